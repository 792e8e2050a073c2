"""`prl-detect` end to end: real files, a real nnU-Net model, every bad input of the list.

Bad input must give one sentence on stderr, exit code 2, no traceback and no output folder; an existing
result is never overwritten without --overwrite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import assert_refused, require_model, run_cli

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def detected(small_case, tmp_path_factory) -> Path:
    require_model("qsm")
    out = tmp_path_factory.mktemp("detect") / "result"
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", out, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "PRLs:" in done.stdout
    return out


def test_detect_writes_the_result_files_and_the_candidates_and_nothing_else(detected):
    # The four result files, and the lesion classifier's candidates (stage 2 runs by default).
    assert sorted(p.name for p in detected.iterdir()) == sorted(
        ["prl_labels.nii.gz", "prl.seg.nrrd", "lesions.csv", "burden.json", "candidates.csv"]
    )
    assert not list(detected.parent.glob(".*partial*"))


def test_the_label_map_is_exactly_on_the_qsm_grid(detected, small_case):
    qsm = sitk.ReadImage(str(small_case / "qsm.nii.gz"))
    labels = sitk.ReadImage(str(detected / "prl_labels.nii.gz"))
    assert labels.GetPixelID() == sitk.sitkUInt16
    assert labels.GetSize() == qsm.GetSize()
    assert labels.GetSpacing() == pytest.approx(qsm.GetSpacing(), abs=1e-6)
    assert labels.GetOrigin() == pytest.approx(qsm.GetOrigin(), abs=1e-5)
    assert labels.GetDirection() == pytest.approx(qsm.GetDirection(), abs=1e-6)


def test_the_prls_of_the_phantom_are_found(detected, small_case):
    truth = json.loads((small_case / "truth.json").read_text(encoding="utf-8"))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case / "gt_instances.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(detected / "prl_labels.nii.gz")))
    prl_ids = [lesion["id"] for lesion in truth["lesions"] if lesion["class"] == "prl"]
    assert len(prl_ids) == 3
    hit = [bool((labels[gt == i] > 0).any()) for i in prl_ids]
    assert sum(hit) >= 2, f"PRLs found: {hit}"
    mimics = [lesion["id"] for lesion in truth["lesions"] if lesion["class"] == "microbleed"]
    assert not any((labels[gt == i] > 0).mean() > 0.5 for i in mimics), "a microbleed was called a PRL"


def test_segments_table_and_label_ids_agree(detected):
    import slicerio

    from PRLDetectorLib.detection.features import LESION_COLUMNS, read_lesions_csv

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(detected / "prl_labels.nii.gz")))
    ids = sorted(int(i) for i in np.unique(labels) if i)
    rows = read_lesions_csv(detected / "lesions.csv")
    assert [row["lesion_id"] for row in rows] == ids
    assert list(rows[0].keys()) == list(LESION_COLUMNS) if rows else True
    for row in rows:
        assert row["voxels"] == int((labels == row["lesion_id"]).sum())
    segmentation = slicerio.read_segmentation(str(detected / "prl.seg.nrrd"))
    assert [s["name"] for s in segmentation["segments"]] == [f"PRL {i}" for i in ids]
    voxels = np.asarray(segmentation["voxels"]).transpose(2, 1, 0)
    for segment in segmentation["segments"]:
        lesion_id = int(segment["name"].split()[1])
        assert np.array_equal(voxels == segment["labelValue"], labels == lesion_id)
    colors = {tuple(s["color"]) for s in segmentation["segments"]}
    assert len(colors) == len(ids)


def test_burden_json_records_the_burden_model_settings_and_checksums(detected, small_case):
    import hashlib

    record = json.loads((detected / "burden.json").read_text(encoding="utf-8"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(detected / "prl_labels.nii.gz")))
    assert record["burden"]["prl_count"] == int(labels.max())
    assert record["burden"]["positive_ge1"] == (labels.max() >= 1)
    assert record["model"]["name"] == "qsm"
    assert record["settings"]["threshold"] == 0.5
    sha = hashlib.sha256((small_case / "qsm.nii.gz").read_bytes()).hexdigest()
    assert record["inputs"]["qsm"]["sha256"] == sha
    assert record["software"]["nnunetv2"]
    # The small field of view cuts through the head, so brain fills every tile of the 65×112×96 network grid
    # (2×4×3 tiles of 48³): all run.
    assert record["network_tiles"] == {"total": 24, "run": 24}


def test_burden_json_counts_only_the_tiles_that_held_brain(sparse_case, tmp_path):
    # The head fills 3×3 of the 5×5 in-plane tile positions of the 51×144×136 network grid, in both of its
    # 2 slabs; the speck in the far corner needs one more: 19 of 50 tiles run.
    out = tmp_path / "result"
    done = run_cli("detect", "--qsm", sparse_case, "--out", out, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "burden.json").read_text(encoding="utf-8"))
    assert record["network_tiles"] == {"total": 50, "run": 19}


def test_an_existing_result_is_not_overwritten_without_overwrite(detected, small_case):
    before = (detected / "burden.json").read_bytes()
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", detected)
    assert_refused(done, "exists")
    assert (detected / "burden.json").read_bytes() == before


def test_overwrite_refuses_a_folder_the_tool_did_not_write(tmp_path, small_case):
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious", encoding="utf-8")
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", mine, "--overwrite")
    assert_refused(done, "not a PRLDetector result")
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "precious"


def _qsm_variant(small_case: Path, tmp_path: Path, change) -> Path:
    image = sitk.ReadImage(str(small_case / "qsm.nii.gz"))
    values = change(sitk.GetArrayFromImage(image))
    out = sitk.GetImageFromArray(values.astype(np.float32))
    out.CopyInformation(image)
    path = tmp_path / "bad_qsm.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


def _qsm_with_nan_in_a_lesion(case: Path, tmp: Path) -> Path:
    """NaN voxels in the middle of a white-matter lesion: certainly inside the head."""
    truth = json.loads((case / "truth.json").read_text(encoding="utf-8"))
    image = sitk.ReadImage(str(case / "qsm.nii.gz"))
    x, y, z = image.TransformPhysicalPointToIndex(truth["lesions"][0]["center_lps_mm"])
    return _qsm_variant(case, tmp, lambda v: _set(v, (slice(z - 1, z + 2), slice(y - 1, y + 2), slice(x - 1, x + 2)), np.nan))


def _set(values: np.ndarray, where, value) -> np.ndarray:
    values[where] = value
    return values


def _padded_case(case: Path, tmp: Path, background: float) -> Path:
    """The small case inside a 10-voxel frame of background, as a QSM tool writes outside the head."""
    image = sitk.ReadImage(str(case / "qsm.nii.gz"))
    padded = sitk.ConstantPad(image, (10, 10, 10), (10, 10, 10), 0.0)
    values = sitk.GetArrayFromImage(padded)
    frame = np.ones(values.shape, bool)
    frame[10:-10, 10:-10, 10:-10] = False
    values[frame] = background
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(padded)
    path = tmp / "padded_qsm.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda case, tmp: _text_file(tmp), "not an image"),
        (lambda case, tmp: _truncated(case, tmp), "truncated"),
        (lambda case, tmp: _write_array(tmp, np.ones((30, 30), np.float32)), "2D"),
        (lambda case, tmp: _write_4d(case, tmp), "4D with 2 volumes"),
        (lambda case, tmp: _qsm_with_nan_in_a_lesion(case, tmp), "27 NaN voxel(s) inside the head"),
        (lambda case, tmp: _qsm_variant(case, tmp, np.zeros_like), "all zero"),
        (lambda case, tmp: _qsm_variant(case, tmp, lambda v: v * 1000), "ppb"),
    ],
    ids=["not-an-image", "truncated", "2d", "4d", "nan-inside", "all-zero", "ppb"],
)
def test_bad_qsm_is_refused_with_one_sentence_and_no_output(tmp_path, small_case, make, phrase):
    require_model("qsm")
    path = make(small_case, tmp_path)
    out = tmp_path / "out"
    done = run_cli("detect", "--qsm", path, "--out", out)
    assert_refused(done, phrase)
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))


def test_nan_outside_the_head_is_accepted(tmp_path, small_case):
    require_model("qsm")
    path = _padded_case(small_case, tmp_path, np.nan)
    done = run_cli("detect", "--qsm", path, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out" / "burden.json").read_text(encoding="utf-8"))
    qsm = sitk.ReadImage(str(small_case / "qsm.nii.gz"))
    frame_voxels = int(np.prod([s + 20 for s in qsm.GetSize()]) - np.prod(qsm.GetSize()))
    assert record["input_checks"]["qsm"]["nonfinite_outside_head"] == frame_voxels
    labels = sitk.ReadImage(str(tmp_path / "out" / "prl_labels.nii.gz"))
    assert labels.GetSize() == tuple(s + 20 for s in qsm.GetSize())


def _text_file(tmp: Path) -> Path:
    path = tmp / "x.nii.gz"
    path.write_text("these are notes, not an image", encoding="utf-8")
    return path


def _truncated(case: Path, tmp: Path) -> Path:
    data = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "qsm.nii.gz")))
    path = tmp / "cut.nii"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    return path


def _write_array(tmp: Path, values: np.ndarray) -> Path:
    path = tmp / "array.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    return path


def _write_4d(case: Path, tmp: Path) -> Path:
    image = sitk.ReadImage(str(case / "qsm.nii.gz"))
    path = tmp / "echoes.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(path))
    return path


def test_a_flair_that_does_not_overlap_the_qsm_is_refused_before_any_model_loads(tmp_path, small_case):
    flair = sitk.ReadImage(str(small_case / "flair.nii.gz"))
    flair.SetOrigin((flair.GetOrigin()[0] + 400.0, *flair.GetOrigin()[1:]))
    path = tmp_path / "far_flair.nii.gz"
    sitk.WriteImage(flair, str(path))
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--flair", path, "--out", tmp_path / "out")
    assert_refused(done, "does not overlap the QSM")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_an_nnunet_model_is_refused(tmp_path, small_case):
    fake = tmp_path / "not_a_model"
    fake.mkdir()
    (fake / "weights.bin").write_bytes(b"\0" * 10)
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--model", fake, "--out", tmp_path / "out")
    assert_refused(done, "not an nnU-Net v2 model")
    assert not (tmp_path / "out").exists()


def test_a_model_whose_channels_do_not_match_the_inputs_is_refused(tmp_path, small_case):
    require_model("qsm")
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--flair", small_case / "flair.nii.gz",
                   "--model", "qsm", "--out", tmp_path / "out")
    assert_refused(done, "takes QSM but QSM + FLAIR was given")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_exists_is_refused_before_any_work(tmp_path, small_case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "burden.json").write_text("{}", encoding="utf-8")
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", out)
    assert_refused(done, "exists")
    assert (out / "burden.json").read_text(encoding="utf-8") == "{}"


def test_bad_settings_are_refused(tmp_path, small_case):
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", tmp_path / "o", "--threshold", "1.5")
    assert_refused(done, "Threshold 1.5")
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", tmp_path / "o", "--min-rim-coverage", "2")
    assert_refused(done, "Minimum rim coverage 2.0")
    assert not (tmp_path / "o").exists()


def test_the_rim_check_keeps_the_lesions_with_a_rim_around_two_thirds_of_the_edge(detected, small_case, tmp_path):
    from PRLDetectorLib.detection.features import read_lesions_csv

    out = tmp_path / "rim"
    done = run_cli("detect", "--qsm", small_case / "qsm.nii.gz", "--out", out, "--device", "cpu",
                   "--min-rim-coverage", "0.67")
    assert done.returncode == 0, done.stderr
    every = read_lesions_csv(detected / "lesions.csv")
    kept = read_lesions_csv(out / "lesions.csv")
    assert [r["voxels"] for r in kept] == sorted(
        (r["voxels"] for r in every if r["paramagnetic_edge_fraction"] >= 0.67), reverse=True)
    assert all(r["paramagnetic_edge_fraction"] >= 0.67 for r in kept)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "prl_labels.nii.gz")))
    assert sorted(np.unique(labels[labels > 0]).tolist()) == [r["lesion_id"] for r in kept]
    record = json.loads((out / "burden.json").read_text(encoding="utf-8"))
    assert record["settings"]["min_rim_coverage"] == 0.67
    assert record["burden"]["prl_count"] == len(kept)
    # The PRLs of the phantom have rims around ≥ 2/3 of their edge: the check keeps the ones detection found.
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case / "gt_instances.nii.gz")))
    truth = json.loads((small_case / "truth.json").read_text(encoding="utf-8"))
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(detected / "prl_labels.nii.gz")))
    for lesion in (item for item in truth["lesions"] if item["class"] == "prl"):
        if (before[gt == lesion["id"]] > 0).any():
            assert (labels[gt == lesion["id"]] > 0).any(), f"the rim check dropped true PRL {lesion['id']}"
    # evaluate --min-rim-coverage scores the unchecked result as detect's rim check would have left it.
    from PRLDetectorLib.cohort.evaluation import evaluate_folders

    checked = evaluate_folders(small_case, out).cases[0]
    replayed = evaluate_folders(small_case, detected, min_rim_coverage=0.67).cases[0]
    assert (replayed.pred_count, replayed.detected, replayed.gt_hits) == (checked.pred_count, checked.detected,
                                                                          checked.gt_hits)
    assert checked.pred_count == len(kept)


def test_progress_lines_report_increasing_fractions_for_the_slicer_panel(tmp_path, small_case):
    require_model("qsm")
    done = subprocess.run(
        [sys.executable, "-m", "PRLDetectorLib", "detect", "--qsm", str(small_case / "qsm.nii.gz"),
         "--out", str(tmp_path / "out"), "--progress-lines"], capture_output=True, text=True, encoding="utf-8",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    fractions = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PRLDETECTOR_PROGRESS")]
    assert len(fractions) > 5
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0


def test_evaluate_prints_the_papers_figures_for_a_detection(detected, small_case, tmp_path):
    pred = tmp_path / "pred" / small_case.name
    shutil.copytree(detected, pred)
    done = run_cli("evaluate", "--gt", small_case.parent, "--pred", pred.parent, "--json", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr
    assert "%" in done.stdout and "(" in done.stdout
    record = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert record["evaluation"]


def test_export_dataset_adds_a_corrected_case_in_nnunets_layout_and_never_overwrites_one(tmp_path, small_case):
    dataset = tmp_path / "Dataset777_site"
    args = ("export-dataset", "--dataset", dataset, "--qsm", small_case / "qsm.nii.gz",
            "--flair", small_case / "flair.nii.gz", "--mask", small_case / "gt_prl.nii.gz")
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "Added case_0000" in done.stdout
    record = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    assert record["channel_names"] == {"0": "QSM", "1": "FLAIR"} and record["numTraining"] == 1
    qsm = sitk.ReadImage(str(small_case / "qsm.nii.gz"))
    label = sitk.ReadImage(str(dataset / "labelsTr" / "case_0000.nii.gz"))
    flair = sitk.ReadImage(str(dataset / "imagesTr" / "case_0000_0001.nii.gz"))
    assert label.GetSize() == flair.GetSize() == qsm.GetSize()  # FLAIR brought onto the QSM grid
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case / "gt_prl.nii.gz"))) > 0
    assert np.array_equal(sitk.GetArrayFromImage(label) > 0, truth)
    assert run_cli(*args).returncode == 0  # the next free id
    assert (dataset / "labelsTr" / "case_0001.nii.gz").is_file()
    before = (dataset / "labelsTr" / "case_0000.nii.gz").read_bytes()
    assert_refused(run_cli(*args, "--case-id", "case_0000"), "already holds a case 'case_0000'")
    assert (dataset / "labelsTr" / "case_0000.nii.gz").read_bytes() == before
    assert_refused(run_cli(*args[:5], "--mask", small_case / "gt_prl.nii.gz"), "takes QSM + FLAIR")
