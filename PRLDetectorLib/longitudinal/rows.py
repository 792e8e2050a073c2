"""A tracked lesion as a table row: the columns of ``changes.csv`` (and of the Slicer change table) and their cells."""

from __future__ import annotations

import math

import numpy as np

from PRLDetectorLib.longitudinal.tracking import LesionChange

_MEASURES = (
    ("volume_mm3", "volume_mm3"),
    ("rim_minus_surround_ppm", "rim_minus_surround_ppm"),
    ("rim_minus_core_ppm", "rim_minus_core_ppm"),
    ("paramagnetic_edge_fraction", "paramagnetic_edge_fraction"),
)
CHANGE_COLUMNS: tuple[str, ...] = (
    "change_id", "change", "relation", "baseline_ids", "followup_ids",
    *(f"{visit}_{column}" for column, _ in _MEASURES for visit in ("baseline", "followup")),
    "volume_change_mm3", "volume_change_percent", "rim_minus_surround_change_ppm", "paramagnetic_edge_fraction_change",
    *(f"{visit}_centroid_ras_{axis}_mm" for visit in ("baseline", "followup") for axis in "xyz"),
    "baseline_measured_from", "followup_measured_from", "evidence",
)
"""Columns of ``changes.csv``: ids are ``;``-separated lesion ids of each visit's ``lesions.csv``; a side
``measured_from`` ``outline of the other visit`` was measured where the other visit's lesion lies."""


def change_row(change: LesionChange) -> dict[str, object]:
    """One tracked lesion as a flat row with the keys of :data:`CHANGE_COLUMNS` (NaN where not measured)."""
    row: dict[str, object] = {
        "change_id": change.change_id, "change": change.change, "relation": change.relation,
        "baseline_ids": ";".join(map(str, change.baseline_ids)), "followup_ids": ";".join(map(str, change.followup_ids)),
    }
    sides = {"baseline": change.baseline, "followup": change.followup}
    for column, attribute in _MEASURES:
        for visit, measures in sides.items():
            row[f"{visit}_{column}"] = getattr(measures, attribute) if measures else math.nan
    before, after = change.baseline, change.followup
    both = before is not None and after is not None and after.volume_mm3 > 0
    row["volume_change_mm3"] = after.volume_mm3 - before.volume_mm3 if both else math.nan
    row["volume_change_percent"] = 100 * (after.volume_mm3 / before.volume_mm3 - 1) if both and before.volume_mm3 else math.nan
    row["rim_minus_surround_change_ppm"] = after.rim_minus_surround_ppm - before.rim_minus_surround_ppm if both else math.nan
    row["paramagnetic_edge_fraction_change"] = (
        after.paramagnetic_edge_fraction - before.paramagnetic_edge_fraction if both else math.nan)
    for visit, measures in sides.items():
        centroid = measures.centroid_ras if measures else (math.nan,) * 3
        row.update({f"{visit}_centroid_ras_{axis}_mm": value for axis, value in zip("xyz", centroid, strict=True)})
        row[f"{visit}_measured_from"] = measures.source if measures else ""
    row["evidence"] = change.evidence
    return row


def format_change_cell(column: str, value: object) -> str:
    """A cell of ``changes.csv``: text as it is; millimetres 3 decimals, percent 1, the rest 6; NaN empty."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return ""
    decimals = 3 if column.endswith(("_mm", "_mm3")) else 1 if column.endswith("_percent") else 6
    return repr(round(value, decimals))
