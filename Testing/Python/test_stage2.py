"""The two stages end to end with the bundled models: nnU-Net's candidates, then the shipped classifier.

Runs the real network (CPU) on the session's small phantom; each test reuses one detect run per setting.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_refused, require_model, run_cli

from PRLDetectorLib.detection.classifier import model_classifier
from PRLDetectorLib.detection.features import read_lesions_csv
from PRLDetectorLib.results import CANDIDATES_NAME

pytestmark = pytest.mark.slow
POINTS = ("sensitive", "balanced", "specific")


@pytest.fixture(scope="module")
def results(small_case, tmp_path_factory) -> dict[str, Path]:
    """One detect per operating point (and one with the classifier off) on the small phantom."""
    out = tmp_path_factory.mktemp("stage2")
    folders = {}
    for point in (*POINTS, "off"):
        folders[point] = out / point
        done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", folders[point], "--device", "cpu",
                       "--operating-point", point)
        assert done.returncode == 0, done.stderr
    return folders


@pytest.mark.parametrize("name", ["qsm", "qsm_flair"])
def test_both_bundled_models_ship_a_classifier_that_loads_by_name(name):
    classifier = model_classifier(require_model(name))
    assert classifier is not None
    points = classifier.operating_points
    assert points["sensitive"] <= points["balanced"] <= points["specific"]
    assert classifier.flair_candidates == (name == "qsm_flair")
    # README: candidates are the network's voxels at p >= 0.2, components of >= 5 mm³.
    assert (classifier.candidate_threshold, classifier.candidate_min_mm3) == (0.2, 5.0)
    # The card says what each point gave on validation data.
    for point in POINTS:
        assert 0 < classifier.card["validation"][point]["candidate_precision"] <= 1


def test_every_called_lesion_carries_a_probability_at_or_above_the_cut_off_and_an_uncertainty(results):
    record = json.loads((results["balanced"] / "burden.json").read_text())
    stage2 = record["lesion_classifier"]
    assert stage2["operating_point"] == "balanced"
    # The expected PRL count is the sum of every candidate's calibrated probability (candidates.csv).
    with (results["balanced"] / CANDIDATES_NAME).open() as stream:
        chances = [float(c["prl_probability"]) for c in csv.DictReader(stream)]
    assert stage2["expected_prl_count"] == pytest.approx(sum(chances), abs=0.01)
    timings = record["timings_s"]
    assert 0 < timings["stage2_s"] <= timings["lesions_s"] <= timings["total_s"]
    assert timings["network_s"] + timings["lesions_s"] <= timings["total_s"]
    lesions = read_lesions_csv(results["balanced"] / "lesions.csv")
    assert len(lesions) == record["burden"]["prl_count"] >= 1
    for row in lesions:
        assert row["prl_probability"] >= stage2["probability_cutoff"] - 1e-6
        assert 0 <= row["prl_uncertainty"] <= 0.5
    assert [e["lesion_id"] for e in record["lesion_probabilities"]] == [int(r["lesion_id"]) for r in lesions]
    with (results["balanced"] / CANDIDATES_NAME).open() as stream:
        candidates = list(csv.DictReader(stream))
    assert len(candidates) == stage2["candidates"] >= len(lesions)
    assert min(float(c["cand_mm3"]) for c in candidates) >= 5.0  # the classifier's own minimum, whatever called
    assert {int(c["lesion_id"]) for c in candidates} - {0} == {int(r["lesion_id"]) for r in lesions}


def test_operating_points_call_fewer_lesions_from_sensitive_to_specific(results):
    counts = [json.loads((results[p] / "burden.json").read_text())["burden"]["prl_count"] for p in POINTS]
    assert counts[0] >= counts[1] >= counts[2]
    # The same candidates were judged: only the cut-off differs.
    candidates = {p: json.loads((results[p] / "burden.json").read_text())["lesion_classifier"]["candidates"]
                  for p in POINTS}
    assert len(set(candidates.values())) == 1


def test_off_is_the_network_alone_with_no_probabilities(results):
    record = json.loads((results["off"] / "burden.json").read_text())
    assert record["lesion_classifier"] is None
    assert not (results["off"] / CANDIDATES_NAME).exists()
    assert all(math.isnan(r["prl_probability"]) for r in read_lesions_csv(results["off"] / "lesions.csv"))


def _review(result: Path, reject: set[int]) -> None:
    """What a Slicer export (or the review page) writes: lesions.csv with the reader's status column."""
    path = result / "lesions.csv"
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        row["status"] = "rejected" if int(row["lesion_id"]) in reject else "confirmed"
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=[*rows[0].keys()])
        writer.writeheader()
        writer.writerows(rows)


