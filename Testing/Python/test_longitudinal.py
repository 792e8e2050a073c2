"""Two visits compared: registration, matching and each change class on a small phantom pair, the files, bad input.

The visits' "detections" are their true PRLs, measured and written by the real pipeline functions
(result_fixtures), so these tests check the tracking, not the network.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import SMALL_EXTENT_MM, assert_refused, run_cli
from result_fixtures import write_truth_result

from PRLDetectorLib.changes import CHANGE_LABELS, DISAPPEARED, ENLARGING, NEW, PERSISTING, RESOLVED
from PRLDetectorLib.longitudinal.compare import VisitInput, run_longitudinal
from PRLDetectorLib.longitudinal.evaluation import score_pair
from PRLDetectorLib.longitudinal.outputs import (
    CHANGE_LABELS_NAME,
    CHANGE_SEGMENTATION_NAME,
    CHANGES_CSV,
    CHANGES_JSON,
)
from PRLDetectorLib.longitudinal.rows import CHANGE_COLUMNS
from PRLDetectorLib.phantom.visits import generate_visits, write_visits

PAIR_SEED, PAIR_PRL = 3, 5
"""Every change class happens in this small pair (see test_phantom_visits)."""


def _truth_results(patient: Path, out: Path, with_flair: bool = True) -> list[Path]:
    results = []
    for visit in ("visit_1", "visit_2"):
        case = patient / visit
        flair = case / "flair.nii.gz" if with_flair else None
        results.append(write_truth_result(case / "qsm.nii.gz", case / "gt_prl.nii.gz", case / "gt_instances.nii.gz",
                                          out / visit, flair))
    return results


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("visits")
    visits = generate_visits("pair", PAIR_SEED, 2, with_flair=True, extent_mm=SMALL_EXTENT_MM, n_prl=PAIR_PRL)
    return write_visits(visits, folder)


@pytest.fixture(scope="module")
def results(pair, tmp_path_factory) -> list[Path]:
    return _truth_results(pair, tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def comparison(results, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("comparison") / "changes"
    run_longitudinal(VisitInput(results[0]), VisitInput(results[1]), out)
    return out


@pytest.fixture(scope="module")
def score(comparison, pair):
    return score_pair(comparison, pair)


def _rows(comparison: Path) -> list[dict]:
    with (comparison / CHANGES_CSV).open(encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("change", [NEW, PERSISTING, ENLARGING, RESOLVED, DISAPPEARED])
def test_each_change_class_of_the_phantom_is_called_as_the_truth_says(score, change):
    events = [called for true, called in score.events if true == change]
    assert events, f"the pair has no {change} PRL"
    assert events == [change] * len(events), score.events


def test_no_row_calls_a_change_the_truth_does_not_have(score):
    assert all(called == true for called, true in score.rows), score.rows


def test_registration_recovers_the_known_head_motion_within_half_a_millimetre(score):
    assert score.registration_error_mm < 0.5
    assert score.registration_error_max_mm < 1.0


def test_a_resolved_prl_is_told_from_a_disappeared_one_by_the_follow_up_flair(comparison):
    rows = {row["change"]: row for row in _rows(comparison)}
    assert "FLAIR" in rows[RESOLVED]["evidence"] and "FLAIR" in rows[DISAPPEARED]["evidence"]


def test_without_a_follow_up_flair_a_prl_whose_rim_went_is_called_resolved_and_the_table_says_why(pair, tmp_path):
    results = _truth_results(pair, tmp_path / "results", with_flair=False)
    table = run_longitudinal(VisitInput(results[0]), VisitInput(results[1]), tmp_path / "changes", report=False)
    score = score_pair(tmp_path / "changes", pair)
    gone = [called for true, called in score.events if true in (RESOLVED, DISAPPEARED)]
    assert gone and set(gone) == {RESOLVED}
    assert all("no FLAIR" in c.evidence for c in table.changes if c.change == RESOLVED)


def test_the_change_table_gives_volumes_rims_and_their_change(comparison):
    rows = _rows(comparison)
    assert list(rows[0]) == list(CHANGE_COLUMNS)
    enlarged = next(row for row in rows if row["change"] == ENLARGING)
    assert float(enlarged["volume_change_percent"]) >= 25
    resolved = next(row for row in rows if row["change"] == RESOLVED)
    assert resolved["followup_ids"] == "" and resolved["followup_measured_from"] == "outline of the other visit"
    assert float(resolved["baseline_rim_minus_surround_ppm"]) > float(resolved["followup_rim_minus_surround_ppm"])
    new = next(row for row in rows if row["change"] == NEW)
    assert new["baseline_ids"] == "" and new["followup_ids"]
    record = json.loads((comparison / CHANGES_JSON).read_text(encoding="utf-8"))
    assert record["counts"][NEW] == sum(row["change"] == NEW for row in rows)
    assert record["registration"]["correlation_before_after"][1] > 0.75


def test_the_label_map_colours_the_follow_up_by_change_and_the_segments_are_named_by_class(comparison, results):
    # The values the README gives (a user's script reads them): 1 new ... 6 not imaged.
    assert CHANGE_LABELS == {"new": 1, "persisting": 2, "enlarging": 3, "resolved": 4, "disappeared": 5, "not imaged": 6}
    classes = sitk.ReadImage(str(comparison / CHANGE_LABELS_NAME))
    followup_labels = sitk.ReadImage(str(results[1] / "prl_labels.nii.gz"))
    assert classes.GetSize() == followup_labels.GetSize() and classes.GetOrigin() == followup_labels.GetOrigin()
    values = sitk.GetArrayViewFromImage(classes)
    rows = _rows(comparison)
    for row in rows:
        for lesion_id in map(int, filter(None, row["followup_ids"].split(";"))):
            voxels = values[sitk.GetArrayViewFromImage(followup_labels) == lesion_id]
            assert set(np.unique(voxels)) == {CHANGE_LABELS[row["change"]]}
    assert CHANGE_LABELS[DISAPPEARED] in np.unique(values)  # a lesion the follow-up lacks: its outline carried over
    segmentation = slicerio.read_segmentation(str(comparison / CHANGE_SEGMENTATION_NAME))
    names = sorted(segment["name"] for segment in segmentation["segments"])
    assert names == sorted(f"{row['change']} {row['change_id']}" for row in rows)


def test_the_page_shows_each_tracked_lesion_at_both_visits(comparison):
    page = (comparison / "report.html").read_text(encoding="utf-8")
    rows = _rows(comparison)
    assert page.count("<img ") == len(rows)
    for row in rows:
        assert f"id='c{row['change_id']}'" in page


def test_a_prl_split_in_two_at_follow_up_is_one_tracked_lesion_with_two_follow_up_ids(pair, results, tmp_path):
    """One-to-many: the follow-up "detection" cuts a persisting PRL in two."""
    record = json.loads((pair / "visits.json").read_text(encoding="utf-8"))
    lasting = next(c["lesion_id"] for c in record["intervals"][0]["changes"] if c["class"] == PERSISTING)
    case = pair / "visit_2"
    instances = sitk.ReadImage(str(case / "gt_instances.nii.gz"))
    values = sitk.GetArrayFromImage(instances)
    where = np.argwhere(values == lasting)
    middle = np.median(where[:, 2])
    cut = values == lasting
    cut &= np.arange(values.shape[2])[None, None, :] > middle
    values[cut] = values.max() + 1
    values[(values == lasting) & (np.arange(values.shape[2])[None, None, :] == int(middle) + 1)] = 0
    split = sitk.GetImageFromArray(values)
    split.CopyInformation(instances)
    gt_prl = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "gt_prl.nii.gz")))
    gt_prl[values == values.max()] = 1
    prl_image = sitk.GetImageFromArray(gt_prl)
    prl_image.CopyInformation(instances)
    sitk.WriteImage(split, str(tmp_path / "split_instances.nii.gz"))
    sitk.WriteImage(prl_image, str(tmp_path / "split_prl.nii.gz"))
    followup = write_truth_result(case / "qsm.nii.gz", tmp_path / "split_prl.nii.gz", tmp_path / "split_instances.nii.gz",
                                  tmp_path / "followup", case / "flair.nii.gz")
    table = run_longitudinal(VisitInput(results[0]), VisitInput(followup), tmp_path / "changes")
    splits = [c for c in table.changes if c.relation == "split"]
    assert len(splits) == 1 and len(splits[0].followup_ids) == 2 and len(splits[0].baseline_ids) == 1
    assert splits[0].change == PERSISTING


def test_the_command_line_compares_two_results(results, tmp_path):
    done = run_cli("longitudinal", "--baseline", results[0], "--followup", results[1], "--out", tmp_path / "out",
                   "--baseline-date", "2021-01-05", "--followup-date", "2022-07-05")
    assert done.returncode == 0, done.stderr
    assert "2 new" in done.stdout and "1 enlarging" in done.stdout
    record = json.loads((tmp_path / "out" / CHANGES_JSON).read_text(encoding="utf-8"))
    assert record["years"] == pytest.approx(1.5, abs=0.01)


def test_overwrite_replaces_a_comparison_and_nothing_else(results, tmp_path):
    out = tmp_path / "out"
    dates = ("--baseline-date", "2021-01-05", "--followup-date", "2022-07-05")
    assert run_cli("longitudinal", "--baseline", results[0], "--followup", results[1], "--out", out, *dates).returncode == 0
    again = ("longitudinal", "--baseline", results[0], "--followup", results[1], "--out", out,
             "--baseline-date", "2021-01-05", "--followup-date", "2024-01-05")
    assert_refused(run_cli(*again), "add --overwrite")
    done = run_cli(*again, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / CHANGES_JSON).read_text(encoding="utf-8"))["years"] == pytest.approx(3.0, abs=0.01)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or retired folder left beside it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    done = run_cli("longitudinal", "--baseline", results[0], "--followup", results[1], "--out", mine, "--overwrite")
    assert_refused(done, "not a PRLDetector comparison")
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_a_follow_up_dated_before_its_baseline_is_refused(results, tmp_path):
    done = run_cli("longitudinal", "--baseline", results[0], "--followup", results[1], "--out", tmp_path / "out",
                   "--baseline-date", "2022-07-05", "--followup-date", "2021-01-05")
    assert_refused(done, "a follow-up cannot precede its baseline")
    assert not (tmp_path / "out").exists()


def test_visits_of_two_patients_are_refused(results, tmp_path_factory, tmp_path):
    other = write_visits(generate_visits("other", 11, 2, extent_mm=SMALL_EXTENT_MM, n_prl=2),
                         tmp_path_factory.mktemp("other"))
    stranger = _truth_results(other, tmp_path / "stranger", with_flair=False)[1]
    done = run_cli("longitudinal", "--baseline", results[0], "--followup", stranger, "--out", tmp_path / "out")
    assert_refused(done, "check that both are of the same patient")
    assert not (tmp_path / "out").exists()


def _result_without_lesions(folder: Path, qsm: sitk.Image, template: Path) -> Path:
    """A detect-shaped result folder of ``qsm`` with no lesion."""
    folder.mkdir(parents=True)
    sitk.WriteImage(qsm, str(folder / "qsm.nii.gz"))
    labels = sitk.Image(qsm.GetSize(), sitk.sitkUInt16)
    labels.CopyInformation(qsm)
    sitk.WriteImage(labels, str(folder / "prl_labels.nii.gz"))
    header = (template / "lesions.csv").read_text(encoding="utf-8").splitlines()[0]
    (folder / "lesions.csv").write_text(header + "\n", encoding="utf-8")
    record = {"inputs": {"qsm": {"path": str(folder / "qsm.nii.gz")}}}
    (folder / "burden.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


def test_visits_that_show_different_parts_of_the_brain_are_refused(pair, results, tmp_path):
    """Baseline: the top third of the field of view; follow-up: the bottom third. Nothing to register on."""
    top = sitk.ReadImage(str(pair / "visit_1" / "qsm.nii.gz"))
    bottom = sitk.ReadImage(str(pair / "visit_2" / "qsm.nii.gz"))
    n1, n2 = top.GetSize()[2], bottom.GetSize()[2]
    baseline = _result_without_lesions(tmp_path / "top", top[:, :, 2 * n1 // 3:], results[0])
    followup = _result_without_lesions(tmp_path / "bottom", bottom[:, :, : n2 // 3], results[0])
    done = run_cli("longitudinal", "--baseline", baseline, "--followup", followup, "--out", tmp_path / "out")
    assert_refused(done, "check that both")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arguments", "phrase"), [
    (["--followup", "FOLLOWUP"], "Give the baseline as a detect result folder or as a QSM"),
    (["--baseline", "NOWHERE", "--followup", "FOLLOWUP"], "is not a PRLDetector result"),
    (["--baseline", "BASELINE", "--followup", "FOLLOWUP", "--followup-date", "July"], "is not a date"),
])
def test_bad_visit_arguments_are_refused_with_one_sentence(results, tmp_path, arguments, phrase):
    names = {"BASELINE": str(results[0]), "FOLLOWUP": str(results[1]), "NOWHERE": str(tmp_path / "nowhere")}
    done = run_cli("longitudinal", *[names.get(a, a) for a in arguments], "--out", tmp_path / "out")
    assert_refused(done, phrase)


@pytest.mark.parametrize(("before_mm3", "after_mm3", "called"), [
    (100.0, 125.0, ENLARGING),  # +25 % and +25 mm³: both halves of the rule
    (100.0, 124.0, PERSISTING),  # +24 %: not enough growth
    (20.0, 30.0, ENLARGING),  # +50 % and exactly +10 mm³
    (20.0, 29.0, PERSISTING),  # +45 % but only +9 mm³: a small lesion's few voxels are not growth
])
def test_enlarging_takes_both_25_percent_and_10_mm3_of_growth_as_the_readme_says(before_mm3, after_mm3, called):
    from PRLDetectorLib.longitudinal.tracking import Measures, _matched_change

    def lesion(volume: float) -> Measures:
        return Measures(volume, 0.05, 0.05, 1.0, 0.03, 0.0, (0.0, 0.0, 0.0), "detected")  # a clear rim

    assert _matched_change(lesion(before_mm3), lesion(after_mm3)) == called
    assert _matched_change(lesion(before_mm3), replace(lesion(after_mm3), paramagnetic_edge_fraction=0.2)) == RESOLVED
