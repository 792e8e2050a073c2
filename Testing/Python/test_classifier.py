"""Stage 2, the lesion classifier: candidates, their features, training, calibration, operating points.

The classifiers here are trained for real (LightGBM, the library's own fit) on phantom lesions. Stage 1's
output is replaced by a probability map drawn over the phantom's lesions and mimics, so that the tests
run in seconds and every candidate is a known lesion: what is under test is what comes after stage 1.
"""

from __future__ import annotations

import itertools
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


def test_the_candidates_voxels_are_their_maps_foreground_and_keep_the_same_lesions():
    from PRLDetectorLib.detection.lesions import foreground_ids, keep_components

    _, candidates, _ = candidates_of(31)
    flat_index, ids = candidates.foreground()
    expected_index, expected_ids = foreground_ids(candidates.labels)
    order = np.argsort(flat_index)
    np.testing.assert_array_equal(flat_index[order], expected_index)
    np.testing.assert_array_equal(ids[order], expected_ids)
    assert ids.dtype == candidates.labels.dtype
    keep = np.zeros(candidates.count + 1, bool)
    keep[1::2] = True
    scanned = keep_components(candidates.labels, keep)
    given = keep_components(candidates.labels, keep, (flat_index, ids))
    assert scanned[0].max() == keep.sum()
    np.testing.assert_array_equal(given[0], scanned[0])
    np.testing.assert_array_equal(given[1], scanned[1])


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
    # The members' spread: some disagreement, and never more than values in [0, 1] with that mean can spread.
    assert uncertainty.max() > 0.01
    assert np.all((uncertainty >= 0) & (uncertainty <= np.sqrt(probability * (1 - probability)) + 1e-6))


