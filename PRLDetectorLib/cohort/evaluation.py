"""Accuracy against ground truth, with the paper's definitions.

* Lesion sensitivity = true PRLs hit by a predicted lesion / all true PRLs.
* Lesion precision = predicted lesions that hit a true PRL / all predicted lesions.
* A "hit" is an overlap of at least ``min_overlap_voxels`` voxels (1 by default) between a predicted
  lesion and a true PRL. A prediction that lands on a rimless lesion or a microbleed hits nothing.
* A patient is positive at cut-off k when they have at least k PRLs (k = 1 in the paper; 4 is also used);
  patient sensitivity and specificity compare the predicted count with the true count at that cut-off.
* Dice is computed per case on the binary masks (NaN when both are empty; such cases are left out of
  the mean) and pooled over all voxels of all cases.
* Two prediction sets are compared as the paper compares its two models: lesion sensitivity on the same
  true PRLs with McNemar's exact test (paired hit flags); lesion precision, whose denominators are each
  model's own predictions and so not paired, with Fisher's exact test; patient classification at ≥ 1 and
  ≥ 4 PRLs with McNemar's exact test on right/wrong calls paired by patient.
* Lesion F1 is the harmonic mean of lesion sensitivity and precision.
* Count agreement compares each patient's predicted PRL count with the true one: Spearman's rho, the
  intraclass correlation ICC(2,1) (two-way random effects, absolute agreement, single rater; Shrout &
  Fleiss 1979), and the mean difference predicted - true with Bland-Altman 95 % limits of agreement.

Proportions are reported with Wilson 95 % confidence intervals, which behave at 0 % and 100 %.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import stats

from PRLDetectorLib.detection.burden import POSITIVE_CUTOFFS
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import LABELS_NAME, LESIONS_NAME

logger = logging.getLogger(__name__)

GT_MASK_NAME = "gt_prl.nii.gz"
GT_INSTANCES_NAME = "gt_instances.nii.gz"
GT_TRUTH_NAME = "truth.json"
PRED_LABELS_NAME = LABELS_NAME
PRL_CLASS = "prl"

_Z95 = 1.959963984540054
_GRID_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Proportion:
    """``successes`` out of ``total``, printed the way the paper prints it: ``72.4 % (147/203)``."""

    successes: int
    total: int

    @property
    def value(self) -> float:
        return self.successes / self.total if self.total else math.nan

    def wilson_ci(self, z: float = _Z95) -> tuple[float, float]:
        """Wilson score interval; (NaN, NaN) when the proportion is undefined (0/0)."""
        if not self.total:
            return (math.nan, math.nan)
        n, p = self.total, self.successes / self.total
        denominator = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denominator
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
        return (max(0.0, centre - half), min(1.0, centre + half))

    def __str__(self) -> str:
        if not self.total:
            return "n/a (0/0)"
        return f"{100 * self.value:.1f} % ({self.successes}/{self.total})"

    def with_ci(self) -> str:
        if not self.total:
            return str(self)
        low, high = self.wilson_ci()
        return f"{self}, 95 % CI {100 * low:.1f}-{100 * high:.1f} %"

    def to_dict(self) -> dict:
        low, high = self.wilson_ci()
        return {
            "value": _json_float(self.value),
            "successes": self.successes,
            "total": self.total,
            "ci95": [_json_float(low), _json_float(high)] if self.total else None,
        }


@dataclass(frozen=True)
class CaseEvaluation:
    """One case: which true PRLs were hit, which predicted lesions hit one, and the voxel overlap."""

    case_id: str
    gt_ids: tuple[int, ...]
    gt_hits: tuple[bool, ...]
    """Per true PRL (same order as ``gt_ids``): hit by some predicted lesion. The pairs for McNemar."""
    pred_ids: tuple[int, ...]
    pred_hits: tuple[bool, ...]
    """Per predicted lesion (same order as ``pred_ids``): hits some true PRL."""
    intersection_voxels: int
    gt_voxels: int
    pred_voxels: int
    min_overlap_voxels: int = 1

    @property
    def gt_count(self) -> int:
        return len(self.gt_ids)

    @property
    def pred_count(self) -> int:
        return len(self.pred_ids)

    @property
    def detected(self) -> int:
        """True PRLs hit (the numerator of lesion sensitivity)."""
        return sum(self.gt_hits)

    @property
    def missed(self) -> int:
        return self.gt_count - self.detected

    @property
    def true_positive_predictions(self) -> int:
        """Predicted lesions that hit a true PRL (the numerator of lesion precision)."""
        return sum(self.pred_hits)

    @property
    def false_positives(self) -> int:
        return self.pred_count - self.true_positive_predictions

    @property
    def dice(self) -> float:
        denominator = self.gt_voxels + self.pred_voxels
        return 2 * self.intersection_voxels / denominator if denominator else math.nan

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "gt_count": self.gt_count,
            "pred_count": self.pred_count,
            "detected": self.detected,
            "false_positives": self.false_positives,
            "dice": _json_float(self.dice),
            "gt_ids": list(self.gt_ids),
            "gt_hits": list(self.gt_hits),
            "pred_ids": list(self.pred_ids),
            "pred_hits": list(self.pred_hits),
            "intersection_voxels": self.intersection_voxels,
            "gt_voxels": self.gt_voxels,
            "pred_voxels": self.pred_voxels,
        }


@dataclass(frozen=True)
class CohortEvaluation:
    """All cases of a test set, with lesion- and patient-level figures pooled over them."""

    cases: tuple[CaseEvaluation, ...]
    min_overlap_voxels: int = 1

    @property
    def lesion_sensitivity(self) -> Proportion:
        return Proportion(sum(c.detected for c in self.cases), sum(c.gt_count for c in self.cases))

    @property
    def lesion_precision(self) -> Proportion:
        return Proportion(
            sum(c.true_positive_predictions for c in self.cases), sum(c.pred_count for c in self.cases)
        )

    def patient_sensitivity(self, cutoff: int = 1) -> Proportion:
        """Patients with ≥ ``cutoff`` true PRLs who are predicted to have ≥ ``cutoff``."""
        positive = [c for c in self.cases if c.gt_count >= cutoff]
        return Proportion(sum(c.pred_count >= cutoff for c in positive), len(positive))

    def patient_specificity(self, cutoff: int = 1) -> Proportion:
        """Patients with fewer than ``cutoff`` true PRLs who are predicted to have fewer."""
        negative = [c for c in self.cases if c.gt_count < cutoff]
        return Proportion(sum(c.pred_count < cutoff for c in negative), len(negative))

    @property
    def lesion_f1(self) -> float:
        """Harmonic mean of lesion sensitivity and precision (NaN when either is undefined)."""
        sensitivity, precision = self.lesion_sensitivity.value, self.lesion_precision.value
        if math.isnan(sensitivity) or math.isnan(precision):
            return math.nan
        return 2 * sensitivity * precision / (sensitivity + precision) if sensitivity + precision else 0.0

    @property
    def false_positives_per_patient(self) -> float:
        return sum(c.false_positives for c in self.cases) / len(self.cases) if self.cases else math.nan

    @property
    def count_agreement(self) -> CountAgreement:
        return count_agreement([c.gt_count for c in self.cases], [c.pred_count for c in self.cases])

    @property
    def mean_dice(self) -> float:
        """Mean of the per-case Dice over the cases where it is defined (NaN if none)."""
        values = [c.dice for c in self.cases if not math.isnan(c.dice)]
        return float(np.mean(values)) if values else math.nan

    @property
    def pooled_dice(self) -> float:
        intersection = sum(c.intersection_voxels for c in self.cases)
        denominator = sum(c.gt_voxels + c.pred_voxels for c in self.cases)
        return 2 * intersection / denominator if denominator else math.nan

    def format_table(self, per_case: bool = True) -> str:
        """A plain-text report: lesion and patient figures, Dice, and (optionally) one line per case."""
        dice_cases = sum(not math.isnan(c.dice) for c in self.cases)
        overlap = f"{self.min_overlap_voxels} voxel" + ("s" if self.min_overlap_voxels != 1 else "")
        rows: list[tuple[str, str]] = [
            ("Lesion sensitivity", self.lesion_sensitivity.with_ci()),
            ("Lesion precision", self.lesion_precision.with_ci()),
        ]
        for cutoff in POSITIVE_CUTOFFS:
            plural = "PRL" if cutoff == 1 else "PRLs"
            rows.append((f"Patient sensitivity (>={cutoff} {plural})", self.patient_sensitivity(cutoff).with_ci()))
            rows.append((f"Patient specificity (>={cutoff} {plural})", self.patient_specificity(cutoff).with_ci()))
        rows.append(("Lesion F1", _format_dice(self.lesion_f1)))
        fp_patients = sum(c.false_positives > 0 for c in self.cases)
        rows.append((
            "False positives per patient",
            f"{self.false_positives_per_patient:.2f} ({fp_patients} of {len(self.cases)} patients have any)"
            if self.cases else "n/a",
        ))
        agreement = self.count_agreement
        rows.append((
            "PRL count, Spearman rho",
            "n/a" if math.isnan(agreement.spearman_rho)
            else f"{agreement.spearman_rho:.3f} ({_format_p(agreement.spearman_p)}, {agreement.n_patients} patients)",
        ))
        rows.append(("PRL count, ICC(2,1)", _format_dice(agreement.icc)))
        low, high = agreement.limits_of_agreement
        rows.append((
            "PRL count, predicted - true",
            "n/a" if math.isnan(agreement.mean_difference) else f"mean {agreement.mean_difference:+.2f}"
            + ("" if math.isnan(low) else f", 95 % limits of agreement {low:+.2f} to {high:+.2f}"),
        ))
        rows.append((f"Dice, mean of {dice_cases} case(s)", _format_dice(self.mean_dice)))
        rows.append(("Dice, pooled", _format_dice(self.pooled_dice)))
        width = max(len(label) for label, _ in rows)
        lines = [f"PRL detection on {len(self.cases)} case(s); a hit is an overlap of at least {overlap}."]
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
        if per_case and self.cases:
            header = ("case", "true PRLs", "detected", "predicted", "false pos.", "Dice")
            table = [header] + [
                (
                    c.case_id, str(c.gt_count), str(c.detected), str(c.pred_count), str(c.false_positives),
                    _format_dice(c.dice),
                )
                for c in self.cases
            ]
            widths = [max(len(row[i]) for row in table) for i in range(len(header))]
            lines.append("")
            for row in table:
                cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
                lines.append("  " + "  ".join(cells))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything in JSON-ready types (NaN becomes null)."""
        return {
            "n_cases": len(self.cases),
            "min_overlap_voxels": self.min_overlap_voxels,
            "lesion_sensitivity": self.lesion_sensitivity.to_dict(),
            "lesion_precision": self.lesion_precision.to_dict(),
            "patient": {
                f"ge{cutoff}": {
                    "sensitivity": self.patient_sensitivity(cutoff).to_dict(),
                    "specificity": self.patient_specificity(cutoff).to_dict(),
                }
                for cutoff in POSITIVE_CUTOFFS
            },
            "lesion_f1": _json_float(self.lesion_f1),
            "false_positives_per_patient": _json_float(self.false_positives_per_patient),
            "count_agreement": self.count_agreement.to_dict(),
            "dice_mean": _json_float(self.mean_dice),
            "dice_pooled": _json_float(self.pooled_dice),
            "cases": [c.to_dict() for c in self.cases],
        }


