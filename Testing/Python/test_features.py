"""Per-lesion measurements on hand-built lesions whose rim, core and surround are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import cdist

from PRLDetectorLib.detection.features import (
    LESION_COLUMNS,
    LesionFeatures,
    lesions_without_rim,
    measure_lesions,
    read_lesions_csv,
    write_lesions_csv,
)
from PRLDetectorLib.errors import InputError


def _reference(shape_zyx, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.Image([int(n) for n in shape_zyx[::-1]], sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def _oblique_direction() -> np.ndarray:
    a, b = math.radians(30), math.radians(10)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return about_z @ about_x


def _only(lesions: list[LesionFeatures]) -> LesionFeatures:
    assert len(lesions) == 1
    return lesions[0]


def test_size_box_and_centroid_of_a_block_match_sitk_with_an_oblique_direction():
    labels = np.zeros((8, 9, 10), np.uint16)
    labels[2:5, 3:7, 1:8] = 1  # z 2..4, y 3..6, x 1..7: centroid index (x, y, z) = (4, 4.5, 3)
    reference = _reference(labels.shape, (0.8, 0.9, 1.7), (10.0, -20.0, 30.0), _oblique_direction())
    lesion = _only(measure_lesions(labels, np.full(labels.shape, 0.01, np.float32), reference))

    expected = reference.TransformContinuousIndexToPhysicalPoint((4.0, 4.5, 3.0))
    assert lesion.centroid_lps == pytest.approx(expected, abs=1e-9)
    assert lesion.centroid_ras == pytest.approx((-expected[0], -expected[1], expected[2]), abs=1e-9)
    assert lesion.bbox_min_ijk == (1, 3, 2)
    assert lesion.bbox_max_ijk == (7, 6, 4)
    assert lesion.voxels == 3 * 4 * 7
    assert lesion.volume_mm3 == pytest.approx(84 * 0.8 * 0.9 * 1.7)


def test_qsm_and_probability_summaries_cover_the_lesion_only():
    labels = np.zeros((6, 6, 6), np.uint16)
    labels[1:3, 1:3, 1:3] = 2
    qsm = np.zeros(labels.shape, np.float32)
    qsm[1:3, 1:3, 1:3] = np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 100
    qsm[5, 5, 5] = 9.0  # outside the lesion: must not be the maximum
    probability = np.where(labels > 0, 0.8, 0.1).astype(np.float32)
    reference = _reference(labels.shape)
    lesion = _only(measure_lesions(labels, qsm, reference, probability))
    assert lesion.lesion_id == 2
    assert lesion.qsm_mean_ppm == pytest.approx(0.035)
    assert lesion.qsm_max_ppm == pytest.approx(0.07)
    assert lesion.probability_mean == pytest.approx(0.8)
    assert math.isnan(_only(measure_lesions(labels, qsm, reference)).probability_mean)


def _ring_cube(rim_value: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A 10-voxel cube whose outer layer is paramagnetic, in tissue of 0.01 ppm."""
    labels = np.zeros((20, 20, 20), np.uint16)
    labels[5:15, 5:15, 5:15] = 1
    qsm = np.full(labels.shape, 0.01, np.float32)
    qsm[5:15, 5:15, 5:15] = rim_value
    qsm[6:14, 6:14, 6:14] = 0.0
    return labels, qsm


def test_rim_and_core_of_a_ring_lesion_separate_the_paramagnetic_layer():
    labels, qsm = _ring_cube()
    # At 1 mm a voxel's depth is its layer number, so a 1.5 mm rim is exactly the outer layer.
    lesion = _only(measure_lesions(labels, qsm, _reference(labels.shape)))
    assert lesion.rim_mean_ppm == pytest.approx(0.1)
    assert lesion.core_mean_ppm == pytest.approx(0.0)
    assert lesion.surround_mean_ppm == pytest.approx(0.01)
    assert lesion.rim_minus_core_ppm == pytest.approx(0.1)
    assert lesion.rim_minus_surround_ppm == pytest.approx(0.09)
    assert lesion.paramagnetic_edge_fraction == pytest.approx(1.0)


