"""Options more than one command takes: the detection settings (``detect``, ``batch``) and their reading."""

from __future__ import annotations

import argparse

from PRLDetectorLib.settings import (
    CONNECTIVITIES,
    DEVICES,
    NO_CLASSIFIER,
    OPERATING_POINTS,
    DetectionSettings,
)


def add_detection_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--tta`` … : one option per field of :class:`DetectionSettings`."""
    defaults = DetectionSettings()
    parser.add_argument("--model", default=defaults.model,
                        help="bundled model name (qsm, qsm_flair) or an nnU-Net v2 model folder (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default=defaults.device,
                        help="auto picks CUDA, then MPS, then CPU (default: %(default)s)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=defaults.tta,
                        help="test-time augmentation by mirroring, ~6x slower on CPU (default: off)")
    parser.add_argument("--operating-point", choices=(*OPERATING_POINTS, NO_CLASSIFIER),
                        default=defaults.operating_point,
                        help="stage 2, the model's lesion classifier: which of its cut-offs calls a candidate a PRL "
                             "(see the model card), or off for the network alone (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="voxel PRL probability threshold of the network when stage 2 is off "
                             "(default: %(default)s)")
    parser.add_argument("--min-lesion-mm3", type=float, default=defaults.min_lesion_mm3,
                        help="drop lesions smaller than this when stage 2 is off (with stage 2 a called candidate "
                             "stays whatever its size) (default: %(default)s mm³)")
    parser.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, default=defaults.connectivity,
                        help="voxel connectivity that splits lesions (default: %(default)s)")
    parser.add_argument("--min-rim-coverage", type=float, default=defaults.min_rim_coverage,
                        help="rim check: drop lesions whose paramagnetic rim covers less than this share of their "
                             "edge; 0.67 is the consensus PRL definition (default: %(default)s = off)")


def settings_from_args(args: argparse.Namespace) -> DetectionSettings:
    """The settings the options of :func:`add_detection_options` give (not validated yet)."""
    return DetectionSettings(
        model=args.model, device=args.device, tta=args.tta, threshold=args.threshold,
        min_lesion_mm3=args.min_lesion_mm3, connectivity=args.connectivity, min_rim_coverage=args.min_rim_coverage,
        operating_point=args.operating_point,
    )
