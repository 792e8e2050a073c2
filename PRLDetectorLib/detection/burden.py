"""Patient PRL burden: how many PRLs, how much tissue, and whether the patient counts as PRL-positive."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

from PRLDetectorLib.detection.features import LesionFeatures

logger = logging.getLogger(__name__)

POSITIVE_CUTOFFS = (1, 4)
"""PRL counts at which a patient is called PRL-positive: ≥ 1 (the paper), ≥ 4 (also used in the literature)."""


@dataclass(frozen=True)
class Burden:
    prl_count: int
    total_volume_mm3: float
    mean_volume_mm3: float
    """0.0 when there are no PRLs."""
    positive_ge1: bool
    positive_ge4: bool

    def to_dict(self) -> dict:
        return asdict(self)


def compute_burden(lesions: Sequence[LesionFeatures], excluded_ids: Collection[int] = ()) -> Burden:
    """Sum the lesions a reader kept; ``excluded_ids`` are the lesion ids the reader rejected."""
    excluded = set(excluded_ids)
    unknown = excluded - {lesion.lesion_id for lesion in lesions}
    if unknown:
        # A stale exclusion (a lesion renumbered or deleted since) must not silently hide another lesion,
        # and it cannot: ids that match nothing exclude nothing. Say so, in case the ids were meant for
        # another numbering.
        logger.warning("Excluded lesion id(s) %s match no lesion; they are ignored.", sorted(unknown))
    kept = [lesion for lesion in lesions if lesion.lesion_id not in excluded]
    total = float(sum(lesion.volume_mm3 for lesion in kept))
    count = len(kept)
    return Burden(
        prl_count=count,
        total_volume_mm3=total,
        mean_volume_mm3=total / count if count else 0.0,
        positive_ge1=count >= POSITIVE_CUTOFFS[0],
        positive_ge4=count >= POSITIVE_CUTOFFS[1],
    )
