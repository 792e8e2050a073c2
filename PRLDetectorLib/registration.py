"""Bringing FLAIR onto the QSM grid (the output grid).

Same-session scans share scanner space: resampling is enough and exact. When they do not line up
(another session, a re-slice that lost the header) a rigid registration with mutual information aligns
FLAIR to the QSM brain outline, which is the one structure both contrasts show clearly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.images import head_mask, same_grid

logger = logging.getLogger(__name__)

ALIGN_MODES = ("auto", "always", "never")
# Brain-outline Dice above which two scans are taken to line up already: about what a 1 mm shift of a brain
# leaves (0.93 let 3 mm of head motion through unregistered on whole-brain phantoms).
ALIGNED_DICE = 0.97
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

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "overlap_fraction": round(self.overlap_fraction, 4),
            "dice_before": round(self.dice_before, 4),
            "dice_after": round(self.dice_after, 4),
            "transform": [round(v, 6) for v in self.transform],
        }


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


def _outline(image: sitk.Image, masked: bool) -> sitk.Image:
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

    ``mode``: ``auto`` registers only when a plain resampling leaves the brain outlines apart;
    ``always`` registers; ``never`` only resamples.
    """
    if mode not in ALIGN_MODES:
        raise InputError(f"FLAIR alignment '{mode}' is unknown; use one of {', '.join(ALIGN_MODES)}.")
    if same_grid(flair, qsm):
        return flair, Alignment("identical grid", 1.0, 1.0, 1.0)
    overlap = check_overlap(flair, qsm)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    resampled = _resample(flair, qsm, identity)
    qsm_outline = _outline(qsm, masked=True)
    flair_outline = _outline(flair, masked=False)
    dice_before = _dice(_resample(flair_outline, qsm, identity, linear=False), qsm_outline)
    logger.info("FLAIR → QSM: box overlap %.0f %%, brain outline Dice %.3f", overlap * 100, dice_before)
    if mode == "never" or (mode == "auto" and dice_before >= ALIGNED_DICE):
        return resampled, Alignment("resampled", overlap, dice_before, dice_before)

    try:
        transform = _register_rigid(qsm_outline, flair)
    except RuntimeError as error:  # e.g. an outline without contrast (a field of view inside the brain)
        logger.warning("Rigid registration of FLAIR failed (%s); keeping the scanner-space resampling.",
                       str(error).strip().splitlines()[-1][:120])
        return resampled, Alignment("resampled", overlap, dice_before, dice_before)
    registered = _resample(flair, qsm, transform)
    dice_after = _dice(_resample(flair_outline, qsm, transform, linear=False), qsm_outline)
    logger.info("FLAIR rigidly registered to QSM: outline Dice %.3f → %.3f", dice_before, dice_after)
    if dice_after < dice_before:  # registration diverged: the header alignment was the better guess
        logger.warning("Registration did not improve the alignment; keeping the scanner-space resampling.")
        return resampled, Alignment("resampled", overlap, dice_before, dice_before)
    return registered, Alignment("rigid registration", overlap, dice_before, dice_after, tuple(transform.GetParameters()))


def flair_channel(flair: sitk.Image, qsm: sitk.Image, mode: str = "auto") -> tuple[sitk.Image, Alignment]:
    """The FLAIR input channel of a QSM + FLAIR network: on the QSM grid and masked to the QSM brain.

    Training data (:mod:`PRLDetectorLib.dataset`) and inference (:mod:`PRLDetectorLib.pipeline`) both take it
    from here, so the network sees at inference exactly what it was trained on.
    """
    on_grid, alignment = flair_to_qsm_grid(flair, qsm, mode)
    brain = head_mask(sitk.GetArrayViewFromImage(qsm))
    masked = sitk.GetImageFromArray(np.where(brain, sitk.GetArrayViewFromImage(on_grid), 0).astype(np.float32))
    masked.CopyInformation(qsm)
    return masked, alignment


def _register_rigid(qsm_outline: sitk.Image, flair: sitk.Image) -> sitk.Euler3DTransform:
    # Fixed: the QSM brain outline, smoothed so the metric has a gradient to follow. QSM contrast inside the
    # brain is too faint and noisy for mutual information with FLAIR; the outline is shared by both.
    fixed = sitk.SmoothingRecursiveGaussian(sitk.Cast(qsm_outline, sitk.sitkFloat32), 2.0)
    moving = sitk.Cast(flair, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed=7)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed, moving)
    # Composite → plain Euler3D so the parameters can be reported.
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0))
    return euler
