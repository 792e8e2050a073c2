"""Judge the longitudinal comparison on two-visit phantom patients: per-class sensitivity and precision of the
change classes against the phantom's truth, and registration error against its known head motion.

The visits' "detections" are made from the phantoms' true PRLs (``gt_instances``), measured and written by
the project's own pipeline functions (``Testing/Python/result_fixtures.py``): that isolates tracking from
detection. ``--detect N`` also runs the bundled model on the first N patients and judges those comparisons.

Usage: .venv/bin/python Testing/Scripts/judge_longitudinal.py WORK [--n 24] [--seed 9000] [--detect 6]
Prints the README's tables; writes WORK/judge.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "Python"))

from result_fixtures import write_truth_result  # noqa: E402

from PRLDetectorLib.longitudinal.alignment import align_visits  # noqa: E402
from PRLDetectorLib.longitudinal.compare import VisitInput, run_longitudinal  # noqa: E402
from PRLDetectorLib.longitudinal.evaluation import confusion, format_table, score_pair  # noqa: E402
from PRLDetectorLib.longitudinal.outputs import CHANGES_JSON, write_changes  # noqa: E402
from PRLDetectorLib.longitudinal.tracking import read_visit, track_lesions  # noqa: E402
from PRLDetectorLib.phantom.visits import generate_visit_cohort  # noqa: E402

EXTENT_MM = (128.0, 150.0, 100.0)


def truth_results(patient: Path, out: Path) -> list[Path]:
    results = []
    for visit in ("visit_1", "visit_2"):
        case, target = patient / visit, out / visit
        if not (target / "burden.json").is_file():
            write_truth_result(case / "qsm.nii.gz", case / "gt_prl.nii.gz", case / "gt_instances.nii.gz", target,
                               case / "flair.nii.gz")
        results.append(target)
    return results


def compare_both_ways(results: list[Path], with_flair: Path, without_flair: Path) -> None:
    """One registration; tracked with the follow-up FLAIR and without it."""
    if (with_flair / CHANGES_JSON).is_file() and (without_flair / CHANGES_JSON).is_file():
        return
    baseline, followup = read_visit(results[0], "baseline"), read_visit(results[1], "follow-up")
    alignment = align_visits(baseline.qsm, followup.qsm)
    write_changes(track_lesions(baseline, followup, alignment), with_flair, overwrite=True, report=False)
    baseline, followup = (replace(v, flair_loader=None, _flair=None) for v in (baseline, followup))
    write_changes(track_lesions(baseline, followup, alignment), without_flair, overwrite=True, report=False)


def detected_results(patient: Path, out: Path, detector) -> list[Path]:
    from PRLDetectorLib.detection.pipeline import write_result

    results = []
    for visit in ("visit_1", "visit_2"):
        target = out / visit
        if not (target / "burden.json").is_file():
            qsm = patient / visit / "qsm.nii.gz"
            write_result(detector.detect_files(qsm), target, {"qsm": qsm})
        results.append(target)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--detect", type=int, default=0, help="also judge real detections on the first N patients")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    phantoms = args.work / "phantoms"
    if not phantoms.is_dir():
        generate_visit_cohort(phantoms, args.n, args.seed, 2, with_flair=True, extent_mm=EXTENT_MM)
    patients = sorted(p for p in phantoms.iterdir() if (p / "visits.json").is_file())[: args.n]
    scores: dict[str, list] = {"flair": [], "qsm_only": [], "detected": []}
    started = time.perf_counter()
    for patient in patients:
        results = truth_results(patient, args.work / "truth" / patient.name)
        flair_dir, qsm_dir = args.work / "compare_flair" / patient.name, args.work / "compare_qsm" / patient.name
        compare_both_ways(results, flair_dir, qsm_dir)
        scores["flair"].append(score_pair(flair_dir, patient))
        scores["qsm_only"].append(score_pair(qsm_dir, patient))
        print(f"{patient.name}: {scores['flair'][-1].events}  registration "
              f"{scores['flair'][-1].registration_error_mm:.2f} mm ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.detect:
        from PRLDetectorLib.detection.pipeline import Detector

        detector = Detector()
        for patient in patients[: args.detect]:
            results = detected_results(patient, args.work / "detect" / patient.name, detector)
            out = args.work / "compare_detected" / patient.name
            if not (out / CHANGES_JSON).is_file():
                flairs = [patient / v / "flair.nii.gz" for v in ("visit_1", "visit_2")]
                run_longitudinal(VisitInput(results[0], flair=flairs[0]), VisitInput(results[1], flair=flairs[1]),
                                 out, overwrite=True, report=False)
            scores["detected"].append(score_pair(out, patient))
            print(f"{patient.name} detected: {scores['detected'][-1].events}", flush=True)
    record = {}
    for name, title in (("flair", "Truth-built results, follow-up FLAIR used"),
                        ("qsm_only", "Truth-built results, QSM only (no FLAIR)"),
                        ("detected", "Bundled QSM model's detections, follow-up FLAIR used")):
        if not scores[name]:
            continue
        print(f"\n{title} ({len(scores[name])} patients):\n{format_table(scores[name])}")
        print("confusion (true → called):", {k: dict(v) for k, v in confusion(scores[name]).items()})
        record[name] = [asdict(s) for s in scores[name]]
    (args.work / "judge.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
