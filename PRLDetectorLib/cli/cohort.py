"""The cohort commands of ``prl-detect``: ``evaluate``, ``batch``, ``report`` and ``associate``.

:func:`register` adds them to the CLI's subparsers. Errors are :class:`InputError` sentences; the CLI
exits 2 on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PRLDetectorLib.cli.options import add_detection_options, settings_from_args
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.progress import count_progress
from PRLDetectorLib.results import REPORT_NAME, RESULT_MARKER

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate``, ``batch``, ``report`` and ``associate``.

    ``evaluate`` is run by :func:`cmd_evaluate`, which with ``--compare`` prints all of the paper's tests.
    """
    evaluate = subparsers.add_parser("evaluate", help="lesion- and patient-level accuracy against ground truth")
    evaluate.add_argument("--gt", required=True, help="ground-truth folder (phantom layout: <case>/gt_prl.nii.gz)")
    evaluate.add_argument("--pred", required=True, help="prediction folder (<case>/prl_labels.nii.gz)")
    evaluate.add_argument("--compare", help="a second prediction folder: McNemar's test on lesion detection")
    evaluate.add_argument("--json", help="write all figures to this JSON file")
    evaluate.add_argument("--min-overlap-voxels", type=int, default=1,
                          help="voxels a predicted lesion must share with a true PRL to hit it (default: 1)")
    evaluate.add_argument("--min-rim-coverage", type=float, default=0.0,
                          help="score only the predicted lesions `detect --min-rim-coverage` would keep (from "
                               "lesions.csv, no new detection; default: 0 = all)")
    evaluate.set_defaults(func=cmd_evaluate)

    batch = subparsers.add_parser(
        "batch", help="run many patients through one loaded model (resumable; BIDS; Dask scale-out)",
        description="Detect PRLs in every patient of a folder of patient folders or of a BIDS dataset. Finished "
        "patients are not redone (if made with the same model and settings: see --redo); a failing patient is "
        "recorded in failures.csv and the batch goes on.",
    )
    source = batch.add_mutually_exclusive_group(required=True)
    source.add_argument("--cases", help="folder with one folder per patient: qsm.nii.gz (or a DICOM folder qsm/) "
                        "[+ flair.nii.gz]")
    source.add_argument("--bids", help="BIDS dataset: sub-*/[ses-*/]anat/*_Chimap.nii.gz [+ *_FLAIR.nii.gz]; also "
                        "writes OUT/derivatives/prldetector")
    batch.add_argument("--out", required=True, help="output folder; finished patients in it are not redone")
    batch.add_argument("--redo", action="store_true",
                       help="detect again the finished patients of --out made with another model or other settings, "
                            "replacing their results (without it such a folder stops the batch)")
    scale = batch.add_mutually_exclusive_group()
    scale.add_argument("--workers", type=int, help="start a local Dask cluster of N single-threaded worker processes, "
                       "each with the model loaded once (about 1.3 GB of memory each for a whole-brain 1 mm scan); "
                       "without it one process uses every core for each patient, which is faster on a machine "
                       "with few cores (2 workers on 2 cores were slower)")
    scale.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786); its workers must "
                       "see the input and output folders at the same paths")
    batch.add_argument("--report", action="store_true", help="write report.html per patient and for the cohort")
    batch.add_argument("--gt", help="ground-truth folder (<case>/gt_prl.nii.gz): the cohort report compares with it")
    batch.add_argument("--dicom-seg", action="store_true",
                       help="write prl_seg.dcm (DICOM SEG) for patients whose QSM is a DICOM series folder")
    batch.add_argument("--longitudinal", action="store_true",
                       help="with --bids: a subject's sessions are visits; compare each with the next (new, persisting, "
                            "enlarging, resolved, disappeared PRLs) into OUT/longitudinal, with PRLs gained and lost "
                            "per patient-year (dates from sub-*_sessions.tsv acq_time)")
    add_detection_options(batch)
    batch.set_defaults(func=cmd_batch)

    report = subparsers.add_parser(
        "report", help="HTML reports of a detect result or of a batch (lesion pictures, cohort statistics)"
    )
    report.add_argument("--results", required=True, help="output folder of detect (one patient) or of batch")
    report.add_argument("--gt", help="ground-truth folder: predicted against true counts and the accuracy table")
    report.add_argument("--redo", action="store_true", help="remake patient reports that exist already")
    _add_association_options(report, required=False)
    report.set_defaults(func=cmd_report)

    associate = subparsers.add_parser(
        "associate", help="PRL burden against a clinical outcome: Spearman and adjusted linear regression"
    )
    associate.add_argument("--burden", required=True, help="burden.csv of a batch")
    _add_association_options(associate, required=True)
    associate.add_argument("--plot", help="write the scatter plots to this PNG")
    associate.add_argument("--json", help="write all figures to this JSON file")
    associate.set_defaults(func=cmd_associate)



