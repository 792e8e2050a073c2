"""Stage 1 alone against stage 1 + 2, both bundled models, on a held-out acquisition variant.

The test set is made by ``evaluate_stage2.sh`` (a reconstruction the classifiers never saw). Stage 1 (the
network) runs once per case and model and is kept in ``WORK/test_s1`` (the same cache ``prl-detect
train-classifier --stage1-cache`` keeps); every operating point then re-decides from it with the library's
own ``Detector.lesions_from_probability``, and the results are written and scored exactly as ``detect`` and
``evaluate`` write and score them.

Usage: .venv/bin/python Testing/Scripts/evaluate_stage2.py WORK [--models qsm qsm_flair] [--write-cards]
  A model is a bundled name or LABEL=FOLDER (a model folder not yet installed, e.g. a retrained one); its
  results go to WORK/pred/LABEL_<point>, and --write-cards writes its card (the bundled model's, or FOLDER's).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from sklearn.metrics import average_precision_score
from tqdm import tqdm

from PRLDetectorLib.cohort.evaluation import (
    CaseEvaluation,
    CohortEvaluation,
    compare_evaluations,
    evaluate_folders,
)
from PRLDetectorLib.detection.burden import compute_burden
from PRLDetectorLib.detection.images import read_image, validate_flair, validate_qsm
from PRLDetectorLib.detection.pipeline import DetectionResult, Detector, write_result
from PRLDetectorLib.detection.registration import flair_channel
from PRLDetectorLib.results import CANDIDATES_NAME
from PRLDetectorLib.settings import NO_CLASSIFIER, DetectionSettings
from PRLDetectorLib.training.classifier import cached_stage1, label_candidates, true_prl_mask

REPO = Path(__file__).resolve().parents[2]
MODES = (NO_CLASSIFIER, "sensitive", "balanced", "specific")
TITLES = {"qsm": "QSM only", "qsm_flair": "QSM + FLAIR"}


def predict(work: Path, label: str, folder: str, mode: str, cases: list[Path]) -> Path:
    out = work / "pred" / f"{label}_{mode}"
    detector = Detector(DetectionSettings(model=folder or label, device="cpu", operating_point=mode))
    for case in tqdm(cases, desc=f"{label} {mode}", unit="case"):
        if (out / case.name / "burden.json").is_file():
            continue
        qsm, _ = validate_qsm(read_image(case / "qsm.nii.gz", "QSM"))

        def run(case=case, qsm=qsm):
            channels = {"qsm": qsm}
            if "flair" in detector.model.channels:
                flair, _ = validate_flair(read_image(case / "flair.nii.gz", "FLAIR"))
                channels["flair"], _ = flair_channel(flair, qsm)
            return detector.segmenter.predict([channels[c] for c in detector.model.channels]), channels.get("flair")

        probability, flair = cached_stage1(work / "test_s1", case, detector.model, run)
        probability_image = sitk.GetImageFromArray(probability)
        probability_image.CopyInformation(qsm)
        started = time.perf_counter()
        labels, lesions, stage2 = detector.lesions_from_probability(qsm, probability_image, flair)
        labels_image = sitk.GetImageFromArray(labels.astype(np.uint16))
        labels_image.CopyInformation(qsm)
        result = DetectionResult(labels_image, probability_image, lesions, compute_burden(lesions), detector.model,
                                 detector.settings, stage2=stage2,
                                 timings={"lesions_s": time.perf_counter() - started})
        write_result(result, out / case.name, {"qsm": case / "qsm.nii.gz"})
    return out


def pr_auc(work: Path, pred: Path, cases: list[Path]) -> tuple[dict, list]:
    """Candidate-level PR-AUC (each candidate labelled by overlap with a true PRL) and stage 1's coverage; and, per
    case, what :func:`cutoff_sweep` needs (read here once, with the candidate maps)."""
    scores, labels, covered, total = [], [], 0, 0
    per_case = []
    for case in cases:
        qsm = sitk.ReadImage(str(case / "qsm.nii.gz"))
        truth = json.loads((case / "truth.json").read_text(encoding="utf-8"))
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "gt_instances.nii.gz")))
        prl_ids = [lesion["id"] for lesion in truth["lesions"] if lesion["class"] == "prl"]
        total += len(prl_ids)
        with (pred / case.name / CANDIDATES_NAME).open(encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        # The candidate map is not written; rebuild it from the cached stage-1 map as detect made it.
        candidates = _candidate_labels(work, pred, case, qsm)
        hit = label_candidates(candidates, true_prl_mask(case, qsm))
        chances, on_prl = np.array([float(r["prl_probability"]) for r in rows]), hit[: len(rows)]
        scores += list(chances)
        labels += list(on_prl)
        covered += sum(1 for i in prl_ids if np.any(candidates[instances == i] > 0))
        # Which candidates touch each true PRL: a called candidate is one lesion (stage 2 keeps it whole).
        touching = [set(np.unique(candidates[(instances == i) & (candidates > 0)]).tolist()) for i in prl_ids]
        per_case.append((case.name, touching, on_prl, chances))
    return {"pr_auc": round(float(average_precision_score(labels, scores)), 3) if any(labels) else None,
            "candidates": len(labels), "prl_candidates": int(sum(labels)),
            "true_prls_with_a_candidate": f"{covered}/{total}"}, per_case


def cutoff_sweep(per_case: list) -> list[dict]:
    """Lesion sensitivity / precision and patient sensitivity / specificity (≥ 1) at every cut-off 0.05-0.95 (step
    0.01): whether any single cut-off would have met all four targets on this set (an oracle, not a method).
    Each cut-off's calls are scored by the library's own :class:`CohortEvaluation`, as ``evaluate`` scores a
    result (a called candidate is one lesion; a true PRL is hit when a called candidate touches it)."""

    def value(proportion, empty: float) -> float:
        return proportion.value if proportion.total else empty

    rows = []
    for cutoff in np.round(np.arange(0.05, 0.951, 0.01), 2):
        cases = []
        for name, touching, on_prl, probability in per_case:
            chosen = (np.flatnonzero(probability >= cutoff) + 1).tolist()
            called = set(chosen)
            cases.append(CaseEvaluation(name, tuple(range(1, len(touching) + 1)),
                                        tuple(bool(ids & called) for ids in touching),
                                        tuple(chosen), tuple(bool(on_prl[k - 1]) for k in chosen), 0, 0, 0))
        cohort = CohortEvaluation(tuple(cases))
        # Nothing called is precision 1 (no false call), an empty class 0: as this sweep has always counted.
        figures = {"cutoff": float(cutoff), "lesion_sensitivity": value(cohort.lesion_sensitivity, 0.0),
                   "lesion_precision": value(cohort.lesion_precision, 1.0),
                   "patient_sensitivity": value(cohort.patient_sensitivity(), 0.0),
                   "patient_specificity": value(cohort.patient_specificity(), 0.0)}
        figures["meets_targets"] = bool(figures["lesion_sensitivity"] >= 0.9 and figures["lesion_precision"] >= 0.9
                                        and figures["patient_sensitivity"] == 1.0
                                        and figures["patient_specificity"] >= 0.9)
        rows.append(figures)
    return rows


def _candidate_labels(work: Path, pred: Path, case: Path, qsm: sitk.Image) -> np.ndarray:
    from PRLDetectorLib.detection.candidates import find_case_candidates
    from PRLDetectorLib.detection.classifier import model_classifier

    record = json.loads((pred / case.name / "burden.json").read_text(encoding="utf-8"))
    model = record["model"]
    classifier = model_classifier(model["path"])
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "test_s1" / case.name / f"prob_{model['name']}.nii.gz")))
    flair = None
    if classifier.flair_candidates:
        flair = sitk.ReadImage(str(work / "test_s1" / case.name / "flair_on_qsm.nii.gz"), sitk.sitkFloat32)
    qsm_float = sitk.Cast(qsm, sitk.sitkFloat32)
    return find_case_candidates(qsm_float, probability, flair, classifier.candidate_threshold,
                                classifier.candidate_min_mm3).labels


def _cell(p: dict) -> str:
    if not p["total"]:
        return "n/a"
    low, high = p["ci95"] or (None, None)
    ci = f" [{100 * low:.0f}–{100 * high:.0f}]" if low is not None else ""
    return f"{100 * p['value']:.1f} % ({p['successes']}/{p['total']}){ci}"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--models", nargs="+", default=["qsm", "qsm_flair"])
    parser.add_argument("--write-cards", action="store_true")
    args = parser.parse_args()
    cases = sorted(p for p in (args.work / "test").iterdir() if (p / "truth.json").is_file())
    figures: dict = {}
    labels = dict(model.partition("=")[::2] for model in args.models)  # label → model folder ("": bundled)
    for label, folder in labels.items():
        evaluations = {}
        for mode in MODES:
            pred = predict(args.work, label, folder, mode, cases)
            evaluations[mode] = evaluate_folders(args.work / "test", pred)
        figures[label] = {mode: evaluations[mode].to_dict() for mode in MODES}
        figures[label]["pr_auc"], per_case = pr_auc(args.work, args.work / "pred" / f"{label}_sensitive", cases)
        figures[label]["cutoff_sweep"] = cutoff_sweep(per_case)
        figures[label]["mcnemar_vs_stage1"] = {
            mode: compare_evaluations(evaluations[NO_CLASSIFIER], evaluations[mode]).to_dict() for mode in MODES[1:]}
    (args.work / "evaluation_stage2.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print("| model | stage 2 | lesion sensitivity | lesion precision | patient sensitivity (≥ 1) | "
          "patient specificity (≥ 1) | FP / patient |")
    print("|---|---|---|---|---|---|---|")
    for model in labels:
        for mode in MODES:
            e = figures[model][mode]
            patient = e["patient"]["ge1"]
            print(f"| {TITLES.get(model, model)} | {'network alone (today)' if mode == NO_CLASSIFIER else mode} | "
                  f"{_cell(e['lesion_sensitivity'])} | {_cell(e['lesion_precision'])} | "
                  f"{_cell(patient['sensitivity'])} | {_cell(patient['specificity'])} | "
                  f"{e['false_positives_per_patient']:.2f} |")
    for model in labels:
        sweep = figures[model]["cutoff_sweep"]
        print(f"\n{model}: candidates {json.dumps(figures[model]['pr_auc'])}")
        meeting = [f"{row['cutoff']:.2f}" for row in sweep if row["meets_targets"]]
        print(f"{model}: cut-offs meeting all four targets on this set: {', '.join(meeting) or 'none'}; every 0.05:")
        for row in sweep:
            if round(row["cutoff"] * 100) % 5 == 0:
                print(f"  {row['cutoff']:.2f}  " + " / ".join(f"{100 * row[k]:.1f}" for k in (
                    "lesion_sensitivity", "lesion_precision", "patient_sensitivity", "patient_specificity")))
        for mode, comparison in figures[model]["mcnemar_vs_stage1"].items():
            print(f"{model} {mode} vs network alone: {json.dumps(comparison)}")
    if args.write_cards:
        for model, folder in labels.items():
            card_path = (Path(folder) if folder else REPO / "Resources" / "Models" / model) / "model.json"
            card = json.loads(card_path.read_text(encoding="utf-8"))
            card.setdefault("accuracy", {})["held_out_variant_stage2"] = {
                "test_set": "40 phantom patients of a reconstruction the classifiers never saw (gradient-"
                            "regularised L2), see Testing/Scripts/evaluate_stage2.sh",
                **{mode: {k: _cell(figures[model][mode][k]) for k in ("lesion_sensitivity", "lesion_precision")}
                   for mode in MODES},
                "candidate_pr_auc": figures[model]["pr_auc"]["pr_auc"]}
            card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
