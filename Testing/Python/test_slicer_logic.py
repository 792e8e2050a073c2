"""The module's Logic core on slicer-core's MRML scene: detect, review, update the burden, export.

The same scenario runs inside Slicer as the module self-test (``PRLDetectorTest`` in PRLDetector.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicerio
import vtk
from conftest import require_model

from PRLDetectorLib.detection.features import (
    LESION_COLUMNS,
    measure_lesions,
    read_lesions_csv,
    write_lesions_csv,
)
from PRLDetectorLib.detection.lesions import find_lesions
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.mrml import bridge
from PRLDetectorLib.mrml.logic import SceneLogic, output_name
from PRLDetectorLib.mrml.process import Finished
from PRLDetectorLib.phantom.phantom import generate_case, write_case
from PRLDetectorLib.results import EXPORT_FILES
from PRLDetectorLib.settings import DetectionSettings


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    write_case(generate_case("logic", seed=3, extent_mm=48, n_prl=3), folder)
    return folder / "logic"


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def logic(scene, tmp_path):
    return SceneLogic(scene, python_executable=sys.executable, models_dir=tmp_path / "models")


@pytest.fixture
def qsm_node(scene, phantom_dir):
    return bridge.add_volume_node(scene, sitk.ReadImage(str(phantom_dir / "qsm.nii.gz")), "Phantom QSM")


@pytest.fixture
def review(logic, qsm_node, phantom_dir):
    """The phantom's ground truth split into lesions: the annotator's starting point, and a stand-in detection."""
    return logic.load_ground_truth(phantom_dir / "gt_prl.nii.gz", qsm_node)


def _rows_by_id(table_node) -> dict[int, dict]:
    return {int(r["lesion_id"]): r for r in bridge.rows_from_table(table_node)}


def _voxel_mm3(qsm_node) -> float:
    return float(np.prod(qsm_node.GetSpacing()))


def _fake_model(models_dir: Path, name: str = "fake") -> Path:
    """A folder that passes model validation and whose checkpoint loads as weights only, but whose content
    breaks nnU-Net (``init_args`` is no dict): running it is a crash, not bad input."""
    import torch

    folder = models_dir / name
    (folder / "fold_0").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "QSM"}, "labels": {"background": 0, "prl": 1}, "file_ending": ".nii.gz",
    }), encoding="utf-8")
    (folder / "plans.json").write_text("{}", encoding="utf-8")
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainer", "init_args": []},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


# -- ground truth and review ------------------------------------------------------------------------------------


def test_a_ground_truth_mask_is_split_into_one_confirmed_segment_per_lesion(review, qsm_node, phantom_dir):
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_dir / "gt_prl.nii.gz")))
    expected = find_lesions(gt, qsm_node.GetSpacing(), 0, 26)
    lesions = bridge.lesion_segments(review.segmentation_node)
    assert len(lesions) == int(expected.max()) >= 2
    assert [s.name for s in lesions] == [f"PRL {i}" for i in range(1, len(lesions) + 1)]
    assert {s.status for s in lesions} == {bridge.CONFIRMED}
    assert review.table_node.GetNumberOfRows() == len(lesions)
    assert bridge.reference_volume(review.segmentation_node) is qsm_node
    rows = _rows_by_id(review.table_node)
    for lesion_id in range(1, len(lesions) + 1):
        assert rows[lesion_id]["voxels"] == int((expected == lesion_id).sum())
    assert review.burden.prl_count == len(lesions)
    assert review.burden.total_volume_mm3 == pytest.approx((gt > 0).sum() * _voxel_mm3(qsm_node))


def test_update_after_deleting_one_segment_and_erasing_half_of_another(logic, review, qsm_node):
    segmentation = review.segmentation_node
    before = _rows_by_id(review.table_node)
    deleted, halved = 2, 1
    segmentation.GetSegmentation().RemoveSegment(bridge.segment_id_of_lesion(segmentation, deleted))
    halved_id = bridge.segment_id_of_lesion(segmentation, halved)
    mask = bridge.labels_from_segmentation(segmentation, qsm_node, [halved_id]) > 0
    voxels = np.flatnonzero(mask)
    mask.ravel()[voxels[: voxels.size // 2]] = False
    bridge.set_segment_from_array(segmentation, halved_id, mask, qsm_node)

    after = logic.update_burden(segmentation)

    rows = _rows_by_id(after.table_node)
    assert after.table_node is review.table_node
    assert sorted(rows) == sorted(set(before) - {deleted})
    n = int(before[halved]["voxels"])
    assert rows[halved]["voxels"] == n - n // 2
    assert rows[halved]["volume_mm3"] == pytest.approx((n - n // 2) * _voxel_mm3(qsm_node))
    for lesion_id in set(rows) - {halved}:
        assert rows[lesion_id]["voxels"] == before[lesion_id]["voxels"]
        assert rows[lesion_id]["status"] == before[lesion_id]["status"]
    assert after.burden.prl_count == review.burden.prl_count - 1
    assert after.burden.total_volume_mm3 == pytest.approx(sum(r["volume_mm3"] for r in rows.values()))
    names = {s.lesion_id: s.name for s in bridge.lesion_segments(segmentation)}
    assert names == {i: f"PRL {i}" for i in rows}


def test_detection_rows_from_lesions_csv_keep_their_probability_until_the_lesion_is_edited(
    logic, qsm_node, phantom_dir, tmp_path
):
    qsm = bridge.image_from_volume_node(qsm_node)
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_dir / "gt_prl.nii.gz")))
    labels = find_lesions(gt, qsm.GetSpacing(), 0, 26)
    probability = np.where(labels > 0, 0.8, 0.1).astype(np.float32)
    write_lesions_csv(tmp_path / "lesions.csv", measure_lesions(labels, sitk.GetArrayViewFromImage(qsm), qsm, probability))
    review = logic.show_detection(qsm_node, labels, read_lesions_csv(tmp_path / "lesions.csv"))
    assert {s.status for s in bridge.lesion_segments(review.segmentation_node)} == {bridge.CANDIDATE}
    segmentation = review.segmentation_node
    edited = bridge.segment_id_of_lesion(segmentation, 1)
    mask = bridge.labels_from_segmentation(segmentation, qsm_node, [edited]) > 0
    mask.ravel()[np.flatnonzero(mask)[:1]] = False
    bridge.set_segment_from_array(segmentation, edited, mask, qsm_node)

    rows = _rows_by_id(logic.update_burden(segmentation).table_node)

    assert math.isnan(rows[1]["probability_mean"]), "no probability map: an edited lesion has no probability"
    assert all(rows[i]["probability_mean"] == pytest.approx(0.8) for i in rows if i != 1)


def test_a_models_prl_probability_orders_the_review_survives_updates_of_untouched_lesions_and_is_exported(
    logic, qsm_node, phantom_dir, tmp_path
):
    qsm = bridge.image_from_volume_node(qsm_node)
    labels = _components(phantom_dir, qsm_node)
    probability = {i: round(0.3 + 0.2 * i, 2) for i in range(1, int(labels.max()) + 1)}
    lesions = [dataclasses.replace(lesion, prl_probability=probability[lesion.lesion_id], prl_uncertainty=0.04)
               for lesion in measure_lesions(labels, sitk.GetArrayViewFromImage(qsm), qsm)]
    write_lesions_csv(tmp_path / "lesions.csv", lesions)  # as a model with a lesion classifier writes it

    review = logic.show_detection(qsm_node, labels, read_lesions_csv(tmp_path / "lesions.csv"))
    table = review.table_node
    assert table.GetColumnTitle("prl_probability") == "PRL probability"
    shown = [r["lesion_id"] for r in bridge.rows_from_table(table)]
    assert shown == sorted(probability, key=probability.get, reverse=True)

    segmentation = review.segmentation_node
    edited = bridge.segment_id_of_lesion(segmentation, 1)
    mask = bridge.labels_from_segmentation(segmentation, qsm_node, [edited]) > 0
    mask.ravel()[np.flatnonzero(mask)[:1]] = False
    bridge.set_segment_from_array(segmentation, edited, mask, qsm_node)
    rows = _rows_by_id(logic.update_burden(segmentation).table_node)
    assert math.isnan(rows[1]["prl_probability"]), "an edited lesion was not classified again"
    assert all(rows[i]["prl_probability"] == pytest.approx(probability[i]) for i in rows if i != 1)
    assert [r["lesion_id"] for r in bridge.rows_from_table(table)][-1] == 1

    paths = logic.export(segmentation, tmp_path / "out")
    lines = paths["lesions.csv"].read_text(encoding="utf-8").splitlines()
    assert lines[0].split(",") == [*LESION_COLUMNS, "status", "note"]
    assert [int(line.split(",")[0]) for line in lines[1:]] == sorted(probability), "files stay in lesion order"


def test_a_segment_in_two_pieces_stays_one_lesion(logic, review, qsm_node):
    segmentation = review.segmentation_node
    before = _rows_by_id(review.table_node)
    first, second = (bridge.segment_id_of_lesion(segmentation, i) for i in (1, 2))
    both = bridge.labels_from_segmentation(segmentation, qsm_node, [first, second]) > 0
    segmentation.GetSegmentation().RemoveSegment(second)
    bridge.set_segment_from_array(segmentation, first, both, qsm_node)

    rows = _rows_by_id(logic.update_burden(segmentation).table_node)

    assert 2 not in rows
    assert rows[1]["voxels"] == before[1]["voxels"] + before[2]["voxels"]


def test_a_segment_drawn_by_the_reader_becomes_a_new_confirmed_row(logic, review, qsm_node):
    segmentation = review.segmentation_node
    before = _rows_by_id(review.table_node)
    occupied = bridge.labels_from_segmentation(segmentation, qsm_node) > 0
    blob = np.zeros_like(occupied)
    blob[2:5, 2:5, 2:5] = True
    assert not (blob & occupied).any()
    drawn = segmentation.GetSegmentation().AddEmptySegment("", "Segment_1")
    bridge.set_segment_from_array(segmentation, drawn, blob, qsm_node)

    after = logic.update_burden(segmentation)

    rows = _rows_by_id(after.table_node)
    new_id = max(before) + 1
    assert set(rows) == set(before) | {new_id}
    assert rows[new_id]["voxels"] == 27 and rows[new_id]["status"] == bridge.CONFIRMED
    assert {s.segment_id: s.name for s in bridge.lesion_segments(segmentation)}[drawn] == "Segment_1"
    assert after.burden.prl_count == review.burden.prl_count + 1


def test_rejected_lesions_leave_the_burden_but_keep_their_row_and_segment(logic, review):
    segmentation = review.segmentation_node
    rows = _rows_by_id(review.table_node)
    burden = logic.set_status(segmentation, 1, bridge.REJECTED)
    assert burden.prl_count == review.burden.prl_count - 1
    assert burden.total_volume_mm3 == pytest.approx(review.burden.total_volume_mm3 - rows[1]["volume_mm3"])
    assert _rows_by_id(review.table_node)[1]["status"] == bridge.REJECTED
    # The status lives in the segment, so an update keeps it.
    after = logic.update_burden(segmentation)
    assert _rows_by_id(after.table_node)[1]["status"] == bridge.REJECTED
    assert after.burden == burden
    assert logic.burden(segmentation) == burden
    back = logic.set_status(segmentation, 1, bridge.CANDIDATE)
    assert back.prl_count == review.burden.prl_count
    with pytest.raises(InputError, match="Update burden"):
        logic.set_status(segmentation, 999, bridge.CONFIRMED)


def test_the_views_centre_on_the_lesion_centroid(logic, review, qsm_node):
    row = _rows_by_id(review.table_node)[1]
    center = logic.lesion_center_ras(review.segmentation_node, 1)
    assert center == pytest.approx((row["centroid_ras_x_mm"], row["centroid_ras_y_mm"], row["centroid_ras_z_mm"]))
    inside = bridge.labels_from_segmentation(review.segmentation_node, qsm_node, ["PRL_1"])
    ras_to_ijk = vtk.vtkMatrix4x4()
    qsm_node.GetRASToIJKMatrix(ras_to_ijk)
    i, j, k = (round(c) for c in ras_to_ijk.MultiplyPoint((*center, 1.0))[:3])
    assert inside[k, j, i] == 1, "the centroid of a compact lesion lies inside it"


def test_splitting_a_segmentation_drawn_as_one_segment(logic, review, qsm_node):
    segmentation = review.segmentation_node
    merged = bridge.segmentation_from_labels(
        logic.scene, (bridge.labels_from_segmentation(segmentation, qsm_node) > 0).astype(np.uint16), qsm_node, "one"
    )
    assert len(bridge.lesion_segments(merged)) == 1
    split = logic.split_segmentation(merged, qsm_node)
    assert len(bridge.lesion_segments(split.segmentation_node)) == len(bridge.lesion_segments(segmentation))


def test_an_empty_mask_is_refused(logic, qsm_node, tmp_path):
    empty = sitk.Image(bridge.geometry_image(qsm_node))
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    with pytest.raises(InputError, match="empty"):
        logic.load_ground_truth(tmp_path / "empty.nii.gz", qsm_node)


def test_the_sample_case_loads_as_qsm_and_flair_nodes_with_its_ground_truth_and_is_made_once(logic, tmp_path):
    sample = logic.load_sample_case(tmp_path / "cache", extent_mm=48)
    assert sample.qsm_node.GetName() == "PRLPhantom QSM" and sample.flair_node.GetName() == "PRLPhantom FLAIR"
    truth_ids = sitk.GetArrayFromImage(sitk.ReadImage(str(sample.ground_truth_path)))
    assert sample.truth["prl_count"] == len(np.unique(truth_ids[truth_ids > 0]))  # this 48 mm crop may hold none
    assert slicer.util.arrayFromVolume(sample.qsm_node).shape == sitk.GetArrayFromImage(
        sitk.ReadImage(str(sample.ground_truth_path))).shape
    stamp = (tmp_path / "cache" / "PRLPhantom" / "qsm.nii.gz").stat().st_mtime_ns
    again = logic.load_sample_case(tmp_path / "cache", extent_mm=48)
    assert (tmp_path / "cache" / "PRLPhantom" / "qsm.nii.gz").stat().st_mtime_ns == stamp
    assert again.qsm_node is not sample.qsm_node


# -- export and training set ----------------------------------------------------------------------------------------


def test_export_writes_the_review_and_the_files_read_back(logic, review, qsm_node, tmp_path):
    segmentation = review.segmentation_node
    logic.set_status(segmentation, 1, bridge.REJECTED)
    logic.set_note(segmentation, 2, "  rim only\n on the lateral side ")
    paths = logic.export(segmentation, tmp_path / "out", reviewer="A. Reader")
    assert sorted(p.name for p in paths.values()) == sorted(EXPORT_FILES)
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name not in EXPORT_FILES]  # no partial file left

    header = paths["lesions.csv"].read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == [*LESION_COLUMNS, "status", "note"]
    rows = read_lesions_csv(paths["lesions.csv"])
    table_rows = bridge.rows_from_table(review.table_node)
    assert [int(r["lesion_id"]) for r in rows] == [r["lesion_id"] for r in table_rows]
    assert [r["status"] for r in rows] == [r["status"] for r in table_rows]
    assert {int(r["lesion_id"]): r["note"] for r in rows if r["note"]} == {2: "rim only on the lateral side"}
    for read, row in zip(rows, table_rows, strict=True):
        assert read["volume_mm3"] == pytest.approx(row["volume_mm3"], abs=1e-3)

    record = json.loads(paths["burden.json"].read_text(encoding="utf-8"))
    assert record["burden"]["prl_count"] == review.burden.prl_count - 1
    assert record["rejected_lesion_ids"] == [1]
    assert record["reviewer"] == "A. Reader" and record["reviewed_in"] == "3D Slicer (PRL Detector)"
    assert record["reviewed_utc"].endswith("+00:00")

    labels = sitk.ReadImage(str(paths["prl_labels.nii.gz"]))
    qsm = bridge.geometry_image(qsm_node)
    assert labels.GetSize() == qsm.GetSize()
    assert np.allclose(labels.GetOrigin(), qsm.GetOrigin(), atol=1e-4)
    assert np.allclose(labels.GetDirection(), qsm.GetDirection(), atol=1e-6)
    values = sitk.GetArrayFromImage(labels)
    assert set(np.unique(values)) == {0} | {r["lesion_id"] for r in table_rows if r["status"] != bridge.REJECTED}
    for row in table_rows:
        if row["status"] != bridge.REJECTED:
            assert (values == row["lesion_id"]).sum() == row["voxels"]

    seg = slicerio.read_segmentation(str(paths["prl.seg.nrrd"]))
    assert [s["name"] for s in seg["segments"]] == [s.name for s in bridge.lesion_segments(segmentation)]
    assert {s["tags"][bridge.STATUS_TAG] for s in seg["segments"] if s["tags"][bridge.LESION_ID_TAG] == "1"} == {"rejected"}
    assert {s["tags"].get(bridge.NOTE_TAG) for s in seg["segments"] if s["tags"][bridge.LESION_ID_TAG] == "2"} == {
        "rim only on the lateral side"}


def test_export_does_not_overwrite_unless_allowed(logic, review, tmp_path):
    logic.export(review.segmentation_node, tmp_path)
    with pytest.raises(InputError, match="already holds"):
        logic.export(review.segmentation_node, tmp_path)
    logic.export(review.segmentation_node, tmp_path, overwrite=True)


# -- result folders: open, review, save, open again ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory):
    """A result folder as detect writes it (the phantom's true PRLs as the "detection"), with FLAIR."""
    from result_fixtures import write_phantom, write_truth_result_of_case

    root = tmp_path_factory.mktemp("result")
    case = write_phantom(root / "cases", "patient", seed=11, n_prl=3)
    return write_truth_result_of_case(case, root / "result")


@pytest.fixture
def fresh_result(result_dir, tmp_path):
    """A copy of the result folder to change (its burden.json keeps pointing at the phantom's scans)."""
    import shutil

    return Path(shutil.copytree(result_dir, tmp_path / "patient"))


def test_a_detect_result_opens_with_its_scans_its_lesions_as_candidates_and_its_table(logic, scene, fresh_result):
    opened = logic.open_result(fresh_result)
    record = json.loads((fresh_result / "burden.json").read_text(encoding="utf-8"))
    csv_rows = read_lesions_csv(fresh_result / "lesions.csv")
    qsm = sitk.ReadImage(record["inputs"]["qsm"]["path"])
    assert bridge.geometry_image(opened.qsm_node).GetSize() == qsm.GetSize()
    assert np.allclose(bridge.geometry_image(opened.qsm_node).GetOrigin(), qsm.GetOrigin(), atol=1e-4)
    # FLAIR is shown on the QSM grid, as detection aligned it.
    assert opened.flair_node is not None
    assert opened.flair_node.GetImageData().GetDimensions() == opened.qsm_node.GetImageData().GetDimensions()
    segmentation = opened.review.segmentation_node
    lesions = bridge.lesion_segments(segmentation)
    assert [s.lesion_id for s in lesions] == [int(r["lesion_id"]) for r in csv_rows]
    assert {s.status for s in lesions} == {bridge.CANDIDATE}
    assert bridge.reference_volume(segmentation) is opened.qsm_node
    labels = bridge.labels_from_segmentation(segmentation, opened.qsm_node)
    for value, row in enumerate(csv_rows, start=1):
        assert (labels == value).sum() == row["voxels"]
    table_rows = bridge.rows_from_table(opened.review.table_node)
    assert [r["volume_mm3"] for r in table_rows] == [r["volume_mm3"] for r in csv_rows]
    assert opened.review.burden.prl_count == record["burden"]["prl_count"] == len(csv_rows)


def test_a_saved_review_opens_again_as_it_was_saved_and_keeps_what_detection_recorded(logic, fresh_result):
    before = json.loads((fresh_result / "burden.json").read_text(encoding="utf-8"))
    opened = logic.open_result(fresh_result)
    segmentation = opened.review.segmentation_node
    logic.set_status(segmentation, 1, bridge.REJECTED)
    logic.set_status(segmentation, 2, bridge.CONFIRMED)
    logic.set_note(segmentation, 2, "clear rim")
    logic.export(segmentation, fresh_result, overwrite=True, reviewer="A. Reader", reviewed_in="test")

    record = json.loads((fresh_result / "burden.json").read_text(encoding="utf-8"))
    for key in ("inputs", "model", "settings", "grid", "software", "created_utc"):
        assert record[key] == before[key], key
    assert record["burden"]["prl_count"] == before["burden"]["prl_count"] - 1
    assert (record["rejected_lesion_ids"], record["confirmed_lesion_ids"]) == ([1], [2])
    assert (record["reviewer"], record["reviewed_in"]) == ("A. Reader", "test")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(fresh_result / "prl_labels.nii.gz")))
    assert 1 not in np.unique(labels) and 2 in np.unique(labels)

    again = SceneLogic(slicer.vtkMRMLScene()).open_result(fresh_result)
    lesions = {s.lesion_id: s for s in bridge.lesion_segments(again.review.segmentation_node)}
    assert (lesions[1].status, lesions[2].status, lesions[2].note) == (bridge.REJECTED, bridge.CONFIRMED, "clear rim")
    assert {s.status for i, s in lesions.items() if i > 2} == {bridge.CANDIDATE}
    assert again.review.burden.prl_count == record["burden"]["prl_count"]
    rows = {int(r["lesion_id"]): r for r in bridge.rows_from_table(again.review.table_node)}
    assert (rows[1]["status"], rows[2]["note"]) == (bridge.REJECTED, "clear rim")


