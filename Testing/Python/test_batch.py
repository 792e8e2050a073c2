"""`prl-detect batch`: one loaded model over many patients, failures recorded, resumable."""

from __future__ import annotations

import csv
import shutil

import pytest

from conftest import require_model
from PRLDetectorLib.batch import run_batch
from PRLDetectorLib.settings import DetectionSettings

pytestmark = pytest.mark.slow


def test_a_batch_records_a_failing_patient_goes_on_and_resumes_without_redoing_work(tmp_path, small_case):
    require_model("qsm")
    cases = tmp_path / "cases"
    shutil.copytree(small_case, cases / "p01")
    (cases / "p02").mkdir()
    (cases / "p02" / "qsm.nii.gz").write_text("not an image")
    out = tmp_path / "out"

    report = run_batch(cases, out, DetectionSettings(device="cpu"), progress=False)
    assert report.done == ["p01"]
    assert "not an image" in report.failed["p02"]
    first = (out / "p01" / "burden.json").stat().st_mtime_ns

    rows = list(csv.DictReader(open(out / "burden.csv")))
    assert [r["case_id"] for r in rows] == ["p01"]
    failures = list(csv.DictReader(open(out / "failures.csv")))
    assert failures[0]["case_id"] == "p02"
    lesion_rows = list(csv.DictReader(open(out / "lesions.csv")))
    assert len(lesion_rows) == int(rows[0]["prl_count"])

    shutil.copytree(small_case, cases / "p03")
    report = run_batch(cases, out, DetectionSettings(device="cpu"), progress=False)
    assert report.skipped == ["p01"] and report.done == ["p03"]
    assert (out / "p01" / "burden.json").stat().st_mtime_ns == first
    assert [r["case_id"] for r in csv.DictReader(open(out / "burden.csv"))] == ["p01", "p03"]
