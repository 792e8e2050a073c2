"""The MRML bridge on slicer-core's real MRML scene: volumes, segments and the lesion table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicerio
import vtk

from PRLDetectorLib.detection.features import LESION_COLUMNS, measure_lesions
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.exports.segments import PRL_TERMINOLOGY, segment_color
from PRLDetectorLib.mrml import bridge
from PRLDetectorLib.phantom.phantom import generate_case


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture(scope="module")
def oblique_case():
    """A small phantom whose grid is made oblique and anisotropic, with its lesion instances as 'detection'."""
    case = generate_case("bridge", seed=3, extent_mm=48, n_prl=3)
    qsm = sitk.Image(case.qsm)
    qsm.SetSpacing((0.9, 1.1, 1.3))
    qsm.SetOrigin((12.5, -30.25, 7.75))
    qsm.SetDirection(tuple(_rotation(0.2, -0.15, 0.35).ravel()))
    labels = sitk.GetArrayFromImage(case.gt_instances).astype(np.uint16)
    assert len(np.unique(labels)) > 3, "the phantom should hold several lesions"
    return qsm, labels


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def qsm_node(scene, oblique_case):
    return bridge.add_volume_node(scene, oblique_case[0], "Phantom QSM")


def _ids(labels: np.ndarray) -> list[int]:
    return [int(i) for i in np.unique(labels) if i]


# -- volumes ------------------------------------------------------------------------------------------------


def test_a_volume_node_round_trip_keeps_voxels_and_oblique_geometry_exactly(scene, oblique_case):
    image = oblique_case[0]
    node = bridge.add_volume_node(scene, image, "QSM")
    back = bridge.image_from_volume_node(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetDirection() == image.GetDirection()
    assert back.GetPixelID() == image.GetPixelID()


def test_slicer_places_every_voxel_where_simpleitk_does_in_lps(scene, oblique_case):
    image = oblique_case[0]
    node = bridge.add_volume_node(scene, image, "QSM")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    size = image.GetSize()
    for index in itertools.product((0, size[0] - 1), (0, size[1] - 1), (0, size[2] - 1)):
        ras = ijk_to_ras.MultiplyPoint((*index, 1.0))[:3]
        lps = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose((-ras[0], -ras[1], ras[2]), lps, atol=1e-9)


def test_a_label_map_node_keeps_its_integer_type(scene, oblique_case):
    qsm, labels = oblique_case
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(qsm)
    node = bridge.add_volume_node(scene, image, "labels", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    back = bridge.image_from_volume_node(node)
    assert back.GetPixelID() == sitk.sitkUInt16
    assert np.array_equal(sitk.GetArrayFromImage(back), labels)


def test_geometry_image_has_the_volume_grid(qsm_node, oblique_case):
    reference = bridge.geometry_image(qsm_node)
    qsm = oblique_case[0]
    assert reference.GetSize() == qsm.GetSize()
    assert reference.GetSpacing() == qsm.GetSpacing()
    assert reference.GetOrigin() == qsm.GetOrigin()
    assert reference.GetDirection() == qsm.GetDirection()


def test_an_empty_volume_node_is_an_input_error(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        bridge.image_from_volume_node(node)


# -- segments -------------------------------------------------------------------------------------------------


def test_labels_become_one_named_coloured_lesion_segment_per_id(scene, qsm_node, oblique_case):
    labels = oblique_case[1]
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "Phantom QSM PRLs")
    ids = _ids(labels)
    lesions = bridge.lesion_segments(segmentation)
    assert [s.segment_id for s in lesions] == [f"PRL_{i}" for i in ids]
    assert [s.name for s in lesions] == [f"PRL {i}" for i in ids]
    assert [s.lesion_id for s in lesions] == ids
    assert {s.status for s in lesions} == {bridge.CANDIDATE}
    colours = []
    for lesion_id in ids:
        segment = segmentation.GetSegmentation().GetSegment(f"PRL_{lesion_id}")
        colours.append(segment.GetColor())
        assert np.allclose(segment.GetColor(), segment_color(lesion_id))
        assert segment.GetTerminology() == PRL_TERMINOLOGY
    for a, b in itertools.combinations(colours, 2):
        assert np.abs(np.subtract(a, b)).max() > 0.05, "two lesions share a colour"


def test_the_segmentation_takes_the_qsm_as_reference_and_shows_in_3d(scene, qsm_node, oblique_case):
    segmentation = bridge.segmentation_from_labels(scene, oblique_case[1], qsm_node, "PRLs")
    assert bridge.reference_volume(segmentation) is qsm_node
    geometry = slicer.vtkOrientedImageData()
    conversion = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(conversion, geometry)
    ijk_to_ras = vtk.vtkMatrix4x4()
    qsm_node.GetIJKToRASMatrix(ijk_to_ras)
    expected = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(expected)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(expected), slicer.util.arrayFromVTKMatrix(ijk_to_ras))
    assert segmentation.GetSegmentation().ContainsRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    )
    display = segmentation.GetDisplayNode()
    assert display.GetVisibility3D() and display.GetVisibility2DFill()


def test_segments_export_back_to_the_same_label_map_on_the_oblique_grid(scene, qsm_node, oblique_case):
    labels = oblique_case[1]
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "PRLs")
    ids = _ids(labels)
    back = bridge.labels_from_segmentation(segmentation, qsm_node)
    # Segment n (1-based, segmentation order) is value n; here segment n is lesion ids[n-1].
    lookup = np.array([0, *ids], dtype=np.uint16)
    assert back.dtype == np.uint16
    assert np.array_equal(lookup[back], labels)


def test_export_values_follow_the_order_of_the_segment_ids_given(scene, qsm_node, oblique_case):
    labels = oblique_case[1]
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "PRLs")
    ids = _ids(labels)[:2]
    back = bridge.labels_from_segmentation(segmentation, qsm_node, [f"PRL_{ids[1]}", f"PRL_{ids[0]}"])
    assert np.array_equal(back == 1, labels == ids[1])
    assert np.array_equal(back == 2, labels == ids[0])
    assert set(np.unique(back)) == {0, 1, 2}


def test_temporary_nodes_do_not_stay_in_the_scene(scene, qsm_node, oblique_case):
    segmentation = bridge.segmentation_from_labels(scene, oblique_case[1], qsm_node, "PRLs")
    before = scene.GetNumberOfNodes()
    bridge.labels_from_segmentation(segmentation, qsm_node)
    bridge.set_segment_from_array(segmentation, "PRL_1", oblique_case[1] == 1, qsm_node)
    assert scene.GetNumberOfNodes() == before
    assert not [scene.GetNthNode(i) for i in range(before) if scene.GetNthNode(i).GetName().startswith("__PRLDetector")]


def test_a_segment_can_be_repainted_and_emptied(scene, qsm_node, oblique_case):
    labels = oblique_case[1]
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "PRLs")
    lesion = labels == 1
    half = lesion.copy()
    half.ravel()[np.flatnonzero(lesion)[: lesion.sum() // 2]] = False
    bridge.set_segment_from_array(segmentation, "PRL_1", half, qsm_node)
    assert np.array_equal(bridge.labels_from_segmentation(segmentation, qsm_node, ["PRL_1"]) == 1, half)
    bridge.set_segment_from_array(segmentation, "PRL_1", np.zeros_like(labels), qsm_node)
    assert not bridge.labels_from_segmentation(segmentation, qsm_node, ["PRL_1"]).any()
    # The other lesions are untouched.
    others = bridge.labels_from_segmentation(segmentation, qsm_node, ["PRL_2"])
    assert np.array_equal(others == 1, labels == 2)


def test_segments_the_reader_draws_get_the_next_lesion_ids_and_are_confirmed(scene, qsm_node, oblique_case):
    labels = oblique_case[1]
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "PRLs")
    highest = max(_ids(labels))
    drawn = segmentation.GetSegmentation().AddEmptySegment("", "my lesion")
    copied = slicer.vtkSegment()
    copied.DeepCopy(segmentation.GetSegmentation().GetSegment("PRL_1"))  # a copy carries the same lesion id
    segmentation.GetSegmentation().AddSegment(copied, "copy")
    lesions = {s.segment_id: s for s in bridge.claim_new_segments(segmentation)}
    assert lesions[drawn].lesion_id == highest + 1 and lesions[drawn].status == bridge.CONFIRMED
    assert lesions[drawn].name == "my lesion"
    assert lesions["copy"].lesion_id == highest + 2
    assert lesions["PRL_1"].lesion_id == 1
    assert len({s.lesion_id for s in lesions.values()}) == len(lesions)


def test_status_is_a_segment_tag_and_bad_statuses_are_refused(scene, qsm_node, oblique_case):
    segmentation = bridge.segmentation_from_labels(scene, oblique_case[1], qsm_node, "PRLs")
    bridge.set_lesion_status(segmentation, "PRL_2", bridge.REJECTED)
    assert {s.segment_id: s.status for s in bridge.lesion_segments(segmentation)}["PRL_2"] == bridge.REJECTED
    with pytest.raises(InputError, match="not one of"):
        bridge.set_lesion_status(segmentation, "PRL_2", "maybe")
    with pytest.raises(InputError, match="no segment"):
        bridge.set_lesion_status(segmentation, "nope", bridge.CONFIRMED)
    assert bridge.segment_id_of_lesion(segmentation, 2) == "PRL_2"
    assert bridge.segment_id_of_lesion(segmentation, 999) is None


def test_the_segmentation_joins_the_study_and_the_transform_of_the_qsm(scene, qsm_node, oblique_case):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "MRI 2025")
    hierarchy.CreateItem(study, qsm_node)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    qsm_node.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = bridge.segmentation_from_labels(scene, oblique_case[1], qsm_node, "PRLs")
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    assert segmentation.GetParentTransformNode() is transform


def test_labels_off_the_reference_grid_are_refused(scene, qsm_node):
    with pytest.raises(InputError, match="resample"):
        bridge.segmentation_from_labels(scene, np.zeros((3, 4, 5), np.uint16), qsm_node, "PRLs")


def test_no_lesions_give_an_empty_segmentation(scene, qsm_node, oblique_case):
    segmentation = bridge.segmentation_from_labels(scene, np.zeros_like(oblique_case[1]), qsm_node, "PRLs")
    assert bridge.lesion_segments(segmentation) == []
    assert not bridge.labels_from_segmentation(segmentation, qsm_node).any()


# -- files ------------------------------------------------------------------------------------------------------


def test_seg_nrrd_reads_back_with_slicerio_on_the_qsm_grid(scene, qsm_node, oblique_case, tmp_path):
    qsm, labels = oblique_case
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "PRLs")
    path = bridge.write_segmentation_file(segmentation, tmp_path / "prl.seg.nrrd")
    read = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in read["segments"]] == [f"PRL {i}" for i in _ids(labels)]
    voxels = np.asarray(read["voxels"])
    layers = voxels if voxels.ndim == 4 else voxels[None]
    assert layers.shape[1:] == qsm.GetSize()  # not cropped: (i, j, k) of the QSM
    for segment in read["segments"]:
        lesion_id = int(segment["tags"][bridge.LESION_ID_TAG])
        mask_ijk = layers[segment.get("layer", 0)] == segment["labelValue"]
        assert np.array_equal(mask_ijk.transpose(2, 1, 0), labels == lesion_id)
    ijk_to_lps = np.asarray(read["ijkToLPS"])
    direction = np.asarray(qsm.GetDirection()).reshape(3, 3)
    assert np.allclose(ijk_to_lps[:3, :3], direction @ np.diag(qsm.GetSpacing()), atol=1e-6)
    assert np.allclose(ijk_to_lps[:3, 3], qsm.GetOrigin(), atol=1e-6)


def test_a_saved_segmentation_loads_back_with_statuses(scene, qsm_node, oblique_case, tmp_path):
    labels = oblique_case[1]
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "PRLs")
    bridge.set_lesion_status(segmentation, "PRL_1", bridge.CONFIRMED)
    path = bridge.write_segmentation_file(segmentation, tmp_path / "review.seg.nrrd")
    loaded = bridge.read_segmentation_file(scene, path)
    assert bridge.lesion_segments(loaded) == bridge.lesion_segments(segmentation)
    assert np.array_equal(
        bridge.labels_from_segmentation(loaded, qsm_node), bridge.labels_from_segmentation(segmentation, qsm_node)
    )
    with pytest.raises(InputError, match="does not exist"):
        bridge.read_segmentation_file(scene, tmp_path / "missing.seg.nrrd")


# -- lesion table -------------------------------------------------------------------------------------------------


def _rows(qsm_node, labels, statuses=None):
    qsm = bridge.image_from_volume_node(qsm_node)
    lesions = measure_lesions(labels, sitk.GetArrayViewFromImage(qsm), qsm)
    return bridge.rows_with_status(lesions, statuses or {})


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_lesion_rows_round_trip_through_a_table_node_with_their_types(scene, qsm_node, oblique_case):
    rows = _rows(qsm_node, oblique_case[1], {2: bridge.REJECTED})
    table = bridge.lesion_table_node(scene, rows, "lesions")
    columns = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert columns == list(bridge.TABLE_COLUMNS) and sorted(columns) == sorted([*LESION_COLUMNS, "status", "note"])
    assert table.GetNumberOfRows() == len(rows)
    assert table.GetTable().GetColumnByName("lesion_id").IsA("vtkIntArray")
    assert table.GetTable().GetColumnByName("volume_mm3").IsA("vtkDoubleArray")
    assert table.GetTable().GetColumnByName("status").IsA("vtkStringArray")
    assert table.GetLocked()
    back = bridge.rows_from_table(table)
    assert len(back) == len(rows)
    for row, read in zip(rows, back, strict=True):
        assert {**row, "note": ""}.keys() == read.keys()
        assert all(_same(row[k], read[k]) for k in row), row
    assert [r["status"] for r in back if r["lesion_id"] == 2] == [bridge.REJECTED]


def test_columns_another_tool_added_to_lesions_csv_ride_along_as_text(scene, qsm_node, oblique_case):
    rows = [{**row, "second_reader_score": f"0.{row['lesion_id']}", bridge.NOTE_COLUMN: "faint rim"}
            for row in _rows(qsm_node, oblique_case[1])]
    table = bridge.lesion_table_node(scene, rows, "lesions")
    columns = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert columns == [*bridge.TABLE_COLUMNS, "second_reader_score"]
    back = bridge.rows_from_table(table)
    assert [r["second_reader_score"] for r in back] == [r["second_reader_score"] for r in rows]
    assert {r[bridge.NOTE_COLUMN] for r in back} == {"faint rim"}


def test_a_table_row_gives_back_its_lesion_features(scene, qsm_node, oblique_case):
    qsm = bridge.image_from_volume_node(qsm_node)
    lesions = measure_lesions(oblique_case[1], sitk.GetArrayViewFromImage(qsm), qsm)
    table = bridge.lesion_table_node(scene, bridge.rows_with_status(lesions, {}), "lesions")
    for lesion, row in zip(lesions, bridge.rows_from_table(table), strict=True):
        rebuilt = bridge.lesion_from_row(row)
        assert rebuilt.as_row().keys() == lesion.as_row().keys()
        assert all(_same(lesion.as_row()[k], rebuilt.as_row()[k]) for k in LESION_COLUMNS)


def test_the_burden_from_the_table_leaves_rejected_lesions_out(scene, qsm_node, oblique_case):
    rows = _rows(qsm_node, oblique_case[1], {1: bridge.REJECTED, 2: bridge.CONFIRMED})
    table = bridge.lesion_table_node(scene, rows, "lesions")
    burden = bridge.burden_from_table(table)
    kept = [r for r in rows if r["lesion_id"] != 1]
    assert burden.prl_count == len(kept)
    assert burden.total_volume_mm3 == pytest.approx(sum(r["volume_mm3"] for r in kept))
    assert burden.positive_ge1 == (len(kept) >= 1) and burden.positive_ge4 == (len(kept) >= 4)


def test_a_table_node_is_refilled_in_place(scene, qsm_node, oblique_case):
    rows = _rows(qsm_node, oblique_case[1])
    table = bridge.lesion_table_node(scene, rows, "lesions")
    same = bridge.lesion_table_node(scene, rows[:1], "lesions", table)
    assert same is table and table.GetNumberOfRows() == 1
    empty = bridge.lesion_table_node(scene, [], "none")
    assert empty.GetNumberOfRows() == 0 and empty.GetNumberOfColumns() == len(bridge.TABLE_COLUMNS)
    assert bridge.burden_from_table(empty).prl_count == 0


def test_table_and_segmentation_are_linked_both_ways(scene, qsm_node, oblique_case):
    segmentation = bridge.segmentation_from_labels(scene, oblique_case[1], qsm_node, "PRLs")
    table = bridge.lesion_table_node(scene, _rows(qsm_node, oblique_case[1]), "lesions")
    bridge.link_table(segmentation, table)
    assert bridge.linked_table(segmentation) is table
    assert bridge.linked_segmentation(table) is segmentation


def test_many_segments_get_no_automatic_3d_surfaces(scene, qsm_node, oblique_case, monkeypatch):
    monkeypatch.setattr(bridge, "SURFACE_SEGMENT_LIMIT", 1)
    segmentation = bridge.segmentation_from_labels(scene, oblique_case[1], qsm_node, "PRLs")
    assert not segmentation.GetSegmentation().ContainsRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    )


def test_lesion_ids_with_gaps_keep_their_own_voxels(scene, qsm_node, oblique_case):
    labels = oblique_case[1]
    ids = _ids(labels)
    gappy = np.zeros_like(labels)
    gappy[labels == ids[0]] = 7
    gappy[labels == ids[1]] = 3
    segmentation = bridge.segmentation_from_labels(scene, gappy, qsm_node, "PRLs")
    assert [s.lesion_id for s in bridge.lesion_segments(segmentation)] == [3, 7]
    for lesion_id in (3, 7):
        exported = bridge.labels_from_segmentation(segmentation, qsm_node, [f"PRL_{lesion_id}"])
        assert np.array_equal(exported == 1, gappy == lesion_id)


# -- transforms (a volume moved in Slicer: parent transform, or hardened into its geometry) ------------------------


def _moving_transform(scene, name: str = "moved by the reader"):
    """A rigid transform node: rotation about all three axes plus a translation of several voxels."""
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(0.12, -0.2, 0.3)
    matrix[:3, 3] = (5.0, -3.5, 2.25)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def _reference_node(scene, which: str, oblique_case, flair_case):
    """The QSM of the oblique case, or a FLAIR on its own grid, and lesion labels on that grid."""
    if which == "qsm":
        return bridge.add_volume_node(scene, oblique_case[0], "QSM"), oblique_case[1]
    flair, labels = flair_case
    return bridge.add_volume_node(scene, flair, "FLAIR"), labels


@pytest.fixture(scope="module")
def flair_case():
    """A FLAIR on its own (coarser, tilted) grid, with lesion labels drawn on that grid."""
    case = generate_case("bridge_flair", seed=5, extent_mm=48, n_prl=3, with_flair=True)
    labels = sitk.Resample(case.gt_instances, case.flair, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(labels).astype(np.uint16)
    assert len(np.unique(array)) > 2
    return case.flair, array


@pytest.mark.parametrize("which", ["qsm", "flair"])
@pytest.mark.parametrize("hardened", [False, True], ids=["parent-transform", "hardened"])
def test_segments_of_a_moved_volume_come_back_on_the_same_voxels(scene, oblique_case, flair_case, which, hardened):
    reference, labels = _reference_node(scene, which, oblique_case, flair_case)
    reference.SetAndObserveTransformNodeID(_moving_transform(scene).GetID())
    if hardened:
        reference.HardenTransform()
        assert reference.GetParentTransformNode() is None
    segmentation = bridge.segmentation_from_labels(scene, labels, reference, "PRLs")
    lookup = np.array([0, *_ids(labels)], dtype=np.uint16)
    assert np.array_equal(lookup[bridge.labels_from_segmentation(segmentation, reference)], labels)


def test_segments_sit_on_the_moved_volume_in_the_world(scene, qsm_node, oblique_case):
    """Where a lesion shows in Slicer: its segment's centre in world RAS is its voxels' centre through the transform."""
    transform = _moving_transform(scene)
    qsm_node.SetAndObserveTransformNodeID(transform.GetID())
    labels = oblique_case[1]
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "PRLs")
    ijk_to_ras = vtk.vtkMatrix4x4()
    qsm_node.GetIJKToRASMatrix(ijk_to_ras)
    to_parent = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToParent(to_parent)
    to_world = slicer.util.arrayFromVTKMatrix(to_parent) @ slicer.util.arrayFromVTKMatrix(ijk_to_ras)
    for lesion_id in _ids(labels)[:2]:
        kji = np.argwhere(labels == lesion_id).mean(axis=0)
        expected = (to_world @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]
        center = bridge.segment_center_ras(segmentation, f"PRL_{lesion_id}")
        # GetSegmentCenterRAS is the centre of the bounding box, not the centroid: within a lesion's size.
        assert np.linalg.norm(np.subtract(center, expected)) < 4.0, (center, expected)


def test_a_segment_repainted_on_a_moved_volume_keeps_its_voxels(scene, qsm_node, oblique_case):
    qsm_node.SetAndObserveTransformNodeID(_moving_transform(scene).GetID())
    labels = oblique_case[1]
    segmentation = bridge.segmentation_from_labels(scene, labels, qsm_node, "PRLs")
    lesion = labels == 1
    half = lesion.copy()
    half.ravel()[np.flatnonzero(lesion)[: lesion.sum() // 2]] = False
    bridge.set_segment_from_array(segmentation, "PRL_1", half, qsm_node)
    assert np.array_equal(bridge.labels_from_segmentation(segmentation, qsm_node, ["PRL_1"]) == 1, half)


def test_a_volume_in_the_frame_of_another_carries_the_transform_between_them_in_its_header(scene, oblique_case):
    """A FLAIR aligned to a moved QSM: in the QSM's own frame, every voxel sits where the two transforms put it."""
    image = oblique_case[0]
    flair = bridge.add_volume_node(scene, image, "FLAIR")
    qsm = bridge.add_volume_node(scene, image, "QSM")
    qsm_move = _moving_transform(scene, "QSM placement")
    qsm.SetAndObserveTransformNodeID(qsm_move.GetID())
    flair_move = _moving_transform(scene, "FLAIR alignment")
    shift = np.eye(4)
    shift[:3, 3] = (-7.0, 2.0, 11.0)
    to_parent = vtk.vtkMatrix4x4()
    flair_move.GetMatrixTransformToParent(to_parent)
    flair_move.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift @ slicer.util.arrayFromVTKMatrix(to_parent)))
    flair.SetAndObserveTransformNodeID(flair_move.GetID())
    before = bridge.image_from_volume_node(flair)

    moved = bridge.image_in_frame_of(flair, qsm)

    assert np.array_equal(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(image)), "a rigid move interpolates nothing"
    # (qsm transform)^-1 . shift . (qsm transform) applied to every voxel centre, in RAS.
    expected = np.linalg.inv(slicer.util.arrayFromVTKMatrix(to_parent)) @ shift @ slicer.util.arrayFromVTKMatrix(to_parent)
    for index in ((0, 0, 0), tuple(s - 1 for s in image.GetSize()), (3, 17, 5)):
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = expected @ np.array([-lps[0], -lps[1], lps[2], 1.0])
        assert np.allclose(moved.TransformIndexToPhysicalPoint(index), (-ras[0], -ras[1], ras[2]), atol=1e-6)
    record = bridge.transform_record(flair, qsm)
    assert record["transform"] == "FLAIR alignment" and record["relative_to"] == "QSM" and record["linear"]
    assert record["resampled"] is False
    assert np.allclose(record["matrix_ras"], expected, atol=1e-9)
    # The reader's node is not touched.
    after = bridge.image_from_volume_node(flair)
    assert after.GetOrigin() == before.GetOrigin() and after.GetDirection() == before.GetDirection()
    assert flair.GetParentTransformNode() is flair_move
    assert bridge.image_in_frame_of(qsm, qsm).GetOrigin() == bridge.image_from_volume_node(qsm).GetOrigin()
    assert bridge.transform_record(qsm, qsm) is None


