"""Two visits compared, one function per arrow:

results (or QSM maps, detected here) → visits → follow-up registered to baseline → tracked lesions → files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.longitudinal.alignment import align_visits
from PRLDetectorLib.longitudinal.outputs import (
    BASELINE_RESULT,
    FOLLOWUP_RESULT,
    check_output,
    write_table_files,
)
from PRLDetectorLib.longitudinal.tracking import ChangeTable, check_order, read_visit, track_lesions
from PRLDetectorLib.results import atomic_path
from PRLDetectorLib.settings import DetectionSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisitInput:
    """What one visit is given as: a ``detect`` result, or a QSM to detect on (or both: the result, and the QSM
    it was detected on when the result does not name it), a FLAIR, and the acquisition time."""

    result: Path | None = None
    qsm: Path | None = None
    flair: Path | None = None
    acq_time: datetime | None = None


def compare_results(baseline: VisitInput, followup: VisitInput) -> ChangeTable:
    """Read two results, register the follow-up to the baseline and track every PRL."""
    check_order(baseline.acq_time, followup.acq_time)
    for name, visit in (("baseline", baseline), ("follow-up", followup)):
        if visit.result is None:
            raise InputError(f"No {name} result is given; give the output folder of detect.")
    first = read_visit(baseline.result, "baseline", baseline.qsm, baseline.flair, baseline.acq_time)
    second = read_visit(followup.result, "follow-up", followup.qsm, followup.flair, followup.acq_time)
    return track_lesions(first, second, align_visits(first.qsm, second.qsm))


def run_longitudinal(baseline: VisitInput, followup: VisitInput, out_dir: Path, settings: DetectionSettings | None = None,
                     overwrite: bool = False, report: bool = True, progress=None) -> ChangeTable:
    """``prl-detect longitudinal``: detect the visits given as QSM only (into ``out_dir/baseline``,
    ``out_dir/followup``), compare, and write everything into ``out_dir`` at once.

    ``progress(message)`` is called as each step starts.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    check_order(baseline.acq_time, followup.acq_time)
    for name, visit in (("baseline", baseline), ("follow-up", followup)):
        if visit.result is None and visit.qsm is None:
            raise InputError(f"Give the {name} as a detect result folder or as a QSM to detect on.")
    step = progress or (lambda message: None)
    with atomic_path(out_dir, folder=True, replace=overwrite) as staging:
        to_detect = [(folder, v) for folder, v in ((BASELINE_RESULT, baseline), (FOLLOWUP_RESULT, followup))
                     if v.result is None]
        if to_detect:
            baseline, followup = _detect(to_detect, baseline, followup, staging, settings or DetectionSettings(), step)
        step("Registering the follow-up to the baseline")
        table = compare_results(baseline, followup)
        for visit, folder in ((table.baseline, BASELINE_RESULT), (table.followup, FOLLOWUP_RESULT)):
            if Path(visit.source).parent == staging:  # detected here: name it where it will be
                visit.source = str(out_dir / folder)
        step("Writing the change table and page")
        write_table_files(table, staging, report)
    logger.info("Wrote %s", out_dir)
    return table


def _detect(to_detect, baseline: VisitInput, followup: VisitInput, staging: Path, settings: DetectionSettings,
            step) -> tuple[VisitInput, VisitInput]:
    from dataclasses import replace

    from PRLDetectorLib.detection.pipeline import Detector, write_result

    settings.validate()
    detector = Detector(settings)
    done = {}
    for folder, visit in to_detect:
        step(f"Detecting PRLs at {'baseline' if folder == BASELINE_RESULT else 'follow-up'}")
        flair = visit.flair if "flair" in detector.model.channels else None
        if "flair" in detector.model.channels and flair is None:
            raise InputError(f"The model '{detector.model.name}' needs a FLAIR; give --{folder}-flair.")
        result = detector.detect_files(visit.qsm, flair)
        inputs = {"qsm": visit.qsm, **({"flair": flair} if flair else {})}
        done[folder] = write_result(result, staging / folder, inputs)
    return (replace(baseline, result=done.get(BASELINE_RESULT, baseline.result)),
            replace(followup, result=done.get(FOLLOWUP_RESULT, followup.result)))