def test_a_wider_rim_takes_in_the_second_layer():
    labels, qsm = _ring_cube()
    lesion = _only(measure_lesions(labels, qsm, _reference(labels.shape), rim_mm=2.0))
    outer_layer, second_layer = 10**3 - 8**3, 8**3 - 6**3
    assert lesion.rim_mean_ppm == pytest.approx(0.1 * outer_layer / (outer_layer + second_layer))
    assert lesion.core_mean_ppm == pytest.approx(0.0)


def test_with_thick_slices_the_rim_is_three_in_plane_layers_plus_the_end_slices():
    labels = np.zeros((8, 20, 20), np.uint16)
    labels[2:6, 4:16, 4:16] = 1  # 4 slices of 12 x 12 voxels
    spacing = (0.5, 0.5, 2.0)  # x, y, z
    # Expected rim: within 1.5 mm in-plane (3 layers of 0.5 mm) or in the first or last slice, whose
    # face neighbour lies outside although it is 2 mm away.
    z, y, x = np.indices(labels.shape)
    in_plane_layer = np.minimum.reduce([y - 4, 15 - y, x - 4, 15 - x]) + 1
    expected_rim = (labels > 0) & ((in_plane_layer <= 3) | (z == 2) | (z == 5))
    qsm = np.where(expected_rim, 1.0, 0.0).astype(np.float32)
    qsm[labels == 0] = 0.5
    lesion = _only(measure_lesions(labels, qsm, _reference(labels.shape, spacing)))
    assert lesion.rim_mean_ppm == 1.0
    assert lesion.core_mean_ppm == 0.0


def test_a_lesion_too_thin_for_a_core_has_nan_core_measures():
    labels = np.zeros((6, 6, 6), np.uint16)
    labels[2:4, 2:4, 2:4] = 1
    qsm = np.full(labels.shape, 0.01, np.float32)
    qsm[labels > 0] = 0.05
    lesion = _only(measure_lesions(labels, qsm, _reference(labels.shape)))
    assert lesion.rim_mean_ppm == pytest.approx(0.05)
    assert math.isnan(lesion.core_mean_ppm) and math.isnan(lesion.rim_minus_core_ppm)
    assert lesion.rim_minus_surround_ppm == pytest.approx(0.04)


def test_a_lesion_on_the_image_border_has_its_rim_on_the_border():
    labels = np.zeros((8, 8, 8), np.uint16)
    labels[:4, :4, :4] = 1
    qsm = np.zeros(labels.shape, np.float32)
    qsm[1:3, 1:3, 1:3] = 1.0  # the core, if the scan edge counts as outside the lesion
    lesion = _only(measure_lesions(labels, qsm, _reference(labels.shape)))
    assert lesion.core_mean_ppm == 1.0
    assert lesion.rim_mean_ppm == 0.0


def test_surround_is_the_shell_from_1_to_3_mm_without_other_lesions_or_zero_voxels():
    rng = np.random.default_rng(5)
    spacing_xyz = (0.6, 0.7, 0.9)
    labels = np.zeros((16, 18, 20), np.uint16)
    labels[6:10, 6:11, 6:12] = 1
    labels[6:10, 12:15, 6:12] = 2  # another lesion inside lesion 1's shell
    qsm = rng.normal(0.0, 0.05, labels.shape).astype(np.float32)
    qsm[:, :, :8] = 0.0  # outside the brain mask
    lesions = measure_lesions(labels, qsm, _reference(labels.shape, spacing_xyz))

    points_mm = np.argwhere(np.ones(labels.shape, bool)) * np.asarray(spacing_xyz[::-1])
    lesion_mm = np.argwhere(labels == 1) * np.asarray(spacing_xyz[::-1])
    distance = cdist(points_mm, lesion_mm).min(axis=1).reshape(labels.shape)
    # Distances that equal a limit up to rounding (5 x 0.6 mm = 3 mm) count as on the limit.
    shell = (labels == 0) & (distance > 1.0 + 1e-6) & (distance <= 3.0 + 1e-6) & (qsm != 0)
    assert lesions[0].surround_mean_ppm == pytest.approx(float(qsm[shell].mean(dtype=np.float64)), abs=1e-9)