def test_a_non_linear_transform_is_hardened_on_a_copy(scene):
    """A displacement-grid transform (as a deformable registration gives): Slicer resamples a temporary copy."""
    voxels = np.zeros((20, 24, 28), np.float32)
    voxels[8:12, 10:14, 12:16] = 1.0
    flair = bridge.add_volume_node(scene, sitk.GetImageFromArray(voxels), "FLAIR")
    grid = vtk.vtkImageData()
    grid.SetDimensions(6, 6, 6)
    grid.SetSpacing(10, 10, 10)
    grid.SetOrigin(-20, -20, -20)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    grid.GetPointData().GetScalars().Fill(0.0)
    grid.GetPointData().GetScalars().FillComponent(0, 3.0)  # 3 mm towards R everywhere
    warp = slicer.vtkOrientedGridTransform()
    warp.SetDisplacementGridData(grid)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformToParent(warp)
    flair.SetAndObserveTransformNodeID(node.GetID())
    nodes = scene.GetNumberOfNodes()

    moved = bridge.image_in_frame_of(flair, None)

    assert scene.GetNumberOfNodes() == nodes
    assert flair.GetParentTransformNode() is node and np.array_equal(slicer.util.arrayFromVolume(flair), voxels)
    inside = np.argwhere(sitk.GetArrayFromImage(moved) > 0.5)
    centre_lps = moved.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in inside.mean(axis=0)[::-1]))
    assert np.allclose(centre_lps, (13.5 - 3.0, 11.5, 9.5), atol=0.51)  # R is -x in LPS
    assert bridge.transform_record(flair)["linear"] is False and bridge.transform_record(flair)["resampled"]


