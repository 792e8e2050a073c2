"""Bringing FLAIR onto the QSM grid (the output grid).

Same-session scans share scanner space: resampling is enough and exact. When they do not line up
(another session, a re-slice that lost the header, head motion between the two acquisitions) a rigid
registration with mutual information between the QSM map and FLAIR, inside the QSM brain, aligns them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.detection.images import head_mask, same_grid
from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

ALIGN_MODES = ("auto", "always", "never")
# Mutual information (Mattes, 48 bins) a registration must reach before it is trusted. Registered phantom
# QSM/FLAIR pairs reach 0.15-0.60 (small crops 0.15-0.27); a featureless map against a featureless FLAIR,
# where the optimiser only fits noise, 0.017.
MIN_MUTUAL_INFORMATION = 0.05
MIN_OVERLAP_FRACTION = 0.25


@dataclass(frozen=True)
class Alignment:
    method: str
    """"identical grid", "resampled" or "rigid registration"."""
    overlap_fraction: float
    dice_before: float
    dice_after: float
    transform: tuple[float, ...] = ()
    """Euler3D parameters (rotation rad x, y, z, translation mm) for a registration."""
    center: tuple[float, ...] = ()
    """Fixed centre of rotation of that transform (LPS mm); the parameters mean nothing without it."""
    mutual_information: tuple[float, float] = ()
    """Mattes mutual information (negated, lower is better) at the header alignment and after registering."""

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "overlap_fraction": round(self.overlap_fraction, 4),
            "dice_before": round(self.dice_before, 4),
            "dice_after": round(self.dice_after, 4),
            "transform": [round(v, 6) for v in self.transform],
            "center_mm": [round(v, 4) for v in self.center],
            "mutual_information_before_after": [round(v, 5) for v in self.mutual_information],
        }


def euler_from_record(record: dict | None) -> sitk.Euler3DTransform | None:
    """Rebuild a recorded registration (``Alignment.to_dict``, as burden.json keeps it); None without one."""
    if not record or record.get("method") != "rigid registration" or len(record.get("center_mm", ())) != 3:
        return None
    euler = sitk.Euler3DTransform()
    euler.SetCenter([float(v) for v in record["center_mm"]])
    euler.SetParameters([float(v) for v in record["transform"]])
    return euler


def flair_as_recorded(flair: sitk.Image, qsm: sitk.Image, record: dict | None) -> sitk.Image | None:
    """FLAIR on the QSM grid exactly as a recorded alignment (``Alignment.to_dict``) put it, without
    registering again; None when the record cannot say (none, or a registration recorded without its centre)."""
    method = (record or {}).get("method")
    if method == "identical grid" and same_grid(flair, qsm):
        return flair
    if method == "resampled":
        return _resample(flair, qsm, sitk.Transform(3, sitk.sitkIdentity))
    transform = euler_from_record(record)
    return None if transform is None else _resample(flair, qsm, transform)


def physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (LPS mm) of an image's voxel grid."""
    size = np.array(image.GetSize()) - 1
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner * size])
        for corner in map(np.array, product((0, 1), repeat=3))
    ]
    corners = np.array(corners)
    return corners.min(0), corners.max(0)


def overlap_fraction(a: sitk.Image, b: sitk.Image) -> float:
    """Share of the smaller image's box that the two boxes have in common."""
    a_min, a_max = physical_box(a)
    b_min, b_max = physical_box(b)
    common = np.clip(np.minimum(a_max, b_max) - np.maximum(a_min, b_min), 0, None).prod()
    smaller = min((a_max - a_min).prod(), (b_max - b_min).prod())
    return float(common / smaller) if smaller > 0 else 0.0


def check_overlap(flair: sitk.Image, qsm: sitk.Image) -> float:
    """Raise InputError when FLAIR and QSM share too little physical space; return the overlap fraction."""
    overlap = overlap_fraction(flair, qsm)
    if overlap < MIN_OVERLAP_FRACTION:
        raise InputError(
            f"The FLAIR does not overlap the QSM in physical space ({overlap:.0%} of the smaller volume); "
            "check that both belong to the same patient and session, or register them first."
        )
    return overlap


def brain_outline(image: sitk.Image, masked: bool) -> sitk.Image:
    """Head mask as uint8: the non-zero support of a masked map (QSM), Otsu's threshold of a FLAIR."""
    values = sitk.GetArrayViewFromImage(image)
    if masked:
        mask = head_mask(values)
    else:
        mask = sitk.GetArrayViewFromImage(sitk.OtsuThreshold(image, 0, 1)) > 0
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(image)
    return out


def _dice(a: sitk.Image, b: sitk.Image) -> float:
    x = sitk.GetArrayViewFromImage(a) > 0
    y = sitk.GetArrayViewFromImage(b) > 0
    total = x.sum() + y.sum()
    return float(2 * (x & y).sum() / total) if total else 0.0


def _resample(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform, linear: bool = True) -> sitk.Image:
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(moving, reference, transform, interpolator, 0.0, moving.GetPixelID())