def test_closing_a_result_takes_all_its_nodes_out_of_the_scene(logic, scene, fresh_result):
    nodes = _node_ids(scene)
    opened = logic.open_result(fresh_result)
    assert _node_ids(scene) - nodes
    logic.close_result(opened)
    assert {n for n in _node_ids(scene) - nodes if not n.startswith("vtkMRMLSubjectHierarchy")} == set()


def test_a_segment_drawn_in_slicer_and_saved_without_measuring_is_measured_when_the_result_opens(logic, fresh_result):
    opened = logic.open_result(fresh_result)
    segmentation = opened.review.segmentation_node
    mask = np.zeros(tuple(reversed(opened.qsm_node.GetImageData().GetDimensions())), dtype=np.uint8)
    mask[10:14, 10:14, 10:14] = 1
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "drawn by the reader")
    bridge.set_segment_from_array(segmentation, segment_id, mask, opened.qsm_node)
    bridge.write_segmentation_file(segmentation, fresh_result / "prl.seg.nrrd")  # Slicer's "Save", not an export

    again = SceneLogic(slicer.vtkMRMLScene()).open_result(fresh_result)
    rows = bridge.rows_from_table(again.review.table_node)
    assert len(rows) == len(read_lesions_csv(fresh_result / "lesions.csv")) + 1
    drawn = rows[-1]
    assert (drawn["voxels"], drawn["status"]) == (64, bridge.CONFIRMED)
    assert again.review.burden.prl_count == len(rows)


