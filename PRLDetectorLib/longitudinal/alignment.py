"""The follow-up QSM registered rigidly to the baseline QSM, and the checks that they show one brain.

Both maps are seen as :func:`~PRLDetectorLib.detection.registration.registration_image` makes them (the map
inside the brain, a value of its own outside), so Mattes mutual information holds on to deep grey matter,
veins and ventricles as well as to the outline. The scanner-space headers are the starting point; when the
two brains' centres lie more than :data:`FAR_APART_MM` apart (another scanner, another origin) the centres
are aligned first.

A registration is refused (:class:`InputError`, one sentence) when the two brains share too little space
after it, or when the two maps, aligned, look too little alike to be one brain: on phantom pairs the QSM
correlation inside both brains is 0.85-0.90 for two visits of one patient and 0.63-0.66 for two patients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.detection.images import head_mask
from PRLDetectorLib.detection.registration import brain_outline, register_rigid, registration_image
from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

FAR_APART_MM = 30.0
MIN_SHARED_BRAIN = 0.25
"""Share of the smaller brain both scans must hold after registration."""
MIN_SAME_BRAIN_CORRELATION = 0.75
"""QSM correlation (inside both brains, after registration) below which two scans are not taken for one brain."""


@dataclass(frozen=True)
class VisitAlignment:
    """How the follow-up lies against the baseline: ``transform`` maps a baseline point (LPS mm) to the
    follow-up point showing the same anatomy (``sitk.Resample(followup, baseline, transform)`` puts the
    follow-up on the baseline grid)."""

    transform: sitk.Euler3DTransform
    correlation: float
    """QSM correlation inside both brains after registration."""
    correlation_before: float
    """The same at the scanner-space headers' alignment."""
    shared_brain: float
    """Share of the smaller brain that both scans hold after registration."""

    @property
    def inverse(self) -> sitk.Transform:
        """Follow-up point → baseline point."""
        return self.transform.GetInverse()

    def to_dict(self) -> dict:
        angles = np.rad2deg(self.transform.GetParameters()[:3])
        return {
            "method": "rigid registration (Mattes mutual information), follow-up onto baseline",
            "transform": "Euler3D: rotation about x, y, z (rad), translation (mm); maps baseline LPS points to "
                         "follow-up LPS points",
            "parameters": [round(v, 6) for v in self.transform.GetParameters()],
            "center_mm": [round(v, 4) for v in self.transform.GetCenter()],
            "baseline_to_followup_lps": np.round(transform_matrix(self.transform), 6).tolist(),
            "rotation_deg": round(float(np.abs(angles).max()), 3),
            "translation_mm": round(float(np.linalg.norm(self.transform.GetTranslation())), 3),
            "correlation_before_after": [round(self.correlation_before, 4), round(self.correlation, 4)],
            "shared_brain": round(self.shared_brain, 4),
        }


def transform_matrix(transform: sitk.Transform) -> np.ndarray:
    """A rigid (or affine) SimpleITK transform as a 4x4 LPS matrix."""
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = np.array(transform.GetTranslation()) + centre - matrix @ centre
    return out


def euler_from_dict(record: dict) -> sitk.Euler3DTransform:
    """Rebuild :meth:`VisitAlignment.to_dict`'s transform."""
    euler = sitk.Euler3DTransform()
    euler.SetCenter([float(v) for v in record["center_mm"]])
    euler.SetParameters([float(v) for v in record["parameters"]])
    return euler


