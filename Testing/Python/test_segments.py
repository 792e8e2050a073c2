"""The ``.seg.nrrd`` writer: one segment per lesion, with the extent Slicer uses to draw and crop it."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.exports.segments import write_seg_nrrd


def test_each_segment_gets_the_bounding_box_of_its_lesion_even_with_gaps_in_the_ids_and_at_the_edges(tmp_path):
    import slicerio

    values = np.zeros((20, 30, 40), dtype=np.uint16)  # z, y, x
    values[0:3, 5:9, 0:2] = 1  # touches the first voxel of x and z
    values[10:20, 29, 30:40] = 7  # touches the last voxel of every axis it spans
    values[4, 4, 4] = 300  # one voxel, an id above 255
    values[12, 2:5, 3] = 300  # the same lesion in a second piece: its box spans both
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.5, 0.6, 1.2))
    write_seg_nrrd(image, tmp_path / "prl.seg.nrrd")

    segmentation = slicerio.read_segmentation(str(tmp_path / "prl.seg.nrrd"))
    extents = {segment["labelValue"]: segment["extent"] for segment in segmentation["segments"]}
    expected = {}
    for lesion_id in (1, 7, 300):
        k, j, i = np.nonzero(values == lesion_id)
        expected[lesion_id] = [i.min(), i.max(), j.min(), j.max(), k.min(), k.max()]
    assert extents == expected
    voxels = np.asarray(segmentation["voxels"]).transpose(2, 1, 0)
    np.testing.assert_array_equal(voxels, values)


def test_a_label_map_without_lesions_gives_a_segmentation_without_segments(tmp_path):
    import slicerio

    write_seg_nrrd(sitk.Image(8, 9, 10, sitk.sitkUInt16), tmp_path / "prl.seg.nrrd")
    assert slicerio.read_segmentation(str(tmp_path / "prl.seg.nrrd"))["segments"] == []
