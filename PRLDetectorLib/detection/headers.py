"""The lesion table as a reader sees it: a header in words for every machine column, which columns a view
shows, and the order of its rows.

Files (``lesions.csv``, the batch tables, BIDS TSVs) keep the machine names; views (the Slicer panel's
table) show these headers. Coordinates are shown in RAS, as Slicer shows them; the LPS copies and the
voxel-index bounding box stay in the files only. The lesion classifier's columns
(:data:`~PRLDetectorLib.detection.features.OPTIONAL_COLUMNS`) are shown when some lesion has a value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from PRLDetectorLib.detection.features import OPTIONAL_COLUMNS

PRL_PROBABILITY = "prl_probability"
"""The lesion classifier's probability that a lesion is a PRL: the review's order when there is one."""
PRL_UNCERTAINTY = "prl_uncertainty"

HEADERS: dict[str, str] = {
    "lesion_id": "PRL",
    "status": "Review",
    PRL_PROBABILITY: "PRL probability",
    PRL_UNCERTAINTY: "Uncertainty (±)",
    "volume_mm3": "Volume (mm³)",
    "centroid_ras_x_mm": "Centre R (mm)",
    "centroid_ras_y_mm": "Centre A (mm)",
    "centroid_ras_z_mm": "Centre S (mm)",
    "paramagnetic_edge_fraction": "Rim coverage",
    "rim_minus_surround_ppm": "Rim − surround (ppm)",
    "rim_minus_core_ppm": "Rim − core (ppm)",
    "probability_mean": "Network probability (mean)",
    "qsm_mean_ppm": "QSM mean (ppm)",
    "qsm_max_ppm": "QSM max (ppm)",
    "rim_mean_ppm": "Rim QSM (ppm)",
    "core_mean_ppm": "Core QSM (ppm)",
    "surround_mean_ppm": "Surround QSM (ppm)",
    "note": "Note",
    "voxels": "Voxels",
    "centroid_lps_x_mm": "Centre x, LPS (mm)",
    "centroid_lps_y_mm": "Centre y, LPS (mm)",
    "centroid_lps_z_mm": "Centre z, LPS (mm)",
    "bbox_min_i": "Box first i",
    "bbox_min_j": "Box first j",
    "bbox_min_k": "Box first k",
    "bbox_max_i": "Box last i",
    "bbox_max_j": "Box last j",
    "bbox_max_k": "Box last k",
}
"""Machine column → the reader's header, in the order a view shows the columns."""

FILE_ONLY: frozenset[str] = frozenset(
    {"centroid_lps_x_mm", "centroid_lps_y_mm", "centroid_lps_z_mm",
     "bbox_min_i", "bbox_min_j", "bbox_min_k", "bbox_max_i", "bbox_max_j", "bbox_max_k"}
)
"""Kept in files and in the table node (scripts read them), not shown in the panel: LPS repeats the RAS
centre, and voxel indices mean nothing to a reader."""

UNITS: dict[str, str] = {"volume_mm3": "mm³"}
"""Units other than the ones a column's name ends with (``_mm``, ``_ppm``)."""


def header(column: str) -> str:
    """The reader's header of a column; an unknown column (added by another tool) keeps its name."""
    return HEADERS.get(column, column)


def unit(column: str) -> str:
    if column in UNITS:
        return UNITS[column]
    return "mm" if column.endswith("_mm") else "ppm" if column.endswith("_ppm") else ""


def view_order(columns: Iterable[str]) -> tuple[str, ...]:
    """``columns`` in the order a view shows them: those with a header in its order, then the others as given,
    then the file-only ones."""
    columns = list(dict.fromkeys(columns))
    known = [c for c in HEADERS if c in columns and c not in FILE_ONLY]
    others = [c for c in columns if c not in HEADERS and c not in FILE_ONLY]
    return (*known, *others, *[c for c in HEADERS if c in columns and c in FILE_ONLY],
            *[c for c in columns if c in FILE_ONLY and c not in HEADERS])


def columns_with_values(rows: Sequence[Mapping[str, object]], columns: Iterable[str] = OPTIONAL_COLUMNS) -> set[str]:
    """The ``columns`` for which some row holds a number (not NaN, not empty)."""
    return {c for c in columns if any(not math.isnan(_number(row.get(c))) for row in rows)}


def hidden_in_view(rows: Sequence[Mapping[str, object]]) -> set[str]:
    """Columns a view leaves out: the file-only ones, and the classifier's when no lesion has a value (a model
    without a lesion classifier)."""
    return set(FILE_ONLY) | (set(OPTIONAL_COLUMNS) - columns_with_values(rows))


def view_rows(rows: Sequence[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """Rows in the order a reader reviews them: most probable PRL first when some lesion has a PRL probability
    (lesions without one last, by id), otherwise as given."""
    if not columns_with_values(rows, (PRL_PROBABILITY,)):
        return list(rows)

    def key(row: Mapping[str, object]) -> tuple[float, int]:
        value = _number(row.get(PRL_PROBABILITY))
        return (-value if not math.isnan(value) else math.inf, int(row["lesion_id"]))

    return sorted(rows, key=key)


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
