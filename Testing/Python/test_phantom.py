"""The synthetic patients: deterministic, on the right grids, and with lesions that look like what they are.

Every lesion property is measured in the generated QSM (what a model sees), not in the susceptibility map
the QSM was simulated from. Cases are small boxes of the brain so that the whole file runs in seconds.
"""

from __future__ import annotations

import json

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.phantom.anatomy import CSF, NUCLEI, VEIN, VENTRICLE, WM
from PRLDetectorLib.phantom.phantom import VARY_GRID_SPACINGS, generate_case, generate_cohort, write_case

EXTENT_MM = (96, 96, 64)
# Seed 2 in this box holds 4 forced PRLs, rimless lesions (two with a faint partial rim) and 3 microbleeds.
SEED = 2


@pytest.fixture(scope="module")
def case():
    return generate_case("case_000", SEED, with_flair=True, extent_mm=EXTENT_MM, n_prl=4)


def arrays(case) -> dict[str, np.ndarray]:
    names = ("qsm", "gt_prl", "gt_instances", "tissue")
    return {name: sitk.GetArrayFromImage(getattr(case, name)) for name in names}


def lesions_of(case, cls: str) -> list[dict]:
    return [lesion for lesion in case.truth["lesions"] if lesion["class"] == cls]


def rim_measures(case, lesion_id: int) -> tuple[float, float | None, float]:
    """Median QSM of the lesion's outer voxel layer, of its core (None if the lesion is too small to have
    one) and of the white matter 2-4 mm outside it.

    Medians, because a rim covers at least two thirds of a PRL's edge: the median edge voxel then lies on
    the rim, whereas a faint rim over less than a third of a rimless lesion's edge cannot move it.
    """
    a = arrays(case)
    spacing = np.array(case.qsm.GetSpacing()[::-1])
    mask = a["gt_instances"] == lesion_id
    box = tuple(slice(max(idx.min() - 6, 0), idx.max() + 7) for idx in np.nonzero(mask))
    inside, qsm = mask[box], a["qsm"][box]
    depth = ndi.distance_transform_edt(np.pad(inside, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    outside = ndi.distance_transform_edt(~inside, sampling=spacing)
    edge = inside & (depth <= 1.5)
    core = inside & (depth > 2.5)
    shell = (outside >= 2) & (outside <= 4) & (a["tissue"][box] == WM)
    core_value = float(np.median(qsm[core])) if core.sum() >= 3 else None
    return float(np.median(qsm[edge])), core_value, float(np.median(qsm[shell]))


def test_same_seed_gives_byte_identical_images_and_truth(case):
    again = generate_case("case_000", SEED, with_flair=True, extent_mm=EXTENT_MM, n_prl=4)
    for name in ("qsm", "flair", "gt_prl", "gt_instances"):
        first = sitk.GetArrayFromImage(getattr(case, name))
        second = sitk.GetArrayFromImage(getattr(again, name))
        assert first.tobytes() == second.tobytes(), name
    assert json.dumps(case.truth) == json.dumps(again.truth)


_FINGERPRINT_CODE = """
import hashlib, json, sys
import SimpleITK as sitk
from PRLDetectorLib.phantom.phantom import generate_case
case = generate_case("case_000", {seed}, with_flair=True, extent_mm={extent}, n_prl=4)
print(json.dumps({{name: hashlib.sha256(sitk.GetArrayFromImage(getattr(case, name)).tobytes()).hexdigest()
                  for name in ("qsm", "flair", "gt_prl", "gt_instances")}}))
"""


def test_another_process_with_another_hash_seed_makes_the_same_bytes(case):
    import hashlib
    import os
    import subprocess
    import sys

    code = _FINGERPRINT_CODE.format(seed=SEED, extent=tuple(EXTENT_MM))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONHASHSEED="12345"))
    there = json.loads(done.stdout.strip().splitlines()[-1])
    here = {name: hashlib.sha256(sitk.GetArrayFromImage(getattr(case, name)).tobytes()).hexdigest() for name in there}
    assert there == here


def test_different_seeds_give_different_patients(case):
    other = generate_case("case_000", SEED + 1, extent_mm=EXTENT_MM, n_prl=4)
    assert not np.array_equal(sitk.GetArrayFromImage(other.qsm), arrays(case)["qsm"])
    assert [lesion["center_lps_mm"] for lesion in other.truth["lesions"]] != [
        lesion["center_lps_mm"] for lesion in case.truth["lesions"]]


def test_asking_for_flair_leaves_the_qsm_and_lesions_unchanged(case):
    without = generate_case("case_000", SEED, with_flair=False, extent_mm=EXTENT_MM, n_prl=4)
    assert without.flair is None
    assert np.array_equal(sitk.GetArrayFromImage(without.qsm), arrays(case)["qsm"])
    assert without.truth["lesions"] == case.truth["lesions"]


