"""Many patients through one loaded model: ``prl-detect batch``.

Input: a folder with one subfolder per patient holding ``qsm.nii.gz`` (or any readable QSM named
``qsm.*``, or a DICOM series folder ``qsm/``) and, for a QSM + FLAIR model, ``flair.*``; or a BIDS dataset
(see :mod:`PRLDetectorLib.cohort.bids`). Output: per patient the files of ``detect`` (plus, on request, an HTML
report and a DICOM SEG); for the cohort ``burden.csv`` (one row per patient), ``lesions.csv`` (one row per
lesion) and ``failures.csv``; for BIDS input also ``derivatives/prldetector/``.

A patient whose result exists is not redone, so an interrupted batch resumes where it stopped, but only
when that result was made with the same model (its checkpoints' sha256) and settings: otherwise the batch
stops before any patient, unless ``redo`` replaces those results. A patient that fails is recorded with its
reason and the batch goes on.

The patients run in this process, one after the other through one loaded model, or as tasks on a Dask
cluster (:func:`run_cases` with ``workers`` or ``scheduler``): every worker process keeps one model loaded
(:func:`worker_detector`) and takes patients one at a time. Workers of a remote cluster must see the
input and output folders at the same paths as this machine.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PRLDetectorLib.detection.features import LESION_COLUMNS, format_cell, read_lesions_csv
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.progress import count_progress
from PRLDetectorLib.results import DICOM_SEG_NAME, LESIONS_NAME, REPORT_NAME, RESULT_MARKER, atomic_path
from PRLDetectorLib.settings import DetectionSettings

if TYPE_CHECKING:
    from PRLDetectorLib.detection.models import ModelInfo
    from PRLDetectorLib.detection.pipeline import Detector

logger = logging.getLogger(__name__)

IMAGE_PATTERNS = ("{}.nii.gz", "{}.nii", "{}.nrrd", "{}.mha", "{}")
BURDEN_COLUMNS = ("case_id", "prl_count", "total_volume_mm3", "mean_volume_mm3", "positive_ge1", "positive_ge4", "model")
BIDS_COLUMNS = ("participant_id", "session_id")
"""Appended to ``burden.csv`` when the patients came from a BIDS dataset, to join with participants.tsv."""

OnCase = Callable[[str, str], None]


@dataclass(frozen=True)
class Case:
    case_id: str
    qsm: Path
    flair: Path | None


@dataclass(frozen=True)
class CaseExports:
    """Files made for each finished patient besides the result of ``detect``."""

    report: bool = False
    """``report.html``: burden, lesion table and a picture of every lesion."""
    dicom_seg: bool = False
    """``prl_seg.dcm``: a DICOM SEG referencing the QSM series, for patients whose QSM is a DICOM folder."""


@dataclass(frozen=True)
class CaseOutcome:
    case_id: str
    status: str
    """``done``, ``skipped`` (finished before) or ``failed``."""
    reason: str = ""
    seconds: float = 0.0


@dataclass
class BatchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each patient done in this run, detection and files."""
    wall_s: float = 0.0
    """Wall time of the whole run, model loading and cluster start included."""

    def add(self, outcome: CaseOutcome) -> None:
        if outcome.status == "failed":
            self.failed[outcome.case_id] = outcome.reason
        elif outcome.status == "skipped":
            self.skipped.append(outcome.case_id)
        else:
            self.done.append(outcome.case_id)
            self.seconds[outcome.case_id] = outcome.seconds

    @property
    def cases_per_hour(self) -> float:
        """Patients done per hour of this run's wall time (NaN when none was done)."""
        return 3600.0 * len(self.done) / self.wall_s if self.done and self.wall_s > 0 else float("nan")


def _find(folder: Path, stem: str) -> Path | None:
    for pattern in IMAGE_PATTERNS:
        candidate = folder / pattern.format(stem)
        if candidate.exists():
            return candidate
    return None


