"""Phantom follow-up visits: visit 1 is today's case, visit 2 the same brain moved, its PRLs changed as the truth says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SMALL_EXTENT_MM, run_cli

from PRLDetectorLib.changes import DISAPPEARED, ENLARGING, NEW, PERSISTING, RESOLVED
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.phantom.phantom import generate_case, generate_cohort
from PRLDetectorLib.phantom.visits import VISITS_NAME, generate_visit_cohort, generate_visits

VISITS_SEED, VISITS_PRL = 3, 5
"""A small pair in which every change class happens (2 new, 1 persisting, 1 enlarging, 1 resolved, 2 disappeared)."""


@pytest.fixture(scope="module")
def pair():
    return generate_visits("pair", VISITS_SEED, 2, with_flair=True, extent_mm=SMALL_EXTENT_MM, n_prl=VISITS_PRL)


def _changes(pair) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for change in pair.record["intervals"][0]["changes"]:
        out.setdefault(change["class"], []).append(change)
    return out


def _arrays(case) -> dict[str, bytes]:
    return {name: sitk.GetArrayViewFromImage(getattr(case, name)).tobytes()
            for name in ("qsm", "flair", "gt_prl", "gt_instances")}


def _truth(case) -> dict[int, dict]:
    return {lesion["id"]: lesion for lesion in case.truth["lesions"]}


def _rim_contrast(case, lesion_id: int) -> float:
    """Mean QSM of the lesion's outer voxel layer minus that of its inner part (ppm)."""
    from scipy import ndimage

    instances = sitk.GetArrayViewFromImage(case.gt_instances)
    qsm = sitk.GetArrayViewFromImage(case.qsm)
    lesion = instances == lesion_id
    inner = ndimage.binary_erosion(lesion, iterations=2)
    return float(qsm[lesion & ~ndimage.binary_erosion(lesion)].mean() - qsm[inner].mean())


def test_visit_1_is_byte_for_byte_the_single_visit_case(pair):
    alone = generate_case("pair", VISITS_SEED, with_flair=True, extent_mm=SMALL_EXTENT_MM, n_prl=VISITS_PRL)
    assert _arrays(pair.visits[0]) == _arrays(alone)
    assert json.dumps(pair.visits[0].truth) == json.dumps(alone.truth)


def test_the_same_seed_gives_a_byte_identical_follow_up(pair):
    again = generate_visits("pair", VISITS_SEED, 2, with_flair=True, extent_mm=SMALL_EXTENT_MM, n_prl=VISITS_PRL)
    assert _arrays(again.visits[1]) == _arrays(pair.visits[1])
    assert json.dumps(again.record) == json.dumps(pair.record)


def test_the_follow_up_has_its_own_grid_and_head_position(pair):
    first, second = pair.visits
    assert first.qsm.GetOrigin() != second.qsm.GetOrigin()
    motion = pair.record["intervals"][0]["head_motion"]
    assert 1.0 <= motion["rotation_deg"] <= 5.0 and 2.0 <= motion["translation_mm"] <= 8.0


def test_the_recorded_head_motion_carries_every_lasting_lesion_to_where_the_follow_up_shows_it(pair):
    """baseline_to_followup_lps maps a baseline point to the follow-up point of the same anatomy (what
    registration must recover): true lesion centres of unchanged lesions land within half a voxel."""
    matrix = np.array(pair.record["intervals"][0]["head_motion"]["baseline_to_followup_lps"])
    before, after = _truth(pair.visits[0]), _truth(pair.visits[1])
    unchanged = [i for i in before if i in after and before[i]["class"] != "prl"]  # rimless lesions and microbleeds
    assert unchanged
    for lesion_id in unchanged:
        moved = (matrix @ np.r_[before[lesion_id]["center_lps_mm"], 1.0])[:3]
        assert np.linalg.norm(moved - after[lesion_id]["center_lps_mm"]) < 0.5, lesion_id


def test_every_change_class_happens_as_the_truth_says(pair):
    changes = _changes(pair)
    assert {NEW, PERSISTING, ENLARGING, RESOLVED, DISAPPEARED} <= set(changes)
    before, after = _truth(pair.visits[0]), _truth(pair.visits[1])
    for change in changes[PERSISTING] + changes[ENLARGING]:
        assert after[change["lesion_id"]]["class"] == "prl"
    for change in changes[ENLARGING]:
        assert change["volume_after_mm3"] >= 1.3 * change["volume_before_mm3"]
    for change in changes[RESOLVED]:  # the lesion stays, rimless, and its rim is gone from the QSM
        lesion_id = change["lesion_id"]
        assert after[lesion_id]["class"] == "rimless"
        assert _rim_contrast(pair.visits[0], lesion_id) > 0.01
        assert _rim_contrast(pair.visits[1], lesion_id) < 0.005
    for change in changes[DISAPPEARED]:
        assert change["lesion_id"] in before and change["lesion_id"] not in after
    for change in changes[NEW]:
        assert change["lesion_id"] not in before and after[change["lesion_id"]]["class"] == "prl"
    gt_prl = sitk.GetArrayViewFromImage(pair.visits[1].gt_prl) > 0
    instances = sitk.GetArrayViewFromImage(pair.visits[1].gt_instances)
    assert set(np.unique(instances[gt_prl])) == {i for i, lesion in after.items() if lesion["class"] == "prl"}


def test_a_resolved_lesion_still_shows_on_the_follow_up_flair(pair):
    second = pair.visits[1]
    flair = sitk.GetArrayFromImage(sitk.Resample(second.flair, second.qsm))  # motion of a few mm: sample the core
    instances = sitk.GetArrayViewFromImage(second.gt_instances)
    from scipy import ndimage

    for change in _changes(pair)[RESOLVED]:
        core = ndimage.binary_erosion(instances == change["lesion_id"], iterations=3)
        if core.any():
            white = sitk.GetArrayViewFromImage(second.tissue) == 3
            assert flair[core].mean() > 1.5 * np.median(flair[white])


def test_visits_cohort_writes_visit_folders_whose_first_visit_is_the_cohort_case(tmp_path):
    generate_cohort(tmp_path / "single", n=1, seed=21, extent_mm=SMALL_EXTENT_MM, vary_grid=True, progress=False)
    generate_visit_cohort(tmp_path / "visits", n=1, seed=21, extent_mm=SMALL_EXTENT_MM, vary_grid=True,
                          progress=False)
    patient = tmp_path / "visits" / "case_000"
    for name in ("qsm.nii.gz", "gt_instances.nii.gz", "truth.json"):
        assert (patient / "visit_1" / name).read_bytes() == (tmp_path / "single" / "case_000" / name).read_bytes()
    record = json.loads((patient / VISITS_NAME).read_text(encoding="utf-8"))
    assert [v["folder"] for v in record["visits"]] == ["visit_1", "visit_2"]
    assert record["visits"][0]["acq_time"] < record["visits"][1]["acq_time"]
    assert 0.7 < record["intervals"][0]["years"] < 2.6
    assert (patient / "visit_2" / "qsm.nii.gz").is_file()


@pytest.mark.parametrize("visits", [0, 1, 7, 2.5])
def test_a_visit_count_out_of_range_is_refused(visits):
    with pytest.raises(InputError, match="Visits"):
        generate_visits("x", 0, visits)


def test_phantom_command_refuses_a_bad_visit_count_with_one_sentence(tmp_path):
    done = run_cli("phantom", "--out", tmp_path / "p", "--visits", "9")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("prl-detect: error: Visits 9")
    assert not (tmp_path / "p").exists()