def test_a_retrain_from_reviewed_statuses_moves_the_probability_of_those_lesions(results, tmp_path):
    import shutil

    reviewed = tmp_path / "reviewed"
    shutil.copytree(results["sensitive"], reviewed)
    lesions = read_lesions_csv(reviewed / "lesions.csv")
    assert lesions, "the small phantom has PRLs: the sensitive point must call some"
    rejected = int(max(lesions, key=lambda r: r["prl_probability"])["lesion_id"])
    _review(reviewed, {rejected})
    retrained = tmp_path / "qsm_site"
    done = run_cli("train-classifier", "--model", "qsm", "--keep-shipped", "--reviewed", reviewed,
                   "--reviewed-weight", "30", "--out", retrained)
    assert done.returncode == 0, done.stderr
    with (reviewed / CANDIDATES_NAME).open() as stream:
        rows = list(csv.DictReader(stream))
    before, after = model_classifier(require_model("qsm")), model_classifier(retrained)
    features = np.array([[float(r[n]) if r[n] else np.nan for n in before.feature_names] for r in rows])
    lesion_ids = np.array([int(r["lesion_id"]) for r in rows])
    p_before, _ = before.predict(features)
    p_after, _ = after.predict(features)
    was_rejected = lesion_ids == rejected
    assert p_after[was_rejected][0] < p_before[was_rejected][0]
    confirmed = (lesion_ids > 0) & ~was_rejected
    if confirmed.any():
        assert p_after[confirmed].mean() >= p_before[confirmed].mean() - 0.05
    card = json.loads((retrained / "model.json").read_text())
    assert card["classifier"]["trained_on"]["reviewed"] == [str(reviewed)]
    # The card describes the new classifier whole (its cut-offs too), not the shipped one's, and drops the
    # shipped classifier's held-out figures.
    assert card["classifier"] == after.model_card_block()
    assert card["classifier"]["operating_points"] != before.operating_points
    assert "held_out_variant_stage2" not in card["accuracy"]
    assert card["accuracy"] == {k: v for k, v in json.loads((require_model("qsm") / "model.json").read_text())[
        "accuracy"].items() if k != "held_out_variant_stage2"}


def test_train_classifier_refuses_a_result_made_without_the_classifier(results, tmp_path):
    done = run_cli("train-classifier", "--model", "qsm", "--reviewed", results["off"], "--out", tmp_path / "m")
    assert_refused(done, "has no candidates.csv")


def test_with_stage_2_a_called_lesion_stays_whatever_the_minimum_lesion_size(results, small_case, tmp_path):
    # --min-lesion-mm3 is the network-alone rule: the classifier judged each candidate on its patch.
    called = read_lesions_csv(results["balanced"] / "lesions.csv")
    assert called
    above_smallest = min(row["volume_mm3"] for row in called) + 1.0
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", tmp_path / "big", "--device", "cpu",
                   "--min-lesion-mm3", above_smallest)
    assert done.returncode == 0, done.stderr
    again = read_lesions_csv(tmp_path / "big" / "lesions.csv")
    assert [(r["lesion_id"], r["volume_mm3"]) for r in again] == [(r["lesion_id"], r["volume_mm3"]) for r in called]