def test_ground_truth_lies_exactly_on_the_qsm_grid(case):
    for image in (case.gt_prl, case.gt_instances):
        assert image.GetSize() == case.qsm.GetSize()
        assert image.GetSpacing() == case.qsm.GetSpacing()
        assert image.GetOrigin() == case.qsm.GetOrigin()
        assert image.GetDirection() == case.qsm.GetDirection()
    assert case.qsm.GetSize() == (96, 96, 64)
    assert case.qsm.GetPixelID() == sitk.sitkFloat32
    assert case.gt_prl.GetPixelID() == sitk.sitkUInt8
    assert case.gt_instances.GetPixelID() == sitk.sitkUInt16


def test_gt_prl_is_the_union_of_the_prl_instances_and_truth_matches_the_voxels(case):
    a = arrays(case)
    prl_ids = [lesion["id"] for lesion in lesions_of(case, "prl")]
    assert set(np.unique(a["gt_prl"])) == {0, 1}
    assert np.array_equal(a["gt_prl"] == 1, np.isin(a["gt_instances"], prl_ids))
    ids_in_image = set(np.unique(a["gt_instances"])) - {0}
    assert ids_in_image == {lesion["id"] for lesion in case.truth["lesions"]}
    voxel_mm3 = float(np.prod(case.qsm.GetSpacing()))
    for lesion in case.truth["lesions"]:
        voxels = int(np.sum(a["gt_instances"] == lesion["id"]))
        assert lesion["voxels"] == voxels
        assert lesion["volume_mm3"] == pytest.approx(voxels * voxel_mm3, rel=1e-6)
        index = case.qsm.TransformPhysicalPointToIndex(lesion["center_lps_mm"])
        x, y, z = lesion["center_lps_mm"]
        assert lesion["center_ras_mm"] == pytest.approx([-x, -y, z])
        assert all(0 <= i < n for i, n in zip(index, case.qsm.GetSize(), strict=True))


def test_n_prl_is_honoured_and_prls_stay_separate_components(case):
    assert case.truth["prl_count"] == 4
    assert len(lesions_of(case, "prl")) == 4
    _, components = cc3d.connected_components(arrays(case)["gt_prl"], connectivity=26, return_N=True)
    assert components == 4


def test_every_prl_lies_in_white_matter(case):
    a = arrays(case)
    for lesion in lesions_of(case, "prl"):
        tissue = a["tissue"][a["gt_instances"] == lesion["id"]]
        assert np.mean(tissue == WM) >= 0.8, lesion
        assert 5.0 <= lesion["diameter_mm"] <= 16.0
        assert 0.67 <= lesion["rim_coverage"] <= 1.0
        assert 1.0 <= lesion["rim_thickness_mm"] <= 2.0


def test_prl_rims_are_brighter_than_their_core_and_the_surrounding_white_matter_in_qsm(case):
    for lesion in lesions_of(case, "prl"):
        edge, core, surround = rim_measures(case, lesion["id"])
        assert edge - surround > 0.02, lesion
        if core is not None:
            assert edge - core > 0.02, lesion


def test_rimless_lesions_have_no_such_rim_even_with_a_faint_partial_one(case):
    rimless = lesions_of(case, "rimless")
    assert any(0 < lesion["rim_coverage"] < 1 / 3 for lesion in rimless)
    with_core = 0
    for lesion in rimless:
        assert lesion["rim_coverage"] < 1 / 3
        edge, core, surround = rim_measures(case, lesion["id"])
        # Uniformly hyperintense lesions (up to +0.025 ppm) may be brighter than white matter, but less so.
        assert edge - surround < 0.02, lesion
        if core is not None:
            with_core += 1
            assert edge - core < 0.02, lesion
    assert with_core >= 2


def test_microbleeds_are_very_bright(case):
    a = arrays(case)
    microbleeds = lesions_of(case, "microbleed")
    assert microbleeds
    for lesion in microbleeds:
        assert 2.0 <= lesion["diameter_mm"] <= 5.5
        assert a["qsm"][a["gt_instances"] == lesion["id"]].max() > 0.25


def test_deep_grey_nuclei_and_veins_are_paramagnetic_compared_with_white_matter(case):
    a = arrays(case)
    wm = a["qsm"][a["tissue"] == WM].mean()
    assert -0.05 < wm < -0.005
    means = {n.name: a["qsm"][a["tissue"] == n.label].mean()
             for n in NUCLEI if np.any(a["tissue"] == n.label)}
    assert {"globus_pallidus", "putamen", "caudate"} <= set(means)
    assert all(mean - wm > 0.04 for mean in means.values()), means
    assert means["globus_pallidus"] > means["putamen"]
    assert a["qsm"][a["tissue"] == VEIN].mean() - wm > 0.08
    assert case.truth["veins"] >= 4


