"""How a PRL changed between two visits: the change classes, their label values, colours and meaning.

One home for these names: the phantom's follow-up truth (:mod:`PRLDetectorLib.phantom.visits`), the
longitudinal comparison and its files (:mod:`PRLDetectorLib.longitudinal`) and the Slicer change table all
use them. Imports nothing.
"""

from __future__ import annotations

NEW = "new"
PERSISTING = "persisting"
ENLARGING = "enlarging"
RESOLVED = "resolved"
DISAPPEARED = "disappeared"
NOT_IMAGED = "not imaged"

CHANGE_CLASSES: tuple[str, ...] = (NEW, PERSISTING, ENLARGING, RESOLVED, DISAPPEARED, NOT_IMAGED)
"""In the order tables list them. ``not imaged``: the baseline PRL lies outside the follow-up's field of view."""

CHANGE_MEANINGS: dict[str, str] = {
    NEW: "a PRL at follow-up where the baseline shows no rim",
    PERSISTING: "a PRL at both visits, not much larger at follow-up",
    ENLARGING: "a PRL at both visits whose volume grew (slowly expanding)",
    RESOLVED: "the rim is gone at follow-up, the lesion is still there",
    DISAPPEARED: "neither rim nor lesion is left at follow-up",
    NOT_IMAGED: "the baseline PRL lies outside the follow-up's field of view",
}

CHANGE_LABELS: dict[str, int] = {name: value for value, name in enumerate(CHANGE_CLASSES, start=1)}
"""Voxel value of each class in the change label map (0 is background)."""

CHANGE_COLORS: dict[str, tuple[float, float, float]] = {
    NEW: (0.90, 0.10, 0.10),
    PERSISTING: (1.00, 0.83, 0.00),
    ENLARGING: (1.00, 0.45, 0.00),
    RESOLVED: (0.20, 0.75, 0.30),
    DISAPPEARED: (0.25, 0.50, 1.00),
    NOT_IMAGED: (0.60, 0.60, 0.60),
}
"""Red for what is worse, yellow and orange for what goes on, green and blue for what went away."""

GAINED = (NEW,)
"""Classes that count as a PRL gained in the cohort summary."""
LOST = (RESOLVED, DISAPPEARED)
"""Classes that count as a PRL lost."""
