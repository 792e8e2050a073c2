"""Splitting a PRL mask into numbered lesions, on arrays whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from PRLDetectorLib.detection.lesions import (
    find_lesions,
    keep_components,
    lesion_extents,
    relabel_consecutive,
)
from PRLDetectorLib.errors import InputError

ISO = (1.0, 1.0, 1.0)


def _cube(mask: np.ndarray, corner: tuple[int, int, int], size: int | tuple[int, int, int]) -> None:
    sz, sy, sx = (size, size, size) if isinstance(size, int) else size
    z, y, x = corner
    mask[z : z + sz, y : y + sy, x : x + sx] = True


def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    """The lesions as sets of flat voxel indices: equal partitions whatever the numbering."""
    flat = labels.ravel()
    return {frozenset(np.flatnonzero(flat == i).tolist()) for i in np.unique(flat[flat > 0])}


def test_two_cubes_touching_at_a_corner_are_one_lesion_at_26_and_two_at_18_and_6():
    mask = np.zeros((10, 10, 10), bool)
    _cube(mask, (1, 1, 1), 3)
    _cube(mask, (4, 4, 4), 3)  # shares only the corner between voxel (3,3,3) and (4,4,4)
    assert find_lesions(mask, ISO, connectivity=26).max() == 1
    assert find_lesions(mask, ISO, connectivity=18).max() == 2
    assert find_lesions(mask, ISO, connectivity=6).max() == 2


def test_two_cubes_touching_along_an_edge_are_one_lesion_at_18_and_two_at_6():
    mask = np.zeros((10, 10, 10), bool)
    _cube(mask, (1, 1, 1), 3)
    _cube(mask, (1, 4, 4), 3)  # same z range: the cubes share an edge line, no face
    assert find_lesions(mask, ISO, connectivity=26).max() == 1
    assert find_lesions(mask, ISO, connectivity=18).max() == 1
    assert find_lesions(mask, ISO, connectivity=6).max() == 2


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_lesions_are_the_same_components_scipy_finds(connectivity):
    mask = np.random.default_rng(7).random((24, 28, 32)) > 0.75
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    expected, _ = ndimage.label(mask, structure=structure)
    assert _partition(find_lesions(mask, ISO, connectivity=connectivity)) == _partition(expected)


def test_lesions_are_numbered_largest_first_and_equal_sizes_keep_raster_order():
    mask = np.zeros((12, 20, 20), bool)
    _cube(mask, (1, 1, 1), 2)  # 8 voxels, first in raster order
    _cube(mask, (1, 10, 10), 4)  # 64 voxels
    _cube(mask, (6, 1, 1), 3)  # 27 voxels
    _cube(mask, (8, 12, 12), 2)  # 8 voxels, last in raster order
    labels = find_lesions(mask, ISO)
    assert labels.dtype == np.uint16
    assert labels[1, 10, 10] == 1
    assert labels[6, 1, 1] == 2
    assert labels[1, 1, 1] == 3
    assert labels[8, 12, 12] == 4
    assert np.array_equal(labels > 0, mask)


def test_minimum_size_drops_exactly_the_lesions_below_it():
    spacing = (0.7, 0.7, 1.2)
    voxel_mm3 = 0.7 * 0.7 * 1.2
    mask = np.zeros((12, 20, 20), bool)
    _cube(mask, (1, 1, 1), 2)  # 8 voxels
    _cube(mask, (1, 10, 10), 4)  # 64 voxels
    _cube(mask, (6, 1, 1), 3)  # 27 voxels: exactly the minimum, so it stays
    labels = find_lesions(mask, spacing, min_lesion_mm3=27 * voxel_mm3)
    assert labels.max() == 2
    assert labels[1, 10, 10] == 1 and labels[6, 1, 1] == 2
    assert labels[1, 1, 1] == 0
    assert find_lesions(mask, spacing, min_lesion_mm3=27 * voxel_mm3 + 0.01).max() == 1


def test_an_empty_mask_gives_an_empty_uint16_map():
    labels = find_lesions(np.zeros((4, 5, 6), np.uint8), ISO, min_lesion_mm3=10)
    assert labels.dtype == np.uint16 and labels.shape == (4, 5, 6) and not labels.any()


def test_a_read_only_mask_from_a_simpleitk_view_is_accepted():
    mask = np.zeros((5, 6, 7), np.uint8)
    _cube(mask, (1, 1, 1), 2)
    view = sitk.GetArrayViewFromImage(sitk.GetImageFromArray(mask))
    assert not view.flags.writeable
    assert find_lesions(view, ISO).max() == 1


def test_a_fortran_ordered_mask_gives_the_same_numbering():
    mask = np.random.default_rng(3).random((10, 11, 12)) > 0.8
    assert np.array_equal(find_lesions(np.asfortranarray(mask), ISO), find_lesions(mask, ISO))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"connectivity": 8}, "Connectivity 8"),
        ({"min_lesion_mm3": -1.0}, "Minimum lesion size"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "spacing"),
        ({"spacing_mm": (1.0, 1.0)}, "spacing"),
    ],
)
def test_bad_settings_are_input_errors(kwargs, message):
    arguments = {"mask": np.zeros((3, 3, 3), bool), "spacing_mm": ISO, **kwargs}
    with pytest.raises(InputError, match=message):
        find_lesions(**arguments)


def test_a_2d_mask_is_an_input_error():
    with pytest.raises(InputError, match="3D"):
        find_lesions(np.zeros((3, 3), bool), ISO)


def test_relabel_consecutive_closes_gaps_and_keeps_the_order():
    labels = np.zeros((4, 4, 4), np.uint16)
    labels[0, 0, :2] = 7
    labels[1, :, :] = 3  # the biggest
    labels[3, 3, 3] = 12
    out = relabel_consecutive(labels)
    assert out.dtype == np.uint16
    assert out[1, 0, 0] == 1 and out[0, 0, 0] == 2 and out[3, 3, 3] == 3
    by_volume = relabel_consecutive(labels, by_volume=True)
    assert by_volume[1, 0, 0] == 1 and by_volume[0, 0, 0] == 2 and by_volume[3, 3, 3] == 3
    single = np.zeros((2, 2, 2), np.int32)
    single[0, 0, 0], single[1, 1, 1] = 9, 4  # equal sizes keep id order
    assert relabel_consecutive(single, by_volume=True)[1, 1, 1] == 1


def test_relabel_consecutive_refuses_fractional_and_negative_ids():
    with pytest.raises(InputError, match="integers"):
        relabel_consecutive(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(InputError, match="negative"):
        relabel_consecutive(-np.ones((2, 2, 2), np.int16))


def test_lesion_extents_agree_with_scipy():
    labels = find_lesions(np.random.default_rng(11).random((15, 17, 19)) > 0.7, ISO)
    extents = lesion_extents(labels)
    ids = np.arange(1, labels.max() + 1)
    assert np.array_equal(extents.ids, ids)
    assert np.array_equal(extents.voxels, ndimage.sum_labels(np.ones_like(labels), labels, ids))
    assert np.allclose(extents.centroid_zyx, ndimage.center_of_mass(np.ones_like(labels), labels, ids))
    boxes = ndimage.find_objects(labels)
    assert np.array_equal(extents.bbox_min_zyx, [[s.start for s in box] for box in boxes])
    assert np.array_equal(extents.bbox_max_zyx, [[s.stop - 1 for s in box] for box in boxes])


def test_lesion_extents_of_an_empty_map_are_empty():
    extents = lesion_extents(np.zeros((3, 3, 3), np.uint16))
    assert len(extents) == 0 and extents.bbox_min_zyx.shape == (0, 3)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_keeping_some_candidates_gives_the_map_find_lesions_makes_of_them(connectivity):
    from PRLDetectorLib.detection.candidates import find_candidates

    rng = np.random.default_rng(connectivity)
    probability = ndimage.gaussian_filter(rng.random((40, 48, 44)), 1.0).astype(np.float32)
    probability = (probability - probability.min()) / np.ptp(probability)
    probability[3:6, 3:6, 3:6] = probability[10:13, 3:6, 3:6] = 1.0  # two of exactly equal size
    candidates, n = find_candidates(probability, 0.62, (1.0, 1.0, 1.0), 0.0, None, connectivity)
    assert n > 10
    for trial in range(5):
        keep = np.zeros(n + 1, bool)
        keep[1:] = rng.random(n) < 0.5
        keep[[1, 2]] = trial % 2 == 0  # sometimes both of the equal-size ones
        expected = find_lesions(keep[candidates], (1.0, 1.0, 1.0), 0.0, connectivity)
        kept, lesion_of = keep_components(candidates, keep)
        assert kept.dtype == np.uint16 and kept.max() == keep[1:].sum()
        np.testing.assert_array_equal(kept, expected)
        for component in range(1, n + 1):  # the lesion each candidate became, as the maps say
            became = np.unique(kept[candidates == component])
            assert list(became) == [lesion_of[component - 1]]