def find_cases(cases_dir: Path) -> list[Case]:
    if not cases_dir.is_dir():
        raise InputError(f"The cases folder '{cases_dir}' does not exist; give a folder of patient folders.")
    cases = []
    for folder in sorted(p for p in cases_dir.iterdir() if p.is_dir()):
        qsm = _find(folder, "qsm")
        if qsm is not None:
            cases.append(Case(folder.name, qsm, _find(folder, "flair")))
    if not cases:
        raise InputError(f"'{cases_dir}' holds no patient folder with a qsm.nii.gz; give a folder of patient folders.")
    return cases


def cases_from_bids(bids_dir: Path) -> list[Case]:
    from PRLDetectorLib.cohort.bids import find_bids_scans

    return [Case(scan.entities, scan.qsm, scan.flair) for scan in find_bids_scans(Path(bids_dir))]


# --- one patient -----------------------------------------------------------------------------------------

_WORKER_DETECTORS: dict[str, Detector] = {}


def worker_detector(settings: DetectionSettings) -> Detector:
    """The Detector this process keeps loaded for ``settings``: loaded on first use, then reused.

    A Dask worker process runs many patients; this is what makes it load the model once. Only the latest
    settings are kept, so a worker never holds two models.
    """
    from PRLDetectorLib.detection.pipeline import Detector

    key = json.dumps(settings.to_dict(), sort_keys=True)
    if key not in _WORKER_DETECTORS:
        _WORKER_DETECTORS.clear()
        _WORKER_DETECTORS[key] = Detector(settings)
    return _WORKER_DETECTORS[key]


def case_finished(target: Path, case: Case, exports: CaseExports) -> bool:
    """True when the patient's result and every requested export exist."""
    if not (target / RESULT_MARKER).is_file():
        return False
    if exports.report and not (target / REPORT_NAME).is_file():
        return False
    return not (exports.dicom_seg and case.qsm.is_dir() and not (target / DICOM_SEG_NAME).is_file())


def result_differs(record: dict, model: ModelInfo, settings: DetectionSettings) -> str | None:
    """Why a patient's ``burden.json`` record was not made with ``model`` and ``settings``; None when it was.

    The model counts by its checkpoints' sha256 and its lesion classifier's, not its name; the device does
    not count. A setting the
    record lacks (a result older than the setting) counts as its default.
    """
    from PRLDetectorLib.detection.classifier import classifier_sha256

    made = record.get("model") or {}
    if made.get("checkpoint_sha256") != model.checkpoint_sha256:
        return f"model '{made.get('name', '?')}' ({str(made.get('checkpoint_sha256'))[:12]}), not '{model.name}' " \
               f"({str(model.checkpoint_sha256)[:12]})"
    if made.get("classifier_sha256") != (current := classifier_sha256(model.path)):
        return f"another lesion classifier ({str(made.get('classifier_sha256'))[:12]}, not {str(current)[:12]})"
    recorded = record.get("settings")
    if not isinstance(recorded, dict):
        return "no record of its settings"
    defaults = DetectionSettings().to_dict()
    for key, value in settings.to_dict().items():
        if key in ("model", "device"):
            continue
        before = recorded.get(key, defaults.get(key))
        if before != value:
            return f"{key} {before}, not {value}"
    return None


