"""Stage 2, the lesion classifier: candidates, their features, training, calibration, operating points.

The classifiers here are trained for real (LightGBM, the library's own fit) on phantom lesions. Stage 1's
output is replaced by a probability map drawn over the phantom's lesions and mimics, so that the tests
run in seconds and every candidate is a known lesion: what is under test is what comes after stage 1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from PRLDetectorLib.detection.candidates import FEATURE_NAMES, fibonacci_directions, find_case_candidates
from PRLDetectorLib.detection.classifier import CLASSIFIER_DIR, load_classifier
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.phantom.phantom import Acquisition, generate_case
from PRLDetectorLib.training.classifier import (
    Examples,
    examples_from_candidates,
    fit_classifier,
    label_candidates,
    pick_operating_points,
    save_classifier,
)

EXTENT_MM = (96, 96, 64)


def stage1_like(case) -> np.ndarray:
    """A stand-in for the network's probability: 0.6 over every lesion and mimic, 0 elsewhere."""
    return (sitk.GetArrayFromImage(case.gt_instances) > 0).astype(np.float32) * 0.6


def candidates_of(seed: int, recon: str = "tkd"):
    case = generate_case(f"case_{seed}", seed, extent_mm=EXTENT_MM, n_prl=3,
                         acquisition=Acquisition(recon=recon, regularisation={"tkd": 0.18, "tikhonov": 0.01,
                                                                              "l2grad": 0.005}[recon]))
    candidates = find_case_candidates(case.qsm, stage1_like(case), None, threshold=0.2, min_mm3=5.0)
    truth = sitk.GetArrayFromImage(case.gt_prl)
    return case, candidates, truth


@pytest.fixture(scope="module")
def trained():
    examples = Examples.empty()
    for seed, recon in ((21, "tkd"), (22, "tikhonov"), (23, "tkd"), (24, "tikhonov"), (25, "tkd"), (26, "tikhonov")):
        _, candidates, truth = candidates_of(seed, recon)
        examples = examples + examples_from_candidates(candidates.labels, candidates.features, truth, f"p{seed}")
    classifier, oof = fit_classifier(examples, folds=3, card={"candidate_threshold": 0.2})
    return classifier, examples, oof


def test_every_lesion_and_mimic_becomes_one_candidate_with_one_feature_row():
    case, candidates, truth = candidates_of(31)
    n_objects = len(case.truth["lesions"])
    assert candidates.count == n_objects
    assert candidates.features.shape == (n_objects, len(FEATURE_NAMES))
    assert label_candidates(candidates.labels, truth).sum() == case.truth["prl_count"] == 3


def test_rim_coverage_of_a_prl_exceeds_that_of_a_rimless_lesion_measured_from_the_patch():
    case, candidates, truth = candidates_of(32)
    labels = label_candidates(candidates.labels, truth)
    cover = candidates.features[:, FEATURE_NAMES.index("rim_cover_0.015")]
    classes = {}
    instances = sitk.GetArrayFromImage(case.gt_instances)
    by_id = {lesion["id"]: lesion["class"] for lesion in case.truth["lesions"]}
    for k in range(candidates.count):
        ids = np.unique(instances[candidates.labels == k + 1])
        classes[k] = by_id[int(ids[ids > 0][0])]
    prl = [cover[k] for k in range(candidates.count) if labels[k]]
    rimless = [cover[k] for k in range(candidates.count) if classes[k] == "rimless"]
    assert prl and rimless
    assert np.median(prl) > np.median(rimless) + 0.2


def test_a_classifier_trained_for_real_separates_rim_from_rimless_lesions_on_an_unseen_phantom(trained):
    classifier, _, _ = trained
    case, candidates, truth = candidates_of(40, "l2grad")  # a reconstruction it never saw
    probability, uncertainty = classifier.predict(candidates.features)
    labels = label_candidates(candidates.labels, truth)
    assert labels.sum() == 3 and (labels == 0).sum() >= 3
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels, probability) >= 0.85
    assert probability[labels == 1].mean() > probability[labels == 0].mean() + 0.3
    assert np.all((uncertainty >= 0) & (uncertainty <= 0.5))


def test_calibrated_probabilities_stay_in_0_1_and_rise_with_the_raw_score(trained):
    classifier, _, _ = trained
    assert np.all(np.diff(classifier.calibration_x) >= 0)
    assert np.all(np.diff(classifier.calibration_y) >= -1e-12)
    assert classifier.calibration_y.min() >= 0 and classifier.calibration_y.max() <= 1


