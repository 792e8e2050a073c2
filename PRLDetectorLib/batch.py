"""Many patients through one loaded model: ``prl-detect batch``.

Input: a folder with one subfolder per patient holding ``qsm.nii.gz`` (or any readable QSM named
``qsm.*``) and, for a QSM + FLAIR model, ``flair.*``. Output: per patient the files of ``detect``; for the
cohort ``burden.csv`` (one row per patient) and ``lesions.csv`` (one row per lesion) and ``failures.csv``.
A patient whose result exists is not redone, so an interrupted batch resumes where it stopped; a patient
that fails is recorded with its reason and the batch goes on.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.features import LESION_COLUMNS, read_lesions_csv
from PRLDetectorLib.pipeline import RESULT_MARKER, Detector, write_result
from PRLDetectorLib.settings import DetectionSettings

logger = logging.getLogger(__name__)

IMAGE_PATTERNS = ("{}.nii.gz", "{}.nii", "{}.nrrd", "{}.mha", "{}")


@dataclass(frozen=True)
class Case:
    case_id: str
    qsm: Path
    flair: Path | None


@dataclass
class BatchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


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


def run_batch(
    cases_dir: Path, out_dir: Path, settings: DetectionSettings, progress: bool = True,
    on_case: Callable[[str, str], None] | None = None,
) -> BatchReport:
    cases = find_cases(Path(cases_dir))
    detector = Detector(settings)
    use_flair = "flair" in detector.model.channels
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    from tqdm import tqdm

    for case in tqdm(cases, desc="Patients", unit="patient", disable=not progress):
        target = out_dir / case.case_id
        if (target / RESULT_MARKER).is_file():
            report.skipped.append(case.case_id)
            continue
        try:
            if use_flair and case.flair is None:
                raise InputError(f"{case.case_id} has no FLAIR but the model '{detector.model.name}' needs one.")
            flair = case.flair if use_flair else None
            result = detector.detect_files(case.qsm, flair)
            inputs = {"qsm": case.qsm, **({"flair": flair} if flair else {})}
            write_result(result, target, inputs)
            report.done.append(case.case_id)
            status = "done"
        except InputError as error:
            report.failed[case.case_id] = str(error)
            logger.warning("%s failed: %s", case.case_id, error)
            status = "failed"
        if on_case:
            on_case(case.case_id, status)
    write_cohort_tables(out_dir, report)
    return report


def write_cohort_tables(out_dir: Path, report: BatchReport) -> None:
    """Gather every finished patient into burden.csv and lesions.csv; failures into failures.csv."""
    patients = sorted(p for p in out_dir.iterdir() if (p / RESULT_MARKER).is_file())
    burden_columns = ["case_id", "prl_count", "total_volume_mm3", "mean_volume_mm3", "positive_ge1", "positive_ge4", "model"]
    with open(out_dir / "burden.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=burden_columns)
        writer.writeheader()
        for patient in patients:
            record = json.loads((patient / RESULT_MARKER).read_text(encoding="utf-8"))
            writer.writerow({"case_id": patient.name, **record["burden"], "model": record["model"]["name"]})
    with open(out_dir / "lesions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", *LESION_COLUMNS])
        writer.writeheader()
        for patient in patients:
            for row in read_lesions_csv(patient / "lesions.csv"):
                writer.writerow({"case_id": patient.name, **{k: row[k] for k in LESION_COLUMNS}})
    with open(out_dir / "failures.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "reason"])
        writer.writerows(sorted(report.failed.items()))