def test_qsm_is_zero_outside_the_brain_and_csf_is_the_reference(case):
    a = arrays(case)
    assert np.all(a["qsm"][a["tissue"] == 0] == 0)
    assert abs(np.median(a["qsm"][np.isin(a["tissue"], (CSF, VENTRICLE))])) < 0.02
    assert -0.5 < a["qsm"].min() and a["qsm"].max() < 1.5


def _flair_in_qsm_space(case) -> np.ndarray:
    matrix = np.array(case.truth["flair"]["qsm_to_flair_lps"])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return sitk.GetArrayFromImage(sitk.Resample(case.flair, case.qsm, transform, sitk.sitkLinear, 0.0))


def test_flair_grid_differs_from_qsm_but_covers_the_same_head(case):
    flair, qsm = case.flair, case.qsm
    assert flair.GetSpacing() != qsm.GetSpacing()
    assert flair.GetSize() != qsm.GetSize()
    motion = case.truth["flair"]["motion"]
    assert 1.0 <= motion["rotation_deg"] <= 3.0 and 1.0 <= motion["translation_mm"] <= 3.0

    def bounds(image):
        corners = np.array([image.TransformIndexToPhysicalPoint((0, 0, 0)),
                            image.TransformIndexToPhysicalPoint([n - 1 for n in image.GetSize()])])
        return corners.min(0), corners.max(0)

    (qlo, qhi), (flo, fhi) = bounds(qsm), bounds(flair)
    overlap = np.prod(np.clip(np.minimum(qhi, fhi) - np.maximum(qlo, flo), 0, None))
    assert overlap > 0.8 * np.prod(qhi - qlo)


def test_flair_shows_ms_lesions_hyperintense_but_not_microbleeds(case):
    a = arrays(case)
    flair = _flair_in_qsm_space(case)
    wm = np.median(flair[a["tissue"] == WM])
    for lesion in case.truth["lesions"]:
        inside = a["gt_instances"] == lesion["id"]
        core = ndi.binary_erosion(inside) if lesion["voxels"] > 30 else inside
        ratio = np.mean(flair[core]) / wm
        if lesion["class"] == "microbleed":
            assert ratio < 1.3, lesion
        else:
            assert ratio > 1.4, lesion


def test_zero_prl_patients_and_patients_with_many_prls_occur_across_a_cohort(tmp_path):
    # 2 mm voxels keep this fast; the counts are drawn the same way at any resolution.
    folders = generate_cohort(tmp_path, 12, seed=3, spacing_mm=2.0, extent_mm=EXTENT_MM, progress=False)
    counts = [json.loads((folder / "truth.json").read_text(encoding="utf-8"))["prl_count"] for folder in folders]
    assert [folder.name for folder in folders] == [f"case_{i:03d}" for i in range(12)]
    assert 1 <= counts.count(0) <= 6
    assert max(counts) >= 4


def test_cohort_refuses_to_overwrite_an_existing_case_folder(tmp_path):
    (tmp_path / "case_001").mkdir()
    with pytest.raises(InputError, match="case_001"):
        generate_cohort(tmp_path, 2, seed=0, spacing_mm=2.0, extent_mm=EXTENT_MM, progress=False)
    assert not (tmp_path / "case_000").exists()


