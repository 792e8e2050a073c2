"""Scale-out on Dask: patients as tasks on a cluster of worker processes, each keeping one model loaded."""

from __future__ import annotations

import csv
import shutil

import pytest
from conftest import require_model
from result_fixtures import write_phantom, write_truth_result_of_case

from PRLDetectorLib.cohort.batch import (
    _WORKER_DETECTORS,
    CaseExports,
    check_scale_out,
    run_batch,
    worker_detector,
)
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.settings import DetectionSettings


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    """Three tiny QSM-only phantom patients (64 x 72 x 56 mm) with 2, 1 and 0 PRLs."""
    folder = tmp_path_factory.mktemp("tiny")
    for index, n_prl in enumerate((2, 1, 0)):
        write_phantom(folder, f"p{index}", seed=31 + index, n_prl=n_prl, with_flair=False)
    return folder


def test_a_local_cluster_makes_the_missing_reports_and_records_a_lost_input_as_a_failure(tiny_cases, tmp_path):
    cases, out = tmp_path / "cases", tmp_path / "out"
    shutil.copytree(tiny_cases, cases)
    from PRLDetectorLib.detection.models import fingerprint, resolve_model

    model = fingerprint(resolve_model("qsm"))  # as the bundled model made them, so the batch resumes them
    for case in ("p0", "p1", "p2"):
        write_truth_result_of_case(cases / case, out / case, model=model)
    (cases / "p2" / "qsm.nii.gz").unlink()  # its report cannot be made any more
    (cases / "p2" / "qsm.nii.gz").write_bytes(b"")  # ...but the patient folder is still found

    seen = []
    report = run_batch(
        cases, out, DetectionSettings(device="cuda"), progress=False, exports=CaseExports(report=True),
        workers=2, on_case=lambda case_id, status: seen.append((case_id, status)),
    )
    # Results existed: no detection (a model on an absent CUDA device would fail), only the reports, made on
    # the workers.
    assert report.skipped == ["p0", "p1"] and not report.done
    assert list(report.failed) == ["p2"] and "QSM" in report.failed["p2"]
    assert sorted(seen) == [("p0", "skipped"), ("p1", "skipped"), ("p2", "failed")]
    assert "PRL 2" in (out / "p0" / "report.html").read_text(encoding="utf-8")
    assert not (out / "p2" / "report.html").exists()
    assert (out / "report.html").is_file()
    assert [r["case_id"] for r in csv.DictReader(open(out / "failures.csv", encoding="utf-8"))] == ["p2"]


def test_workers_and_scheduler_together_or_no_worker_are_input_errors():
    with pytest.raises(InputError, match="not both"):
        check_scale_out(2, "tcp://127.0.0.1:8786")
    with pytest.raises(InputError, match="starts no worker"):
        check_scale_out(0, None)


@pytest.mark.slow
def test_two_workers_detect_a_cohort_record_a_broken_patient_and_resume(tiny_cases, tmp_path):
    model = require_model("qsm")
    cases, out = tmp_path / "cases", tmp_path / "out"
    shutil.copytree(tiny_cases, cases)
    (cases / "p3").mkdir()
    (cases / "p3" / "qsm.nii.gz").write_text("not an image", encoding="utf-8")
    settings = DetectionSettings(model=str(model), device="cpu")

    report = run_batch(cases, out, settings, progress=False, workers=2)
    assert report.done == ["p0", "p1", "p2"]
    assert "not an image" in report.failed["p3"]
    assert report.cases_per_hour > 0
    burden = list(csv.DictReader(open(out / "burden.csv", encoding="utf-8")))
    assert [r["case_id"] for r in burden] == ["p0", "p1", "p2"]
    lesions = list(csv.DictReader(open(out / "lesions.csv", encoding="utf-8")))
    assert len(lesions) == sum(int(r["prl_count"]) for r in burden)
    first = (out / "p0" / "burden.json").stat().st_mtime_ns

    again = run_batch(cases, out, settings, progress=False, workers=2)
    assert again.skipped == ["p0", "p1", "p2"] and list(again.failed) == ["p3"]
    assert (out / "p0" / "burden.json").stat().st_mtime_ns == first


@pytest.mark.slow
def test_a_worker_keeps_one_model_loaded_per_settings():
    model = require_model("qsm")
    try:
        first = worker_detector(DetectionSettings(model=str(model), device="cpu"))
        assert worker_detector(DetectionSettings(model=str(model), device="cpu")) is first
        other = worker_detector(DetectionSettings(model=str(model), device="cpu", threshold=0.7))
        assert other is not first and len(_WORKER_DETECTORS) == 1
    finally:
        _WORKER_DETECTORS.clear()


@pytest.mark.slow
def test_a_worker_killed_mid_patient_is_recorded_as_a_failure_and_the_batch_goes_on(tiny_cases, tmp_path):
    """README "Robust for hundreds of patients": a lost worker fails its patient only. Of two workers, each on a
    patient, the one running the first is killed (SIGKILL, as the kernel's out-of-memory killer does) while it
    works; with no retries allowed, that patient is recorded in failures.csv with no result folder, and the
    other patient's result is made."""
    import os
    import signal
    import threading
    import time

    import dask
    from distributed import LocalCluster

    model = require_model("qsm")
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    for case in ("p0", "p1"):
        shutil.copytree(tiny_cases / case, cases / case)
    settings = DetectionSettings(model=str(model), device="cpu")
    # No retries; two workers, so that each takes one patient and the kill takes one.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        outcome = {}
        batch = threading.Thread(target=lambda: outcome.update(report=run_batch(
            cases, out, settings, progress=False, scheduler=cluster.scheduler_address)))
        batch.start()
        killed, deadline = None, time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and batch.is_alive():
            running = [task for key, task in list(cluster.scheduler.tasks.items())
                       if str(key).startswith("prl-case-") and task.state == "processing"]
            if len(running) == 2 and running[0].processing_on is not running[1].processing_on:
                time.sleep(1.0)  # inside process_case: reading, loading the model or detecting
                killed = str(running[0].key).split("-")[2]
                (nanny,) = [n for n in cluster.workers.values()
                            if n.worker_address == running[0].processing_on.address]
                os.kill(nanny.process.process.pid, signal.SIGKILL)
            time.sleep(0.1)
        batch.join(timeout=600)
    assert killed in ("p0", "p1"), "no patient was seen running"
    report = outcome["report"]
    other = "p1" if killed == "p0" else "p0"
    assert list(report.failed) == [killed] and report.failed[killed].startswith("worker lost: KilledWorker")
    assert report.done == [other]
    assert not (out / killed).exists() and (out / other / "burden.json").is_file()
    rows = list(csv.DictReader(open(out / "failures.csv", encoding="utf-8")))
    assert [r["case_id"] for r in rows] == [killed] and "worker lost" in rows[0]["reason"]
