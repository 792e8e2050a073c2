"""The files of a longitudinal comparison, written into one folder at once.

* ``changes.csv`` and ``changes.json``: one row per tracked lesion (:data:`CHANGE_COLUMNS`); the JSON adds
  both visits, the registration, the interval and the rules' thresholds;
* ``change_labels.nii.gz``: the follow-up grid, each tracked lesion valued by its change class
  (:data:`PRLDetectorLib.changes.CHANGE_LABELS`); a lesion the follow-up lacks (resolved, disappeared) by
  its baseline outline carried over;
* ``changes.seg.nrrd``: the same as Slicer segments, one per tracked lesion, named by class ("new 3"),
  coloured by class;
* ``report.html``: the page with each tracked lesion's baseline and follow-up side by side.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib import __version__
from PRLDetectorLib.changes import CHANGE_COLORS, CHANGE_LABELS, CHANGE_MEANINGS
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.longitudinal import tracking
from PRLDetectorLib.longitudinal.rows import CHANGE_COLUMNS, change_row, format_change_cell
from PRLDetectorLib.longitudinal.tracking import ChangeTable
from PRLDetectorLib.results import REPORT_NAME, atomic_path

logger = logging.getLogger(__name__)

CHANGES_CSV = "changes.csv"
CHANGES_JSON = "changes.json"
"""Written last of the files; its presence means the comparison is finished."""
CHANGE_LABELS_NAME = "change_labels.nii.gz"
CHANGE_SEGMENTATION_NAME = "changes.seg.nrrd"
BASELINE_RESULT, FOLLOWUP_RESULT = "baseline", "followup"
"""Subfolders for the results ``longitudinal`` detects itself."""

def _json_value(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def table_record(table: ChangeTable) -> dict:
    """Everything ``changes.json`` says."""
    def visit(v: tracking.Visit) -> dict:
        return {"result": v.source, "acq_time": v.acq_time.isoformat() if v.acq_time else None,
                "prls": len(v.lesions), "flair": v.has_flair, "burden_sha256": v.result_sha256}

    return {
        "baseline": visit(table.baseline),
        "followup": visit(table.followup),
        "years": round(table.years, 4) if table.years is not None else None,
        "registration": table.alignment.to_dict(),
        "counts": table.counts(),
        "classes": CHANGE_MEANINGS,
        "rules": {
            "match_margin_mm": tracking.MATCH_MARGIN_MM,
            "rim_present": {"paramagnetic_edge_fraction_at_least": tracking.RIM_EDGE_FRACTION,
                            "rim_minus_surround_ppm_at_least": tracking.RIM_CONTRAST_PPM},
            "enlarging": {"volume_ratio_at_least": tracking.ENLARGING_RATIO,
                          "volume_gain_mm3_at_least": tracking.ENLARGING_MIN_MM3},
            "lesion_still_there": {"flair_ratio_at_least": tracking.FLAIR_LESION_RATIO,
                                   "without_flair": "taken to be there (resolved)"},
            "not_imaged_below_share": tracking.MIN_IMAGED_SHARE,
        },
        "changes": [{k: _json_value(v) for k, v in change_row(change).items()} for change in table.changes],
        "prldetector": __version__,
    }


def change_class_image(table: ChangeTable) -> sitk.Image:
    """The follow-up grid, each tracked lesion valued by its change class."""
    lookup = np.zeros(len(table.changes) + 1, np.uint8)
    for change in table.changes:
        lookup[change.change_id] = CHANGE_LABELS[change.change]
    image = sitk.GetImageFromArray(lookup[table.followup_map])
    image.CopyInformation(table.followup.qsm)
    return image


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing folder unless ``overwrite``, and never replace one that is not a comparison."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not overwrite:
        raise InputError(f"The output folder '{out_dir}' exists; choose another folder or add --overwrite to replace it.")
    if not (out_dir / CHANGES_JSON).is_file():
        raise InputError(f"The output folder '{out_dir}' holds files that are not a PRLDetector comparison, so "
                         "--overwrite will not replace it; choose another folder.")


def write_table_files(table: ChangeTable, folder: Path, report: bool = True) -> None:
    """Write the comparison's files into ``folder`` (a staging folder: see :func:`write_changes`)."""
    folder = Path(folder)
    with (folder / CHANGES_CSV).open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=CHANGE_COLUMNS)
        writer.writeheader()
        for change in table.changes:
            writer.writerow({k: format_change_cell(k, v) for k, v in change_row(change).items()})
    classes = change_class_image(table)
    sitk.WriteImage(classes, str(folder / CHANGE_LABELS_NAME), True)
    ids = sitk.GetImageFromArray(table.followup_map)
    ids.CopyInformation(table.followup.qsm)
    from PRLDetectorLib.exports.segments import write_seg_nrrd

    names = {c.change_id: f"{c.change} {c.change_id}" for c in table.changes}
    colors = {c.change_id: CHANGE_COLORS[c.change] for c in table.changes}
    write_seg_nrrd(ids, folder / CHANGE_SEGMENTATION_NAME, names, colors)
    if report:
        from PRLDetectorLib.longitudinal.report import changes_report_html

        (folder / REPORT_NAME).write_text(changes_report_html(table), encoding="utf-8")
    (folder / CHANGES_JSON).write_text(json.dumps(table_record(table), indent=2) + "\n", encoding="utf-8")


def write_changes(table: ChangeTable, out_dir: Path, overwrite: bool = False, report: bool = True) -> Path:
    """Write the comparison into ``out_dir`` all at once."""
    check_output(out_dir, overwrite)
    with atomic_path(out_dir, folder=True, replace=overwrite) as staging:
        write_table_files(table, staging, report)
    logger.info("Wrote %s", out_dir)
    return Path(out_dir)


def read_change_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``changes.csv`` as text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"'{path}' does not exist; give the {CHANGES_CSV} of a longitudinal comparison.")
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))
