"""Follow-up visits in the Slicer scene (slicer-core's real MRML scene): two results loaded, a change table, and
each row placed at both visits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import slicer
from conftest import SMALL_EXTENT_MM
from result_fixtures import write_truth_result

from PRLDetectorLib.changes import NEW, PERSISTING, RESOLVED
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.longitudinal.rows import CHANGE_COLUMNS
from PRLDetectorLib.mrml import bridge
from PRLDetectorLib.mrml.logic import SceneLogic
from PRLDetectorLib.phantom.visits import generate_visits, write_visits


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("visits")
    patient = write_visits(generate_visits("pair", 3, 2, with_flair=True, extent_mm=SMALL_EXTENT_MM, n_prl=5), folder)
    out = []
    for visit in ("visit_1", "visit_2"):
        case = patient / visit
        out.append(write_truth_result(case / "qsm.nii.gz", case / "gt_prl.nii.gz", case / "gt_instances.nii.gz",
                                      folder / "results" / visit))
    return out


@pytest.fixture
def logic(tmp_path):
    return SceneLogic(slicer.vtkMRMLScene(), python_executable=sys.executable, models_dir=tmp_path / "models")


@pytest.fixture
def compared(logic, results):
    baseline = logic.load_result(results[0], name="Baseline QSM")
    followup = logic.load_result(results[1], name="Follow-up QSM")
    return baseline, followup, logic.compare_visits(baseline.segmentation_node, followup.segmentation_node)


def _column(table_node, name: str) -> list:
    array = table_node.GetTable().GetColumnByName(name)
    return [array.GetValue(i) for i in range(table_node.GetNumberOfRows())]


def test_a_loaded_result_becomes_a_review_of_its_qsm(logic, results):
    review = logic.load_result(results[0], name="Baseline QSM")
    assert bridge.reference_volume(review.segmentation_node).GetName() == "Baseline QSM"
    assert review.table_node.GetNumberOfRows() == review.burden.prl_count == 5


def test_comparing_two_reviews_gives_a_change_table_node_with_the_command_line_s_columns(compared):
    _, _, comparison = compared
    table_node = comparison.table_node
    assert table_node.IsA("vtkMRMLTableNode") and table_node.GetScene() is not None
    assert [table_node.GetColumnName(i) for i in range(table_node.GetNumberOfColumns())] == list(CHANGE_COLUMNS)
    assert _column(table_node, "change") == [c.change for c in comparison.changes.changes]
    assert {NEW, PERSISTING, RESOLVED} <= set(_column(table_node, "change"))


def test_selecting_a_row_gives_the_lesion_s_position_at_both_visits(compared, logic):
    baseline, followup, comparison = compared
    rows = {int(r["lesion_id"]): r for r in bridge.rows_from_table(baseline.table_node)}
    later = {int(r["lesion_id"]): r for r in bridge.rows_from_table(followup.table_node)}
    table_node = comparison.table_node
    for row, change in enumerate(comparison.changes.changes):
        at_baseline, at_followup = logic.change_positions(table_node, row)
        assert at_baseline is not None and at_followup is not None, change
        if change.baseline_ids:  # a detected lesion: exactly its centroid in the lesion table
            lesion = rows[change.baseline_ids[0]]
            expected = [lesion[f"centroid_ras_{a}_mm"] for a in "xyz"]
            assert np.allclose(at_baseline, expected, atol=1e-3) or len(change.baseline_ids) > 1
        if change.followup_ids and len(change.followup_ids) == 1:
            lesion = later[change.followup_ids[0]]
            assert np.allclose(at_followup, [lesion[f"centroid_ras_{a}_mm"] for a in "xyz"], atol=1e-3)
        if change.change == RESOLVED:  # no follow-up lesion: where the baseline outline lies on the follow-up
            moved = comparison.changes.alignment.transform.TransformPoint(change.baseline.centroid_lps)
            assert np.linalg.norm(np.array(at_followup) - np.array([-moved[0], -moved[1], moved[2]])) < 2.0


def test_rejected_lesions_are_left_out_of_the_comparison(logic, results):
    baseline = logic.load_result(results[0])
    followup = logic.load_result(results[1])
    for lesion_id in [int(r["lesion_id"]) for r in bridge.rows_from_table(followup.table_node)]:
        logic.set_status(followup.segmentation_node, lesion_id, bridge.REJECTED)
    comparison = logic.compare_visits(baseline.segmentation_node, followup.segmentation_node)
    assert NEW not in _column(comparison.table_node, "change")
    assert all(ids == "" for ids in _column(comparison.table_node, "followup_ids"))


def test_comparing_a_review_with_itself_is_refused(logic, results):
    review = logic.load_result(results[0])
    with pytest.raises(InputError, match="same segmentation"):
        logic.compare_visits(review.segmentation_node, review.segmentation_node)
