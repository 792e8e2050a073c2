"""Reading and validating inputs with real SimpleITK files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from PRLDetectorLib.detection.images import read_image, same_grid, validate_flair, validate_qsm
from PRLDetectorLib.errors import InputError


def _brain_like(shape=(20, 24, 22), value=0.05, seed=0) -> np.ndarray:
    """A QSM-like map: an ellipsoid of small ppm values, zero outside."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    c = [(s - 1) / 2 for s in shape]
    inside = ((z - c[0]) / (shape[0] * 0.4)) ** 2 + ((y - c[1]) / (shape[1] * 0.4)) ** 2 + ((x - c[2]) / (shape[2] * 0.4)) ** 2 <= 1
    return np.where(inside, rng.normal(0, value, shape), 0).astype(np.float32)


def _write(array: np.ndarray, path, spacing=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_reads_nifti_nrrd_and_mha_with_the_same_values_and_geometry(tmp_path, suffix):
    values = _brain_like()
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.8, 0.9, 1.1))
    image.SetOrigin((10.0, -20.0, 30.0))
    path = tmp_path / f"qsm{suffix}"
    sitk.WriteImage(image, str(path))
    read = read_image(path, "QSM")
    assert read.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(read.GetSpacing(), (0.8, 0.9, 1.1), atol=1e-5)
    np.testing.assert_allclose(read.GetOrigin(), (10.0, -20.0, 30.0), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), values)


def test_reads_a_dicom_series_folder(tmp_path):
    values = (_brain_like() * 1000).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.0, 1.0, 2.0))
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(values.shape[0]):
        slice_ = image[:, :, k]
        slice_.SetMetaData("0020|000e", series_uid)
        slice_.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_.SetMetaData("0020|0013", str(k))
        slice_.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(slice_)
    read = read_image(folder, "QSM")
    assert read.GetSize() == image.GetSize()
    np.testing.assert_allclose(read.GetSpacing()[2], 2.0, atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), values.astype(np.float32))


def test_a_file_that_is_not_an_image_is_named_as_such(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("these are my notes, not an image", encoding="utf-8")
    with pytest.raises(InputError, match="not an image"):
        read_image(path, "QSM")


def test_a_truncated_file_is_called_truncated(tmp_path):
    path = tmp_path / "qsm.nii"
    _write(_brain_like((40, 40, 40)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_image(path, "QSM")


def test_a_truncated_gzip_file_is_refused(tmp_path):
    path = tmp_path / "qsm.nii.gz"
    _write(_brain_like((40, 40, 40)), path)
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data)[:-2000])
    with pytest.raises(InputError):
        read_image(path, "QSM")


def test_2d_and_4d_images_are_refused(tmp_path):
    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 20), np.float32)), str(flat))
    with pytest.raises(InputError, match="2D"):
        read_image(flat, "QSM")
    echoes = tmp_path / "echoes.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(_brain_like())] * 3), str(echoes))
    with pytest.raises(InputError, match="4D with 3 volumes"):
        read_image(echoes, "QSM")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz", "FLAIR")


def test_nan_outside_the_head_is_read_as_zero_and_reported():
    values = _brain_like()
    values[values == 0] = np.nan
    image, check = validate_qsm(sitk.GetImageFromArray(values))
    cleaned = sitk.GetArrayFromImage(image)
    assert np.isfinite(cleaned).all()
    assert check.nonfinite_outside_head == int(np.isnan(values).sum()) > 0
    assert cleaned[np.isnan(values)].max() == 0


def test_nan_inside_the_head_is_refused():
    values = _brain_like()
    values[10, 12, 11] = np.nan
    with pytest.raises(InputError, match=r"1 NaN voxel\(s\) inside the head around voxel \[11, 12, 10\]"):
        validate_qsm(sitk.GetImageFromArray(values))


def test_inf_inside_the_head_is_refused():
    values = _brain_like()
    values[9:11, 12, 11] = np.inf
    with pytest.raises(InputError, match=r"2 infinite voxel\(s\)"):
        validate_qsm(sitk.GetImageFromArray(values))


def test_an_all_zero_volume_is_refused():
    with pytest.raises(InputError, match="all zero"):
        validate_qsm(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.float32)))
    with pytest.raises(InputError, match="all zero"):
        validate_flair(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.float32)))


def test_qsm_in_ppb_is_refused_and_the_same_map_in_ppm_is_accepted():
    ppm = _brain_like(value=0.08)
    validate_qsm(sitk.GetImageFromArray(ppm))
    with pytest.raises(InputError, match="ppb"):
        validate_qsm(sitk.GetImageFromArray(ppm * 1000))


def test_same_grid_tells_a_shifted_origin_apart():
    a = sitk.Image(5, 5, 5, sitk.sitkFloat32)
    b = sitk.Image(a)
    assert same_grid(a, b)
    b.SetOrigin((0.0, 0.0, 0.5))
    assert not same_grid(a, b)


