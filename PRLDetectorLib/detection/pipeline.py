"""The whole detection, one function per arrow:

volumes → FLAIR on the QSM grid → PRL probability → lesion instances → per-lesion features → burden → files.

:class:`Detector` keeps one nnU-Net model loaded, so a batch of cases pays for loading once.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib import __version__
from PRLDetectorLib.detection.burden import Burden, compute_burden
from PRLDetectorLib.detection.features import (
    LesionFeatures,
    lesions_without_rim,
    measure_lesions,
    write_lesions_csv,
)
from PRLDetectorLib.detection.images import (
    VolumeCheck,
    file_sha256,
    read_image,
    validate_flair,
    validate_qsm,
)
from PRLDetectorLib.detection.inference import Segmenter
from PRLDetectorLib.detection.lesions import find_lesions, relabel_consecutive
from PRLDetectorLib.detection.models import ModelInfo, check_channels, resolve_model
from PRLDetectorLib.detection.registration import Alignment, flair_channel
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.exports.segments import write_seg_nrrd
from PRLDetectorLib.results import (
    BURDEN_NAME,
    LABELS_NAME,
    LESIONS_NAME,
    RESULT_MARKER,
    SEGMENTATION_NAME,
    atomic_path,
)
from PRLDetectorLib.settings import DetectionSettings

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

@dataclass
class DetectionResult:
    labels: sitk.Image
    """uint16 lesion ids on exactly the QSM grid (0 = background)."""
    probability: sitk.Image
    """float32 PRL probability on the QSM grid."""
    lesions: list[LesionFeatures]
    burden: Burden
    model: ModelInfo
    settings: DetectionSettings
    alignment: Alignment | None = None
    checks: dict[str, VolumeCheck] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tiles: dict[str, int] = field(default_factory=dict)
    """Sliding-window tiles in all and tiles run (the rest held no brain)."""


def _stage(progress: Progress | None, start: float, end: float) -> Progress | None:
    """Map a stage's own 0..1 progress onto [start, end] of the whole run."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)