@dataclass(frozen=True)
class CountAgreement:
    """How well the predicted PRL count of each patient agrees with the true count."""

    n_patients: int
    spearman_rho: float
    spearman_p: float
    icc: float
    """ICC(2,1): two-way random effects, absolute agreement, single rater."""
    mean_difference: float
    """Mean of predicted - true count."""
    limits_of_agreement: tuple[float, float]
    """Bland-Altman: mean difference ± 1.96 standard deviations of the differences."""

    def to_dict(self) -> dict:
        return {
            "n_patients": self.n_patients,
            "spearman_rho": _json_float(self.spearman_rho),
            "spearman_p": _json_float(self.spearman_p),
            "icc_2_1": _json_float(self.icc),
            "mean_difference": _json_float(self.mean_difference),
            "limits_of_agreement": [_json_float(v) for v in self.limits_of_agreement],
        }


def icc_2_1(ratings: np.ndarray) -> float:
    """ICC(2,1) of an (n subjects, k raters) array; NaN when there is no variance to explain."""
    ratings = np.asarray(ratings, dtype=float)
    n, k = ratings.shape
    if n < 2 or k < 2:
        return math.nan
    grand = ratings.mean()
    subject_means, rater_means = ratings.mean(axis=1), ratings.mean(axis=0)
    ms_subjects = k * float(((subject_means - grand) ** 2).sum()) / (n - 1)
    ms_raters = n * float(((rater_means - grand) ** 2).sum()) / (k - 1)
    residual = ratings - subject_means[:, None] - rater_means[None, :] + grand
    ms_error = float((residual**2).sum()) / ((n - 1) * (k - 1))
    denominator = ms_subjects + (k - 1) * ms_error + k * (ms_raters - ms_error) / n
    return (ms_subjects - ms_error) / denominator if denominator > 0 else math.nan


