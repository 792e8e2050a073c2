"""The whole detection, one function per arrow:

volumes → FLAIR on the QSM grid → PRL probability → lesion instances → per-lesion features → burden → files.

:class:`Detector` keeps one nnU-Net model loaded, so a batch of cases pays for loading once.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib import __version__
from PRLDetectorLib.detection.burden import Burden, compute_burden
from PRLDetectorLib.detection.candidates import FEATURE_NAMES, CandidateSet, find_case_candidates
from PRLDetectorLib.detection.classifier import LesionClassifier, classifier_sha256, model_classifier
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
from PRLDetectorLib.detection.inference import Segmenter, return_freed_memory
from PRLDetectorLib.detection.lesions import find_lesions, keep_components, relabel_consecutive
from PRLDetectorLib.detection.models import ModelInfo, check_channels, resolve_model
from PRLDetectorLib.detection.registration import Alignment, flair_channel
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.exports.segments import write_seg_nrrd
from PRLDetectorLib.results import (
    BURDEN_NAME,
    CANDIDATES_NAME,
    LABELS_NAME,
    LESIONS_NAME,
    RESULT_MARKER,
    SEGMENTATION_NAME,
    atomic_path,
)
from PRLDetectorLib.settings import NO_CLASSIFIER, DetectionSettings

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
    stage2: Stage2 | None = None
    """The lesion classifier's candidates and calls; None when stage 2 did not run."""


@dataclass
class Stage2:
    """What the lesion classifier saw and decided."""

    operating_point: str
    cutoff: float
    candidates: CandidateSet
    probability: np.ndarray
    """Calibrated PRL probability per candidate."""
    uncertainty: np.ndarray
    lesion_of_candidate: np.ndarray
    """The lesion id each candidate became (0: not called, or dropped by size or the rim check)."""
    classifier: dict
    seconds: float = 0.0
    """Time stage 2 took: candidates, their features and the classifier."""

    def record(self) -> dict:
        """The part of ``burden.json`` that says how stage 2 decided."""
        return {
            "operating_point": self.operating_point,
            "probability_cutoff": round(self.cutoff, 4),
            "candidates": int(self.candidates.count),
            "called": int(np.count_nonzero(self.probability >= self.cutoff)),
            # The sum of calibrated probabilities estimates the PRL count without choosing a cut-off.
            "expected_prl_count": round(float(self.probability.sum()), 2),
            "classifier": self.classifier,
            "seconds": round(self.seconds, 3),
        }


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

    def __init__(self, settings: DetectionSettings | None = None, extra_model_dirs: list[Path] | None = None,
                 one_case: bool = False):
        """``one_case``: the detector runs a single case (``prl-detect detect``), so the network compiled for
        the CPU runtime is freed as soon as the network pass is done, for the lesion stage and the writing."""
        self.settings = settings or DetectionSettings()
        self.settings.validate()
        model = resolve_model(self.settings.model, extra_model_dirs)
        self.segmenter = Segmenter(model, device=self.settings.device, tta=self.settings.tta)
        self.segmenter.keep_runtime = not one_case
        self.model = self.segmenter.model  # with the sha256 of the checkpoints it loaded
        self.classifier: LesionClassifier | None = None
        if self.settings.operating_point != NO_CLASSIFIER:
            self.classifier = model_classifier(self.model.path)
            if self.classifier is None:
                logger.warning("Model '%s' has no lesion classifier: its network's lesions are the calls "
                               "(stage 1 alone, threshold %.2f).", self.model.name, self.settings.threshold)
            else:
                self.classifier.cutoff(self.settings.operating_point)  # an unknown point fails before any work

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
        labels, lesions, stage2 = self.lesions_from_probability(qsm, probability, channels.get("flair"))
        return_freed_memory()  # the lesion stage's working arrays, before the result is written
        if stage2 is not None:
            timings["stage2_s"] = stage2.seconds
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
            tiles=vars(self.segmenter.last_tiles).copy(), stage2=stage2,
        )

    def lesions_from_probability(self, qsm: sitk.Image, probability: sitk.Image, flair: sitk.Image | None = None
                                 ) -> tuple[np.ndarray, list[LesionFeatures], Stage2 | None]:
        """Everything after the network: lesion instances (stage 2 when the model has a classifier), their
        features and probabilities, the rim check. ``flair`` is the FLAIR channel on the QSM grid, if any."""
        settings = self.settings
        probability_values = sitk.GetArrayViewFromImage(probability)
        qsm_values = sitk.GetArrayViewFromImage(qsm)
        stage2 = None
        if self.classifier is not None:
            labels, stage2 = self._classify(qsm, probability_values, flair)
        else:
            labels = find_lesions(
                probability_values >= settings.threshold, qsm.GetSpacing(), settings.min_lesion_mm3,
                settings.connectivity
            )
        lesions = self._with_probabilities(measure_lesions(labels, qsm_values, qsm, probability_values), stage2)
        if settings.min_rim_coverage > 0:
            rimless = lesions_without_rim(lesions, settings.min_rim_coverage)
            if rimless:
                labels[np.isin(labels, rimless)] = 0
                labels = relabel_consecutive(labels, by_volume=True)
                if stage2 is not None:
                    stage2.lesion_of_candidate = _lesion_of_candidate(stage2.candidates.labels, labels)
                lesions = self._with_probabilities(measure_lesions(labels, qsm_values, qsm, probability_values),
                                                   stage2)
            logger.info("Rim check: dropped %d of %d lesion(s) whose paramagnetic rim covers < %.0f %% of the edge",
                        len(rimless), len(rimless) + len(lesions), 100 * settings.min_rim_coverage)
        return labels, lesions, stage2

    def _classify(self, qsm: sitk.Image, probability: np.ndarray, flair: sitk.Image | None
                  ) -> tuple[np.ndarray, Stage2]:
        """Stage 2: candidates at the classifier's stage-1 cut-off (+ FLAIR-bright lesions), the ones called
        at the operating point kept as lesions, numbered by volume."""
        classifier = self.classifier
        settings = self.settings
        started = time.perf_counter()
        candidates = find_case_candidates(
            qsm, probability, flair if classifier.flair_candidates else None, classifier.candidate_threshold,
            classifier.candidate_min_mm3, settings.connectivity)
        return_freed_memory()  # the candidates' working volumes, before LightGBM loads (at the first case)
        chance, spread = classifier.predict(candidates.features)
        cutoff = classifier.cutoff(settings.operating_point)
        called = np.flatnonzero(chance >= cutoff) + 1
        is_called = np.zeros(len(chance) + 1, bool)
        is_called[called] = True
        # A called candidate stays a lesion whatever its outline's size: the classifier judged it on its patch,
        # and a PRL whose stage-1 outline is a small piece of its rim is still a PRL (candidates are already
        # at least the classifier's minimum size). Candidates are components at this connectivity in cc3d's
        # order, so the lesions are the called ones renumbered as find_lesions numbers them.
        labels, lesion_of_candidate = keep_components(candidates.labels, is_called, candidates.foreground())
        stage2 = Stage2(settings.operating_point, cutoff, candidates, chance, spread,
                        lesion_of_candidate, _classifier_record(classifier),
                        time.perf_counter() - started)
        logger.info("Lesion classifier (%s, p ≥ %.2f): %d of %d candidate(s) called PRL",
                    settings.operating_point, cutoff, len(called), candidates.count)
        return labels, stage2

    @staticmethod
    def _with_probabilities(lesions: list[LesionFeatures], stage2: Stage2 | None) -> list[LesionFeatures]:
        if stage2 is None:
            return lesions
        by_lesion = {int(lesion): k for k, lesion in enumerate(stage2.lesion_of_candidate) if lesion}
        return [replace(lesion, prl_probability=float(stage2.probability[by_lesion[lesion.lesion_id]]),
                        prl_uncertainty=float(stage2.uncertainty[by_lesion[lesion.lesion_id]]))
                if lesion.lesion_id in by_lesion else lesion for lesion in lesions]

    def detect_files(self, qsm_path: str | Path, flair_path: str | Path | None = None, progress: Progress | None = None) -> DetectionResult:
        self.check_inputs(flair_path is not None)
        qsm = read_image(qsm_path, "QSM")
        flair = read_image(flair_path, "FLAIR") if flair_path is not None else None
        return self.detect(qsm, flair, progress)


