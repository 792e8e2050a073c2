"""How well a comparison agrees with a phantom's change truth (``visits.json``), and how well it registered.

A *truth event* is one PRL of the truth's interval: each PRL of the earlier visit (persisting, enlarging,
resolved, disappeared, not imaged) and each new one. A comparison row is tied to the truth lesions its
result lesions lie on (by overlap with each visit's ``gt_instances``); an event is found by the row that holds
its lesion (the baseline side for an earlier PRL, else the follow-up side).

Per change class: sensitivity = events of the class whose row says that class / events of the class (an event
no row holds counts as missed); precision = rows saying the class whose truth is that class / rows saying it
(a row on no true PRL has the truth ``none``).

Registration error: the mean distance, over the baseline brain, between where the recorded registration and
where the phantom's true head motion put each point.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.changes import CHANGE_CLASSES, NEW
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.longitudinal.outputs import CHANGES_JSON
from PRLDetectorLib.results import BURDEN_NAME, LABELS_NAME

NONE = "none"
"""The truth of a row that lies on no true PRL."""


@dataclass
class PairScore:
    """One comparison against its phantom truth."""

    patient: str
    events: list[tuple[str, str]] = field(default_factory=list)
    """(true class, called class) per truth event; called ``missed`` when no row holds it."""
    rows: list[tuple[str, str]] = field(default_factory=list)
    """(called class, true class) per comparison row."""
    registration_error_mm: float = float("nan")
    registration_error_max_mm: float = float("nan")


def _ids(text: str | None) -> list[int]:
    return [int(v) for v in str(text or "").split(";") if v.strip()]


def _truth_of(labels: np.ndarray, truth: np.ndarray) -> dict[int, int]:
    """Result lesion id → the truth lesion it overlaps most (lesions on no truth lesion are left out)."""
    both = (labels > 0) & (truth > 0)
    pairs = Counter(zip(labels[both].tolist(), truth[both].tolist(), strict=True))
    best: dict[int, tuple[int, int]] = {}
    for (lesion, true_id), count in pairs.items():
        if count > best.get(lesion, (0, 0))[0]:
            best[lesion] = (count, true_id)
    return {lesion: true_id for lesion, (_, true_id) in best.items()}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def score_pair(comparison_dir: Path, patient_dir: Path, interval: int = 0) -> PairScore:
    """Score ``comparison_dir`` (a ``longitudinal`` output) against the phantom patient folder of ``visits.json``."""
    comparison_dir, patient_dir = Path(comparison_dir), Path(patient_dir)
    record = json.loads((comparison_dir / CHANGES_JSON).read_text(encoding="utf-8"))
    visits = json.loads((patient_dir / "visits.json").read_text(encoding="utf-8"))
    truth = visits["intervals"][interval]
    folders = {v["visit"]: v["folder"] for v in visits["visits"]}
    results = [Path(record["baseline"]["result"]), Path(record["followup"]["result"])]
    for result in results:
        if not (result / LABELS_NAME).is_file():
            raise InputError(f"The comparison's result '{result}' is gone; score it where it was made.")
    gts = [_array(patient_dir / folders[truth[key]] / "gt_instances.nii.gz") for key in ("from_visit", "to_visit")]
    base_truth, follow_truth = (_truth_of(_array(r / LABELS_NAME), g) for r, g in zip(results, gts, strict=True))
    true_class = {c["lesion_id"]: c["class"] for c in truth["changes"]}
    new_ids = {i for i, c in true_class.items() if c == NEW}

    score = PairScore(patient_dir.name)
    holder: dict[int, str] = {}
    for row in record["changes"]:
        base = [base_truth[i] for i in _ids(row["baseline_ids"]) if i in base_truth]
        follow = [follow_truth[i] for i in _ids(row["followup_ids"]) if i in follow_truth]
        earlier = [i for i in base + follow if i in true_class and i not in new_ids]
        later = [i for i in follow if i in new_ids]
        tied = earlier or later
        score.rows.append((row["change"], true_class[tied[0]] if tied else NONE))
        for true_id in earlier + later:
            holder.setdefault(true_id, row["change"])
    score.events = [(cls, holder.get(true_id, "missed")) for true_id, cls in true_class.items()]

    motion = np.array(truth["head_motion"]["baseline_to_followup_lps"])
    found = np.array(record["registration"]["baseline_to_followup_lps"])
    baseline_qsm = json.loads((results[0] / BURDEN_NAME).read_text(encoding="utf-8"))["inputs"]["qsm"]["path"]
    errors = _registration_errors(sitk.ReadImage(str(baseline_qsm)), found, motion)
    score.registration_error_mm, score.registration_error_max_mm = float(errors.mean()), float(errors.max())
    return score


def _registration_errors(qsm: sitk.Image, found: np.ndarray, truth: np.ndarray, samples: int = 20000) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayViewFromImage(qsm) != 0)[:, ::-1]
    index = index[:: max(1, len(index) // samples)]
    direction = np.array(qsm.GetDirection()).reshape(3, 3)
    points = np.array(qsm.GetOrigin()) + (index * np.array(qsm.GetSpacing())) @ direction.T
    homogeneous = np.c_[points, np.ones(len(points))]
    return np.linalg.norm(homogeneous @ (found - truth).T, axis=1)


@dataclass
class ClassFigures:
    change: str
    true_events: int
    found_events: int
    called_rows: int
    right_rows: int

    @property
    def sensitivity(self) -> float:
        return self.found_events / self.true_events if self.true_events else float("nan")

    @property
    def precision(self) -> float:
        return self.right_rows / self.called_rows if self.called_rows else float("nan")


def class_figures(scores: list[PairScore]) -> list[ClassFigures]:
    events = [e for s in scores for e in s.events]
    rows = [r for s in scores for r in s.rows]
    return [ClassFigures(cls, sum(t == cls for t, _ in events), sum(t == cls and c == cls for t, c in events),
                         sum(c == cls for c, _ in rows), sum(c == cls and t == cls for c, t in rows))
            for cls in CHANGE_CLASSES]


def confusion(scores: list[PairScore]) -> dict[str, Counter]:
    """True class → Counter of called classes, over every truth event."""
    out: dict[str, Counter] = {}
    for true, called in (e for s in scores for e in s.events):
        out.setdefault(true, Counter())[called] += 1
    return out


def format_table(scores: list[PairScore]) -> str:
    """The README's per-class table (markdown) and the registration line."""
    def cell(numerator: int, denominator: int) -> str:
        return f"{100 * numerator / denominator:.1f} % ({numerator}/{denominator})" if denominator else "–"

    lines = ["| change | true PRLs | sensitivity | precision |", "|---|---|---|---|"]
    for figures in class_figures(scores):
        if figures.true_events or figures.called_rows:
            lines.append(f"| {figures.change} | {figures.true_events} | "
                         f"{cell(figures.found_events, figures.true_events)} | "
                         f"{cell(figures.right_rows, figures.called_rows)} |")
    errors = np.array([s.registration_error_mm for s in scores])
    worst = np.array([s.registration_error_max_mm for s in scores])
    lines.append("")
    lines.append(f"Registration error over the baseline brain ({len(scores)} pairs): median of the mean "
                 f"{np.median(errors):.2f} mm (range {errors.min():.2f}-{errors.max():.2f} mm); largest single-point "
                 f"error {worst.max():.2f} mm.")
    return "\n".join(lines)