# -- the lesion table as the reader sees it ------------------------------------------------------------------------


def _titles(table) -> dict[str, str]:
    return {table.GetColumnName(i): table.GetColumnTitle(table.GetColumnName(i)) for i in range(table.GetNumberOfColumns())}


def test_the_panel_table_shows_readers_headers_and_ras_first_while_columns_keep_machine_names(scene, qsm_node, oblique_case):
    from PRLDetectorLib.detection import headers

    table = bridge.lesion_table_node(scene, _rows(qsm_node, oblique_case[1]), "lesions")
    titles = _titles(table)
    assert set(titles) == set(LESION_COLUMNS) | {"status", "note"}, "the node keeps every machine column for scripts"
    assert table.GetUseColumnTitleAsColumnHeader()
    assert titles["volume_mm3"] == "Volume (mm³)" and titles["paramagnetic_edge_fraction"] == "Rim coverage"
    assert titles["centroid_ras_x_mm"] == "Centre R (mm)" and titles["lesion_id"] == "PRL"
    assert all(title != name for name, title in titles.items()), "a column shows its machine name"
    hidden = bridge.hidden_columns(table)
    shown = [name for name in titles if name not in hidden]
    assert shown[:3] == ["lesion_id", "status", "volume_mm3"]
    assert {"centroid_ras_x_mm", "centroid_ras_y_mm", "centroid_ras_z_mm"} <= set(shown)
    assert not any("lps" in name or "bbox" in name for name in shown)
    assert {"prl_probability", "prl_uncertainty"} <= hidden, "no lesion classifier ran: nothing to show"
    # The file-only columns come last, so a narrow panel shows the reader's columns first.
    names = list(titles)
    assert names[-len(headers.FILE_ONLY):] == [c for c in names if c in headers.FILE_ONLY]
    assert table.GetColumnUnitLabel("volume_mm3") == "mm³" and "volume_mm3" in table.GetColumnDescription("volume_mm3")