def count_agreement(true_counts: Sequence[int], predicted_counts: Sequence[int]) -> CountAgreement:
    """Spearman, ICC(2,1) and Bland-Altman of per-patient PRL counts (NaN where undefined)."""
    true = np.asarray(true_counts, dtype=float)
    predicted = np.asarray(predicted_counts, dtype=float)
    n = int(true.size)
    rho = p_value = math.nan
    if n >= 3 and np.ptp(true) > 0 and np.ptp(predicted) > 0:
        rho, p_value = (float(v) for v in stats.spearmanr(true, predicted))
    differences = predicted - true
    mean = float(differences.mean()) if n else math.nan
    spread = 1.959963984540054 * float(differences.std(ddof=1)) if n > 1 else math.nan
    return CountAgreement(
        n_patients=n, spearman_rho=rho, spearman_p=p_value, icc=icc_2_1(np.stack([true, predicted], axis=1)),
        mean_difference=mean, limits_of_agreement=(mean - spread, mean + spread),
    )


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's exact test on paired hit flags.

    ``b`` counts pairs that A hit and B missed, ``c`` pairs that B hit and A missed; the two-sided p value
    is the exact binomial probability of a split at least as uneven as ``b`` : ``c`` under p = 1/2.
    """

    b: int
    c: int
    n_pairs: int
    p_value: float
    outcome: str = "hit"
    """What a success is, for the printout: "hit" (a lesion) or "right" (a patient's classification)."""
    pairs: str = "paired lesions"

    def __str__(self) -> str:
        return (
            f"{self.b} {self.outcome} by A only, {self.c} by B only, of {self.n_pairs} {self.pairs}; "
            f"exact two-sided p = {self.p_value:.4g}"
        )

    def to_dict(self) -> dict:
        return {"b": self.b, "c": self.c, "n_pairs": self.n_pairs, "p_value": self.p_value, "pairs": self.pairs}


@dataclass(frozen=True)
class ProportionComparison:
    """Two proportions over different items (A's and B's own predicted lesions): Fisher's exact test."""

    a: Proportion
    b: Proportion
    p_value: float

    def __str__(self) -> str:
        return f"A {self.a} against B {self.b}; Fisher's exact two-sided p = {self.p_value:.4g}"

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "p_value": self.p_value}