def test_operating_points_are_ordered_and_call_fewer_candidates_from_sensitive_to_specific(trained):
    classifier, examples, oof = trained
    points = classifier.operating_points
    assert points["sensitive"] <= points["balanced"] <= points["specific"]
    _, candidates, truth = candidates_of(41, "l2grad")
    probability, _ = classifier.predict(candidates.features)
    called = [int((probability >= points[p]).sum()) for p in ("sensitive", "balanced", "specific")]
    assert called[0] >= called[1] >= called[2]
    validation = classifier.card["validation"]
    assert validation["sensitive"]["candidate_sensitivity"] >= 0.95
    assert validation["specific"]["candidate_precision"] >= validation["balanced"]["candidate_precision"]


def test_operating_points_meet_their_definitions_on_a_known_example():
    probability = np.array([0.05, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    labels = np.array([0, 0, 1, 0, 0, 1, 1, 1, 1, 1])
    points = pick_operating_points(probability, labels)
    assert points["sensitive"]["cutoff"] == pytest.approx(0.2)  # the highest cut-off keeping all 6 PRLs
    assert points["specific"]["cutoff"] == pytest.approx(0.7)  # the first cut-off with precision ≥ 95 %
    assert points["specific"]["candidate_precision"] == 1.0


def test_a_saved_classifier_loads_as_text_and_predicts_the_same(trained, tmp_path):
    classifier, examples, _ = trained
    (tmp_path / "model").mkdir()
    folder = save_classifier(classifier, examples, tmp_path / "model")
    assert folder.name == CLASSIFIER_DIR
    loaded = load_classifier(folder)
    _, candidates, _ = candidates_of(42)
    assert np.allclose(loaded.predict(candidates.features)[0], classifier.predict(candidates.features)[0])
    # Nothing is pickled: every file is JSON, LightGBM text or gzip'd CSV.
    assert sorted(p.suffix for p in folder.iterdir()) == sorted([".json", ".gz", *[".txt"] * len(classifier.members)])


def test_a_classifier_with_other_features_is_refused_with_a_sentence(trained, tmp_path):
    classifier, examples, _ = trained
    (tmp_path / "model").mkdir()
    folder = save_classifier(classifier, examples, tmp_path / "model")
    card = json.loads((folder / "classifier.json").read_text())
    card["feature_names"] = card["feature_names"][:-1]
    (folder / "classifier.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="retrain it with prl-detect train-classifier"):
        load_classifier(folder)


def test_too_few_examples_are_refused():
    few = Examples(np.zeros((4, len(FEATURE_NAMES)), np.float32), np.array([1, 0, 1, 0]),
                   np.array(["a", "a", "b", "b"], object), np.ones(4))
    with pytest.raises(InputError, match="too few to train"):
        fit_classifier(few)


def test_directions_cover_the_sphere_evenly():
    directions = fibonacci_directions(64)
    assert np.allclose(np.linalg.norm(directions, axis=1), 1)
    assert np.abs(directions.mean(axis=0)).max() < 0.05


def test_the_distance_to_the_brain_edge_is_the_distance_transforms_at_each_point():
    from scipy import ndimage

    from PRLDetectorLib.detection.candidates import distances_to_brain_edge

    rng = np.random.default_rng(4)
    zz, yy, xx = np.mgrid[:40, :50, :60]
    brain = ((zz - 20) / 17.0) ** 2 + ((yy - 25) / 22.0) ** 2 + ((xx - 30) / 40.0) ** 2 <= 1  # touches the x border
    brain &= rng.random(brain.shape) > 0.02  # holes inside count as outside, as they do for the transform
    spacing = np.array([1.2, 0.6, 0.5])
    points = [tuple(p) for p in rng.integers(0, brain.shape, size=(200, 3))]
    expected = ndimage.distance_transform_edt(np.pad(brain, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    got = distances_to_brain_edge(brain, spacing, points)
    np.testing.assert_allclose(got, [expected[p] for p in points], rtol=0, atol=1e-9)
    assert (got > 0).sum() > 50  # most points lie in the brain, some far from its edge


def test_candidates_are_the_components_in_cc3ds_order_without_the_small_ones():
    import cc3d

    from PRLDetectorLib.detection.candidates import find_candidates

    rng = np.random.default_rng(7)
    probability = (rng.random((40, 50, 45)) > 0.96).astype(np.float32) * 0.5
    probability[5:12, 5:20, 5:9] = 0.9
    for connectivity in (6, 26):
        components, n = cc3d.connected_components(probability >= 0.2, connectivity=connectivity, return_N=True)
        sizes = np.bincount(components.ravel(), minlength=n + 1) * 1.2  # 1 x 1 x 1.2 mm voxels
        kept = [c for c in range(1, n + 1) if sizes[c] >= 3.0]
        labels, count = find_candidates(probability, 0.2, (1.0, 1.0, 1.2), 3.0, None, connectivity)
        assert count == len(kept) > 5 and labels.dtype == np.uint32
        for new_id, component in enumerate(kept, start=1):
            assert np.array_equal(labels == new_id, components == component)
        assert not labels[~np.isin(components, kept)].any()