def test_nan_voxels_of_a_nifti_file_reach_validation_at_their_place(tmp_path):
    # ITK's NIfTI reader turns NaN into 0; a hole in the map must still be seen where it is.
    values = _brain_like()
    values[10, 12, 11] = np.nan
    path = tmp_path / "qsm.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    read = sitk.GetArrayFromImage(read_image(path, "QSM"))
    assert np.argwhere(np.isnan(read)).tolist() == [[10, 12, 11]]
    with pytest.raises(InputError, match=r"1 NaN voxel\(s\) inside the head"):
        validate_qsm(read_image(path, "QSM"))


# --- Inf and NaN: where they are, and what is background ------------------------------------------------------


@pytest.fixture(scope="module")
def whole_brain():
    """A 1 mm whole-brain phantom QSM: the brain in a zero background, as QSM tools write it."""
    from PRLDetectorLib.phantom.phantom import generate_case

    return generate_case("whole", seed=11, with_flair=False).qsm


@pytest.fixture(scope="module")
def brain_crop():
    """A small phantom crop inside the brain (no background at all), as the tests detect on."""
    from PRLDetectorLib.phantom.phantom import generate_case

    return generate_case("crop", seed=13, with_flair=False, extent_mm=(96.0, 112.0, 72.0)).qsm


def _like(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(reference)
    return image


def _edge_block(values: np.ndarray) -> tuple[slice, slice, slice]:
    """A 10x10x10 block straddling the brain's edge: half in the brain, half in the background (along x)."""
    z, y = values.shape[0] // 2, values.shape[1] // 2
    x = int(np.flatnonzero(values[z, y] != 0)[-1])  # the last brain voxel along this row
    return slice(z - 5, z + 5), slice(y - 5, y + 5), slice(x - 4, x + 6)


def test_a_block_of_inf_straddling_the_edge_of_the_brain_is_refused_with_where_it_is(whole_brain):
    values = sitk.GetArrayFromImage(whole_brain)
    block = _edge_block(values)
    values[block] = np.inf
    with pytest.raises(InputError, match=r"has 1000 infinite voxel\(s\) around voxel \[\d+, \d+, \d+\] "
                       r"\(LPS [-\d.]+, [-\d.]+, [-\d.]+ mm\), spanning voxels \[(\d+)-(\d+), "):
        validate_qsm(_like(values, whole_brain))


def test_inf_far_outside_the_head_is_refused_too(whole_brain):
    values = sitk.GetArrayFromImage(whole_brain)
    values[:3, :3, :3] = -np.inf
    with pytest.raises(InputError, match=r"27 infinite voxel\(s\) around voxel \[1, 1, 1\]"):
        validate_qsm(_like(values, whole_brain))


def test_a_nan_block_on_the_edge_of_a_brain_in_zero_background_is_a_hole_not_background(whole_brain):
    values = sitk.GetArrayFromImage(whole_brain)
    values[_edge_block(values)] = np.nan
    with pytest.raises(InputError, match=r"1000 NaN voxel\(s\) on the edge of the head around voxel .* where the "
                       "rest of its background is 0"):
        validate_qsm(_like(values, whole_brain))


def test_a_nan_background_around_the_brain_is_read_as_zero(whole_brain):
    values = sitk.GetArrayFromImage(whole_brain)
    background = values == 0
    values[background] = np.nan
    image, check = validate_qsm(_like(values, whole_brain))
    assert check.background == "nan" and check.nonfinite_outside_head == int(background.sum())
    assert np.array_equal(sitk.GetArrayViewFromImage(image) == 0, background)


# --- QSM the models do not expect: SI units, flipped sign, unmasked -----------------------------------------


def test_qsm_in_dimensionless_si_units_is_refused(whole_brain, brain_crop):
    for image in (whole_brain, brain_crop):
        with pytest.raises(InputError, match="dimensionless SI susceptibility, not ppm .*multiply it by 1e6"):
            validate_qsm(_like(sitk.GetArrayFromImage(image) * 1e-6, image))


def test_qsm_with_the_sign_flipped_is_refused_and_the_same_map_unflipped_passes(whole_brain, brain_crop):
    for image in (whole_brain, brain_crop):
        _, check = validate_qsm(image)
        assert check.bright_dark_tail_ratio > 1.5 and not check.warnings
        with pytest.raises(InputError, match="looks sign-flipped.*multiply the map by -1"):
            validate_qsm(_like(-sitk.GetArrayFromImage(image), image))


def test_a_qsm_whose_dark_tail_is_a_little_heavier_passes_with_a_warning_that_is_recorded(whole_brain, caplog):
    # Between "sign-flipped" (< 0.67) and a normal map (> 1): scale the dark side until the ratio is 0.8.
    from PRLDetectorLib.detection.images import head_mask, tail_ratio

    values = sitk.GetArrayFromImage(whole_brain)
    head = head_mask(values)
    median = float(np.median(values[head]))
    stretch = tail_ratio(values[head]) / 0.8
    doubtful = np.where(head & (values < median), median + (values - median) * stretch, values)
    _, check = validate_qsm(_like(doubtful, whole_brain))
    assert check.bright_dark_tail_ratio == pytest.approx(0.8, abs=0.02)
    assert len(check.warnings) == 1 and "dark tail is heavier than its bright one" in check.warnings[0]
    assert "check that paramagnetic" in caplog.text


def test_an_unmasked_qsm_passes_with_a_warning_and_a_crop_inside_the_brain_does_not(whole_brain, brain_crop, caplog):
    values = sitk.GetArrayFromImage(whole_brain)
    from PRLDetectorLib.detection.images import head_mask

    noisy = np.where(head_mask(values), values, np.random.default_rng(0).normal(0, 0.3, values.shape))
    _, check = validate_qsm(_like(noisy, whole_brain))
    assert check.background == "none"
    assert len(check.warnings) == 1 and "looks unmasked" in check.warnings[0]
    assert "looks unmasked" in caplog.text
    _, crop = validate_qsm(brain_crop)
    assert crop.background == "none" and not crop.warnings


def test_the_warnings_of_the_input_checks_are_recorded_in_burden_json(tmp_path, whole_brain):
    import json

    from result_fixtures import TRUTH_MODEL

    from PRLDetectorLib.detection.burden import compute_burden
    from PRLDetectorLib.detection.images import VolumeCheck
    from PRLDetectorLib.detection.pipeline import DetectionResult, write_result
    from PRLDetectorLib.settings import DetectionSettings

    labels = _like(np.zeros(sitk.GetArrayViewFromImage(whole_brain).shape), whole_brain)
    check = VolumeCheck(robust_max_abs=0.1, background="none", warnings=("The QSM ... looks unmasked ...",))
    result = DetectionResult(labels=labels, probability=labels, lesions=[], burden=compute_burden([]),
                             model=TRUTH_MODEL, settings=DetectionSettings(), checks={"qsm": check})
    write_result(result, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "burden.json").read_text(encoding="utf-8"))
    assert record["input_checks"]["qsm"]["warnings"] == ["The QSM ... looks unmasked ..."]
    assert record["input_checks"]["qsm"]["background"] == "none"