def compare_proportions(a: Proportion, b: Proportion) -> ProportionComparison:
    """Fisher's exact test of two independent proportions (p = 1 when either is 0/0)."""
    if not a.total or not b.total:
        return ProportionComparison(a, b, 1.0)
    table = [[a.successes, a.total - a.successes], [b.successes, b.total - b.successes]]
    return ProportionComparison(a, b, float(stats.fisher_exact(table)[1]))


@dataclass(frozen=True)
class EvaluationComparison:
    """Model A against model B on the same ground truth, the tests of the paper.

    Lesion sensitivity is compared on the same true PRLs (McNemar, paired); lesion precision over each
    model's own predicted lesions, which are not the same lesions (Fisher's exact test); patient
    classification at each cut-off on the same patients (McNemar on right/wrong per patient).
    """

    lesion_sensitivity: McNemarResult
    lesion_precision: ProportionComparison
    patient_classification: dict[int, McNemarResult]

    def format_table(self) -> str:
        lines = [
            f"  Lesion sensitivity (McNemar):  {self.lesion_sensitivity}",
            f"  Lesion precision (Fisher):     {self.lesion_precision}",
        ]
        for cutoff, result in self.patient_classification.items():
            label = f"Patients, >={cutoff} {'PRL' if cutoff == 1 else 'PRLs'} (McNemar):"
            lines.append(f"  {label:<30} {result}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "lesion_sensitivity_mcnemar": self.lesion_sensitivity.to_dict(),
            "lesion_precision_fisher": self.lesion_precision.to_dict(),
            "patient_classification_mcnemar": {f"ge{k}": v.to_dict() for k, v in self.patient_classification.items()},
        }