def test_save_writes_back_to_the_folder_the_review_came_from_and_needs_a_reviewer(logic, review, fresh_result):
    with pytest.raises(InputError, match="not opened from a result folder"):
        logic.save_review(review.segmentation_node, "A. Reader")
    opened = logic.open_result(fresh_result)
    with pytest.raises(InputError, match="Type your name"):
        logic.save_review(opened.review.segmentation_node, "  ")
    paths = logic.save_review(opened.review.segmentation_node, "A. Reader")
    assert {path.parent for path in paths.values()} == {fresh_result.resolve()}


def test_a_failed_save_leaves_the_result_as_it_was(logic, fresh_result, monkeypatch):
    before = {p.name: p.read_bytes() for p in fresh_result.iterdir()}
    opened = logic.open_result(fresh_result)
    logic.set_status(opened.review.segmentation_node, 1, bridge.REJECTED)

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bridge, "write_segmentation_file", disk_full)
    with pytest.raises(OSError):
        logic.export(opened.review.segmentation_node, fresh_result, overwrite=True, reviewer="A. Reader")
    assert {p.name: p.read_bytes() for p in fresh_result.iterdir()} == before


def test_a_save_renames_burden_json_into_place_after_the_other_three_files(logic, fresh_result, monkeypatch):
    import PRLDetectorLib.results as results

    renamed = []

    def recording_replace(source, target):
        renamed.append(Path(target).name)
        return real_replace(source, target)

    real_replace = results.os.replace
    monkeypatch.setattr(results.os, "replace", recording_replace)
    opened = logic.open_result(fresh_result)
    logic.export(opened.review.segmentation_node, fresh_result, overwrite=True, reviewer="A. Reader")
    assert sorted(renamed[:-1]) == ["lesions.csv", "prl.seg.nrrd", "prl_labels.nii.gz"]
    assert renamed[-1] == "burden.json"  # the file that marks a finished result comes last


