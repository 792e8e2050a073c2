"""Training stage 2, the lesion classifier: from cases with ground truth, or from a reader's reviewed results.

Examples are stage 1's *candidates* (the bundled nnU-Net at the classifier's low cut-off, plus FLAIR-bright
lesions for a QSM + FLAIR model) on cases the network was not trained on, labelled by overlap with the true
PRLs (cases) or by the reader's status (reviewed results: confirmed = PRL, rejected = not; candidates the
reader never saw are left out). The members are LightGBM models, one per patient fold; their out-of-fold
predictions calibrate the ensemble (isotonic) and pick the operating points, whose figures go in the card.

A site adapts the shipped classifier to its scanner by training on the shipped examples
(``training_candidates.csv.gz`` beside the classifier) plus its own reviewed cases: no GPU needed.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.detection.candidates import FEATURE_NAMES, find_case_candidates
from PRLDetectorLib.detection.classifier import (
    CLASSIFIER_DIR,
    LesionClassifier,
    columns_by_name,
    known_measures,
)
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import CANDIDATES_NAME, LESIONS_NAME, atomic_path

logger = logging.getLogger(__name__)

EXAMPLES_NAME = "training_candidates.csv.gz"
"""The classifier's training examples, shipped beside it so that a retrain can add to them."""
LGB_PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 10,
              "feature_fraction": 0.7, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
              "verbose": -1, "num_threads": 1, "deterministic": True, "force_row_wise": True}
ROUNDS = 300
TARGET_SENSITIVE = 0.95
"""The sensitive point keeps at least this share of validation PRL candidates."""
TARGET_SPECIFIC = 0.95
BALANCED_CUTOFF = 0.5
"""The specific point reaches at least this precision on validation candidates (when any cut-off does)."""


@dataclass
class Examples:
    """Labelled candidates: features, label (1 = PRL), the patient each came from, and their weight.

    ``names`` names the feature columns: :data:`FEATURE_NAMES` for candidates measured by this version, fewer
    for examples an earlier version wrote (a shipped classifier's). Added together, examples keep the measures
    both have, so a retrain on a shipped classifier's examples trains on those."""

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    weights: np.ndarray
    names: tuple[str, ...] = FEATURE_NAMES

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls) -> Examples:
        return cls(np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, int), np.zeros(0, object),
                   np.zeros(0))

    def columns(self, names: tuple[str, ...]) -> np.ndarray:
        """The features in the columns ``names`` (each one these examples have)."""
        return columns_by_name(self.features, self.names, names)

    def __add__(self, other: Examples) -> Examples:
        names = self.names
        if other.names != names:
            # No examples yet (Examples.empty()) have no measures to lose; else the measures both have. (The one
            # reader of an earlier version's examples, train-classifier --keep-shipped, says so.)
            theirs = set(other.names)
            names = other.names if not len(self) else tuple(name for name in self.names if name in theirs)
        return Examples(np.concatenate([self.columns(names), other.columns(names)]),
                        np.concatenate([self.labels, other.labels]), np.concatenate([self.groups, other.groups]),
                        np.concatenate([self.weights, other.weights]), names)


def label_candidates(candidate_labels: np.ndarray, true_prls: np.ndarray) -> np.ndarray:
    """1 for each candidate that overlaps a true PRL by at least one voxel (the evaluation's "hit"), else 0."""
    n = int(candidate_labels.max()) if candidate_labels.size else 0
    hit = np.zeros(n, int)
    ids = candidate_labels[(candidate_labels > 0) & (true_prls > 0)]
    hit[np.unique(ids).astype(int) - 1] = 1
    return hit


def true_prl_mask(case: Path, reference: sitk.Image) -> np.ndarray:
    """A case's true PRLs on the QSM grid: ``gt_prl.nii.gz`` (phantoms, exports) or a ``.seg.nrrd`` mask."""
    from PRLDetectorLib.exports.segments import read_mask

    for name in ("gt_prl.nii.gz", "gt_prl.nrrd", "prl_mask.nii.gz", "prl.seg.nrrd"):
        if (case / name).is_file():
            return read_mask(case / name, reference) > 0
    raise InputError(f"Case {case} has no ground truth (gt_prl.nii.gz or prl.seg.nrrd); add the PRL mask.")