def compare_patient_classification(eval_a: CohortEvaluation, eval_b: CohortEvaluation, cutoff: int = 1) -> McNemarResult:
    """McNemar's test of right/wrong PRL-positive calls (≥ ``cutoff`` PRLs), paired by patient."""
    cases_a = {c.case_id: c for c in eval_a.cases}
    cases_b = {c.case_id: c for c in eval_b.cases}
    if cases_a.keys() != cases_b.keys():
        differing = sorted(cases_a.keys() ^ cases_b.keys())[0]
        raise InputError(
            f"The two evaluations cover different patients ('{differing}' is in only one); evaluate both "
            "prediction sets on the same patients."
        )
    keys = sorted(cases_a)

    def right(case: CaseEvaluation) -> bool:
        return (case.pred_count >= cutoff) == (case.gt_count >= cutoff)

    result = mcnemar([right(cases_a[k]) for k in keys], [right(cases_b[k]) for k in keys])
    return McNemarResult(result.b, result.c, result.n_pairs, result.p_value, outcome="right", pairs="patients")


def compare_evaluations(eval_a: CohortEvaluation, eval_b: CohortEvaluation) -> EvaluationComparison:
    """Every comparison of the paper between two prediction sets on the same ground truth."""
    return EvaluationComparison(
        lesion_sensitivity=compare_lesion_detection(eval_a, eval_b),
        lesion_precision=compare_proportions(eval_a.lesion_precision, eval_b.lesion_precision),
        patient_classification={k: compare_patient_classification(eval_a, eval_b, k) for k in POSITIVE_CUTOFFS},
    )


