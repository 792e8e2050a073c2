"""FLAIR onto the QSM grid: resampling when aligned, rigid registration when not, refusal when apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from PRLDetectorLib.detection.images import same_grid
from PRLDetectorLib.detection.registration import (
    MIN_MUTUAL_INFORMATION,
    check_overlap,
    euler_from_record,
    flair_to_qsm_grid,
    overlap_fraction,
    physical_box,
)
from PRLDetectorLib.errors import InputError


def _head(size=(80, 96, 72), spacing=(1.0, 1.0, 1.0), origin=(-40.0, -48.0, -36.0)) -> tuple[sitk.Image, sitk.Image]:
    """A brain-like ellipsoid with an asymmetric bump, as QSM (masked, small values) and FLAIR (noisy, unmasked)."""
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    z, y, x = np.indices(size[::-1]).astype(float)
    pts = np.stack([x, y, z], -1) * np.array(spacing) + np.array(origin)
    brain = (pts[..., 0] / 30) ** 2 + (pts[..., 1] / 38) ** 2 + (pts[..., 2] / 26) ** 2 <= 1
    bump = ((pts[..., 0] - 18) / 12) ** 2 + ((pts[..., 1] - 30) / 10) ** 2 + ((pts[..., 2] - 10) / 10) ** 2 <= 1
    brain |= bump
    rng = np.random.default_rng(1)
    qsm = np.where(brain, rng.normal(0, 0.03, brain.shape), 0).astype(np.float32)
    flair = (np.where(brain, 300.0, 20.0) + rng.normal(0, 10, brain.shape)).astype(np.float32)
    q = sitk.GetImageFromArray(qsm)
    q.CopyInformation(ref)
    f = sitk.GetImageFromArray(flair)
    f.CopyInformation(ref)
    return q, f


def _moved(image: sitk.Image, transform: sitk.Transform, spacing=(1.2, 1.2, 1.5)) -> sitk.Image:
    """Resample the FLAIR content onto its own coarser grid, displaced by ``transform``."""
    grid = sitk.Image([int(s * image.GetSpacing()[i] / spacing[i]) for i, s in enumerate(image.GetSize())], sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(image.GetOrigin())
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, 20.0)


def test_an_identical_grid_is_passed_through():
    qsm, flair = _head()
    out, how = flair_to_qsm_grid(flair, qsm)
    assert how.method == "identical grid"
    assert out is flair


def test_an_aligned_flair_on_another_grid_is_only_resampled_onto_the_qsm_grid():
    qsm, flair = _head()
    other = _moved(flair, sitk.Transform(3, sitk.sitkIdentity))
    out, how = flair_to_qsm_grid(other, qsm)
    assert how.method == "resampled"
    assert same_grid(out, qsm)
    assert how.dice_before > 0.95


def test_a_misaligned_flair_is_registered_rigidly_and_lines_up_afterwards():
    qsm, flair = _head()
    shift = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, np.deg2rad(6), (7.0, -5.0, 4.0))
    other = _moved(flair, shift)
    out, how = flair_to_qsm_grid(other, qsm)
    assert how.method == "rigid registration"
    assert same_grid(out, qsm)
    assert how.dice_before < 0.9
    assert how.dice_after > 0.95
    # Voxel by voxel the registered FLAIR matches the undisplaced one far better than the raw resampling.
    truth = sitk.GetArrayFromImage(flair)
    plain = sitk.GetArrayFromImage(sitk.Resample(other, qsm, sitk.Transform(), sitk.sitkLinear, 20.0))
    registered = sitk.GetArrayFromImage(out)
    assert np.abs(registered - truth).mean() < 0.4 * np.abs(plain - truth).mean()
    # The recorded transform (parameters + centre, as burden.json keeps them) rebuilds that registration.
    record = how.to_dict()
    assert len(record["transform"]) == 6 and len(record["center_mm"]) == 3
    again = sitk.GetArrayFromImage(sitk.Resample(other, qsm, euler_from_record(record), sitk.sitkLinear, 0.0))
    assert np.abs(again - registered).max() < 0.05 * np.abs(truth).max()


def test_a_flair_that_does_not_overlap_the_qsm_is_refused():
    qsm, flair = _head()
    far = sitk.Image(flair)
    far.SetOrigin((500.0, 0.0, 0.0))
    assert overlap_fraction(far, qsm) == 0.0
    with pytest.raises(InputError, match="does not overlap the QSM"):
        flair_to_qsm_grid(far, qsm)
    # The rule is a quarter of the smaller box: 20 % shared is refused, 30 % goes on.
    lo, hi = physical_box(qsm)
    width = float(hi[0] - lo[0])
    for shared, refused in ((0.2, True), (0.3, False)):
        shifted = sitk.Image(qsm)
        shifted.SetOrigin(tuple(np.add(qsm.GetOrigin(), ((1 - shared) * width, 0.0, 0.0))))
        assert overlap_fraction(shifted, qsm) == pytest.approx(shared)
        if refused:
            with pytest.raises(InputError, match=r"does not overlap the QSM in physical space \(20%"):
                check_overlap(shifted, qsm)
        else:
            assert check_overlap(shifted, qsm) == pytest.approx(shared)


def test_a_qsm_field_of_view_inside_the_brain_still_gets_its_flair():
    # No zero background around the QSM: its outline has no edge to register to; resampling must stand.
    qsm, flair = _head()
    inner = qsm[25:55, 30:66, 25:47]
    assert (sitk.GetArrayViewFromImage(inner) != 0).all()
    moved = _moved(flair, sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.0, (3.0, 0.0, 0.0)))
    out, how = flair_to_qsm_grid(moved, inner)
    assert same_grid(out, inner)
    # A featureless map against a featureless FLAIR: the optimiser can only fit noise, which must not be kept.
    assert how.method == "resampled"
    assert -how.mutual_information[1] < MIN_MUTUAL_INFORMATION


def _mean_error_mm(qsm: sitk.Image, transform: sitk.Transform, qsm_to_flair: np.ndarray) -> float:
    """Mean distance, over the brain, between where ``transform`` and the true head motion send a QSM point."""
    brain = np.argwhere(sitk.GetArrayViewFromImage(qsm) != 0)[::40][:, ::-1]
    points = np.array([qsm.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in brain])
    truth = points @ qsm_to_flair[:3, :3].T + qsm_to_flair[:3, 3]
    found = np.array([transform.TransformPoint(tuple(p)) for p in points])
    return float(np.linalg.norm(found - truth, axis=1).mean())


def test_the_head_motion_of_a_phantom_is_recovered_on_a_field_of_view_that_cuts_through_the_brain(small_case):
    # 96 x 112 x 72 mm: the QSM's brain outline is cut by the box on most sides. Registering to that outline
    # drove this patient's 3.1 mm of head motion to 9.9 mm; the recorded transform must now undo it.
    qsm = sitk.ReadImage(str(small_case / "qsm.nii.gz"), sitk.sitkFloat32)
    flair = sitk.ReadImage(str(small_case / "flair.nii.gz"), sitk.sitkFloat32)
    truth = json.loads((small_case / "truth.json").read_text(encoding="utf-8"))["flair"]
    qsm_to_flair = np.array(truth["qsm_to_flair_lps"])
    out, how = flair_to_qsm_grid(flair, qsm)
    assert how.method == "rigid registration"
    before = _mean_error_mm(qsm, sitk.Transform(3, sitk.sitkIdentity), qsm_to_flair)
    after = _mean_error_mm(qsm, euler_from_record(how.to_dict()), qsm_to_flair)
    assert before > 2.0
    assert after < 0.6
    assert same_grid(out, qsm)