def test_calibrated_probabilities_stay_in_0_1_and_rise_with_the_raw_score(trained):
    classifier, _, _ = trained
    assert np.all(np.diff(classifier.calibration_x) >= 0)
    assert np.all(np.diff(classifier.calibration_y) >= -1e-12)
    assert classifier.calibration_y.min() >= 0 and classifier.calibration_y.max() <= 1
    # ... and it does rise: from the lowest raw scores (rimless) to the highest (rims) it spans most of [0, 1].
    assert classifier.calibration_y[0] < 0.2 and classifier.calibration_y[-1] > 0.8


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
    card["feature_names"] = [*card["feature_names"][:-1], "vein_score_v9"]  # a measure this version lacks
    (folder / "classifier.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="retrain it with prl-detect train-classifier"):
        load_classifier(folder)


def test_a_classifier_and_examples_of_an_earlier_version_with_fewer_measures_still_work(trained, tmp_path):
    """Measures are only ever added: a site's classifier, or a shipped one, trained on fewer measures loads and
    takes its own columns by name; its examples and new ones train on the measures both have."""
    from PRLDetectorLib.training.classifier import read_examples, write_examples

    _, examples, _ = trained
    earlier = tuple(name for name in FEATURE_NAMES if not name.startswith(("flair_", "centroid_")))
    old_examples = Examples(examples.columns(earlier), examples.labels, examples.groups, examples.weights, earlier)
    write_examples(tmp_path / "old.csv.gz", old_examples)
    read_back = read_examples(tmp_path / "old.csv.gz")
    assert read_back.names == earlier and np.allclose(read_back.features, old_examples.features, atol=1e-6, equal_nan=True)  # 6 decimals
    old, _ = fit_classifier(read_back, folds=3)
    (tmp_path / "model").mkdir()
    loaded = load_classifier(save_classifier(old, read_back, tmp_path / "model"))
    assert loaded.feature_names == earlier
    _, candidates, _ = candidates_of(42)
    full = candidates.features  # every measure of this version, in FEATURE_NAMES order
    by_name, _ = loaded.predict(full)
    own, _ = loaded.predict(full[:, [FEATURE_NAMES.index(n) for n in earlier]])
    assert np.array_equal(by_name, own)
    # Were the columns taken by position, the dropped measures would shift every later one.
    assert not np.allclose(by_name, loaded.predict(full[:, :len(earlier)], columns=earlier)[0])
    # Old and new examples together keep the measures both have, rows in order.
    both = read_back + examples
    assert both.names == earlier and len(both) == 2 * len(examples)
    assert np.allclose(both.features[len(examples):], examples.columns(earlier), equal_nan=True)
    assert fit_classifier(both, folds=3)[0].feature_names == earlier
    assert (examples + read_back).names == earlier  # whichever comes first
    with pytest.raises(InputError, match="lack the measure"):
        loaded.predict(full[:, :5], columns=FEATURE_NAMES[:5])


def test_a_cut_member_is_refused_at_load_before_any_work_and_lightgbm_waits_for_the_first_prediction(
        trained, tmp_path):
    import subprocess
    import sys

    classifier, examples, _ = trained
    (tmp_path / "model").mkdir()
    folder = save_classifier(classifier, examples, tmp_path / "model")
    # LightGBM (and the scikit-learn it imports, ~50 MB) is not loaded by loading the classifier, only by its
    # first prediction: a fresh process shows it.
    script = ("import sys; from PRLDetectorLib.detection.classifier import load_classifier\n"
              f"c = load_classifier({str(folder)!r}); before = 'lightgbm' in sys.modules\n"
              f"import numpy as np; c.predict(np.zeros((2, {len(FEATURE_NAMES)}))); print(before, 'lightgbm' in sys.modules)")
    from conftest import REPO

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.split() == ["False", "True"]
    member = folder / "member_1.txt"
    member.write_text(member.read_text()[: member.stat().st_size // 2])
    with pytest.raises(InputError, match=r"member_1.txt is not a whole LightGBM text model.*reinstall the model"):
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
    everywhere = (rng.random((40, 50, 45)) > 0.96).astype(np.float32) * 0.5
    everywhere[5:12, 5:20, 5:9] = 0.9
    off_centre = np.zeros_like(everywhere)  # components in part of the volume only: labelled in their box
    off_centre[3:30, 4:41, 2:37] = everywhere[3:30, 4:41, 2:37]
    for probability, connectivity in itertools.product((everywhere, off_centre), (6, 26)):
        components, n = cc3d.connected_components(probability >= 0.2, connectivity=connectivity, return_N=True)
        sizes = np.bincount(components.ravel(), minlength=n + 1) * 1.2  # 1 x 1 x 1.2 mm voxels
        kept = [c for c in range(1, n + 1) if sizes[c] >= 3.0]
        labels, count = find_candidates(probability, 0.2, (1.0, 1.0, 1.2), 3.0, None, connectivity)
        assert count == len(kept) > 5 and labels.dtype == np.uint16
        for new_id, component in enumerate(kept, start=1):
            assert np.array_equal(labels == new_id, components == component)
        assert not labels[~np.isin(components, kept)].any()


# The fast paths of stage 2's patch measures against straightforward references (the code the shipped classifiers'
# features were first computed with): the classifiers were trained on these exact values.

def _reference_ring_centre(patch, brain, step=0.75, search_mm=3.0):
    """ring_centre as first written: seven full-size fftconvolve passes over the whole patch."""
    from scipy.signal import fftconvolve

    from PRLDetectorLib.detection.candidates import _CORE_KERNEL, _RING_KERNELS, _radius_grid

    values = np.where(brain, patch, np.nan)
    filled = np.where(brain, patch, np.nanmedian(values) if brain.any() else 0.0).astype(np.float32)
    core = fftconvolve(filled, _CORE_KERNEL, mode="same")
    score = np.max([fftconvolve(filled, k, mode="same") for k in _RING_KERNELS], axis=0) - core
    n = patch.shape[0]
    allowed = (_radius_grid(n, step) <= search_mm) & brain
    if not allowed.any():
        return np.zeros(3), filled, score
    best = np.array(np.unravel_index(int(np.argmax(np.where(allowed, score, -np.inf))), score.shape), float)
    return (best - (n - 1) / 2) * step, filled, score


def _reference_largest_run(flags, neighbours):
    seen = np.zeros(flags.size, bool)
    best = 0
    for start in np.flatnonzero(flags):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            i = stack.pop()
            size += 1
            for j in neighbours[i]:
                if flags[j] and not seen[j]:
                    seen[j] = True
                    stack.append(j)
        best = max(best, size)
    return best


def _reference_ray_features(patch, inside, ref, sd, core):
    """_ray_features as first written: a Python list per ray for what lies beyond its peak."""
    from scipy import ndimage

    from PRLDetectorLib.detection import candidates as c

    n = patch.shape[0]
    radii = np.arange(1, int(c.RAY_MAX_MM / c.RAY_STEP_MM) + 1) * c.RAY_STEP_MM
    coords = (n - 1) / 2 + (c._DIRECTIONS[:, None, ::-1] * radii[None, :, None]) / c.PATCH_STEP_MM
    values = ndimage.map_coordinates(np.where(inside, patch, ref), coords.reshape(-1, 3).T, order=1)
    values = values.reshape(len(c._DIRECTIONS), len(radii)) - ref
    zone = (radii >= 1.5) & (radii <= 8.0)
    peak_index = np.argmax(np.where(zone[None, :], values, -np.inf), axis=1)
    peak = values[np.arange(len(values)), peak_index]
    peak_r = radii[peak_index]
    outer = np.array([values[i, (radii >= peak_r[i] + 1.5) & (radii <= peak_r[i] + 3.5)].mean()
                      if np.any((radii >= peak_r[i] + 1.5) & (radii <= peak_r[i] + 3.5)) else values[i, -1]
                      for i in range(len(values))])
    contrast = peak - max(0.0 if np.isnan(core) else core, 0.0)
    drop = peak - outer
    f = []
    for flags in [(contrast > d) & (drop > d / 2) & (peak > d) for d in c.RIM_DELTAS_PPM] + [
            (contrast > d * sd) & (drop > d * sd / 2) & (peak > d * sd) for d in c.RIM_DELTAS_SD]:
        f += [float(flags.mean()), _reference_largest_run(flags, c._NEIGHBOURS) / len(flags)]
    qs = np.percentile(contrast, (10, 25, 50, 75, 90))
    f += list(qs) + list(qs / sd)
    for share in c.RIM_SHARES:
        flags = (contrast >= share * max(float(qs[-1]), 1e-4)) & (drop > 0) & (peak > 0)
        f += [float(flags.mean()), _reference_largest_run(flags, c._NEIGHBOURS) / len(flags)]
    return f + [float(np.median(peak_r)), float(np.std(peak_r)), float(np.median(drop))]


@pytest.fixture(scope="module")
def phantom_patches():
    """QSM and brain patches of a phantom at its lesions' centroids and a few mm off them (some reach the brain's
    edge), sampled as find_case_candidates samples them."""
    from scipy import ndimage

    from PRLDetectorLib.detection.candidates import BrainPatchSampler, PatchSampler

    case = generate_case("case_patches", 33, extent_mm=EXTENT_MM, n_prl=3)
    instances = sitk.GetArrayFromImage(case.gt_instances)
    q = sitk.GetArrayFromImage(case.qsm)
    brain = (q != 0) & np.isfinite(q)
    qsm_patches, brain_patches = PatchSampler(case.qsm), BrainPatchSampler(brain, case.qsm)
    plain_brain_patches = PatchSampler(sitk.Cast(sitk.GetImageFromArray(brain.astype(np.float32)), sitk.sitkFloat32))
    plain_brain_patches.image.CopyInformation(case.qsm)
    centroids = ndimage.center_of_mass(instances > 0, instances, range(1, int(instances.max()) + 1))
    rng = np.random.default_rng(3)
    patches = []
    for centroid in centroids:
        point = np.array(case.qsm.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centroid[::-1])))
        for shift in (np.zeros(3), rng.uniform(-4, 4, 3), rng.uniform(-25, 25, 3)):
            patches.append((qsm_patches(point + shift), brain_patches(point + shift),
                            plain_brain_patches(point + shift)))
    return patches


def test_the_ring_centre_and_its_scores_are_those_of_seven_full_fftconvolve_passes(phantom_patches):
    from PRLDetectorLib.detection.candidates import ring_centre, ring_scores

    moved = 0
    for patch, brain, _ in phantom_patches:
        inside = brain > 0.5
        expected, filled, score = _reference_ring_centre(patch, inside)
        assert np.array_equal(ring_centre(patch, inside), expected)
        moved += bool(expected.any())
        if inside.any():
            cube = (slice(12, 21),) * 3
            scale = np.abs(score[cube]).max()
            assert np.abs(ring_scores(filled, 4) - score[cube]).max() <= 1e-5 * scale
    assert moved >= 5  # the search does move the centre, so the comparison is not of zeros


def test_the_brain_patch_shortcut_gives_the_resampled_mask_to_the_bit(phantom_patches):
    kinds = set()
    for _, brain, plain in phantom_patches:
        assert np.array_equal(brain, plain)
        kinds.add(bool(plain.min() == 1.0))
    assert kinds == {True, False}  # deep in the brain and at its edge (or outside)


def test_the_ray_features_are_those_of_the_plain_per_ray_loops(phantom_patches):
    from PRLDetectorLib.detection.candidates import _radius_grid, _ray_features, _robust

    r = _radius_grid(33, 0.75)
    compared = 0
    for patch, brain, _ in phantom_patches:
        inside = brain > 0.5
        if not (inside & (r < 1.6)).any():
            continue
        ref, sd = _robust(patch[inside & (r >= 7.0) & (r <= 12.0)])
        core = float(patch[inside & (r < 1.6)].mean()) - ref
        for scale in (1.0, 3.0):  # weak and strong rims: covers and contiguities both away from 0 and 1
            got = _ray_features(patch * scale, inside, ref * scale, sd * scale, core * scale)
            expected = _reference_ray_features(patch * scale, inside, ref * scale, sd * scale, core * scale)
            assert got == expected  # the very same floats
            compared += 1
    assert compared >= 20


def test_candidate_features_do_not_depend_on_how_many_threads_share_the_candidates():
    case = generate_case("case_threads", 34, extent_mm=EXTENT_MM, n_prl=3)
    one = find_case_candidates(case.qsm, stage1_like(case), None, threshold=0.2, min_mm3=5.0, workers=1)
    three = find_case_candidates(case.qsm, stage1_like(case), None, threshold=0.2, min_mm3=5.0, workers=3)
    assert one.count >= 5
    assert np.array_equal(one.features, three.features, equal_nan=True)
    assert np.array_equal(one.labels, three.labels) and one.sources == three.sources


def test_the_brain_patch_shortcut_sees_a_hole_one_voxel_beyond_the_patch_edge():
    from PRLDetectorLib.detection.candidates import BrainPatchSampler, PatchSampler

    brain = np.ones((50, 60, 70), bool)
    hole = np.array([25, 30, 20])  # (z, y, x)
    brain[tuple(hole)] = False
    image = sitk.GetImageFromArray(brain.astype(np.float32))
    image.SetSpacing((0.9, 1.0, 1.1))
    image.SetOrigin((-30.0, -20.0, 10.0))
    shortcut, plain = BrainPatchSampler(brain, image), PatchSampler(image)
    hole_lps = np.array(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in hole[::-1])))
    skipped = 0
    for along in np.linspace(-1.6, 1.6, 17):  # the patch's low x edge from 1.6 mm short of the hole to past it
        centre = hole_lps + np.array([12.0 + along, 0.0, 0.0])
        got = shortcut(centre)
        assert np.array_equal(got, plain(centre))
        skipped += bool(got.min() == 1.0)
    assert 0 < skipped < 17