def test_written_case_reads_back_the_same(case, tmp_path):
    folder = write_case(case, tmp_path)
    assert folder == tmp_path / "case_000"
    assert {p.name for p in folder.iterdir()} == {"qsm.nii.gz", "flair.nii.gz", "gt_prl.nii.gz",
                                                 "gt_instances.nii.gz", "truth.json"}
    qsm = sitk.ReadImage(str(folder / "qsm.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(qsm), arrays(case)["qsm"])
    assert qsm.GetOrigin() == pytest.approx(case.qsm.GetOrigin(), abs=1e-4)
    truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
    assert truth["case_id"] == "case_000" and truth["seed"] == SEED and truth["spacing_mm"] == [1.0, 1.0, 1.0]
    with pytest.raises(InputError, match="already exists"):
        write_case(case, tmp_path)


def test_vary_grid_draws_each_case_from_realistic_acquisition_grids(tmp_path):
    folders = generate_cohort(tmp_path, 3, seed=11, extent_mm=(64, 64, 48), vary_grid=True, progress=False)
    for folder in folders:
        truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
        assert tuple(truth["spacing_mm"]) in VARY_GRID_SPACINGS
        assert sitk.ReadImage(str(folder / "qsm.nii.gz")).GetSpacing() == pytest.approx(truth["spacing_mm"])


@pytest.mark.parametrize("kwargs, message", [
    ({"spacing_mm": -1.0}, "spacing_mm"),
    ({"spacing_mm": (1.0, 1.0)}, "spacing_mm"),
    ({"extent_mm": 10.0}, "extent_mm"),
    ({"n_prl": 99}, "n_prl"),
    ({"n_prl": 20, "extent_mm": 40.0}, "fit"),
])
def test_bad_arguments_raise_an_input_error_that_names_them(kwargs, message):
    with pytest.raises(InputError, match=message):
        generate_case("case_000", 0, **kwargs)


def test_a_case_id_must_be_a_plain_folder_name():
    with pytest.raises(InputError, match="folder name"):
        generate_case("../escape", 0, extent_mm=EXTENT_MM)


@pytest.mark.slow
def test_default_case_covers_the_whole_brain_at_1_mm():
    whole = generate_case("case_000", 0)
    assert whole.qsm.GetSize() == (182, 218, 182)
    tissue = sitk.GetArrayFromImage(whole.tissue)
    # The brain fits in the box: no tissue on the outer faces of the grid.
    faces = [tissue[0], tissue[-1], tissue[:, 0], tissue[:, -1], tissue[:, :, 0], tissue[:, :, -1]]
    assert sum(int(np.count_nonzero(face)) for face in faces) < 200


# --- varied acquisitions (site and protocol variety for training and held-out testing) -----------------

def _varied(recon: str, seed: int = 11, **changes):
    from PRLDetectorLib.phantom.phantom import Acquisition

    acquisition = Acquisition(recon=recon, **changes)
    return generate_case("case_000", seed, extent_mm=EXTENT_MM, n_prl=3, acquisition=acquisition)


def test_reconstruction_methods_give_different_maps_of_the_same_patient():
    tkd, tikhonov, l2 = (_varied(r, regularisation=v) for r, v in
                         (("tkd", 0.15), ("tikhonov", 0.01), ("l2grad", 0.005)))
    maps = [sitk.GetArrayFromImage(c.qsm) for c in (tkd, tikhonov, l2)]
    # Same anatomy and lesions (the ground truth is identical) ...
    assert np.array_equal(sitk.GetArrayFromImage(tkd.gt_instances), sitk.GetArrayFromImage(l2.gt_instances))
    # ... but each inversion leaves its own blur and underestimation in the map.
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(maps[a] - maps[b]).mean() > 1e-3
    # Gradient regularisation smooths: less voxel-to-voxel variation than TKD inside the brain.
    brain = maps[0] != 0
    roughness = [np.abs(np.diff(m, axis=2))[brain[:, :, 1:]].mean() for m in maps]
    assert roughness[2] < roughness[0]
    assert [c.truth["qsm"]["reconstruction"] for c in (tkd, tikhonov, l2)] == ["tkd", "tikhonov", "l2grad"]


def test_an_oblique_b0_changes_the_map_and_is_recorded():
    straight = _varied("tkd")
    tilted = _varied("tkd", b0_zyx=(float(np.cos(0.35)), 0.0, float(np.sin(0.35))))
    assert tilted.truth["qsm"]["b0_tilt_deg"] == pytest.approx(20.05, abs=0.1)
    difference = sitk.GetArrayFromImage(straight.qsm) - sitk.GetArrayFromImage(tilted.qsm)
    assert np.abs(difference).max() > 0.01


def test_varied_cohort_draws_reconstructions_from_the_given_set_and_forces_the_negative_share(tmp_path):
    folders = generate_cohort(tmp_path, n=8, seed=3, extent_mm=EXTENT_MM, vary_acquisition=True,
                              recons=("tikhonov", "l2grad"), negative_share=0.25, progress=False)
    truths = [json.loads((f / "truth.json").read_text()) for f in folders]
    assert {t["qsm"]["reconstruction"] for t in truths} <= {"tikhonov", "l2grad"}
    # Every 4th case is forced PRL-negative (the others may draw 0 as well).
    assert all(truths[i]["prl_count"] == 0 for i in (0, 4)) or all(truths[i]["prl_count"] == 0 for i in (3, 7))
    classes = {lesion["class"] for t in truths for lesion in t["lesions"]}
    assert "calcification" in classes
    # Partial rims as bright as a PRL's, over less than 2/3 of the edge: the look-alikes a reader rejects.
    partial = [lesion for t in truths for lesion in t["lesions"]
               if lesion["class"] == "rimless" and lesion["rim_ppm"] >= 0.06]
    assert partial and all(lesion["rim_coverage"] < 0.67 for lesion in partial)


def test_an_unknown_reconstruction_is_refused_with_its_name(tmp_path):
    with pytest.raises(InputError, match="Reconstruction qsmnet is unknown"):
        generate_cohort(tmp_path, n=1, seed=1, vary_acquisition=True, recons=("qsmnet",), progress=False)