def _add_association_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--clinical", required=required, help="clinical table, CSV or TSV (e.g. participants.tsv)")
    parser.add_argument("--outcome", required=required, help="outcome column of the clinical table, e.g. EDSS")
    parser.add_argument("--covariates", nargs="*", default=[], metavar="COLUMN",
                        help="columns to adjust the regression for (a two-valued text column such as sex is coded 0/1)")
    parser.add_argument("--id-column", help="column to join on (default: case_id, else participant_id)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from PRLDetectorLib.cohort.evaluation import compare_evaluations, evaluate_folders

    options = {"min_overlap_voxels": args.min_overlap_voxels, "min_rim_coverage": args.min_rim_coverage}
    evaluation = evaluate_folders(Path(args.gt), Path(args.pred), **options)
    print(evaluation.format_table())
    record = {"pred": str(args.pred), "gt": str(args.gt), "min_rim_coverage": args.min_rim_coverage,
              "evaluation": evaluation.to_dict()}
    if args.compare:
        other = evaluate_folders(Path(args.gt), Path(args.compare), **options)
        comparison = compare_evaluations(evaluation, other)
        print(f"\nB = {args.compare}:")
        print(other.format_table())
        print(f"\nA = {args.pred} against B:")
        print(comparison.format_table())
        record["compare"] = {
            "pred": str(args.compare), "evaluation": other.to_dict(), "mcnemar": comparison.lesion_sensitivity.to_dict(),
            "tests": comparison.to_dict(),
        }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2), encoding="utf-8")
        print(f"Written: {args.json}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from PRLDetectorLib.cohort.batch import CaseExports, check_scale_out, run_batch, run_bids_batch

    settings = settings_from_args(args)
    settings.validate()
    check_scale_out(args.workers, args.scheduler)
    if args.gt and not args.report:
        raise InputError("--gt is used by the cohort report; add --report, or run 'prl-detect evaluate'.")
    if args.longitudinal and not args.bids:
        raise InputError("--longitudinal compares the sessions of BIDS subjects; give the dataset with --bids.")
    if args.longitudinal:  # session dates that contradict the visit order stop the run before any detection
        from PRLDetectorLib.longitudinal.cohort import subject_visits

        subject_visits(Path(args.bids))
    exports = CaseExports(report=args.report, dicom_seg=args.dicom_seg)
    run = run_bids_batch if args.bids else run_batch
    try:
        report = run(
            Path(args.bids or args.cases), Path(args.out), settings, progress=not args.quiet, exports=exports,
            workers=args.workers, scheduler=args.scheduler, redo=args.redo,
        )
    except KeyboardInterrupt:
        print("prl-detect: interrupted; finished patients are kept. Run the same command again to resume.",
              file=sys.stderr)
        return 130
    if args.report and args.gt:
        from PRLDetectorLib.cohort.report import write_cohort_report

        write_cohort_report(Path(args.out), gt_dir=Path(args.gt))
    print(f"Done {len(report.done)}, already done {len(report.skipped)}, failed {len(report.failed)} "
          f"in {report.wall_s / 60:.1f} min; cohort tables in {args.out}")
    if report.done:
        print(f"Throughput: {report.cases_per_hour:.1f} patients per hour")
    for case_id, reason in sorted(report.failed.items()):
        print(f"  {case_id}: {reason}")
    if args.report:
        print(f"Cohort report: {Path(args.out) / 'report.html'}")
    if args.longitudinal:
        _batch_longitudinal(args)
    return 0


def _batch_longitudinal(args: argparse.Namespace) -> None:
    from PRLDetectorLib.longitudinal.cohort import LONGITUDINAL_DIR, run_bids_longitudinal

    outcome = run_bids_longitudinal(Path(args.bids), Path(args.out), report=args.report, progress=not args.quiet)
    summary = outcome.summary
    print(f"Visits compared: {summary['pairs_compared']} pair(s) of {summary['subjects_compared']} subject(s), "
          f"{len(outcome.failed)} not comparable; PRLs gained {summary['prls_gained']}, lost {summary['prls_lost']}")
    if summary["prls_gained_per_patient_year"] is not None:
        print(f"Per patient-year ({summary['patient_years']:.1f} patient-years): gained "
              f"{summary['prls_gained_per_patient_year']:.2f}, lost {summary['prls_lost_per_patient_year']:.2f}")
    for pair, reason in sorted(outcome.failed.items()):
        print(f"  {pair}: {reason}")
    print(f"Change tables: {Path(args.out) / LONGITUDINAL_DIR}")


def cmd_report(args: argparse.Namespace) -> int:
    from PRLDetectorLib.cohort.report import write_case_report, write_cohort_report

    results = Path(args.results)
    if (results / RESULT_MARKER).is_file():
        if args.gt or args.clinical:
            raise InputError("--gt and --clinical are for a batch folder; give --results the output folder of batch.")
        print(f"Report: {write_case_report(results)}")
        return 0
    if not (results / "burden.csv").is_file():
        raise InputError(f"'{results}' is neither a detect result (burden.json) nor a batch output (burden.csv).")
    if bool(args.clinical) != bool(args.outcome):
        raise InputError("Give --clinical and --outcome together to add the association to the report.")
    association = data = None
    if args.clinical:  # before the patient pages, so that a bad table fails at once
        from PRLDetectorLib.cohort.association import associate

        association, data = associate(results / "burden.csv", Path(args.clinical), args.outcome, args.covariates,
                                      args.id_column)
    patients = sorted(p for p in results.iterdir() if (p / RESULT_MARKER).is_file())
    with count_progress(len(patients), "Reports", "patients", enabled=not args.quiet) as advance:
        for patient in patients:
            if args.redo or not (patient / REPORT_NAME).is_file():
                write_case_report(patient)
            advance(patient.name)
    plot = None
    if association is not None:
        from PRLDetectorLib.cohort.association import plot_association

        plot = plot_association(association, data, results / f"association_{_safe(args.outcome)}.png")
    out = write_cohort_report(results, Path(args.gt) if args.gt else None, association, plot)
    print(f"Cohort report: {out}")
    return 0


def cmd_associate(args: argparse.Namespace) -> int:
    from PRLDetectorLib.cohort.association import associate, plot_association

    association, data = associate(Path(args.burden), Path(args.clinical), args.outcome, args.covariates, args.id_column)
    print(association.format_table())
    if args.plot:
        print(f"Plot: {plot_association(association, data, Path(args.plot))}")
    if args.json:
        Path(args.json).write_text(json.dumps(association.to_dict(), indent=2), encoding="utf-8")
        print(f"Written: {args.json}")
    return 0


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