def stale_results(out_dir: Path, case_ids: list[str], settings: DetectionSettings) -> dict[str, str]:
    """The finished patients of ``out_dir`` whose results were made with another model or other settings."""
    from PRLDetectorLib.detection.models import fingerprint, resolve_model

    model = fingerprint(resolve_model(settings.model))
    stale = {}
    for case_id in case_ids:
        try:
            record = json.loads((out_dir / case_id / RESULT_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        reason = result_differs(record, model, settings) if isinstance(record, dict) else "an unreadable record"
        if reason:
            stale[case_id] = reason
    return stale


def process_case(
    case: Case, out_dir: Path, settings: DetectionSettings, exports: CaseExports = CaseExports(),
    detector: Detector | None = None, replace: bool = False,
) -> CaseOutcome:
    """Detect, write and export one patient; never raises: a failure comes back with its reason.

    Without ``detector`` the process's :func:`worker_detector` is used (loaded only if detection is needed).
    A patient whose result exists is not detected again, only its missing exports are made; with ``replace``
    it is detected again and its result folder replaced.
    """
    started = time.perf_counter()
    target = Path(out_dir) / case.case_id
    already = (target / RESULT_MARKER).is_file() and not replace
    try:
        if not already:
            from PRLDetectorLib.detection.images import read_image
            from PRLDetectorLib.detection.pipeline import write_result

            qsm = read_image(case.qsm, "QSM")  # an unreadable scan fails before a worker loads the model
            detector = detector or worker_detector(settings)
            use_flair = "flair" in detector.model.channels
            if use_flair and case.flair is None:
                raise InputError(f"{case.case_id} has no FLAIR but the model '{detector.model.name}' needs one.")
            flair = case.flair if use_flair else None
            result = detector.detect(qsm, read_image(flair, "FLAIR") if flair else None)
            inputs = {"qsm": case.qsm, **({"flair": flair} if flair else {})}
            write_result(result, target, inputs, overwrite=replace)
    except Exception as error:  # a batch of hundreds must not stop for one patient
        return _failed(case.case_id, error)
    try:
        write_exports(case, target, exports)
    except Exception as error:
        return _failed(case.case_id, error, "its result is kept but an export failed: ")
    status = "skipped" if already else "done"
    return CaseOutcome(case.case_id, status, seconds=time.perf_counter() - started)


def _failed(case_id: str, error: Exception, context: str = "") -> CaseOutcome:
    if isinstance(error, InputError):
        logger.warning("%s failed: %s%s", case_id, context, error)
        return CaseOutcome(case_id, "failed", f"{context}{error}")
    logger.error("%s failed unexpectedly: %s", case_id, context, exc_info=error)
    return CaseOutcome(case_id, "failed", f"{context}unexpected {type(error).__name__}: {error}")


def write_exports(case: Case, target: Path, exports: CaseExports) -> None:
    """Make the requested exports of a finished patient that are not there yet."""
    if exports.dicom_seg and case.qsm.is_dir() and not (target / DICOM_SEG_NAME).is_file():
        from PRLDetectorLib.exports.dicom_seg import write_result_dicom_seg

        with atomic_path(target / DICOM_SEG_NAME) as partial:
            write_result_dicom_seg(target, case.qsm, partial)
    if exports.report and not (target / REPORT_NAME).is_file():
        from PRLDetectorLib.cohort.report import case_report_html

        html = case_report_html(target, case_id=case.case_id)
        with atomic_path(target / REPORT_NAME) as partial:
            partial.write_text(html, encoding="utf-8")


# --- many patients -----------------------------------------------------------------------------------------


def run_batch(
    cases_dir: Path, out_dir: Path, settings: DetectionSettings, progress: bool = True,
    on_case: OnCase | None = None, *, exports: CaseExports = CaseExports(), workers: int | None = None,
    scheduler: str | None = None, redo: bool = False,
) -> BatchReport:
    """Run every patient folder of ``cases_dir`` (see :func:`run_cases` for the options)."""
    return run_cases(
        find_cases(Path(cases_dir)), out_dir, settings, progress=progress, on_case=on_case, exports=exports,
        workers=workers, scheduler=scheduler, redo=redo,
    )


def run_bids_batch(
    bids_dir: Path, out_dir: Path, settings: DetectionSettings, progress: bool = True,
    on_case: OnCase | None = None, *, exports: CaseExports = CaseExports(), workers: int | None = None,
    scheduler: str | None = None, redo: bool = False,
) -> BatchReport:
    """Run every QSM scan of a BIDS dataset, then write ``out_dir/derivatives/prldetector``."""
    from PRLDetectorLib.cohort.bids import find_bids_scans, write_derivatives

    scans = find_bids_scans(Path(bids_dir))
    cases = [Case(scan.entities, scan.qsm, scan.flair) for scan in scans]
    report = run_cases(
        cases, out_dir, settings, progress=progress, on_case=on_case, exports=exports, workers=workers,
        scheduler=scheduler, redo=redo,
    )
    write_derivatives(Path(bids_dir), Path(out_dir), scans)
    return report


def check_scale_out(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and scheduler:
        raise InputError("Give either --workers (a cluster on this machine) or --scheduler (a running one), not both.")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers} starts no worker; give 1 or more.")


def run_cases(
    cases: list[Case], out_dir: Path, settings: DetectionSettings, *, progress: bool = True,
    on_case: OnCase | None = None, exports: CaseExports = CaseExports(), workers: int | None = None,
    scheduler: str | None = None, redo: bool = False,
) -> BatchReport:
    """Detect every patient not finished yet, record failures, and write the cohort tables.

    ``workers`` starts a Dask cluster of that many single-threaded worker processes on this machine;
    ``scheduler`` (an address such as ``tcp://10.0.0.5:8786``) uses a running cluster; neither runs the
    patients here, through one model. ``on_case(case_id, status)`` is called as each patient ends.
    Finished patients made with another model or other settings stop the batch before any work, unless
    ``redo``, which detects them again and replaces their results.
    """
    settings.validate()
    check_scale_out(workers, scheduler)
    duplicates = sorted({c.case_id for c in cases if sum(d.case_id == c.case_id for d in cases) > 1})
    if duplicates:
        raise InputError(f"Two patients share the id '{duplicates[0]}'; give every patient its own folder name.")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    finished = [c.case_id for c in cases if (out_dir / c.case_id / RESULT_MARKER).is_file()]
    stale = stale_results(out_dir, finished, settings) if finished else {}
    if stale and not redo:
        case_id, reason = next(iter(sorted(stale.items())))
        raise InputError(
            f"'{out_dir}' holds results of {len(stale)} patient(s) made with another model or other settings "
            f"({case_id}: {reason}); add --redo to replace them, or give a new --out."
        )
    if stale:
        logger.info("%d patient(s) made with another model or other settings are redone.", len(stale))
    pending = []
    for case in cases:
        if case.case_id not in stale and case_finished(out_dir / case.case_id, case, exports):
            report.add(CaseOutcome(case.case_id, "skipped"))
            if on_case:
                on_case(case.case_id, "skipped")
        else:
            pending.append(case)
    if any(case.case_id in stale or not (out_dir / case.case_id / RESULT_MARKER).is_file() for case in pending):
        from PRLDetectorLib.detection.models import load_checkpoints, resolve_model

        # A bad model (or a checkpoint that is more than weights) fails the batch here, not every patient.
        load_checkpoints(resolve_model(settings.model))
    if report.skipped:
        logger.info("%d patient(s) finished before are not redone.", len(report.skipped))

    with count_progress(len(pending), "Patients", "patients", enabled=progress) as advance:
        def record(outcome: CaseOutcome) -> None:
            report.add(outcome)
            failed = f", {len(report.failed)} failed in all" if report.failed else ""
            advance(f"{outcome.case_id} {outcome.status}{failed}")
            if on_case:
                on_case(outcome.case_id, outcome.status)

        try:
            if workers is None and scheduler is None:
                _run_here(pending, out_dir, settings, exports, record, set(stale))
            elif pending:
                _run_on_dask(pending, out_dir, settings, exports, record, workers, scheduler, set(stale))
        except KeyboardInterrupt:
            # Finished patients are complete folders: list them, so the tables match what is on disk.
            write_cohort_tables(out_dir, report)
            raise
    report.done.sort()
    report.skipped.sort()
    report.wall_s = time.perf_counter() - started
    write_cohort_tables(out_dir, report)
    if exports.report:
        from PRLDetectorLib.cohort.report import write_cohort_report

        write_cohort_report(out_dir)
    logger.info(
        "Batch: %d done, %d finished before, %d failed in %.0f s", len(report.done), len(report.skipped),
        len(report.failed), report.wall_s,
    )
    return report


def _run_here(
    pending: list[Case], out_dir: Path, settings: DetectionSettings, exports: CaseExports,
    record: Callable[[CaseOutcome], None], redo: set[str] = frozenset(),
) -> None:
    detector: Detector | None = None
    for case in pending:
        replace = case.case_id in redo
        if detector is None and (replace or not (out_dir / case.case_id / RESULT_MARKER).is_file()):
            from PRLDetectorLib.detection.pipeline import Detector

            detector = Detector(settings)
        record(process_case(case, out_dir, settings, exports, detector, replace=replace))


@contextmanager
def dask_client(workers: int | None, scheduler: str | None):
    """A Dask client: on a new local cluster of ``workers`` single-threaded processes, or on ``scheduler``."""
    # Dask tells of every worker and connection at INFO; the batch's own log and bar say what matters.
    chatty = logging.getLogger("distributed")
    level = chatty.level
    if not logger.isEnabledFor(logging.DEBUG):
        chatty.setLevel(logging.WARNING)
    try:
        with _client(workers, scheduler) as client:
            yield client
    finally:
        chatty.setLevel(level)


@contextmanager
def _client(workers: int | None, scheduler: str | None):
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as error:
            raise InputError(
                f"No Dask scheduler answers at '{scheduler}' ({error}); start one (dask scheduler) or check the "
                "address."
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    # One thread per worker: nnU-Net on CPU is fastest with whole cores, and a worker runs one patient.
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        silence_logs=logging.WARNING,
    ) as cluster, Client(cluster) as client:
        logger.info("Started a Dask cluster of %d worker process(es) at %s", workers, cluster.scheduler_address)
        yield client


def _run_on_dask(
    pending: list[Case], out_dir: Path, settings: DetectionSettings, exports: CaseExports,
    record: Callable[[CaseOutcome], None], workers: int | None, scheduler: str | None,
    redo: set[str] = frozenset(),
) -> None:
    from distributed import as_completed

    with dask_client(workers, scheduler) as client:
        futures = {
            client.submit(process_case, case, out_dir, settings, exports, replace=case.case_id in redo,
                          key=f"prl-case-{case.case_id}-{time.time_ns()}", pure=False): case
            for case in pending
        }
        for future in as_completed(futures):
            case = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # the worker died (out of memory, killed): record, go on
                logger.warning("%s failed: its worker was lost (%s)", case.case_id, error)
                outcome = CaseOutcome(case.case_id, "failed", f"worker lost: {type(error).__name__}: {error}")
            record(outcome)


# --- cohort tables -----------------------------------------------------------------------------------------


def write_cohort_tables(out_dir: Path, report: BatchReport) -> None:
    """Gather every finished patient into burden.csv and lesions.csv; failures into failures.csv.

    Patients named by BIDS entities (``sub-01_ses-1``) get ``participant_id`` and ``session_id`` columns.
    """
    from PRLDetectorLib.cohort.bids import split_entities

    patients = sorted(p for p in out_dir.iterdir() if (p / RESULT_MARKER).is_file())
    bids = bool(patients) and all(p.name.startswith("sub-") for p in patients)
    columns = [*BURDEN_COLUMNS, *(BIDS_COLUMNS if bids else ())]
    with atomic_path(out_dir / "burden.csv") as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for patient in patients:
            record = json.loads((patient / RESULT_MARKER).read_text(encoding="utf-8"))
            row = {"case_id": patient.name, **record["burden"], "model": record["model"]["name"]}
            if bids:
                entities = split_entities(patient.name)
                row.update(participant_id=entities["sub"], session_id=entities.get("ses", ""))
            writer.writerow(row)
    with atomic_path(out_dir / "lesions.csv") as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", *LESION_COLUMNS])
        writer.writeheader()
        for patient in patients:
            for row in read_lesions_csv(patient / LESIONS_NAME):
                writer.writerow({"case_id": patient.name, **{k: format_cell(k, row[k]) for k in LESION_COLUMNS}})
    with atomic_path(out_dir / "failures.csv") as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "reason"])
        writer.writerows(sorted(report.failed.items()))