def examples_from_candidates(candidate_labels: np.ndarray, features: np.ndarray, truth: np.ndarray,
                             group: str, weight: float = 1.0) -> Examples:
    labels = label_candidates(candidate_labels, truth)
    return Examples(np.asarray(features, np.float32), labels, np.full(len(labels), group, object),
                    np.full(len(labels), float(weight)))


def examples_from_reviewed_result(result: Path, weight: float = 1.0) -> Examples:
    """A reviewed result folder: its candidates that became lesions the reader confirmed (1) or rejected (0)."""
    from PRLDetectorLib.detection.features import read_lesions_csv

    candidates_path = result / CANDIDATES_NAME
    if not candidates_path.is_file():
        raise InputError(f"Result {result} has no {CANDIDATES_NAME} (it was made without the lesion classifier); "
                         "rerun detect with an operating point other than off.")
    statuses = {int(row["lesion_id"]): str(row.get("status", "")).strip().lower()
                for row in read_lesions_csv(result / LESIONS_NAME)}
    rows, labels = [], []
    with candidates_path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [name for name in FEATURE_NAMES if name not in (reader.fieldnames or ())]
        if missing:
            raise InputError(f"{candidates_path} lacks feature column(s) {', '.join(missing[:3])}; it was made "
                             "by another version; rerun detect.")
        for row in reader:
            status = statuses.get(int(row["lesion_id"] or 0), "")
            if status not in ("confirmed", "rejected"):
                continue
            rows.append([float(row[name]) if row[name] else np.nan for name in FEATURE_NAMES])
            labels.append(1 if status == "confirmed" else 0)
    features = np.asarray(rows, np.float32).reshape(-1, len(FEATURE_NAMES))
    return Examples(features, np.asarray(labels, int), np.full(len(labels), result.name, object),
                    np.full(len(labels), float(weight)))


def write_examples(path: Path, examples: Examples) -> None:
    with atomic_path(path) as partial, gzip.open(partial, "wt", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["group", "label", "weight", *examples.names])
        for k in range(len(examples)):
            writer.writerow([examples.groups[k], int(examples.labels[k]), examples.weights[k],
                             *[repr(round(float(v), 6)) if np.isfinite(v) else "" for v in examples.features[k]]])


def read_examples(path: Path) -> Examples:
    """Examples as :func:`write_examples` wrote them, by this version or an earlier one (fewer measures)."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        header = list(reader.fieldnames or ())
        names = tuple(header[3:])
        if header[:3] != ["group", "label", "weight"] or not known_measures(names):
            raise InputError(f"Training examples {path} have other features than this version computes; "
                             "train from cases instead.")
        rows = list(reader)
    features = np.array([[float(r[n]) if r[n] else np.nan for n in names] for r in rows], np.float32)
    return Examples(features.reshape(-1, len(names)), np.array([int(r["label"]) for r in rows]),
                    np.array([r["group"] for r in rows], object), np.array([float(r["weight"]) for r in rows]),
                    names)


def _platt_table(raw: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Platt scaling (a logistic fit on the raw score's logit), tabulated on a fine grid of raw scores so that
    calibration is one monotone interpolation at prediction time. Smooth where isotonic regression on a few
    hundred candidates makes a handful of plateaus (ties that blur the operating points)."""
    from sklearn.linear_model import LogisticRegression

    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p))

    fit = LogisticRegression(C=100.0).fit(logit(raw)[:, None], labels)
    x = np.linspace(0.0, 1.0, 1001)
    y = fit.predict_proba(logit(x)[:, None])[:, 1]
    return x, np.maximum.accumulate(y)


def _figures(probability: np.ndarray, labels: np.ndarray, cutoff: float) -> dict:
    called = probability >= cutoff
    tp = int(np.sum(called & (labels == 1)))
    return {"cutoff": round(float(cutoff), 4), "exact_cutoff": float(cutoff), "candidate_sensitivity": round(tp / max(int(labels.sum()), 1), 4),
            "candidate_precision": round(tp / max(int(called.sum()), 1), 4), "called": int(called.sum()),
            "prl_candidates": int(labels.sum()), "candidates": len(labels)}


