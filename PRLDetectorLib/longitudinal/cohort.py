"""Visits of a BIDS cohort: the sessions of one subject are its visits, compared one after the other.

``prl-detect batch --bids DIR --out OUT --longitudinal`` first detects every scan (the batch), then for every
subject compares each session with the next (``OUT/longitudinal/<sub>/<ses-a>_to_<ses-b>/``, the files of
``prl-detect longitudinal``) and writes, in ``OUT/longitudinal/``:

* ``changes.csv``: every tracked lesion of every pair, with ``participant_id``, both sessions and the interval;
* ``subjects.csv``: per subject: sessions, years followed, PRLs at the first and the last visit, PRLs gained
  (new) and lost (resolved or disappeared), and both per year;
* ``summary.json``: the cohort: PRLs gained and lost per patient-year (subjects without dates left out of the
  rates, and named), and the pairs that could not be compared, with the reason (``failures.csv``).

Visit order: the sessions' labels, numbers compared as numbers (ses-2 before ses-10). Dates come from the
subject's ``sub-<label>_sessions.tsv`` (``acq_time``) when it has them; a session dated before the one it
follows is refused before anything is detected, with a sentence that names both.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path

from PRLDetectorLib.changes import GAINED, LOST
from PRLDetectorLib.cohort.bids import BidsScan, find_bids_scans
from PRLDetectorLib.detection.images import file_sha256
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.longitudinal.outputs import CHANGES_JSON
from PRLDetectorLib.longitudinal.rows import CHANGE_COLUMNS
from PRLDetectorLib.results import RESULT_MARKER, atomic_path

logger = logging.getLogger(__name__)

LONGITUDINAL_DIR = "longitudinal"
SUBJECT_COLUMNS = (
    "participant_id", "sessions", "compared_pairs", "first_session", "last_session", "years", "prls_first", "prls_last",
    "gained", "lost", "new", "persisting", "enlarging", "resolved", "disappeared", "gained_per_year", "lost_per_year",
)


@dataclass(frozen=True)
class SessionVisit:
    scan: BidsScan
    acq_time: datetime | None


@dataclass
class CohortChanges:
    """What ``--longitudinal`` found: the pairs compared, the ones that could not be, the cohort summary."""

    compared: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def _natural(label: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def session_dates(bids_dir: Path, participant: str) -> dict[str, datetime]:
    """``session_id`` → ``acq_time`` from ``sub-<label>/sub-<label>_sessions.tsv`` (empty without one)."""
    from PRLDetectorLib.longitudinal.tracking import parse_time

    path = Path(bids_dir) / participant / f"{participant}_sessions.tsv"
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    dates = {}
    for row in rows:
        session, text = (row.get("session_id") or "").strip(), (row.get("acq_time") or "").strip()
        if session and text and text != "n/a":
            dates[session] = parse_time(text, f"acq_time of {participant} {session} in {path.name}")
    return dates


def subject_visits(bids_dir: Path, scans: list[BidsScan] | None = None) -> dict[str, list[SessionVisit]]:
    """Each subject's session visits in order; raise when sessions.tsv dates a session before the one it follows."""
    scans = scans if scans is not None else find_bids_scans(Path(bids_dir))
    subjects: dict[str, list[BidsScan]] = {}
    for scan in scans:
        if scan.session_id:
            subjects.setdefault(scan.participant_id, []).append(scan)
    out = {}
    for participant, sessions in sorted(subjects.items()):
        by_session: dict[str, BidsScan] = {}
        for scan in sessions:
            if scan.session_id in by_session:
                logger.warning("%s %s has several QSM scans; %s is its visit.", participant, scan.session_id,
                               by_session[scan.session_id].entities)
                continue
            by_session[scan.session_id] = scan
        if len(by_session) < 2:
            continue
        dates = session_dates(bids_dir, participant)
        visits = [SessionVisit(by_session[s], dates.get(s)) for s in sorted(by_session, key=_natural)]
        for earlier, later in pairwise(visits):
            if earlier.acq_time and later.acq_time and later.acq_time <= earlier.acq_time:
                raise InputError(
                    f"{participant}: {later.scan.session_id} ({later.acq_time:%Y-%m-%d}) is dated before "
                    f"{earlier.scan.session_id} ({earlier.acq_time:%Y-%m-%d}) in {participant}_sessions.tsv, so a "
                    "follow-up would precede its baseline; fix acq_time or the session labels.")
        out[participant] = visits
    return out


def pair_dir(out_dir: Path, participant: str, earlier: SessionVisit, later: SessionVisit) -> Path:
    return Path(out_dir) / LONGITUDINAL_DIR / participant / f"{earlier.scan.session_id}_to_{later.scan.session_id}"