def _sphere_with_partial_rim(direction=None) -> tuple[np.ndarray, np.ndarray, sitk.Image, float]:
    """A sphere whose rim is paramagnetic except in the index quadrant x > centre, y > centre."""
    n, centre, radius = 32, 15.5, 9.0  # centre between voxels: no rim voxel sits on a sector edge
    z, y, x = np.indices((n, n, n))
    r = np.sqrt((z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2)
    labels = (r <= radius).astype(np.uint16)
    qsm = np.full(labels.shape, 0.01, np.float32)
    qsm[labels > 0] = 0.0
    uncovered = (x > centre) & (y > centre)
    qsm[(labels > 0) & (r > radius - 2) & ~uncovered] = 0.1
    return labels, qsm, _reference(labels.shape, direction=direction), 0.75


@pytest.mark.parametrize("direction", [None, np.diag([-1.0, 1.0, 1.0]), np.diag([-1.0, -1.0, 1.0])])
def test_a_rim_around_three_quarters_of_the_edge_gives_a_paramagnetic_fraction_of_three_quarters(direction):
    labels, qsm, reference, expected = _sphere_with_partial_rim(direction)
    lesion = _only(measure_lesions(labels, qsm, reference))
    assert lesion.paramagnetic_edge_fraction == pytest.approx(expected, abs=0.03)
    assert lesion.rim_mean_ppm > lesion.core_mean_ppm + 0.05


def test_a_lesion_without_a_rim_has_no_paramagnetic_edge():
    labels, qsm, reference, _ = _sphere_with_partial_rim()
    qsm[labels > 0] = 0.015  # above the surround, but by less than the 0.02 ppm margin
    assert _only(measure_lesions(labels, qsm, reference)).paramagnetic_edge_fraction == 0.0


def test_the_rim_check_keeps_the_lesions_whose_rim_covers_enough_of_the_edge():
    """Three spheres side by side: a full rim, a rim around 3/4 of the edge, no rim."""
    n, radius = 32, 9.0
    z, y, x = np.indices((n, n, 3 * n))
    labels = np.zeros(z.shape, np.uint16)
    qsm = np.full(z.shape, 0.01, np.float32)
    for lesion, coverage in ((1, 1.0), (2, 0.75), (3, 0.0)):
        cx = 15.5 + (lesion - 1) * n
        r = np.sqrt((z - 15.5) ** 2 + (y - 15.5) ** 2 + (x - cx) ** 2)
        inside = r <= radius
        labels[inside] = lesion
        qsm[inside] = 0.0
        shell = inside & (r > radius - 2)
        if coverage == 0.75:
            shell &= ~((x > cx) & (y > 15.5))
        if coverage > 0:
            qsm[shell] = 0.1
    lesions = measure_lesions(labels, qsm, _reference(labels.shape))
    assert [round(lesion.paramagnetic_edge_fraction, 1) for lesion in lesions] == [1.0, 0.8, 0.0]
    assert lesions_without_rim(lesions, 2 / 3) == [3]
    assert lesions_without_rim(lesions, 0.9) == [2, 3]
    assert lesions_without_rim(lesions, 0.0) == []
    unmeasurable = LesionFeatures(**{**vars(lesions[0]), "paramagnetic_edge_fraction": math.nan})
    assert lesions_without_rim([unmeasurable], 0.1) == [1]


def test_threads_do_not_change_the_results():
    rng = np.random.default_rng(2)
    labels = np.zeros((20, 30, 30), np.uint16)
    for i in range(12):
        z, y, x = rng.integers(2, 16), rng.integers(2, 26), rng.integers(2, 26)
        labels[z : z + 3, y : y + 4, x : x + 4] = i + 1
    qsm = rng.normal(0.0, 0.05, labels.shape).astype(np.float32)
    reference = _reference(labels.shape, (0.6, 0.6, 1.0))
    single = measure_lesions(labels, qsm, reference, workers=1)
    threaded = measure_lesions(labels, qsm, reference, workers=3)
    assert len(single) == len(threaded) == 12
    for one, other in zip(single, threaded, strict=True):
        assert one.as_row() == pytest.approx(other.as_row(), nan_ok=True)


def test_lesion_ids_with_gaps_are_kept():
    labels = np.zeros((6, 6, 6), np.uint16)
    labels[1, 1, 1], labels[4, 4, 4] = 3, 7
    lesions = measure_lesions(labels, np.ones(labels.shape, np.float32), _reference(labels.shape))
    assert [lesion.lesion_id for lesion in lesions] == [3, 7]


def test_arrays_off_the_reference_grid_are_input_errors():
    labels = np.zeros((4, 5, 6), np.uint16)
    with pytest.raises(InputError, match="QSM"):
        measure_lesions(labels, np.zeros((4, 5, 7)), _reference(labels.shape))
    with pytest.raises(InputError, match="reference"):
        measure_lesions(labels, np.zeros(labels.shape), _reference((6, 5, 4)))
    with pytest.raises(InputError, match="Rim width"):
        measure_lesions(labels, np.zeros(labels.shape), _reference(labels.shape), rim_mm=0)


def test_rows_have_the_csv_columns_in_order():
    labels, qsm = _ring_cube()
    row = _only(measure_lesions(labels, qsm, _reference(labels.shape))).as_row()
    assert tuple(row) == LESION_COLUMNS
    assert LESION_COLUMNS[:3] == ("lesion_id", "voxels", "volume_mm3")
    assert "centroid_lps_x_mm" in row and "centroid_ras_z_mm" in row and "bbox_max_k" in row


def test_the_csv_round_trips_with_nan_as_an_empty_cell(tmp_path):
    labels = np.zeros((10, 10, 10), np.uint16)
    labels[2:4, 2:4, 2:4] = 1  # no core: NaN core measures
    labels[5:9, 5:9, 5:9] = 2
    qsm = np.random.default_rng(1).normal(0.0, 0.05, labels.shape).astype(np.float32)
    reference = _reference(labels.shape, (0.9, 0.9, 1.1), (-90.0, -120.0, -70.0))
    lesions = measure_lesions(labels, qsm, reference)
    path = tmp_path / "lesions.csv"
    write_lesions_csv(path, lesions)
    assert path.read_text(encoding="utf-8").splitlines()[0] == ",".join(LESION_COLUMNS)
    assert ",," in path.read_text(encoding="utf-8").splitlines()[1]
    rows = read_lesions_csv(path)
    assert [row["lesion_id"] for row in rows] == [1, 2]
    for lesion, row in zip(lesions, rows, strict=True):
        assert row == pytest.approx(lesion.as_row(), abs=1e-3, nan_ok=True)
    assert math.isnan(rows[0]["core_mean_ppm"])


def test_reading_a_csv_keeps_extra_columns_and_names_missing_ones(tmp_path):
    path = tmp_path / "lesions.csv"
    labels, qsm = _ring_cube()
    write_lesions_csv(path, measure_lesions(labels, qsm, _reference(labels.shape)))
    header, line = path.read_text(encoding="utf-8").splitlines()
    path.write_text(f"{header},reader\n{line},rejected\n", encoding="utf-8")
    assert read_lesions_csv(path)[0]["reader"] == "rejected"
    path.write_text("lesion_id,voxels\n1,5\n", encoding="utf-8")
    with pytest.raises(InputError, match="volume_mm3"):
        read_lesions_csv(path)