def _image_like(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(reference)
    return image


class Detector:
    """A loaded PRL model and the settings to run it with."""

    def __init__(self, settings: DetectionSettings | None = None, extra_model_dirs: list[Path] | None = None):
        self.settings = settings or DetectionSettings()
        self.settings.validate()
        model = resolve_model(self.settings.model, extra_model_dirs)
        self.segmenter = Segmenter(model, device=self.settings.device, tta=self.settings.tta)
        self.model = self.segmenter.model  # with the sha256 of the checkpoints it loaded

    def check_inputs(self, with_flair: bool) -> None:
        """Fail before any work when the inputs do not match the model's channels."""
        check_channels(self.model, {"qsm", "flair"} if with_flair else {"qsm"})

    def detect(self, qsm: sitk.Image, flair: sitk.Image | None = None, progress: Progress | None = None) -> DetectionResult:
        settings = self.settings
        self.check_inputs(flair is not None)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if progress:
            progress(0.0, "Checking the inputs")
        qsm, qsm_check = validate_qsm(qsm)
        checks = {"qsm": qsm_check}
        channels = {"qsm": qsm}
        alignment = None
        if flair is not None:
            flair, checks["flair"] = validate_flair(flair)
            if progress:
                progress(0.03, "Bringing FLAIR onto the QSM grid")
            channels["flair"], alignment = flair_channel(flair, qsm)
        timings["inputs_s"] = time.perf_counter() - started

        t = time.perf_counter()
        probability = self.segmenter.predict([channels[c] for c in self.model.channels], _stage(progress, 0.1, 0.9))
        timings["network_s"] = time.perf_counter() - t

        t = time.perf_counter()
        if progress:
            progress(0.92, "Splitting lesions and measuring them")
        probability_values = sitk.GetArrayViewFromImage(probability)
        labels = find_lesions(
            probability_values >= settings.threshold, qsm.GetSpacing(), settings.min_lesion_mm3, settings.connectivity
        )
        qsm_values = sitk.GetArrayViewFromImage(qsm)
        lesions = measure_lesions(labels, qsm_values, qsm, probability_values)
        if settings.min_rim_coverage > 0:
            rimless = lesions_without_rim(lesions, settings.min_rim_coverage)
            if rimless:
                labels[np.isin(labels, rimless)] = 0
                labels = relabel_consecutive(labels, by_volume=True)
                lesions = measure_lesions(labels, qsm_values, qsm, probability_values)
            logger.info("Rim check: dropped %d of %d lesion(s) whose paramagnetic rim covers < %.0f %% of the edge",
                        len(rimless), len(rimless) + len(lesions), 100 * settings.min_rim_coverage)
        burden = compute_burden(lesions)
        timings["lesions_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - started
        if progress:
            progress(1.0, f"Found {burden.prl_count} PRL(s)")
        logger.info(
            "%d PRL(s), %.1f mm³ in all (network %.1f s, total %.1f s)",
            burden.prl_count, burden.total_volume_mm3, timings["network_s"], timings["total_s"],
        )
        return DetectionResult(
            labels=_image_like(labels, qsm), probability=probability, lesions=lesions, burden=burden,
            model=self.model, settings=settings, alignment=alignment, checks=checks, timings=timings,
            tiles=vars(self.segmenter.last_tiles).copy(),
        )

    def detect_files(self, qsm_path: str | Path, flair_path: str | Path | None = None, progress: Progress | None = None) -> DetectionResult:
        self.check_inputs(flair_path is not None)
        qsm = read_image(qsm_path, "QSM")
        flair = read_image(flair_path, "FLAIR") if flair_path is not None else None
        return self.detect(qsm, flair, progress)


def check_output_folder(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite``; never replace a folder this tool did not write."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"The output '{out_dir}' is a file; choose a folder path that does not exist.")
    contents = list(out_dir.iterdir())
    if not contents:
        return
    if not overwrite:
        raise InputError(
            f"The output folder '{out_dir}' exists; choose another folder or add --overwrite to replace it."
        )
    if not (out_dir / RESULT_MARKER).is_file():
        raise InputError(
            f"The output folder '{out_dir}' holds files that are not a PRLDetector result, so --overwrite will "
            "not replace it; choose another folder."
        )


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"prldetector": __version__, "python": platform.python_version()}
    for package in ("nnunetv2", "torch", "SimpleITK", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def result_record(result: DetectionResult, inputs: dict[str, str | Path] | None = None) -> dict:
    """Everything ``burden.json`` says: the burden and how it was obtained, enough to reproduce it."""
    model = result.model
    return {
        "burden": result.burden.to_dict(),
        "lesion_ids": [lesion.lesion_id for lesion in result.lesions],
        "model": {
            "name": model.name,
            "version": model.version,
            "path": str(model.path),
            "channels": list(model.channels),
            "folds": list(model.folds),
            "checkpoint_sha256": model.checkpoint_sha256,
        },
        "settings": result.settings.to_dict(),
        "inputs": {
            role: {"path": str(Path(path).resolve()), "sha256": file_sha256(path)} for role, path in (inputs or {}).items()
        },
        "flair_alignment": result.alignment.to_dict() if result.alignment else None,
        "input_checks": {role: vars(check) for role, check in result.checks.items()},
        "grid": {
            "size": list(result.labels.GetSize()),
            "spacing_mm": list(result.labels.GetSpacing()),
            "origin_lps_mm": list(result.labels.GetOrigin()),
            "direction": list(result.labels.GetDirection()),
        },
        "network_tiles": result.tiles,
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "software": software_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(
    result: DetectionResult, out_dir: str | Path, inputs: dict[str, str | Path] | None = None, overwrite: bool = False
) -> Path:
    """Write the result files into ``out_dir`` all at once: a failure leaves no half-written folder, and of two
    runs writing the same ``out_dir`` without ``overwrite`` one wins and the other gets an InputError."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    with atomic_path(out_dir, folder=True, replace=overwrite) as staging:
        sitk.WriteImage(sitk.Cast(result.labels, sitk.sitkUInt16), str(staging / LABELS_NAME), True)
        write_seg_nrrd(result.labels, staging / SEGMENTATION_NAME)
        write_lesions_csv(staging / LESIONS_NAME, result.lesions)
        (staging / BURDEN_NAME).write_text(json.dumps(result_record(result, inputs), indent=2, default=_json_default), encoding="utf-8")
    logger.info("Wrote %s", out_dir)
    return out_dir


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