def run_bids_longitudinal(bids_dir: Path, out_dir: Path, report: bool = False, progress: bool = True) -> CohortChanges:
    """Compare the consecutive sessions of every subject whose scans the batch finished; write the cohort tables.

    A pair compared already is not compared again unless either result was remade since (``--redo``, or other
    settings: its ``burden.json`` is no longer the one the comparison read); one that cannot be compared (a
    result missing, or the two scans not one brain) is recorded with its reason and the others go on.
    """
    from tqdm import tqdm

    from PRLDetectorLib.longitudinal.compare import VisitInput, run_longitudinal

    out_dir = Path(out_dir)
    subjects = subject_visits(bids_dir)
    pairs = [(p, a, b) for p, visits in subjects.items() for a, b in pairwise(visits)]
    outcome = CohortChanges()
    for participant, earlier, later in tqdm(pairs, desc="Visit pairs", unit="pair", disable=not progress or not pairs):
        target = pair_dir(out_dir, participant, earlier, later)
        name = target.relative_to(out_dir / LONGITUDINAL_DIR).as_posix()
        results = [out_dir / visit.scan.entities for visit in (earlier, later)]
        missing = [r.name for r in results if not (r / RESULT_MARKER).is_file()]
        if missing:
            outcome.failed[name] = f"no detection result for {', '.join(missing)}"
            continue
        if not _up_to_date(target, results):
            try:
                run_longitudinal(VisitInput(results[0], acq_time=earlier.acq_time),
                                 VisitInput(results[1], acq_time=later.acq_time), target, overwrite=True, report=report)
            except InputError as error:
                logger.warning("%s: %s", name, error)
                outcome.failed[name] = str(error)
                continue
        outcome.compared.append(target)
    outcome.summary = write_cohort_changes(out_dir, subjects, outcome)
    return outcome


def _up_to_date(target: Path, results: list[Path]) -> bool:
    """Whether ``target`` holds a comparison of exactly these two results as they are now."""
    if not (target / CHANGES_JSON).is_file():
        return False
    record = json.loads((target / CHANGES_JSON).read_text(encoding="utf-8"))
    read = [record.get(visit, {}).get("burden_sha256") for visit in ("baseline", "followup")]
    return read == [file_sha256(result / RESULT_MARKER) for result in results]


def write_cohort_changes(out_dir: Path, subjects: dict[str, list[SessionVisit]], outcome: CohortChanges) -> dict:
    """``changes.csv``, ``subjects.csv``, ``failures.csv`` and ``summary.json`` in ``OUT/longitudinal``."""
    folder = Path(out_dir) / LONGITUDINAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    compared = set(outcome.compared)
    rows, subject_rows = [], []
    for participant, visits in subjects.items():
        counts = {"new": 0, "persisting": 0, "enlarging": 0, "resolved": 0, "disappeared": 0}
        years, dated, pairs, prls = 0.0, True, 0, []
        for earlier, later in pairwise(visits):
            target = pair_dir(out_dir, participant, earlier, later)
            if target not in compared:
                dated = False
                continue
            record = json.loads((target / CHANGES_JSON).read_text(encoding="utf-8"))
            pairs += 1
            prls = prls or [record["baseline"]["prls"]]
            prls.append(record["followup"]["prls"])
            if record["years"] is None:
                dated = False
            else:
                years += record["years"]
            for change in record["changes"]:
                counts[change["change"]] = counts.get(change["change"], 0) + 1
                rows.append({"participant_id": participant, "from_session": earlier.scan.session_id,
                             "to_session": later.scan.session_id, "years": record["years"], **change})
        if not pairs:
            continue
        gained = sum(counts.get(c, 0) for c in GAINED)
        lost = sum(counts.get(c, 0) for c in LOST)
        subject_rows.append({
            "participant_id": participant, "sessions": len(visits), "compared_pairs": pairs,
            "first_session": visits[0].scan.session_id, "last_session": visits[-1].scan.session_id,
            "years": round(years, 4) if dated else None, "prls_first": prls[0], "prls_last": prls[-1],
            "gained": gained, "lost": lost, **{k: counts.get(k, 0) for k in ("new", "persisting", "enlarging",
                                                                              "resolved", "disappeared")},
            "gained_per_year": round(gained / years, 4) if dated and years > 0 else None,
            "lost_per_year": round(lost / years, 4) if dated and years > 0 else None,
        })
    _write_csv(folder / "changes.csv", ["participant_id", "from_session", "to_session", "years", *CHANGE_COLUMNS], rows)
    _write_csv(folder / "subjects.csv", list(SUBJECT_COLUMNS), subject_rows)
    _write_csv(folder / "failures.csv", ["pair", "reason"],
               [{"pair": k, "reason": v} for k, v in sorted(outcome.failed.items())])
    dated_rows = [r for r in subject_rows if r["years"]]
    patient_years = sum(r["years"] for r in dated_rows)
    gained = sum(r["gained"] for r in dated_rows)
    lost = sum(r["lost"] for r in dated_rows)
    summary = {
        "subjects_compared": len(subject_rows),
        "pairs_compared": len(outcome.compared),
        "pairs_failed": len(outcome.failed),
        "patient_years": round(patient_years, 3),
        "prls_gained": sum(r["gained"] for r in subject_rows),
        "prls_lost": sum(r["lost"] for r in subject_rows),
        "prls_gained_per_patient_year": round(gained / patient_years, 4) if patient_years else None,
        "prls_lost_per_patient_year": round(lost / patient_years, 4) if patient_years else None,
        "subjects_without_dates": [r["participant_id"] for r in subject_rows if not r["years"]],
        "gained_means": list(GAINED),
        "lost_means": list(LOST),
    }
    with atomic_path(folder / "summary.json") as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with atomic_path(path) as partial, partial.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