def align_visits(baseline_qsm: sitk.Image, followup_qsm: sitk.Image) -> VisitAlignment:
    """Register the follow-up QSM to the baseline QSM; raise :class:`InputError` when they are not one brain."""
    baseline_qsm = sitk.Cast(baseline_qsm, sitk.sitkFloat32)
    followup_qsm = sitk.Cast(followup_qsm, sitk.sitkFloat32)
    baseline_outline = brain_outline(baseline_qsm, masked=True)
    followup_outline = brain_outline(followup_qsm, masked=True)
    if not sitk.GetArrayViewFromImage(baseline_outline).any() or not sitk.GetArrayViewFromImage(followup_outline).any():
        raise InputError("One of the two QSM maps is empty (all zero); give the QSM each result was detected on.")
    fixed = registration_image(baseline_qsm, baseline_outline)
    moving = registration_image(followup_qsm, followup_outline)
    start = _starting_shift(baseline_outline, followup_outline)
    before = sitk.Euler3DTransform()
    before.SetTranslation(tuple(start))
    correlation_before, _ = brain_correlation(baseline_qsm, followup_qsm, before)
    try:
        transform = register_rigid(fixed, baseline_outline, _shifted(moving, start))
    except RuntimeError as error:
        raise InputError("The follow-up QSM could not be registered to the baseline QSM "
                         f"({str(error).strip().splitlines()[-1][:100]}); check that both are of one patient.") from None
    transform = _compose_shift(transform, start)
    correlation, shared = brain_correlation(baseline_qsm, followup_qsm, transform)
    alignment = VisitAlignment(transform, correlation, correlation_before, shared)
    logger.info("Follow-up registered to baseline: %.1f mm, %.1f°; QSM correlation %.2f → %.2f, shared brain %.0f %%",
                alignment.to_dict()["translation_mm"], alignment.to_dict()["rotation_deg"], correlation_before,
                correlation, 100 * shared)
    if shared < MIN_SHARED_BRAIN:
        raise InputError(f"The two visits' brains barely overlap after registration ({shared:.0%} shared); check that "
                         "both QSM maps are of the same patient and cover the same part of the brain.")
    if correlation < MIN_SAME_BRAIN_CORRELATION:
        raise InputError(f"The two visits do not look like one brain after registration (QSM correlation "
                         f"{correlation:.2f}, below {MIN_SAME_BRAIN_CORRELATION}); check that both are of the same "
                         "patient.")
    return alignment


def _starting_shift(baseline_outline: sitk.Image, followup_outline: sitk.Image) -> np.ndarray:
    """Zero when the headers roughly agree; else the shift that puts the two brains' centres together."""
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(baseline_outline)
    baseline_centre = np.array(shape.GetCentroid(1))
    shape.Execute(followup_outline)
    followup_centre = np.array(shape.GetCentroid(1))
    shift = followup_centre - baseline_centre
    if np.linalg.norm(shift) <= FAR_APART_MM:
        return np.zeros(3)
    logger.info("The two brains' centres lie %.0f mm apart in scanner space; starting from their centres.",
                float(np.linalg.norm(shift)))
    return shift


def _shifted(image: sitk.Image, shift: np.ndarray) -> sitk.Image:
    """``image`` with its origin moved by ``-shift``: the registration then starts from the shifted position."""
    if not np.any(shift):
        return image
    out = sitk.Image(image)
    out.SetOrigin(tuple(np.array(image.GetOrigin()) - shift))
    return out


def _compose_shift(transform: sitk.Euler3DTransform, shift: np.ndarray) -> sitk.Euler3DTransform:
    """A transform found on the shifted follow-up, as one on the real follow-up (a point moves ``shift`` further)."""
    if not np.any(shift):
        return transform
    out = sitk.Euler3DTransform(transform)
    out.SetTranslation(tuple(np.array(transform.GetTranslation()) + shift))
    return out


def brain_correlation(baseline_qsm: sitk.Image, followup_qsm: sitk.Image, transform: sitk.Transform) -> tuple[float, float]:
    """QSM correlation inside both brains with the follow-up moved by ``transform``, and the share of the smaller
    brain that both hold."""
    moved = sitk.Resample(followup_qsm, baseline_qsm, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    a = sitk.GetArrayViewFromImage(baseline_qsm)
    b = sitk.GetArrayViewFromImage(moved)
    baseline_brain = head_mask(a)
    both = baseline_brain & head_mask(b)
    followup_voxels = np.count_nonzero(head_mask(sitk.GetArrayViewFromImage(followup_qsm)))
    followup_in_baseline_voxels = followup_voxels * np.prod(followup_qsm.GetSpacing()) / np.prod(baseline_qsm.GetSpacing())
    smaller = min(np.count_nonzero(baseline_brain), followup_in_baseline_voxels)
    shared = float(np.count_nonzero(both) / smaller) if smaller else 0.0
    if np.count_nonzero(both) < 100:
        return 0.0, shared
    x = a[both].astype(np.float64)
    y = b[both].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return (float((x * y).sum() / norm) if norm > 0 else 0.0), shared
