"""`prl-detect batch`: one loaded model over many patients, failures recorded, resumable."""

from __future__ import annotations

import csv
import shutil

import pytest
from conftest import require_model

from PRLDetectorLib.cohort.batch import CaseExports, run_batch
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.settings import DetectionSettings


@pytest.mark.slow
def test_a_batch_records_a_failing_patient_goes_on_and_resumes_without_redoing_work(tmp_path, small_case):
    require_model("qsm")
    cases = tmp_path / "cases"
    shutil.copytree(small_case, cases / "p01")
    (cases / "p02").mkdir()
    (cases / "p02" / "qsm.nii.gz").write_text("not an image", encoding="utf-8")
    out = tmp_path / "out"

    report = run_batch(cases, out, DetectionSettings(device="cpu"), progress=False)
    assert report.done == ["p01"]
    assert "not an image" in report.failed["p02"]
    first = (out / "p01" / "burden.json").stat().st_mtime_ns

    rows = list(csv.DictReader(open(out / "burden.csv", encoding="utf-8")))
    assert [r["case_id"] for r in rows] == ["p01"]
    failures = list(csv.DictReader(open(out / "failures.csv", encoding="utf-8")))
    assert failures[0]["case_id"] == "p02"
    lesion_rows = list(csv.DictReader(open(out / "lesions.csv", encoding="utf-8")))
    assert len(lesion_rows) == int(rows[0]["prl_count"])

    shutil.copytree(small_case, cases / "p03")
    report = run_batch(cases, out, DetectionSettings(device="cpu"), progress=False)
    assert report.skipped == ["p01"] and report.done == ["p03"]
    assert (out / "p01" / "burden.json").stat().st_mtime_ns == first
    assert [r["case_id"] for r in csv.DictReader(open(out / "burden.csv", encoding="utf-8"))] == ["p01", "p03"]


@pytest.fixture(scope="module")
def finished_cohort(tmp_path_factory):
    """Two tiny phantom patients and their results, as an interrupted batch with the bundled QSM model and
    the default settings left them."""
    from result_fixtures import write_phantom, write_truth_result_of_case

    from PRLDetectorLib.detection.models import fingerprint, resolve_model

    model = fingerprint(resolve_model("qsm"))
    root = tmp_path_factory.mktemp("finished")
    for index, n_prl in enumerate((1, 0)):
        case = write_phantom(root / "cases", f"p{index}", seed=41 + index, n_prl=n_prl, with_flair=False)
        write_truth_result_of_case(case, root / "out" / case.name, model=model)
    return root


def test_a_resumed_batch_only_adds_the_missing_reports_and_loads_no_model(finished_cohort, tmp_path):
    cases, out = finished_cohort / "cases", tmp_path / "out"
    shutil.copytree(finished_cohort / "out", out)
    before = (out / "p0" / "burden.json").stat().st_mtime_ns

    # A CUDA device that is not there: loading the model would fail, so nothing loads it.
    report = run_batch(cases, out, DetectionSettings(device="cuda"), progress=False,
                       exports=CaseExports(report=True))
    assert report.skipped == ["p0", "p1"] and not report.done and not report.failed
    assert (out / "p0" / "burden.json").stat().st_mtime_ns == before
    assert "PRL 1" in (out / "p0" / "report.html").read_text(encoding="utf-8")
    assert "No PRL was found." in (out / "p1" / "report.html").read_text(encoding="utf-8")
    assert "cohort of 2 patient(s)" in (out / "report.html").read_text(encoding="utf-8")


def test_a_missing_model_stops_the_batch_before_any_patient(finished_cohort, tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(finished_cohort / "cases" / "p0", cases / "p0")
    with pytest.raises(InputError, match="no-such-model"):
        run_batch(cases, tmp_path / "out", DetectionSettings(model="no-such-model"), progress=False)
    assert not (tmp_path / "out" / "p0").exists()


def test_the_batch_command_takes_cases_or_bids_not_both(tmp_path):
    parser = _cohort_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["batch", "--cases", "a", "--bids", "b", "--out", "c"])
    args = parser.parse_args(["batch", "--bids", "b", "--out", "c", "--workers", "2", "--report", "--gt", "g"])
    assert (args.bids, args.workers, args.report, args.gt, args.model) == ("b", 2, True, "g", "qsm")
    with pytest.raises(InputError, match="add --report"):
        args.func(parser.parse_args(["batch", "--cases", "a", "--out", "c", "--gt", "g"]))


