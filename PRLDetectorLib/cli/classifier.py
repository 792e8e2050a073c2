"""``prl-detect train-classifier``: train stage 2 (the lesion classifier) of a model, on CPU."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.settings import DEVICES

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train-classifier",
        help="train a model's lesion classifier (stage 2) on cases with ground truth and/or reviewed results",
        description="Writes a copy of the model folder with a new classifier/ (the nnU-Net weights are copied "
                    "unchanged). Examples: the candidates of stage 1 on --cases (labelled by their PRL mask), the "
                    "confirmed/rejected lesions of --reviewed result folders, and (with --keep-shipped) the "
                    "examples the model's current classifier was trained on.")
    parser.add_argument("--model", required=True, help="bundled or installed model name, or a model folder")
    parser.add_argument("--out", required=True, help="model folder to write (must not exist)")
    parser.add_argument("--cases", nargs="*", default=[], metavar="DIR",
                        help="folders of case folders: qsm.* [+ flair.*] + gt_prl.nii.gz (or prl.seg.nrrd)")
    parser.add_argument("--reviewed", nargs="*", default=[], metavar="DIR",
                        help="result folders (or folders of them) a reader reviewed: confirmed = PRL, rejected = not")
    parser.add_argument("--keep-shipped", action="store_true",
                        help="also learn from the examples the model's current classifier was trained on")
    parser.add_argument("--reviewed-weight", type=float, default=3.0,
                        help="weight of a reviewed lesion against a shipped example (default: %(default)s)")
    parser.add_argument("--candidate-threshold", type=float, default=0.2,
                        help="stage 1's probability cut-off for candidates (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="ensemble members = patient folds (default: %(default)s)")
    parser.add_argument("--stage1-cache", help="folder that keeps stage 1's probability maps per case, for reruns")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="device for stage 1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=cmd_train_classifier)


def _result_folders(paths: list[str]) -> list[Path]:
    from PRLDetectorLib.results import RESULT_MARKER

    found = []
    for path in map(Path, paths):
        if (path / RESULT_MARKER).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if (p / RESULT_MARKER).is_file())
        else:
            raise InputError(f"Reviewed result '{path}' does not exist; give a result folder or a folder of them.")
    return found


def _case_folders(paths: list[str]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise InputError(f"Cases folder '{path}' does not exist; give a folder of case folders.")
        found += sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return found


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from PRLDetectorLib.detection.candidates import FEATURE_NAMES
    from PRLDetectorLib.detection.classifier import CLASSIFIER_DIR
    from PRLDetectorLib.detection.models import resolve_model
    from PRLDetectorLib.training.classifier import (
        EXAMPLES_NAME,
        Examples,
        examples_from_cases,
        examples_from_reviewed_result,
        fit_classifier,
        read_examples,
        save_classifier,
    )

    out = Path(args.out)
    if out.exists():
        raise InputError(f"The output '{out}' exists; choose a new folder for the retrained model.")
    if not 0 < args.candidate_threshold < 1:
        raise InputError(f"--candidate-threshold {args.candidate_threshold} is outside (0, 1); use e.g. 0.2.")
    model = resolve_model(args.model)
    cases, reviewed = _case_folders(args.cases), _result_folders(args.reviewed)
    if not (cases or reviewed or args.keep_shipped):
        raise InputError("No examples: give --cases, --reviewed or --keep-shipped.")
    examples = Examples.empty()
    if args.keep_shipped:
        shipped = model.path / CLASSIFIER_DIR / EXAMPLES_NAME
        if not shipped.is_file():
            raise InputError(f"Model '{model.name}' ships no classifier examples; train from --cases instead.")
        examples = examples + read_examples(shipped)
        if examples.names != FEATURE_NAMES:
            logger.warning("The shipped examples were measured by an earlier version (%d of this version's %d "
                           "measures): the new classifier is trained on those %d; train from --cases alone to use "
                           "them all.", len(examples.names), len(FEATURE_NAMES), len(examples.names))
    if cases:
        bar = tqdm(total=len(cases), desc="Stage 1 on cases", unit="case", disable=None)
        examples = examples + examples_from_cases(
            cases, str(model.path), args.candidate_threshold, device=args.device,
            cache=Path(args.stage1_cache) if args.stage1_cache else None,
            progress=lambda done, total: bar.update(1))
        bar.close()
    for result in reviewed:
        examples = examples + examples_from_reviewed_result(result, weight=args.reviewed_weight)
    card = {"name": f"{model.name} lesion classifier", "version": model.version,
            "candidate_threshold": args.candidate_threshold, "candidate_min_mm3": 5.0,
            "flair_candidates": "flair" in model.channels,
            "trained_on": {"cases": [str(p) for p in args.cases], "reviewed": [str(p) for p in args.reviewed],
                           "kept_shipped_examples": bool(args.keep_shipped)}}
    classifier, _ = fit_classifier(examples, folds=args.folds, seed=args.seed, card=card)
    shutil.copytree(model.path, out, ignore=shutil.ignore_patterns(CLASSIFIER_DIR))
    try:
        save_classifier(classifier, examples, out)
        card_path = out / "model.json"
        if card_path.is_file():
            model_card = json.loads(card_path.read_text(encoding="utf-8"))
            model_card["classifier"] = classifier.model_card_block()
            # The network's held-out figures stand; figures measured with the replaced classifier do not.
            model_card.get("accuracy", {}).pop("held_out_variant_stage2", None)
            card_path.write_text(json.dumps(model_card, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    points = classifier.card["validation"]
    for name in ("sensitive", "balanced", "specific"):
        p = points[name]
        print(f"{name:9s} p ≥ {p['cutoff']:.3f}: candidate sensitivity {100 * p['candidate_sensitivity']:.1f} %, "
              f"precision {100 * p['candidate_precision']:.1f} % (out of fold)")
    print(f"Model with its new classifier: {out}")
    return 0