def test_columns_another_tool_added_to_lesions_csv_survive_a_review(logic, fresh_result):
    text = (fresh_result / "lesions.csv").read_text(encoding="utf-8").splitlines()
    text = [text[0] + ",second_reader_score"] + [line + f",0.{i}" for i, line in enumerate(text[1:], start=1)]
    (fresh_result / "lesions.csv").write_text("\n".join(text) + "\n", encoding="utf-8")
    opened = logic.open_result(fresh_result)
    logic.export(opened.review.segmentation_node, fresh_result, overwrite=True, reviewer="A. Reader")
    rows = read_lesions_csv(fresh_result / "lesions.csv")
    assert [r["second_reader_score"] for r in rows] == [f"0.{i}" for i in range(1, len(rows) + 1)]


def test_a_result_whose_qsm_is_gone_or_that_is_incomplete_is_refused_and_leaves_the_scene_alone(logic, scene, fresh_result):
    nodes = _node_ids(scene)
    (fresh_result / "prl.seg.nrrd").write_bytes(b"NRRD0004\nnot a segmentation\n")
    with pytest.raises(InputError, match="not a segmentation Slicer can read"):
        logic.open_result(fresh_result)
    assert _node_ids(scene) == nodes
    record = json.loads((fresh_result / "burden.json").read_text(encoding="utf-8"))
    record["inputs"]["qsm"]["path"] = str(fresh_result / "moved" / "qsm.nii.gz")
    (fresh_result / "burden.json").write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(InputError, match="no longer at"):
        logic.open_result(fresh_result)
    (fresh_result / "prl.seg.nrrd").unlink()
    with pytest.raises(InputError, match="holds no prl.seg.nrrd"):
        logic.open_result(fresh_result)
    with pytest.raises(InputError, match="holds no burden.json"):
        logic.open_result(fresh_result / "nothing")
    assert _node_ids(scene) == nodes