def evaluate_case(
    gt_labels: np.ndarray,
    pred_labels: np.ndarray,
    *,
    case_id: str = "case",
    min_overlap_voxels: int = 1,
) -> CaseEvaluation:
    """Match the predicted lesions of one case against its true PRLs.

    Both inputs are instance maps on the same grid (0 background, one id per lesion); a binary mask
    counts as one lesion, so split it first (:func:`PRLDetectorLib.detection.lesions.find_lesions`).
    """
    gt_labels, pred_labels = np.asarray(gt_labels), np.asarray(pred_labels)
    if gt_labels.shape != pred_labels.shape:
        raise InputError(
            f"Case '{case_id}': ground truth {gt_labels.shape} and prediction {pred_labels.shape} differ in "
            "shape; put both on the same grid."
        )
    if min_overlap_voxels < 1:
        raise InputError(f"Minimum overlap {min_overlap_voxels} is below one voxel; use 1 or more.")

    gt_foreground, pred_foreground = gt_labels != 0, pred_labels != 0
    both = gt_foreground & pred_foreground
    gt_ids = np.unique(gt_labels[gt_foreground])
    pred_ids = np.unique(pred_labels[pred_foreground])
    # Overlap of every (true, predicted) pair that overlaps at all, from the shared voxels only.
    pairs, overlap = np.unique(
        np.stack([gt_labels[both].astype(np.int64), pred_labels[both].astype(np.int64)]), axis=1, return_counts=True
    )
    hitting = pairs[:, overlap >= min_overlap_voxels]
    return CaseEvaluation(
        case_id=case_id,
        gt_ids=tuple(int(i) for i in gt_ids),
        gt_hits=tuple(bool(h) for h in np.isin(gt_ids, hitting[0])),
        pred_ids=tuple(int(i) for i in pred_ids),
        pred_hits=tuple(bool(h) for h in np.isin(pred_ids, hitting[1])),
        intersection_voxels=int(np.count_nonzero(both)),
        gt_voxels=int(np.count_nonzero(gt_foreground)),
        pred_voxels=int(np.count_nonzero(pred_foreground)),
        min_overlap_voxels=min_overlap_voxels,
    )


def evaluate_folders(
    gt_dir: Path, pred_dir: Path, *, min_overlap_voxels: int = 1, skip_missing: bool = False,
    min_rim_coverage: float = 0.0,
) -> CohortEvaluation:
    """Evaluate every case of ``gt_dir`` against the prediction of the same name in ``pred_dir``.

    ``gt_dir`` holds one folder per case with ``gt_prl.nii.gz`` (binary PRL mask) and optionally
    ``gt_instances.nii.gz`` (lesion ids) with ``truth.json`` (the class of each id); ``pred_dir`` holds
    folders of the same names with ``prl_labels.nii.gz``. Either may also be a single case folder.
    A case with ground truth but no prediction is an input error, or with ``skip_missing`` left out with a
    warning (a batch report over the patients that did not fail).

    ``min_rim_coverage`` > 0 scores only the predicted lesions that ``detect --min-rim-coverage`` keeps
    (``paramagnetic_edge_fraction`` of the result's ``lesions.csv`` at least that), without rerunning the
    network.
    """
    from PRLDetectorLib.settings import check_rim_coverage

    check_rim_coverage(min_rim_coverage)
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for what, folder in (("ground-truth", gt_dir), ("prediction", pred_dir)):
        if not folder.is_dir():
            raise InputError(f"The {what} folder {folder} does not exist; pass an existing folder.")

    if (gt_dir / GT_MASK_NAME).is_file():
        pred_case = pred_dir if (pred_dir / PRED_LABELS_NAME).is_file() else pred_dir / gt_dir.name
        pairs = [(gt_dir.name, gt_dir, pred_case)]
    else:
        gt_cases = sorted(p for p in gt_dir.iterdir() if (p / GT_MASK_NAME).is_file())
        if not gt_cases:
            raise InputError(
                f"The ground-truth folder {gt_dir} has no case with {GT_MASK_NAME}; pass a case folder or "
                "a folder of case folders."
            )
        pairs = [(p.name, p, pred_dir / p.name) for p in gt_cases]
        extra = sorted(
            p.name for p in pred_dir.iterdir()
            if (p / PRED_LABELS_NAME).is_file() and not (gt_dir / p.name / GT_MASK_NAME).is_file()
        )
        if extra:
            logger.warning("Predictions without ground truth are ignored: %s.", ", ".join(extra))

    unpredicted = [case_id for case_id, _, pred_case in pairs if not (pred_case / PRED_LABELS_NAME).is_file()]
    if skip_missing and unpredicted:
        logger.warning("Cases with ground truth but no prediction are left out: %s.", ", ".join(unpredicted))
        pairs = [pair for pair in pairs if pair[0] not in unpredicted]
    for case_id, _, pred_case in pairs:
        if not (pred_case / PRED_LABELS_NAME).is_file():
            raise InputError(
                f"Case '{case_id}' has ground truth but no {PRED_LABELS_NAME} in {pred_case}; run detection "
                "on it or remove it from the ground-truth folder."
            )
    cases = tuple(
        _evaluate_case_folder(case_id, gt_case, pred_case, min_overlap_voxels, min_rim_coverage)
        for case_id, gt_case, pred_case in pairs
    )
    return CohortEvaluation(cases=cases, min_overlap_voxels=min_overlap_voxels)


