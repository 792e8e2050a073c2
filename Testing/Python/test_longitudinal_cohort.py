"""BIDS sessions as visits: ``batch --bids --longitudinal`` compares each session with the next per subject.

The batch's detections are made beforehand from the phantoms' true PRLs (result_fixtures) in the batch's own
output layout, so the batch finds them finished and only the longitudinal part runs.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import SMALL_EXTENT_MM, assert_refused, run_cli
from result_fixtures import write_truth_result

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.longitudinal.cohort import subject_visits
from PRLDetectorLib.phantom.visits import generate_visits, write_visits_bids

SUBJECTS = {"sub-000": (3, 5, 2), "sub-001": (8, 3, 3)}
"""participant → (seed, PRLs at visit 1, visits)."""


def _detections_from_truth(bids: Path, out: Path) -> None:
    """What the batch would write for every scan, had detection with the bundled QSM model and the default
    settings (what the batch below runs) found exactly the true PRLs."""
    from PRLDetectorLib.detection.models import fingerprint, resolve_model

    model = fingerprint(resolve_model("qsm"))
    for participant in SUBJECTS:
        truth = bids / "sourcedata" / "phantom" / participant
        record = json.loads((truth / "visits.json").read_text(encoding="utf-8"))
        for visit in record["visits"]:
            session = f"ses-{visit['visit']}"
            anat = bids / participant / session / "anat"
            case = truth / visit["folder"]
            write_truth_result(anat / f"{participant}_{session}_Chimap.nii.gz", case / "gt_prl.nii.gz",
                               case / "gt_instances.nii.gz", out / f"{participant}_{session}",
                               anat / f"{participant}_{session}_FLAIR.nii.gz", model=model)


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bids") / "dataset"
    for participant, (seed, n_prl, visits) in SUBJECTS.items():
        patient = generate_visits(participant, seed, visits, with_flair=True, extent_mm=SMALL_EXTENT_MM, n_prl=n_prl)
        write_visits_bids(patient, folder, participant)
    return folder


@pytest.fixture(scope="module")
def batch(bids, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("batch") / "out"
    _detections_from_truth(bids, out)
    done = run_cli("batch", "--bids", bids, "--out", out, "--longitudinal")
    return out, done


def _csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def _truth_counts(bids: Path, participant: str) -> dict[str, int]:
    record = json.loads((bids / "sourcedata" / "phantom" / participant / "visits.json").read_text(encoding="utf-8"))
    counts: dict[str, int] = {}
    for interval in record["intervals"]:
        for name, n in interval["counts"].items():
            counts[name] = counts.get(name, 0) + n
    return counts


def test_each_subject_s_sessions_are_compared_one_after_the_other(batch):
    out, done = batch
    assert done.returncode == 0, done.stderr
    pairs = sorted(p.relative_to(out / "longitudinal").as_posix() for p in (out / "longitudinal").glob("sub-*/*"))
    assert pairs == ["sub-000/ses-1_to_ses-2", "sub-001/ses-1_to_ses-2", "sub-001/ses-2_to_ses-3"]
    for pair in pairs:
        assert (out / "longitudinal" / pair / "changes.json").is_file()


def test_the_subject_table_counts_prls_gained_and_lost_as_the_truth_has_them(batch, bids):
    out, _ = batch
    subjects = {row["participant_id"]: row for row in _csv(out / "longitudinal" / "subjects.csv")}
    assert set(subjects) == set(SUBJECTS)
    for participant, row in subjects.items():
        truth = _truth_counts(bids, participant)
        assert int(row["gained"]) == truth["new"], participant
        assert int(row["lost"]) == truth["resolved"] + truth["disappeared"], participant
        assert float(row["gained_per_year"]) == pytest.approx(int(row["gained"]) / float(row["years"]), abs=1e-3)
    assert int(subjects["sub-001"]["compared_pairs"]) == 2


def test_the_cohort_summary_gives_prls_gained_and_lost_per_patient_year_from_the_session_dates(batch, bids):
    out, done = batch
    summary = json.loads((out / "longitudinal" / "summary.json").read_text(encoding="utf-8"))
    years = 0.0
    for participant in SUBJECTS:
        record = json.loads((bids / "sourcedata" / "phantom" / participant / "visits.json").read_text(encoding="utf-8"))
        years += sum(interval["years"] for interval in record["intervals"])
    assert summary["patient_years"] == pytest.approx(years, abs=0.01)
    gained = sum(_truth_counts(bids, p)["new"] for p in SUBJECTS)
    assert summary["prls_gained_per_patient_year"] == pytest.approx(gained / years, abs=1e-3)
    assert "per patient-year" in done.stdout.lower() or "Per patient-year" in done.stdout
    rows = _csv(out / "longitudinal" / "changes.csv")
    assert {row["participant_id"] for row in rows} == set(SUBJECTS)


def test_a_second_run_does_not_compare_finished_pairs_again(batch, bids):
    out, _ = batch
    finished = {p: p.stat().st_mtime_ns for p in (out / "longitudinal").glob("sub-*/*/changes.json")}
    done = run_cli("batch", "--bids", bids, "--out", out, "--longitudinal")
    assert done.returncode == 0, done.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert "Visits compared: 3 pair(s)" in done.stdout


def test_a_pair_is_compared_again_when_one_of_its_results_was_remade(batch, bids, tmp_path):
    # As after --redo (or a run with other settings): sub-000's follow-up result is replaced, here by one that
    # found no PRL. Its pair must be compared again; the other subject's pairs must not.
    import numpy as np
    import SimpleITK as sitk

    out = tmp_path / "out"
    shutil.copytree(batch[0], out)
    finished = {p: p.stat().st_mtime_ns for p in (out / "longitudinal").glob("sub-001/*/changes.json")}
    anat = bids / "sub-000" / "ses-2" / "anat"
    qsm = anat / "sub-000_ses-2_Chimap.nii.gz"
    empty = sitk.GetImageFromArray(np.zeros(sitk.ReadImage(str(qsm)).GetSize()[::-1], np.uint16))
    empty.CopyInformation(sitk.ReadImage(str(qsm)))
    sitk.WriteImage(empty, str(tmp_path / "none.nii.gz"))
    from PRLDetectorLib.detection.models import fingerprint, resolve_model

    shutil.rmtree(out / "sub-000_ses-2")
    write_truth_result(qsm, tmp_path / "none.nii.gz", tmp_path / "none.nii.gz", out / "sub-000_ses-2",
                       anat / "sub-000_ses-2_FLAIR.nii.gz", model=fingerprint(resolve_model("qsm")))
    done = run_cli("batch", "--bids", bids, "--out", out, "--longitudinal")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "longitudinal" / "sub-000" / "ses-1_to_ses-2" / "changes.json").read_text(encoding="utf-8"))
    assert record["followup"]["prls"] == 0 and record["counts"]["new"] == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    subjects = {row["participant_id"]: row for row in _csv(out / "longitudinal" / "subjects.csv")}
    assert int(subjects["sub-000"]["gained"]) == 0


def test_a_session_dated_before_the_one_it_follows_is_refused_before_any_detection(bids, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(bids, dataset)
    sessions = dataset / "sub-001" / "sub-001_sessions.tsv"
    lines = sessions.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].split("\t")[0] + "\t2001-01-01T09:00:00"  # ses-2 now before ses-1
    sessions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = run_cli("batch", "--bids", dataset, "--out", tmp_path / "out", "--longitudinal")
    assert_refused(done, "sub-001: ses-2 (2001-01-01) is dated before ses-1")
    assert not (tmp_path / "out").exists()


def test_longitudinal_needs_a_bids_dataset(tmp_path):
    done = run_cli("batch", "--cases", tmp_path, "--out", tmp_path / "out", "--longitudinal")
    assert_refused(done, "give the dataset with --bids")


def test_sessions_are_ordered_by_label_with_numbers_compared_as_numbers(tmp_path):
    for session in ("ses-10", "ses-2", "ses-1"):
        anat = tmp_path / "sub-01" / session / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-01_{session}_Chimap.nii.gz").write_bytes(b"")
    visits = subject_visits(tmp_path)
    assert [v.scan.session_id for v in visits["sub-01"]] == ["ses-1", "ses-2", "ses-10"]
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-1\t2020-01-01\nses-2\t2021-01-01\nses-10\t2020-06-01\n", encoding="utf-8")
    with pytest.raises(InputError, match="ses-10 .2020-06-01. is dated before ses-2"):
        subject_visits(tmp_path)


def test_a_session_of_another_patient_is_recorded_as_not_comparable_and_the_others_go_on(batch, bids, tmp_path):
    out, _ = batch
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "longitudinal")
    # sub-000's follow-up result replaced by sub-001's: two brains.
    shutil.rmtree(copy / "sub-000_ses-2")
    shutil.copytree(out / "sub-001_ses-2", copy / "sub-000_ses-2")
    done = run_cli("batch", "--bids", bids, "--out", copy, "--longitudinal")
    assert done.returncode == 0, done.stderr
    failures = _csv(copy / "longitudinal" / "failures.csv")
    assert [f["pair"] for f in failures] == ["sub-000/ses-1_to_ses-2"]
    assert "same patient" in failures[0]["reason"]
    assert (copy / "longitudinal" / "sub-001" / "ses-2_to_ses-3" / "changes.json").is_file()