def test_centring_on_a_lesion_moves_every_slice_view_to_its_centroid(logic, scene, fresh_result):
    opened = logic.open_result(fresh_result)
    slice_logics = []
    for name in ("Red", "Green", "Yellow"):
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLScene(scene)
        slice_logic.AddSliceNode(name)
        slice_logics.append(slice_logic)
    segmentation = opened.review.segmentation_node
    row = _rows_by_id(opened.review.table_node)[2]
    centre = logic.centre_views_on_lesion(segmentation, 2)
    expected = (row["centroid_ras_x_mm"], row["centroid_ras_y_mm"], row["centroid_ras_z_mm"])
    assert centre == pytest.approx(expected)
    for slice_logic in slice_logics:
        assert bridge.slice_centre_ras(slice_logic.GetSliceNode()) == pytest.approx(expected, abs=1e-3)


def test_a_reviewed_case_joins_an_nnunet_training_set_without_rejected_lesions(logic, review, qsm_node, tmp_path):
    segmentation = review.segmentation_node
    logic.set_status(segmentation, 1, bridge.REJECTED)
    case_id = logic.add_training_case(segmentation, tmp_path / "Dataset")
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "Dataset" / "labelsTr" / f"{case_id}.nii.gz")))
    kept = [s.segment_id for s in bridge.lesion_segments(segmentation) if s.status != bridge.REJECTED]
    assert np.array_equal(label > 0, bridge.labels_from_segmentation(segmentation, qsm_node, kept) > 0)
    assert (tmp_path / "Dataset" / "imagesTr" / f"{case_id}_0000.nii.gz").is_file()


def test_cancelling_the_case_id_question_adds_nothing(logic, review, tmp_path):
    asked = []

    def cancel(suggested: str) -> None:
        asked.append(suggested)
        return None

    assert logic.add_training_case(review.segmentation_node, tmp_path / "Dataset", ask_case_id=cancel) is None
    assert asked == ["case_0000"]
    assert not (tmp_path / "Dataset").exists()


