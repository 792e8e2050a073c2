"""``prl-detect``: the command line over the library.

Exit codes: 0 done, 2 bad input or settings (one sentence on stderr, nothing written), 1 a bug.

This module has the one-case commands (``detect``, ``phantom``, ``train``, ``export-model``,
``export-dataset``, ``models``) and assembles the parser: every command module registers its own
subcommands (:func:`register` here, :func:`PRLDetectorLib.cli.cohort.register` for the cohort ones,
:func:`PRLDetectorLib.cli.review.register` for the review page).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from PRLDetectorLib import __version__
from PRLDetectorLib.cli import classifier, cohort, longitudinal, review
from PRLDetectorLib.cli.options import add_detection_options, settings_from_args
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.progress import LOGGER_NAME, PROGRESS_PREFIX, progress_line, step_progress
from PRLDetectorLib.settings import DEVICES

logger = logging.getLogger(LOGGER_NAME)


@contextmanager
def _progress_reporter(enabled_lines: bool, quiet: bool, description: str):
    """Yield a progress callback: machine-readable lines for Slicer, or progress for people (a bar on a
    terminal, one log line per step in a pipe or a log file)."""
    if enabled_lines:
        # Bound now: nnU-Net's print() output is redirected into the log while it runs, ours must not be.
        stdout = sys.stdout

        def report(fraction: float, message: str) -> None:
            print(progress_line(fraction, message), file=stdout, flush=True)

        yield report
        return
    with step_progress(description, enabled=not quiet) as report:
        yield report


def cmd_detect(args: argparse.Namespace) -> int:
    from PRLDetectorLib.detection.images import read_image
    from PRLDetectorLib.detection.inference import return_freed_memory
    from PRLDetectorLib.detection.pipeline import Detector, check_output_folder, write_result
    from PRLDetectorLib.detection.registration import check_overlap

    if args.dicom_seg and not Path(args.qsm).is_dir():
        raise InputError("--dicom-seg needs the QSM as a DICOM series folder (--qsm DIR), so the SEG can refer to it.")
    settings = settings_from_args(args)
    settings.validate()
    check_output_folder(args.out, args.overwrite)
    qsm = read_image(args.qsm, "QSM")
    flair = read_image(args.flair, "FLAIR") if args.flair else None
    if flair is not None:
        check_overlap(flair, qsm)  # before the model loads: an input problem whatever the model
    detector = Detector(settings, one_case=True)
    detector.check_inputs(flair is not None)
    with _progress_reporter(args.progress_lines, args.quiet, "detect") as progress:
        result = detector.detect(qsm, flair, progress)
    # The result holds what is written: the input volumes and the lesion stage's freed memory go back to the
    # system before the writing (the writing's peak was detect's).
    del qsm, flair
    return_freed_memory()
    inputs = {"qsm": args.qsm, **({"flair": args.flair} if args.flair else {})}
    out = write_result(result, args.out, inputs, overwrite=args.overwrite)
    burden = result.burden
    print(
        f"PRLs: {burden.prl_count}  total volume: {burden.total_volume_mm3:.1f} mm³  "
        f"PRL-positive (≥1): {'yes' if burden.positive_ge1 else 'no'}  (≥4): {'yes' if burden.positive_ge4 else 'no'}"
    )
    print(f"Results: {out}")
    if args.dicom_seg:
        from PRLDetectorLib.exports.dicom_seg import write_result_dicom_seg
        from PRLDetectorLib.results import DICOM_SEG_NAME

        print(f"DICOM SEG: {write_result_dicom_seg(out, Path(args.qsm), out / DICOM_SEG_NAME)}")
    if args.report:
        from PRLDetectorLib.cohort.report import write_case_report

        print(f"Report: {write_case_report(out)}")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from PRLDetectorLib.phantom.phantom import generate_cohort

    if args.n < 1:
        raise InputError(f"--n {args.n} asks for no case; give 1 or more.")
    if args.visits != 1:
        return _phantom_visits(args)
    if args.bids:
        raise InputError("--bids writes the visits of each patient as BIDS sessions; add --visits 2 (or more).")
    paths = generate_cohort(
        Path(args.out), n=args.n, seed=args.seed, with_flair=args.flair,
        spacing_mm=args.spacing, extent_mm=tuple(args.extent_mm) if args.extent_mm else None,
        vary_grid=args.vary_grid, progress=not args.quiet, vary_acquisition=args.vary_acquisition,
        recons=tuple(args.recon), negative_share=args.negative_share,
    )
    for path in paths:
        truth = json.loads((path / "truth.json").read_text(encoding="utf-8"))
        print(f"{path}: {truth['prl_count']} PRL(s), {len(truth['lesions'])} lesion(s) and mimic(s)")
    return 0


def trained_model_name(name: str | None, model_out: str | Path) -> str:
    """The name of a model ``train`` or ``export-model`` writes: ``--name``, else the ``--model-out`` folder's.

    A name taken from the folder may not be a bundled model's (it would be shadowed by it, or shadow it); a
    bundled name given on purpose (to rebuild a bundled model) is kept, with a warning.
    """
    from PRLDetectorLib.detection.models import BUNDLED_MODELS_DIR, check_model_name

    if name is None:
        name = Path(model_out).name
        if (BUNDLED_MODELS_DIR / name).exists():
            raise InputError(f"The model would be named '{name}' after --model-out, which is a bundled model's name; "
                             "give it another with --name.")
        return check_model_name(name)
    check_model_name(name, bundled_ok=True)
    if (BUNDLED_MODELS_DIR / name).exists():
        logger.warning("'%s' is a bundled model's name: use this model by its folder path, or install it under "
                       "another name.", name)
    return name

def _phantom_visits(args: argparse.Namespace) -> int:
    from PRLDetectorLib.phantom.visits import VISITS_NAME, generate_visit_cohort

    paths = generate_visit_cohort(
        Path(args.out), n=args.n, seed=args.seed, n_visits=args.visits, with_flair=args.flair,
        spacing_mm=args.spacing, extent_mm=tuple(args.extent_mm) if args.extent_mm else None,
        vary_grid=args.vary_grid, progress=not args.quiet, bids=args.bids,
    )
    for path in paths:
        truth = Path(args.out) / "sourcedata" / "phantom" / path.name if args.bids else path
        record = json.loads((truth / VISITS_NAME).read_text(encoding="utf-8"))
        changes = "; ".join(
            f"visit {i['from_visit']}→{i['to_visit']}: "
            + (", ".join(f"{n} {k}" for k, n in i["counts"].items() if n) or "no PRL at either visit")
            for i in record["intervals"])
        print(f"{path}: {len(record['visits'])} visits; {changes}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from PRLDetectorLib.training.training import run_training_job

    if args.epochs < 1 or args.iterations < 1 or args.save_every < 1:
        raise InputError("--epochs, --iterations and --save-every must be 1 or more.")
    if args.resume and args.init_from:
        raise InputError("--resume goes on with a run that already has its start; drop --init-from.")
    name = trained_model_name(args.name, args.model_out)
    model = run_training_job(
        cases_dir=Path(args.cases), work_dir=Path(args.work), model_out=Path(args.model_out), name=name,
        with_flair=args.flair, dataset_id=args.dataset_id, small=args.plan == "small", epochs=args.epochs,
        iterations_per_epoch=args.iterations, val_iterations=args.val_iterations, seed=args.seed,
        device=args.device, fold=int(args.fold) if args.fold.isdigit() else args.fold, resume=args.resume,
        save_every=args.save_every, init_from=args.init_from,
    )
    print(f"Model: {model}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from PRLDetectorLib.training.training import export_trained_model

    name = trained_model_name(args.name, args.model_out)
    model = export_trained_model(Path(args.work), args.dataset_id, Path(args.model_out), name, args.checkpoint,
                                 int(args.fold) if args.fold.isdigit() else args.fold, seed=args.seed)
    print(f"Model: {model}")
    return 0


def cmd_export_dataset(args: argparse.Namespace) -> int:
    from PRLDetectorLib.training.dataset import add_case_files

    case_id = add_case_files(Path(args.dataset), args.qsm, args.mask, args.flair, args.case_id)
    print(f"Added {case_id} to {args.dataset}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from PRLDetectorLib.detection.models import bundled_models

    models = bundled_models()
    if not models:
        print("No models installed.")
    for model in models:
        print(f"{model.path.name:12s} {' + '.join(c.upper() for c in model.channels):12s} {model.version:10s} {model.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prl-detect", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    classifier.register(sub)
    cohort.register(sub)
    review.register(sub)
    longitudinal.register(sub)
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``detect``, ``phantom``, ``train``, ``export-model``, ``export-dataset`` and ``models``."""
    from PRLDetectorLib.phantom.phantom import RECONSTRUCTIONS

    detect = sub.add_parser("detect", help="find PRLs in one QSM (+FLAIR) case")
    detect.add_argument("--qsm", required=True, help="QSM in ppm: NIfTI, NRRD, MHA or a DICOM series folder")
    detect.add_argument("--flair", help="FLAIR (any grid overlapping the QSM); needs a QSM + FLAIR model")
    detect.add_argument("--out", required=True, help="output folder (must not exist, unless --overwrite)")
    detect.add_argument("--overwrite", action="store_true", help="replace an existing result folder")
    detect.add_argument("--progress-lines", action="store_true",
                        help=f"print '{PROGRESS_PREFIX} <fraction> <message>' lines instead of a progress bar")
    add_detection_options(detect)
    detect.add_argument("--report", action="store_true", help="also write report.html with lesion pictures")
    detect.add_argument("--dicom-seg", action="store_true",
                        help="also write prl_seg.dcm, a DICOM SEG on the QSM series (--qsm must be a DICOM folder)")
    detect.set_defaults(func=cmd_detect)

    phantom = sub.add_parser("phantom", help="generate phantom patients with known PRLs")
    phantom.add_argument("--out", required=True, help="folder to create the cases in")
    phantom.add_argument("--n", type=int, default=1, help="number of patients (default: %(default)s)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    phantom.add_argument("--flair", action="store_true", help="also write a FLAIR on its own grid")
    phantom.add_argument("--spacing", type=float, default=1.0, help="QSM voxel size in mm (default: %(default)s)")
    phantom.add_argument("--extent-mm", type=float, nargs=3, metavar=("X", "Y", "Z"),
                         help="crop the field of view to this box around the brain centre (small, fast cases)")
    phantom.add_argument("--vary-grid", action="store_true", help="draw each patient's grid from realistic ones")
    phantom.add_argument("--vary-acquisition", action="store_true",
                         help="draw each patient's site and protocol: QSM reconstruction, B0 tilt, noise, "
                              "anisotropic grids, 2D FLAIR, and look-alikes (partial rims, veins through lesions, "
                              "calcifications)")
    phantom.add_argument("--recon", nargs="+", default=list(RECONSTRUCTIONS), choices=RECONSTRUCTIONS,
                         help="reconstructions --vary-acquisition draws from (default: all)")
    phantom.add_argument("--negative-share", type=float, default=None, metavar="F",
                         help="make this share of the patients PRL-negative (e.g. 0.25); others draw their count")
    phantom.add_argument("--visits", type=int, default=1,
                         help="visits per patient (2 or more: CASE/visit_1, visit_2, ... and visits.json, which says "
                              "how every PRL changed and how the head moved; visit 1 is the single-visit case)")
    phantom.add_argument("--bids", action="store_true",
                         help="with --visits: write a BIDS dataset (sub-000/ses-1/anat/sub-000_ses-1_Chimap.nii.gz, "
                              "sessions.tsv with acq_time; the truth in sourcedata/phantom)")
    phantom.set_defaults(func=cmd_phantom)

    train = sub.add_parser("train", help="train an nnU-Net v2 PRL model on case folders (phantoms or your own)")
    train.add_argument("--cases", required=True,
                       help="folder of case folders: qsm.nii.gz [+ flair.nii.gz] + gt_prl.nii.gz (or a .seg.nrrd)")
    train.add_argument("--model-out", required=True, help="model folder to write (must not exist)")
    train.add_argument("--work", required=True, help="nnU-Net raw/preprocessed/results folders go here")
    train.add_argument("--name", help="model name (default: the --model-out folder's name; not a bundled model's)")
    train.add_argument("--flair", action="store_true", help="train on QSM + FLAIR")
    train.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id (default: %(default)s)")
    train.add_argument("--plan", choices=("small", "default"), default="small",
                       help="small: CPU-friendly 48³ patch, 16-32-64-128; default: nnU-Net's own plan (GPU)")
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--iterations", type=int, default=100, help="training iterations per epoch")
    train.add_argument("--val-iterations", type=int, default=20, help="validation iterations per epoch")
    train.add_argument("--fold", default="0", help="nnU-Net fold (0-4, or 'all' to train on every case)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=DEVICES, default="auto")
    train.add_argument("--resume", action="store_true",
                       help="go on with an interrupted run in --work from its last checkpoint, with the epochs and "
                            "iterations it was started with (give the same --dataset-id, --plan, --fold)")
    train.add_argument("--save-every", type=int, default=5, help="epochs between checkpoints (default: %(default)s)")
    train.add_argument("--init-from", metavar="MODEL",
                       help="fine-tune: start from this model's weights and plan (a bundled name or a model folder; "
                            "same inputs as --flair says), e.g. to adapt a bundled model to a site's scans")
    train.set_defaults(func=cmd_train)

    export_model = sub.add_parser("export-model", help="export a trained (or still training) nnU-Net run as a model")
    export_model.add_argument("--work", required=True, help="the --work folder of `prl-detect train`")
    export_model.add_argument("--dataset-id", type=int, default=501)
    export_model.add_argument("--name", help="model name (default: the --model-out folder's name; not a bundled "
                              "model's)")
    export_model.add_argument("--model-out", required=True, help="model folder to write (must not exist)")
    export_model.add_argument("--checkpoint", choices=("final", "latest", "best"), default="final",
                              help="nnU-Net checkpoint: final, latest (saved every 5 epochs) or best (EMA pseudo-Dice)")
    export_model.add_argument("--fold", default="0")
    export_model.add_argument("--seed", type=int, default=0, help="the seed the run was trained with (for the card)")
    export_model.set_defaults(func=cmd_export_model)

    export = sub.add_parser("export-dataset", help="add a corrected case to an nnU-Net raw dataset for retraining")
    export.add_argument("--dataset", required=True, help="nnU-Net raw dataset folder (created if missing)")
    export.add_argument("--qsm", required=True)
    export.add_argument("--flair")
    export.add_argument("--mask", required=True, help="PRL label map or .seg.nrrd on the QSM (any grid)")
    export.add_argument("--case-id", help="case id (default: the next case_NNNN)")
    export.set_defaults(func=cmd_export_dataset)

    models = sub.add_parser("models", help="list the bundled and installed models")
    models.set_defaults(func=cmd_models)


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except InputError as error:
        print(f"prl-detect: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prl-detect: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