def mcnemar(a_hits: Sequence[bool], b_hits: Sequence[bool]) -> McNemarResult:
    """McNemar's exact test: do A and B detect the same lesions equally often?"""
    a, b = np.asarray(a_hits, dtype=bool), np.asarray(b_hits, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(
            f"McNemar's test needs one flag per lesion from each method, got {a.size} and {b.size}; "
            "pass flags for the same lesions."
        )
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    discordant = only_a + only_b
    p_value = min(1.0, 2 * float(stats.binom.cdf(min(only_a, only_b), discordant, 0.5))) if discordant else 1.0
    return McNemarResult(b=only_a, c=only_b, n_pairs=int(a.size), p_value=p_value)


def compare_lesion_detection(
    eval_a: CohortEvaluation | CaseEvaluation, eval_b: CohortEvaluation | CaseEvaluation
) -> McNemarResult:
    """McNemar's test of lesion detection between two prediction sets on the same true PRLs.

    Lesions are paired by (case, ground-truth id), so both evaluations must cover the same ground truth.
    """
    flags_a, flags_b = _hits_by_lesion(eval_a), _hits_by_lesion(eval_b)
    if flags_a.keys() != flags_b.keys():
        differing = sorted(flags_a.keys() ^ flags_b.keys())[0]
        raise InputError(
            f"The two evaluations cover different true PRLs (case '{differing[0]}', lesion {differing[1]} is "
            "in only one); evaluate both prediction sets against the same ground truth."
        )
    keys = sorted(flags_a)
    return mcnemar([flags_a[k] for k in keys], [flags_b[k] for k in keys])


def _hits_by_lesion(evaluation: CohortEvaluation | CaseEvaluation) -> dict[tuple[str, int], bool]:
    cases = evaluation.cases if isinstance(evaluation, CohortEvaluation) else (evaluation,)
    return {
        (case.case_id, gt_id): hit
        for case in cases
        for gt_id, hit in zip(case.gt_ids, case.gt_hits, strict=True)
    }


def _evaluate_case_folder(
    case_id: str, gt_case: Path, pred_case: Path, min_overlap_voxels: int, min_rim_coverage: float = 0.0
) -> CaseEvaluation:
    gt_image = _read(gt_case / GT_MASK_NAME, case_id)
    gt_mask = sitk.GetArrayViewFromImage(gt_image) != 0
    gt_labels = _ground_truth_labels(case_id, gt_case, gt_image, gt_mask)

    pred_image = _read(pred_case / PRED_LABELS_NAME, case_id)
    _check_same_grid(case_id, gt_image, pred_image, PRED_LABELS_NAME)
    pred_labels = _integer_labels(sitk.GetArrayFromImage(pred_image), case_id, PRED_LABELS_NAME)
    if pred_labels.size and pred_labels.max() <= 1:
        # A binary prediction is a mask, not instances: split it the way detection does.
        pred_labels = cc3d.connected_components(pred_labels, connectivity=26)
    if min_rim_coverage > 0:
        pred_labels[np.isin(pred_labels, _rimless_ids(case_id, pred_case, min_rim_coverage))] = 0
    evaluation = evaluate_case(gt_labels, pred_labels, case_id=case_id, min_overlap_voxels=min_overlap_voxels)
    logger.info(
        "%s: %d/%d true PRL(s) detected, %d false positive(s), Dice %.3f",
        case_id, evaluation.detected, evaluation.gt_count, evaluation.false_positives, evaluation.dice,
    )
    return evaluation


def _rimless_ids(case_id: str, pred_case: Path, min_rim_coverage: float) -> list[int]:
    from PRLDetectorLib.detection.features import read_lesions_csv, rim_covers

    table = pred_case / LESIONS_NAME
    if not table.is_file():
        raise InputError(f"Case '{case_id}' has no lesions.csv in {pred_case}, which the rim check needs; "
                         "evaluate a prl-detect result or leave out --min-rim-coverage.")
    rows = read_lesions_csv(table)
    return [int(row["lesion_id"]) for row in rows if not rim_covers(row["paramagnetic_edge_fraction"], min_rim_coverage)]


def _ground_truth_labels(case_id: str, gt_case: Path, gt_image: sitk.Image, gt_mask: np.ndarray) -> np.ndarray:
    """True PRL instances: the phantom's own ids when it has them, so touching PRLs stay apart."""
    instances_path = gt_case / GT_INSTANCES_NAME
    if not instances_path.is_file():
        return cc3d.connected_components(gt_mask, connectivity=26)

    instances_image = _read(instances_path, case_id)
    _check_same_grid(case_id, gt_image, instances_image, GT_INSTANCES_NAME)
    instances = _integer_labels(sitk.GetArrayFromImage(instances_image), case_id, GT_INSTANCES_NAME)
    truth_path = gt_case / GT_TRUTH_NAME
    if not truth_path.is_file():
        # Without classes, the PRL mask says which instances are PRLs.
        return np.where(gt_mask, instances, 0)
    try:
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
        prl_ids = [int(lesion["id"]) for lesion in truth["lesions"] if lesion.get("class") == PRL_CLASS]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"Case '{case_id}': {truth_path} is not a phantom truth file ({error}); it needs "
            '"lesions": [{"id": ..., "class": ...}].'
        ) from None
    labels = np.where(np.isin(instances, prl_ids), instances, 0)
    if np.count_nonzero(labels) != np.count_nonzero(gt_mask):
        logger.warning(
            "%s: the PRL instances of %s cover %d voxels but %s has %d; the instances are used.",
            case_id, GT_INSTANCES_NAME, np.count_nonzero(labels), GT_MASK_NAME, np.count_nonzero(gt_mask),
        )
    return labels