def test_the_case_id_question_offers_the_next_free_id_and_takes_the_readers_answer(logic, review, tmp_path):
    dataset = tmp_path / "Dataset"
    first = logic.add_training_case(review.segmentation_node, dataset, ask_case_id=lambda suggested: suggested)
    asked = []
    second = logic.add_training_case(
        review.segmentation_node, dataset, ask_case_id=lambda suggested: asked.append(suggested) or "reader-7")
    assert (first, asked, second) == ("case_0000", ["case_0001"], "reader-7")
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["case_0000.nii.gz", "reader-7.nii.gz"]


# -- detection in a child process -------------------------------------------------------------------------------------


def test_a_missing_model_or_input_is_refused_before_anything_starts(logic, qsm_node, scene):
    with pytest.raises(InputError, match="no model named"):
        logic.start_detection(qsm_node, None, DetectionSettings(model="no-such-model"))
    with pytest.raises(InputError, match="No QSM"):
        logic.start_detection(None, None, DetectionSettings())
    with pytest.raises(InputError, match="Threshold"):
        logic.start_detection(qsm_node, None, DetectionSettings(threshold=2.0))
    _fake_model(logic.models_dir)
    flair = bridge.add_volume_node(scene, bridge.image_from_volume_node(qsm_node), "FLAIR")
    with pytest.raises(InputError, match="FLAIR"):
        logic.start_detection(qsm_node, flair, DetectionSettings(model="fake"))


def test_an_input_error_in_the_child_comes_back_as_its_sentence_and_leaves_the_scene_alone(logic, scene):
    _fake_model(logic.models_dir)
    one_slice = sitk.Image([40, 30, 1], sitk.sitkFloat32) + 0.1
    qsm = bridge.add_volume_node(scene, one_slice, "flat QSM")
    nodes = _node_ids(scene)
    run = logic.start_detection(qsm, None, DetectionSettings(model="fake"))
    try:
        finished = run.wait(timeout=120)
        assert finished.returncode == 2
        with pytest.raises(InputError) as error:
            run.load()
        assert str(error.value).startswith("The QSM") and "single slice" in str(error.value)
    finally:
        run.cleanup()
    assert _node_ids(scene) == nodes
    assert not run.work_dir.exists()


def test_a_crash_in_the_child_is_reported_with_its_traceback(logic, qsm_node, scene):
    _fake_model(logic.models_dir)
    nodes = _node_ids(scene)
    with pytest.raises(RuntimeError, match="exit code 1"):
        logic.detect(qsm_node, None, DetectionSettings(model="fake"), timeout=300)
    assert _node_ids(scene) == nodes


def test_cancel_kills_the_child_tree_and_leaves_the_scene_unchanged(scene, qsm_node, tmp_path):
    if os.name == "nt":
        pytest.fail("the slow launcher below is a POSIX shell script; Windows needs its own launcher")
    # Stands in for PythonSlicer, a launcher that starts the real interpreter as its child.
    launcher = tmp_path / "SlowPythonSlicer"
    launcher.write_text(f"#!/bin/sh\nsleep 120\nexec {sys.executable} \"$@\"\n", encoding="utf-8")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    logic = SceneLogic(scene, python_executable=launcher, models_dir=tmp_path / "models")
    _fake_model(logic.models_dir)
    nodes = _node_ids(scene)
    run = logic.start_detection(qsm_node, None, DetectionSettings(model="fake"))
    assert run.running
    started = time.monotonic()
    run.cancel()
    finished = run.wait(timeout=30)
    assert isinstance(finished, Finished) and finished.cancelled
    assert time.monotonic() - started < 15
    with pytest.raises(InputError, match="cancelled"):
        run.load()
    run.cleanup()
    assert _node_ids(scene) == nodes
    assert not run.work_dir.exists()


def test_the_child_command_carries_every_setting(logic, qsm_node):
    """The child process is the CLI: its own parser must read back every field the panel set, each one away
    from its default (the operating point was once left out, so the panel's choice never reached the run)."""
    from dataclasses import fields

    from PRLDetectorLib.cli.main import build_parser
    from PRLDetectorLib.cli.options import settings_from_args
    from PRLDetectorLib.mrml.logic import DetectionRun

    _fake_model(logic.models_dir)
    settings = DetectionSettings(model="fake", device="cpu", tta=True, threshold=0.35, operating_point="specific",
                                 min_lesion_mm3=4.5, connectivity=6, min_rim_coverage=0.67)
    defaults = DetectionSettings()
    assert all(getattr(settings, f.name) != getattr(defaults, f.name) for f in fields(DetectionSettings))
    run = DetectionRun(logic, qsm_node, None, settings, logic.resolve_model("fake"))
    try:
        command = run.command(Path("q.nii"), Path("f.nii"))
        env = run.environment()
    finally:
        run.cleanup()
    assert command[:4] == [sys.executable, "-u", "-m", "PRLDetectorLib"]
    args = build_parser().parse_args([str(part) for part in command[4:]])
    assert (args.command, args.qsm, args.flair, args.progress_lines) == ("detect", "q.nii", "f.nii", True)
    read_back = settings_from_args(args)
    assert read_back == DetectionSettings(**{**settings.to_dict(), "model": str(logic.models_dir / "fake")})
    assert str(Path(bridge.__file__).parents[2]) in env["PYTHONPATH"].split(os.pathsep)