def pick_operating_points(probability: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """Cut-offs on calibrated validation probabilities.

    * sensitive: the highest cut-off that keeps ≥ 95 % of the PRL candidates;
    * balanced: 0.5, "more likely a PRL than not" (an F1-best cut-off on a few hundred validation candidates
      moved by ±0.2 between reconstructions left out in turn; a calibrated 0.5 does not depend on that noise);
    * specific: the lowest cut-off with precision ≥ 95 % (or the most precise one that still calls something),
      never below balanced.
    """
    cutoffs = np.unique(np.concatenate([probability, [BALANCED_CUTOFF]]))
    stats = [_figures(probability, labels, c) for c in cutoffs]
    sens = np.array([s["candidate_sensitivity"] for s in stats])
    prec = np.array([s["candidate_precision"] for s in stats])
    sensitive = int(np.max(np.flatnonzero(sens >= TARGET_SENSITIVE))) if np.any(sens >= TARGET_SENSITIVE) else 0
    balanced = int(np.flatnonzero(cutoffs == BALANCED_CUTOFF)[0])
    reaching = np.flatnonzero((prec >= TARGET_SPECIFIC) & (sens > 0))
    specific = int(reaching[0]) if reaching.size else int(np.argmax(np.where(sens > 0, prec, -1)))
    # Presets stay ordered: sensitive ≤ balanced ≤ specific.
    sensitive = min(sensitive, balanced)
    specific = max(specific, balanced)
    return {"sensitive": dict(stats[sensitive]), "balanced": dict(stats[balanced]), "specific": dict(stats[specific])}


def fit_classifier(examples: Examples, folds: int = 5, seed: int = 0, card: dict | None = None,
                   feature_names: tuple[str, ...] | None = None) -> tuple[LesionClassifier, np.ndarray]:
    """Members on patient folds, isotonic calibration and operating points on their out-of-fold predictions.

    Returns the classifier and the calibrated out-of-fold probability of every example. ``feature_names`` names
    the columns of ``examples.features``: by default ``examples.names`` (an experiment may add its own).
    """
    feature_names = tuple(feature_names or examples.names)
    import lightgbm
    from sklearn.model_selection import GroupKFold

    labels = examples.labels
    if len(examples) < 10 or labels.sum() < 2 or (labels == 0).sum() < 2:
        raise InputError(f"{len(examples)} labelled candidates ({int(labels.sum())} PRL) are too few to train a "
                         "lesion classifier; add cases (at least 2 PRLs and 2 other candidates).")
    n_groups = len(np.unique(examples.groups))
    folds = max(2, min(folds, n_groups))
    if n_groups < 2:
        raise InputError("All labelled candidates come from one patient; add cases from other patients.")
    oof = np.zeros(len(labels))
    members = []
    params = dict(LGB_PARAMS)
    # Small sets (a site's first reviews) need smaller leaves.
    params["min_data_in_leaf"] = int(min(LGB_PARAMS["min_data_in_leaf"], max(2, len(labels) // 20)))
    for k, (fit, held) in enumerate(GroupKFold(n_splits=folds).split(examples.features, labels, examples.groups)):
        data = lightgbm.Dataset(examples.features[fit], labels[fit], weight=examples.weights[fit])
        member = lightgbm.train(dict(params, seed=seed + k), data, num_boost_round=ROUNDS)
        oof[held] = member.predict(examples.features[held])
        members.append(member)
    x, y = _platt_table(oof, labels)
    calibrated = np.interp(oof, x, y)
    points = pick_operating_points(calibrated, labels)
    card = {**(card or {}), "members_trained_on": {"examples": len(labels), "prl": int(labels.sum()),
                                                  "patients": int(n_groups), "folds": folds},
            "validation": {"what": "out-of-fold candidates of the training patients (patient folds)", **points}}
    cutoffs = {k: float(v.pop("exact_cutoff")) for k, v in points.items()}
    classifier = LesionClassifier(feature_names, members, x, y, cutoffs, card)
    return classifier, calibrated


def cached_stage1(cache: Path | None, case: Path, model, run) -> tuple[np.ndarray, sitk.Image | None]:
    """Stage 1's probability (and FLAIR channel) for a case, from ``cache/<case>/`` when it holds this model's.

    ``run()`` computes (probability image, FLAIR channel or None) when the cache has nothing valid; the
    result is stored when a cache folder is given. Entries are keyed by the model's checkpoint hash.
    """
    key = str(model.card.get("checkpoint_sha256") or model.name)
    folder = cache / case.name if cache else None
    record = folder / f"stage1_{model.name}.json" if folder else None
    if record is not None and record.is_file():
        info = json.loads(record.read_text(encoding="utf-8"))
        if info.get("checkpoint") == key:
            probability = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"prob_{model.name}.nii.gz")))
            flair = (sitk.ReadImage(str(folder / "flair_on_qsm.nii.gz"), sitk.sitkFloat32)
                     if "flair" in model.channels else None)
            return probability, flair
    probability_image, flair = run()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.Cast(probability_image, sitk.sitkFloat32), str(folder / f"prob_{model.name}.nii.gz"), True)
        if flair is not None:
            sitk.WriteImage(sitk.Cast(flair, sitk.sitkFloat32), str(folder / "flair_on_qsm.nii.gz"), True)
        record.write_text(json.dumps({"checkpoint": key}), encoding="utf-8")
    return sitk.GetArrayFromImage(probability_image), flair