def test_prl_probability_and_uncertainty_are_shown_when_present_and_sort_the_table(scene, qsm_node, oblique_case):
    rows = _rows(qsm_node, oblique_case[1])
    probabilities = {1: 0.35, 2: 0.9, 3: math.nan}  # lesion 3: the classifier gave nothing
    with_probability = [
        {**row, "prl_probability": probabilities.get(row["lesion_id"], 0.6), "prl_uncertainty": 0.05} for row in rows
    ]
    table = bridge.lesion_table_node(scene, with_probability, "lesions")
    titles = _titles(table)
    assert titles["prl_probability"] == "PRL probability" and titles["prl_uncertainty"] == "Uncertainty (±)"
    assert list(titles)[2:4] == ["prl_probability", "prl_uncertainty"]
    assert not {"prl_probability", "prl_uncertainty"} & bridge.hidden_columns(table)
    back = bridge.rows_from_table(table)
    ids = [r["lesion_id"] for r in back]
    assert ids[0] == 2 and ids[-1] == 3, "most probable first, lesions without a probability last"
    values = [r["prl_probability"] for r in back]
    assert values[:-1] == sorted(values[:-1], reverse=True) and math.isnan(values[-1])
    assert all(r["prl_uncertainty"] == pytest.approx(0.05) for r in back)
    # Without a classifier's values (a model without one) the table keeps the lesions' order.
    plain = bridge.lesion_table_node(scene, rows, "plain")
    assert [r["lesion_id"] for r in bridge.rows_from_table(plain)] == [r["lesion_id"] for r in rows]