def _lesion_of_candidate(candidates: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """For each candidate id 1..n, the lesion id it became (0 if none): a lesion is a whole candidate."""
    n = int(candidates.max()) if candidates.size else 0
    out = np.zeros(n, np.int64)
    inside = (candidates > 0) & (lesions > 0)
    out[candidates[inside].astype(np.int64) - 1] = lesions[inside]
    return out


def _classifier_record(classifier: LesionClassifier) -> dict:
    card = classifier.card
    return {key: card[key] for key in ("name", "version", "trained_on", "validation", "candidate_threshold")
            if key in card}


def write_candidates_csv(path: str | Path, stage2: Stage2) -> None:
    """One row per candidate: what stage 2 decided about it and the features it decided on."""
    columns = ["candidate_id", "lesion_id", "source", "prl_probability", "prl_uncertainty", *FEATURE_NAMES]
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        for k in range(stage2.candidates.count):
            values = [repr(round(float(v), 6)) if np.isfinite(v) else "" for v in stage2.candidates.features[k]]
            writer.writerow([k + 1, int(stage2.lesion_of_candidate[k]), stage2.candidates.sources[k],
                             repr(round(float(stage2.probability[k]), 6)),
                             repr(round(float(stage2.uncertainty[k]), 6)), *values])


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
            "classifier_sha256": classifier_sha256(model.path),
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
        "lesion_classifier": result.stage2.record() if result.stage2 else None,
        "lesion_probabilities": [
            {"lesion_id": lesion.lesion_id, "prl_probability": lesion.prl_probability,
             "prl_uncertainty": lesion.prl_uncertainty} for lesion in result.lesions] if result.stage2 else None,
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
        labels = result.labels
        if labels.GetPixelID() != sitk.sitkUInt16:
            labels = sitk.Cast(labels, sitk.sitkUInt16)
        sitk.WriteImage(labels, str(staging / LABELS_NAME), True)
        write_seg_nrrd(result.labels, staging / SEGMENTATION_NAME)
        write_lesions_csv(staging / LESIONS_NAME, result.lesions)
        if result.stage2 is not None:
            write_candidates_csv(staging / CANDIDATES_NAME, result.stage2)
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