def _itk_reading(path) -> sitk.Image:
    """The general reading path: ITK reads the voxels, nibabel puts back the NaN/Inf ITK turns into 0."""
    from PRLDetectorLib.detection.images import _read_file, _restore_nifti_nonfinite, as_3d_float

    return _restore_nifti_nonfinite(path, as_3d_float(_read_file(path, "QSM"), "QSM"))


@pytest.mark.parametrize("kind", ["float_with_nan", "scaled_int16", "oblique_qform_only", "plain_nii"])
def test_a_nifti_decompressed_once_is_the_image_itk_reads(tmp_path, kind):
    import nibabel

    from PRLDetectorLib.detection.images import _read_nifti_once

    values = _brain_like((20, 24, 22)).transpose(2, 1, 0)  # nibabel: i, j, k
    affine = np.diag([0.8, 0.9, 1.1, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    if kind == "float_with_nan":
        values = values.copy()
        values[values == 0] = np.nan
        values[3, 4, 5] = np.inf
        nifti = nibabel.Nifti1Image(values, affine)
    elif kind == "scaled_int16":
        nifti = nibabel.Nifti1Image(np.round(values * 1000).astype(np.int16), affine)
        nifti.header.set_slope_inter(0.001, -0.25)
    elif kind == "oblique_qform_only":
        angle = np.deg2rad(17.0)
        rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
        affine[:3, :3] = rotation @ np.diag([-0.8, 0.9, 1.1])
        nifti = nibabel.Nifti1Image(values, None)
        nifti.set_qform(affine, code=1)
        nifti.set_sform(None, code=0)
    else:
        nifti = nibabel.Nifti1Image(values, affine)
    path = tmp_path / ("qsm.nii" if kind == "plain_nii" else "qsm.nii.gz")
    nibabel.save(nifti, str(path))

    once = _read_nifti_once(path, "QSM")
    assert once is not None, "the one-decompression path was not taken"
    itk = _itk_reading(path)
    assert read_image(path, "QSM").GetSize() == itk.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(once), sitk.GetArrayFromImage(itk))
    assert once.GetPixelID() == itk.GetPixelID() == sitk.sitkFloat32
    assert once.GetOrigin() == itk.GetOrigin()
    assert once.GetSpacing() == itk.GetSpacing()
    assert once.GetDirection() == itk.GetDirection()