def examples_from_cases(cases: Iterable[Path], model_name: str, candidate_threshold: float = 0.2,
                        candidate_min_mm3: float = 5.0, device: str = "cpu", cache: Path | None = None,
                        progress=None) -> Examples:
    """Run stage 1 on each case (QSM [+ FLAIR] + ground truth), take its candidates, label them by the truth."""
    from PRLDetectorLib.detection.images import read_image, validate_flair, validate_qsm
    from PRLDetectorLib.detection.pipeline import Detector
    from PRLDetectorLib.detection.registration import flair_channel
    from PRLDetectorLib.settings import NO_CLASSIFIER, DetectionSettings

    detector = Detector(DetectionSettings(model=model_name, device=device, operating_point=NO_CLASSIFIER))
    model = detector.model
    flair_wanted = "flair" in model.channels

    def run(case: Path, qsm: sitk.Image) -> tuple[sitk.Image, sitk.Image | None]:
        channels = {"qsm": qsm}
        if flair_wanted:
            flair, _ = validate_flair(read_image(_one(case, "flair"), "FLAIR"))
            channels["flair"], _ = flair_channel(flair, qsm)
        probability = detector.segmenter.predict([channels[c] for c in model.channels])
        return probability, channels.get("flair")

    examples = Examples.empty()
    cases = list(cases)
    for index, case in enumerate(cases):
        qsm, _ = validate_qsm(read_image(_one(case, "qsm"), "QSM"))

        probability, flair = cached_stage1(cache, case, model, lambda case=case, qsm=qsm: run(case, qsm))
        candidates = find_case_candidates(qsm, probability, flair if flair_wanted else None, candidate_threshold,
                                          candidate_min_mm3)
        examples = examples + examples_from_candidates(candidates.labels, candidates.features,
                                                       true_prl_mask(case, qsm), case.name)
        logger.info("%s: %d candidate(s), %d on a true PRL", case.name, candidates.count,
                    int(examples.labels[-candidates.count:].sum()) if candidates.count else 0)
        if progress:
            progress(index + 1, len(cases))
    return examples


def _one(case: Path, role: str) -> Path:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if (case / f"{role}{suffix}").is_file():
            return case / f"{role}{suffix}"
    if (case / role).is_dir():
        return case / role
    raise InputError(f"Case {case} has no {role} image ({role}.nii.gz, .nrrd, .mha or a DICOM folder {role}/).")


def save_classifier(classifier: LesionClassifier, examples: Examples, model_folder: Path) -> Path:
    """Write the classifier (and its training examples) into ``model_folder/classifier``, atomically."""
    target = Path(model_folder) / CLASSIFIER_DIR
    with atomic_path(target, folder=True) as staging:
        classifier.save(staging)
        write_examples(staging / EXAMPLES_NAME, examples)
    return target