def flair_to_qsm_grid(flair: sitk.Image, qsm: sitk.Image, mode: str = "auto") -> tuple[sitk.Image, Alignment]:
    """Return FLAIR on exactly the QSM grid and how it got there.

    ``mode``: ``auto`` registers FLAIR acquired on another grid and keeps the registration only when it
    raises the mutual information between the two over what the scanner-space headers give, to at least
    ``MIN_MUTUAL_INFORMATION`` (head motion between two acquisitions is the rule, and the overlap of brain
    outlines cannot see 2-3 mm of it); ``always`` keeps any registration that converged; ``never`` only
    resamples. A FLAIR already on the QSM grid is taken as it is (registered or reconstructed on it).
    """
    if mode not in ALIGN_MODES:
        raise InputError(f"FLAIR alignment '{mode}' is unknown; use one of {', '.join(ALIGN_MODES)}.")
    if same_grid(flair, qsm):
        return flair, Alignment("identical grid", 1.0, 1.0, 1.0)
    overlap = check_overlap(flair, qsm)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    resampled = _resample(flair, qsm, identity)
    qsm_outline = brain_outline(qsm, masked=True)
    flair_outline = brain_outline(flair, masked=False)
    dice_before = _dice(_resample(flair_outline, qsm, identity, linear=False), qsm_outline)
    logger.info("FLAIR → QSM: box overlap %.0f %%, brain outline Dice %.3f", overlap * 100, dice_before)
    header_only = Alignment("resampled", overlap, dice_before, dice_before)
    if mode == "never":
        return resampled, header_only

    fixed = registration_image(qsm, qsm_outline)
    moving = sitk.Cast(flair, sitk.sitkFloat32)
    try:
        transform = register_rigid(fixed, qsm_outline, moving)
    except RuntimeError as error:  # e.g. a QSM without contrast
        logger.warning("Rigid registration of FLAIR failed (%s); keeping the scanner-space resampling.",
                       str(error).strip().splitlines()[-1][:120])
        return resampled, header_only
    information = (_mutual_information(fixed, moving, identity), _mutual_information(fixed, moving, transform))
    if mode == "auto" and (information[1] >= information[0] or -information[1] < MIN_MUTUAL_INFORMATION):
        logger.info("Registration did not improve on the scanner-space alignment, or the two share too little "
                    "structure to trust it (mutual information %.4f → %.4f); keeping the resampling.",
                    -information[0], -information[1])
        return resampled, Alignment("resampled", overlap, dice_before, dice_before, mutual_information=information)
    registered = _resample(flair, qsm, transform)
    dice_after = _dice(_resample(flair_outline, qsm, transform, linear=False), qsm_outline)
    angles = np.rad2deg(transform.GetParameters()[:3])
    logger.info("FLAIR rigidly registered to QSM: %.1f mm, %.1f°; mutual information %.4f → %.4f",
                float(np.linalg.norm(transform.GetTranslation())), float(np.abs(angles).max()),
                -information[0], -information[1])
    return registered, Alignment("rigid registration", overlap, dice_before, dice_after,
                                 tuple(transform.GetParameters()), tuple(transform.GetCenter()), information)


def flair_channel(flair: sitk.Image, qsm: sitk.Image, mode: str = "auto") -> tuple[sitk.Image, Alignment]:
    """The FLAIR input channel of a QSM + FLAIR network: on the QSM grid and masked to the QSM brain.

    Training data (:mod:`PRLDetectorLib.training.dataset`) and inference (:mod:`PRLDetectorLib.detection.pipeline`) both take it
    from here, so the network sees at inference exactly what it was trained on.
    """
    on_grid, alignment = flair_to_qsm_grid(flair, qsm, mode)
    brain = head_mask(sitk.GetArrayViewFromImage(qsm))
    masked = sitk.GetImageFromArray(np.where(brain, sitk.GetArrayViewFromImage(on_grid), 0).astype(np.float32))
    masked.CopyInformation(qsm)
    return masked, alignment


def registration_image(qsm: sitk.Image, qsm_outline: sitk.Image) -> sitk.Image:
    """What registration sees of a QSM map: the map inside the brain, a value of its own outside it. FLAIR is
    registered to it; a follow-up QSM, made into one too, to the baseline's (:mod:`PRLDetectorLib.longitudinal`).

    Mutual information then sees both structures FLAIR shares with QSM: the brain outline (where there is one)
    and, inside, deep grey matter, veins, ventricles and the grey/white border. The outline alone failed on a
    field of view that cuts through the brain (on 96 x 112 x 72 mm crops it drove 2-3 mm of head motion to
    6-17 mm); the map's content alone has nothing to hold on to where the QSM is featureless.
    """
    values = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.Cast(qsm, sitk.sitkFloat32), 0.5))
    brain = sitk.GetArrayViewFromImage(qsm_outline) > 0
    inside = values[brain]
    low, high = (np.percentile(inside, (1, 99)) if inside.size else (0.0, 1.0))
    background = low - 0.25 * max(high - low, 1e-6)
    fixed = sitk.GetImageFromArray(np.where(brain, np.clip(values, low, high), background).astype(np.float32))
    fixed.CopyInformation(qsm)
    return fixed


def register_rigid(fixed: sitk.Image, qsm_outline: sitk.Image, moving: sitk.Image) -> sitk.Euler3DTransform:
    """Rigid Mattes-MI registration of ``moving`` (float32: FLAIR, or a follow-up QSM's registration image) to
    ``fixed``; the transform maps fixed points to moving points."""
    # The scanner-space headers are the starting point; rotation about the fixed brain's centre.
    initial = sitk.Euler3DTransform()
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(qsm_outline)
    initial.SetCenter(shape.GetCentroid(1))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, seed=7)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=200, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed, moving)
    # Composite → plain Euler3D so the parameters can be reported.
    return sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0))


def _mutual_information(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Registration's own metric at one transform, over every voxel at full resolution (deterministic);
    ``moving``: FLAIR as float32."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform)
    return float(method.MetricEvaluate(fixed, moving))