def test_a_retrain_on_shipped_examples_with_fewer_measures_says_so_and_trains_on_those(tmp_path):
    """``train-classifier --keep-shipped`` on a model whose examples an earlier version wrote (here: without
    the centroid rays) warns and trains on the measures the examples have; the result loads and predicts."""
    import csv
    import gzip
    import shutil

    from conftest import require_model, run_cli

    model = tmp_path / "qsm"
    shutil.copytree(require_model("qsm"), model)
    examples = model / CLASSIFIER_DIR / "training_candidates.csv.gz"
    with gzip.open(examples, "rt", newline="") as stream:
        rows = list(csv.reader(stream))
    keep = [k for k, name in enumerate(rows[0]) if not name.startswith("centroid_")]
    with gzip.open(examples, "wt", newline="") as stream:
        csv.writer(stream).writerows([[row[k] for k in keep] for row in rows])
    out = tmp_path / "qsm_site"
    done = run_cli("train-classifier", "--model", model, "--keep-shipped", "--out", out)
    assert done.returncode == 0, done.stderr
    earlier = tuple(name for name in FEATURE_NAMES if not name.startswith("centroid_"))
    assert f"measured by an earlier version ({len(earlier)} of this version's {len(FEATURE_NAMES)}" in done.stderr
    retrained = load_classifier(out / CLASSIFIER_DIR)
    assert retrained.feature_names == earlier
    _, candidates, _ = candidates_of(42)
    probability, _ = retrained.predict(candidates.features)
    assert probability.shape == (candidates.count,) and np.all((probability >= 0) & (probability <= 1))


def test_the_blur_experiment_smooths_inside_the_brain_and_keeps_its_mask():
    """``Testing/Scripts/experiment_blur_augmentation.py`` (README, "Two more levers"): the smoothed QSM keeps
    the brain mask (the measures read it from the map's zeros), blurs a rim and does not pull the brain's edge
    towards the zeros outside."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "Scripts" / "experiment_blur_augmentation.py"
    spec = importlib.util.spec_from_file_location("experiment_blur_augmentation", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = np.zeros((24, 24, 24), np.float32)
    values[2:22, 2:22, 2:22] = 0.05  # brain, uniform
    values[12, 12, 12] = 0.5  # a bright point
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.8, 0.8, 1.6))
    smoothed = sitk.GetArrayFromImage(module.smoothed_in_brain(image, 1.0))
    assert np.array_equal(smoothed != 0, values != 0)
    assert smoothed[12, 12, 12] < 0.3 and smoothed[12, 12, 13] > 0.06
    assert smoothed[2, 2, 2] == pytest.approx(0.05, abs=1e-4)  # the brain's corner, far from the point
