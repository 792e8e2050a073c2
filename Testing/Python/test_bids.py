"""BIDS in and out: Chimap scans are found with their FLAIR, and a valid derivatives folder comes out."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from result_fixtures import write_phantom, write_truth_result_of_case

from PRLDetectorLib.cohort.batch import run_bids_batch
from PRLDetectorLib.cohort.bids import LESION_COLUMN_DESCRIPTIONS, find_bids_scans
from PRLDetectorLib.detection.features import LESION_COLUMNS
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.settings import DetectionSettings


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    return {
        "a": write_phantom(folder, "a", seed=11, n_prl=2, with_flair=True),
        "b": write_phantom(folder, "b", seed=12, n_prl=0, with_flair=False),
    }


@pytest.fixture
def bids(tmp_path, phantoms):
    """sub-01 with a session, QSM and FLAIR; sub-02 without session or FLAIR; a T1w that is no QSM."""
    root = tmp_path / "bids"
    anat1 = root / "sub-01" / "ses-1" / "anat"
    anat2 = root / "sub-02" / "anat"
    anat1.mkdir(parents=True)
    anat2.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "MS", "BIDSVersion": "1.10.0"}), encoding="utf-8")
    shutil.copy(phantoms["a"] / "qsm.nii.gz", anat1 / "sub-01_ses-1_Chimap.nii.gz")
    shutil.copy(phantoms["a"] / "flair.nii.gz", anat1 / "sub-01_ses-1_FLAIR.nii.gz")
    shutil.copy(phantoms["b"] / "qsm.nii.gz", anat2 / "sub-02_Chimap.nii.gz")
    shutil.copy(phantoms["b"] / "qsm.nii.gz", anat2 / "sub-02_T1w.nii.gz")
    return root


def test_chimap_scans_are_found_with_their_flair_and_named_by_their_entities(bids):
    scans = find_bids_scans(bids)
    assert [s.entities for s in scans] == ["sub-01_ses-1", "sub-02"]
    assert scans[0].flair.name == "sub-01_ses-1_FLAIR.nii.gz" and scans[1].flair is None
    assert scans[0].anat_dir.as_posix() == "sub-01/ses-1/anat"
    assert (scans[0].participant_id, scans[0].session_id) == ("sub-01", "ses-1")
    assert (scans[1].participant_id, scans[1].session_id) == ("sub-02", "")


def test_two_flairs_named_unlike_the_qsm_leave_the_scan_without_flair(bids, caplog):
    anat = bids / "sub-01" / "ses-1" / "anat"
    shutil.copy(anat / "sub-01_ses-1_FLAIR.nii.gz", anat / "sub-01_ses-1_acq-sag_FLAIR.nii.gz")
    (anat / "sub-01_ses-1_FLAIR.nii.gz").rename(anat / "sub-01_ses-1_acq-ax_FLAIR.nii.gz")
    with caplog.at_level(logging.WARNING):
        scans = find_bids_scans(bids)
    assert scans[0].flair is None
    assert "2 FLAIRs" in caplog.text


def test_a_folder_without_chimap_scans_is_an_input_error_naming_the_suffix(tmp_path):
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(InputError, match="_Chimap.nii.gz"):
        find_bids_scans(tmp_path)


def test_a_bids_batch_writes_derivatives_with_a_described_lesion_table(bids, phantoms, tmp_path):
    out = tmp_path / "out"
    # Results as a finished batch left them: the batch resumes, loads no model, and writes derivatives.
    from PRLDetectorLib.detection.models import fingerprint, resolve_model

    model = fingerprint(resolve_model("qsm"))  # results as the bundled model made them: the batch resumes them
    write_truth_result_of_case(phantoms["a"], out / "sub-01_ses-1", model=model)
    write_truth_result_of_case(phantoms["b"], out / "sub-02", model=model)
    report = run_bids_batch(bids, out, DetectionSettings(device="cuda"), progress=False)  # loads no model
    assert report.skipped == ["sub-01_ses-1", "sub-02"] and not report.done and not report.failed

    root = out / "derivatives" / "prldetector"
    description = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "PRLDetector"
    assert description["DatasetLinks"]["raw"] == bids.resolve().as_uri()

    anat = root / "sub-01" / "ses-1" / "anat"
    stem = "sub-01_ses-1_space-orig_desc-PRL_dseg"
    dseg = sitk.ReadImage(str(anat / f"{stem}.nii.gz"))
    labels = sitk.ReadImage(str(out / "sub-01_ses-1" / "prl_labels.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(dseg), sitk.GetArrayFromImage(labels))
    assert sorted(np.unique(sitk.GetArrayFromImage(dseg))) == [0, 1, 2]

    with open(anat / f"{stem}.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["index"] for r in rows] == ["1", "2"] and rows[0]["name"] == "PRL 1" and rows[0]["mapping"] == "7"
    lesions = list(csv.DictReader(open(out / "sub-01_ses-1" / "lesions.csv", encoding="utf-8")))
    assert float(rows[1]["volume_mm3"]) == pytest.approx(float(lesions[1]["volume_mm3"]))

    sidecar = json.loads((anat / f"{stem}.json").read_text(encoding="utf-8"))
    assert all(column in sidecar and sidecar[column]["Description"] for column in rows[0])
    assert sidecar["volume_mm3"]["Units"] == "mm^3" and sidecar["rim_mean_ppm"]["Units"] == "ppm"
    assert sidecar["Sources"] == [
        "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_Chimap.nii.gz", "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz"
    ]
    assert sidecar["PRLCount"] == 2

    # A patient without PRLs still gets a segmentation and a table with its header only.
    empty = root / "sub-02" / "anat" / "sub-02_space-orig_desc-PRL_dseg.tsv"
    assert empty.read_text(encoding="utf-8").splitlines()[0].startswith("index\tname\tabbreviation\tcolor\tmapping\tvoxels")
    assert len(empty.read_text(encoding="utf-8").splitlines()) == 1

    burden = list(csv.DictReader(open(out / "burden.csv", encoding="utf-8")))
    assert [(r["participant_id"], r["session_id"]) for r in burden] == [("sub-01", "ses-1"), ("sub-02", "")]


def test_every_lesion_measurement_has_a_description_for_the_bids_sidecar():
    assert set(LESION_COLUMN_DESCRIPTIONS) == set(LESION_COLUMNS) - {"lesion_id"}