# -- detection with the bundled model (slow) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_model_detection_in_a_child_process_and_in_process_agree_and_never_replace_an_edited_review(
    logic, scene, small_case
):
    require_model("qsm")
    qsm_node = bridge.add_volume_node(scene, sitk.ReadImage(str(small_case / "qsm.nii.gz")), "Small QSM")
    settings = DetectionSettings(model="qsm", device="cpu")
    progress = []

    review = logic.detect(qsm_node, None, settings, progress=lambda f, m: progress.append(f), timeout=1800)

    segmentation = review.segmentation_node
    lesions = bridge.lesion_segments(segmentation)
    rows = bridge.rows_from_table(review.table_node)
    assert segmentation.GetName() == output_name(qsm_node)
    assert len(lesions) == len(rows) == review.burden.prl_count >= 1
    # The table shows the most probable PRL first (the bundled model has a lesion classifier); by id it matches.
    by_id = sorted(rows, key=lambda r: r["lesion_id"])
    assert [s.name for s in lesions] == [f"PRL {r['lesion_id']}" for r in by_id]
    assert [r["lesion_id"] for r in by_id] == list(range(1, len(rows) + 1))
    probabilities = [r["prl_probability"] for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    colours = [tuple(segmentation.GetSegmentation().GetSegment(s.segment_id).GetColor()) for s in lesions]
    assert len(set(colours)) == len(colours)
    assert bridge.reference_volume(segmentation) is qsm_node
    assert [review.table_node.GetColumnName(i) for i in range(review.table_node.GetNumberOfColumns())] == list(
        bridge.TABLE_COLUMNS
    )
    assert progress and progress[-1] == 1.0 and progress == sorted(progress)
    labels = bridge.labels_from_segmentation(segmentation, qsm_node)
    for value, row in enumerate(by_id, start=1):
        assert (labels == value).sum() == row["voxels"]
        assert not math.isnan(row["probability_mean"])

    # The reader edits this review; running detection again must leave it as it is.
    segmentation.GetSegmentation().AddEmptySegment("", "added by hand")
    again = logic.detect_in_process(qsm_node, None, settings)
    assert again.segmentation_node is not segmentation
    assert "added by hand" in [s.name for s in bridge.lesion_segments(segmentation)]
    assert sorted(r["voxels"] for r in bridge.rows_from_table(again.table_node)) == sorted(r["voxels"] for r in rows)


# -- volumes the reader moved in Slicer (parent transforms) -------------------------------------------------------------


def _transform_node(scene, matrix: np.ndarray, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def _rigid(angles: tuple[float, float, float], translation: tuple[float, float, float]) -> np.ndarray:
    rotation = sitk.Euler3DTransform((0, 0, 0), *angles, (0, 0, 0)).GetMatrix()
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(rotation, (3, 3))
    matrix[:3, 3] = translation
    return matrix


QSM_MOVE = _rigid((0.1, -0.15, 0.25), (6.0, -4.5, 3.25))
"""Where the reader put the QSM in Slicer (a translation and a rotation)."""
FLAIR_HEADER_ERROR = _rigid((-0.2, 0.05, 0.3), (-12.0, 9.0, 5.0))
"""How far the FLAIR's own header is off (RAS): the reader corrected it with a transform in Slicer."""


def _displaced(image: sitk.Image, ras_matrix: np.ndarray) -> sitk.Image:
    """The same voxels with a header moved by ``ras_matrix`` (RAS), as a scan whose header is off would be."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    moved = lps @ ras_matrix @ lps
    out = sitk.Image(image)
    direction = np.reshape(image.GetDirection(), (3, 3))
    out.SetDirection(tuple((moved[:3, :3] @ direction).ravel()))
    out.SetOrigin(tuple(moved[:3, :3] @ np.array(image.GetOrigin()) + moved[:3, 3]))
    return out


@pytest.fixture
def moved_case(scene, qsm_node):
    """The QSM under the reader's transform, and a FLAIR (here the QSM's own voxels: on the QSM grid once its
    header error is undone) whose header is off and which the reader aligned to the moved QSM with a transform."""
    qsm_transform = _transform_node(scene, QSM_MOVE, "QSM placement")
    qsm_node.SetAndObserveTransformNodeID(qsm_transform.GetID())
    qsm = bridge.image_from_volume_node(qsm_node)
    flair_node = bridge.add_volume_node(scene, _displaced(qsm, FLAIR_HEADER_ERROR), "FLAIR")
    alignment = _transform_node(scene, QSM_MOVE @ np.linalg.inv(FLAIR_HEADER_ERROR), "FLAIR to QSM")
    flair_node.SetAndObserveTransformNodeID(alignment.GetID())
    return qsm_node, flair_node


def _components(phantom_dir, qsm_node) -> np.ndarray:
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_dir / "gt_prl.nii.gz")))
    return find_lesions(gt, qsm_node.GetSpacing(), 0, 26)


def test_review_update_and_export_of_a_moved_qsm_measure_the_lesions_own_voxels(logic, moved_case, phantom_dir, tmp_path):
    qsm_node, _ = moved_case
    truth = _components(phantom_dir, qsm_node)
    unmoved = logic.split_into_lesions(truth > 0, bridge.add_volume_node(
        logic.scene, bridge.image_from_volume_node(qsm_node), "same QSM, not moved"))
    expected = _rows_by_id(unmoved.table_node)

    review = logic.load_ground_truth(phantom_dir / "gt_prl.nii.gz", qsm_node)
    rows = _rows_by_id(review.table_node)
    assert sorted(rows) == sorted(expected)
    for lesion_id, row in rows.items():
        for column in ("voxels", "centroid_ras_x_mm", "centroid_ras_y_mm", "centroid_ras_z_mm", "qsm_mean_ppm"):
            assert row[column] == pytest.approx(expected[lesion_id][column], abs=1e-6), (lesion_id, column)
    # The views centre on the lesion where Slicer shows it: its scanner-space centroid through the QSM's transform.
    center = np.array([*logic.lesion_center_ras(review.segmentation_node, 1), 1.0])
    ijk = np.linalg.inv(QSM_MOVE @ _ijk_to_ras(qsm_node)) @ center
    assert truth[tuple(np.round(ijk[2::-1]).astype(int))] == 1

    paths = logic.export(review.segmentation_node, tmp_path / "out")
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["prl_labels.nii.gz"])))
    assert np.array_equal(exported, truth)
    seg = slicerio.read_segmentation(str(paths["prl.seg.nrrd"]))
    assert sum(int(np.count_nonzero(np.asarray(seg["voxels"]) == s["labelValue"])) for s in seg["segments"]) == int(
        (truth > 0).sum())


def _ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def test_a_moved_case_joins_the_training_set_with_its_own_voxels_and_the_readers_flair_alignment(
    logic, moved_case, phantom_dir, tmp_path
):
    qsm_node, flair_node = moved_case
    truth = _components(phantom_dir, qsm_node)
    review = logic.load_ground_truth(phantom_dir / "gt_prl.nii.gz", qsm_node)
    case_id = logic.add_training_case(review.segmentation_node, tmp_path / "Dataset", flair_node)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "Dataset" / "labelsTr" / f"{case_id}.nii.gz")))
    assert np.array_equal(label > 0, truth > 0)
    # The FLAIR as the reader aligned it lies exactly on the QSM grid: its channel is its own voxels, masked.
    flair = sitk.ReadImage(str(tmp_path / "Dataset" / "imagesTr" / f"{case_id}_0001.nii.gz"))
    qsm = sitk.ReadImage(str(tmp_path / "Dataset" / "imagesTr" / f"{case_id}_0000.nii.gz"))
    qsm_voxels, flair_voxels = sitk.GetArrayFromImage(qsm), sitk.GetArrayFromImage(flair)
    brain = flair_voxels != 0
    assert brain.mean() > 0.2
    assert np.allclose(flair_voxels[brain], qsm_voxels[brain], atol=1e-6)


def _fake_flair_model(models_dir: Path) -> Path:
    folder = _fake_model(models_dir, "fake_flair")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "QSM", "1": "FLAIR"}, "labels": {"background": 0, "prl": 1}, "file_ending": ".nii.gz",
    }), encoding="utf-8")
    return folder


def test_detection_gets_the_flair_as_the_reader_aligned_it_and_leaves_the_readers_nodes_alone(logic, moved_case):
    qsm_node, flair_node = moved_case
    _fake_flair_model(logic.models_dir)
    before = _ijk_to_ras(flair_node), flair_node.GetParentTransformNode()
    run = logic.start_detection(qsm_node, flair_node, DetectionSettings(model="fake_flair"))
    try:
        run.wait(timeout=120)
        qsm = sitk.ReadImage(str(run.work_dir / "qsm.nii"))
        flair = sitk.ReadImage(str(run.work_dir / "flair.nii"))
    finally:
        run.cleanup()
    # In the QSM's own (scanner) frame, where the child measures and the results come back to.
    assert qsm.GetOrigin() == pytest.approx(bridge.image_from_volume_node(qsm_node).GetOrigin())
    assert np.allclose(flair.GetOrigin(), qsm.GetOrigin(), atol=1e-4)
    assert np.allclose(flair.GetDirection(), qsm.GetDirection(), atol=1e-6)
    assert np.allclose(flair.GetSpacing(), qsm.GetSpacing(), atol=1e-6)
    assert np.array_equal(_ijk_to_ras(flair_node), before[0]) and flair_node.GetParentTransformNode() is before[1]
    record = run.input_transforms
    assert record["flair"]["transform"] == "FLAIR to QSM" and record["qsm"]["transform"] == "QSM placement"
    relative = np.linalg.inv(QSM_MOVE) @ QSM_MOVE @ np.linalg.inv(FLAIR_HEADER_ERROR)
    assert np.allclose(record["flair"]["matrix_ras"], relative, atol=1e-9)


def _fake_child(tmp_path: Path, result: Path) -> Path:
    """Stands in for PythonSlicer running ``prl-detect detect``: copies a prepared result to its ``--out``."""
    launcher = tmp_path / "FakeDetect"
    launcher.write_text(
        "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --out ] && out=\"$2\"; shift; done\n"
        f"cp -r '{result}' \"$out\"\n", encoding="utf-8")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    return launcher


def test_the_exported_burden_says_which_reader_transforms_detection_used(scene, moved_case, phantom_dir, tmp_path):
    if os.name == "nt":
        pytest.fail("the fake child below is a POSIX shell script")
    qsm_node, flair_node = moved_case
    labels = _components(phantom_dir, qsm_node).astype(np.uint16)
    qsm = bridge.image_from_volume_node(qsm_node)
    result = tmp_path / "prepared"
    result.mkdir()
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(qsm)
    sitk.WriteImage(label_image, str(result / "prl_labels.nii.gz"))
    write_lesions_csv(result / "lesions.csv", measure_lesions(labels, sitk.GetArrayViewFromImage(qsm), qsm))
    (result / "burden.json").write_text(json.dumps({"settings": {}, "model": {"name": "fake_flair"}}), encoding="utf-8")
    logic = SceneLogic(scene, python_executable=_fake_child(tmp_path, result), models_dir=tmp_path / "models")
    _fake_flair_model(logic.models_dir)

    review = logic.detect(qsm_node, flair_node, DetectionSettings(model="fake_flair"), timeout=120)
    assert bridge.labels_from_segmentation(review.segmentation_node, qsm_node).astype(bool).sum() == (labels > 0).sum()
    paths = logic.export(review.segmentation_node, tmp_path / "out")

    record = json.loads(paths["burden.json"].read_text(encoding="utf-8"))["input_transforms"]
    assert record["flair"]["volume"] == "FLAIR" and record["flair"]["transform"] == "FLAIR to QSM"
    assert record["flair"]["applied"].endswith("(no interpolation)") and record["flair"]["resampled"] is False
    assert record["qsm"]["transform"] == "QSM placement"
    assert np.allclose(record["qsm"]["matrix_ras"], QSM_MOVE, atol=1e-9)