def _read(path: Path, case_id: str) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"Case '{case_id}': {path} cannot be read as an image; replace it with a NIfTI file.") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"Case '{case_id}': {path} is not a 3D scalar image; write a 3D label map.")
    return image


def _check_same_grid(case_id: str, reference: sitk.Image, image: sitk.Image, name: str) -> None:
    same = (
        reference.GetSize() == image.GetSize()
        and np.allclose(reference.GetSpacing(), image.GetSpacing(), atol=_GRID_TOLERANCE)
        and np.allclose(reference.GetOrigin(), image.GetOrigin(), atol=_GRID_TOLERANCE)
        and np.allclose(reference.GetDirection(), image.GetDirection(), atol=_GRID_TOLERANCE)
    )
    if not same:
        raise InputError(
            f"Case '{case_id}': {name} (size {image.GetSize()}, spacing {_rounded(image.GetSpacing())}, origin "
            f"{_rounded(image.GetOrigin())}) is not on the ground-truth grid (size {reference.GetSize()}, "
            f"spacing {_rounded(reference.GetSpacing())}, origin {_rounded(reference.GetOrigin())}); resample "
            "it onto the ground-truth grid."
        )


def _integer_labels(array: np.ndarray, case_id: str, name: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
            raise InputError(f"Case '{case_id}': {name} holds negative ids; use 0 for background and 1..n for lesions.")
        return array
    rounded = np.rint(array)
    if not np.array_equal(rounded, array) or (array.size and rounded.min() < 0):
        raise InputError(f"Case '{case_id}': {name} holds fractional or negative values; write integer lesion ids.")
    return rounded.astype(np.uint32)


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, 3) for v in values)


def _format_p(value: float) -> str:
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"


def _format_dice(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