def _cohort_parser():
    import argparse

    from PRLDetectorLib.cli import cohort as cohort_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("-q", "--quiet", action="store_true")
    cohort_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_the_batch_knows_a_finished_patient_by_the_file_the_pipeline_writes_last():
    from PRLDetectorLib.cohort import batch
    from PRLDetectorLib.detection import pipeline

    assert batch.RESULT_MARKER == pipeline.RESULT_MARKER


def test_cohort_tables_are_readable_like_any_file_the_user_writes(finished_cohort, tmp_path):
    import os

    from PRLDetectorLib.cohort.batch import BatchReport, write_cohort_tables

    out = tmp_path / "out"
    shutil.copytree(finished_cohort / "out", out)
    write_cohort_tables(out, BatchReport())
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "burden.csv").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("settings, phrase", [
    (DetectionSettings(threshold=0.7), "p0: threshold 0.5, not 0.7"),
    (DetectionSettings(min_rim_coverage=0.67), "p0: min_rim_coverage 0.0, not 0.67"),
    (DetectionSettings(model="qsm_flair"), "p0: model 'qsm' "),
], ids=["threshold", "rim-check", "model"])
def test_a_batch_does_not_resume_results_made_with_another_model_or_settings(finished_cohort, tmp_path, settings, phrase):
    cases, out = finished_cohort / "cases", tmp_path / "out"
    shutil.copytree(finished_cohort / "out", out)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(InputError, match=f"holds results of 2 patient\\(s\\) made with another model or other "
                       f"settings \\({phrase}.*add --redo to replace them, or give a new --out"):
        run_batch(cases, out, settings, progress=False, exports=CaseExports(report=True))
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_the_same_model_by_path_and_another_device_resume(finished_cohort, tmp_path, bundled_model_dir):
    cases, out = finished_cohort / "cases", tmp_path / "out"
    shutil.copytree(finished_cohort / "out", out)
    report = run_batch(cases, out, DetectionSettings(model=str(bundled_model_dir / "qsm"), device="cuda"), progress=False)
    assert report.skipped == ["p0", "p1"] and not report.failed


@pytest.mark.slow
def test_redo_detects_again_the_patients_made_with_other_settings(finished_cohort, tmp_path):
    import json

    from conftest import assert_refused, run_cli

    cases, out = finished_cohort / "cases", tmp_path / "out"
    shutil.copytree(finished_cohort / "out", out)
    done = run_cli("batch", "--cases", cases, "--out", out, "--threshold", "0.7", "--device", "cpu")
    assert_refused(done, "--redo")
    done = run_cli("batch", "--cases", cases, "--out", out, "--threshold", "0.7", "--device", "cpu", "--redo")
    assert done.returncode == 0, done.stderr
    assert "Done 2, already done 0, failed 0" in done.stdout
    for patient in ("p0", "p1"):
        record = json.loads((out / patient / "burden.json").read_text(encoding="utf-8"))
        assert record["settings"]["threshold"] == 0.7 and record["model"]["name"] == "qsm"
    done = run_cli("batch", "--cases", cases, "--out", out, "--threshold", "0.7", "--device", "cpu")
    assert done.returncode == 0 and "Done 0, already done 2" in done.stdout


def test_the_same_checkpoint_with_another_lesion_classifier_is_another_model(finished_cohort, tmp_path, bundled_model_dir):
    cases, out = finished_cohort / "cases", tmp_path / "out"
    shutil.copytree(finished_cohort / "out", out)
    retrained = tmp_path / "retrained"  # what train-classifier makes: the same checkpoint, a new classifier
    shutil.copytree(bundled_model_dir / "qsm", retrained, ignore=shutil.ignore_patterns("classifier"))
    (retrained / "classifier").mkdir()
    (retrained / "classifier" / "card.json").write_text('{"name": "retrained"}', encoding="utf-8")
    with pytest.raises(InputError, match="another lesion classifier"):
        run_batch(cases, out, DetectionSettings(model=str(retrained)), progress=False)
