"""PRLs tracked from a baseline visit to a follow-up: matched by overlap after registration, each given a change.

Input: two ``detect`` results (or Slicer review exports) with their QSM maps, and how the follow-up lies
against the baseline (:mod:`PRLDetectorLib.longitudinal.alignment`). The baseline lesions are carried onto the
follow-up grid through the registration; a baseline and a follow-up lesion belong together when they share
a voxel (within :data:`MATCH_MARGIN_MM`). Lesions that belong together, directly or through others, form one
*tracked lesion*: one-to-one, a baseline lesion split into several, several merged into one.

Each tracked lesion gets one change (:mod:`PRLDetectorLib.changes`):

* found at both visits: **resolved** when its follow-up rim measures show no rim (:func:`rim_present`),
  **enlarging** when its volume grew by at least :data:`ENLARGING_RATIO` and :data:`ENLARGING_MIN_MM3`,
  else **persisting**;
* found at baseline only: the baseline outline is measured on the follow-up QSM where registration puts it.
  A rim there: **persisting** (detection missed it at follow-up). No rim: the lesion is looked for on the
  follow-up FLAIR (a lesion is brighter than the tissue 1-3 mm around it): there, **resolved**; gone,
  **disappeared**. An outline mostly outside the follow-up's field of view: **not imaged**;
* found at follow-up only: the follow-up outline is measured on the baseline QSM the same way: a rim there,
  **persisting** (missed at baseline), else **new**.

Without a follow-up FLAIR a PRL whose rim is gone is called **resolved**: QSM cannot tell a lesion whose core
matches the tissue around it from no lesion (on phantoms the core contrast of resolved and of disappeared
PRLs overlaps, -10 to +12 ppb), and a rim that resolved is the common outcome. The evidence column says so.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from PRLDetectorLib.changes import DISAPPEARED, ENLARGING, NEW, NOT_IMAGED, PERSISTING, RESOLVED
from PRLDetectorLib.detection.features import LesionFeatures, measure_lesions, read_lesions_csv
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.longitudinal.alignment import VisitAlignment
from PRLDetectorLib.results import BURDEN_NAME, LABELS_NAME, LESIONS_NAME

logger = logging.getLogger(__name__)

MATCH_MARGIN_MM = 1.0
"""A baseline lesion, carried onto the follow-up, is grown by this much before overlaps are counted."""
RIM_EDGE_FRACTION = 0.5
"""A rim is present when at least this share of the lesion edge is paramagnetic …"""
RIM_CONTRAST_PPM = 0.01
"""… and the rim is at least this much above the tissue around it (ppm)."""
ENLARGING_RATIO = 1.25
ENLARGING_MIN_MM3 = 10.0
FLAIR_LESION_RATIO = 1.2
"""A lesion shows on FLAIR when its inside is this many times brighter than the tissue 1-3 mm around it."""
NOT_CHECKED = "no FLAIR: whether the lesion is still there was not checked"
MIN_IMAGED_SHARE = 0.5


def parse_time(text: str | None, what: str) -> datetime | None:
    """An ISO date or date-time (``2021-03-04``, ``2021-03-04T10:22:00``), as BIDS ``acq_time`` writes it."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise InputError(f"The {what} '{text}' is not a date; write it as 2021-03-04 or 2021-03-04T10:22:00.") from None
    return value.replace(tzinfo=None)


def check_order(baseline: datetime | None, followup: datetime | None, names: tuple[str, str] = ("baseline", "follow-up")) -> None:
    """A follow-up must be acquired after its baseline (when both dates are known)."""
    if baseline and followup and followup <= baseline:
        raise InputError(f"The {names[1]} ({followup:%Y-%m-%d}) was not acquired after the {names[0]} "
                         f"({baseline:%Y-%m-%d}); a follow-up cannot precede its baseline, so swap the two or fix "
                         "the dates.")


@dataclass
class Visit:
    """One visit: its QSM, its lesions (ids on the QSM grid and their measurements), its FLAIR if any."""

    name: str
    qsm: sitk.Image
    labels: np.ndarray
    """uint16 lesion ids on the QSM grid, (z, y, x)."""
    lesions: list[dict]
    """Rows of the visit's ``lesions.csv``."""
    flair_loader: Callable[[], sitk.Image] | None = None
    """Gives the FLAIR on the QSM grid (aligned), to tell a lesion that lost its rim from no lesion; called
    only when such a lesion is looked for (aligning a FLAIR costs a registration)."""
    source: str = ""
    acq_time: datetime | None = None
    result_sha256: str = ""
    """Checksum of the result's ``burden.json`` as read: a comparison is stale once its results were remade."""
    _flair: sitk.Image | None = field(default=None, repr=False)

    @property
    def has_flair(self) -> bool:
        return self.flair_loader is not None or self._flair is not None

    @property
    def flair(self) -> sitk.Image | None:
        if self._flair is None and self.flair_loader is not None:
            self._flair = self.flair_loader()
        return self._flair

    def rows_by_id(self) -> dict[int, dict]:
        return {int(row["lesion_id"]): row for row in self.lesions}


def read_visit(result_dir: str | Path, name: str, qsm: str | Path | None = None, flair: str | Path | None = None,
               acq_time: datetime | None = None) -> Visit:
    """A visit from a ``detect`` result folder: the QSM it names (or ``qsm``), its labels and lesion table, and
    its FLAIR (the one detection used, aligned as it recorded, or ``flair``, registered to the QSM)."""
    from PRLDetectorLib.detection.images import file_sha256, read_image
    from PRLDetectorLib.detection.registration import flair_as_recorded, flair_to_qsm_grid

    result_dir = Path(result_dir)
    marker = result_dir / BURDEN_NAME
    if not marker.is_file() or not (result_dir / LABELS_NAME).is_file():
        raise InputError(f"'{result_dir}' is not a PRLDetector result (no {BURDEN_NAME} and {LABELS_NAME}); give the "
                         f"output folder of detect for the {name}.")
    record = json.loads(marker.read_text(encoding="utf-8"))
    inputs = record.get("inputs", {})
    qsm_path = qsm or inputs.get("qsm", {}).get("path")
    if not qsm_path:
        raise InputError(f"The {name} result '{result_dir}' names no QSM; give it with --{_option(name)}-qsm.")
    qsm_image = sitk.Cast(read_image(qsm_path, "QSM"), sitk.sitkFloat32)
    labels_image = sitk.ReadImage(str(result_dir / LABELS_NAME))
    if labels_image.GetSize() != qsm_image.GetSize():
        raise InputError(f"The lesions of '{result_dir}' are not on the grid of the QSM '{qsm_path}'; give the QSM "
                         "that result was detected on.")
    recorded = inputs.get("flair", {}).get("path")
    flair_path = flair or recorded
    if flair_path and not Path(flair_path).exists():
        raise InputError(f"The {name} FLAIR '{flair_path}' does not exist; give it with --{_option(name)}-flair.")

    def load_flair() -> sitk.Image:
        original = read_image(flair_path, "FLAIR")
        aligned = None
        if str(flair_path) == str(recorded):
            aligned = flair_as_recorded(original, qsm_image, record.get("flair_alignment"))
        if aligned is None:
            aligned, _ = flair_to_qsm_grid(original, qsm_image)
        return aligned

    return Visit(name, qsm_image, sitk.GetArrayFromImage(labels_image).astype(np.uint16),
                 read_lesions_csv(result_dir / LESIONS_NAME), load_flair if flair_path else None, str(result_dir),
                 acq_time, file_sha256(marker))


def _option(name: str) -> str:
    return "followup" if name.startswith("follow") else "baseline"


@dataclass(frozen=True)
class Measures:
    """A lesion (or a group of lesions) at one visit."""

    volume_mm3: float
    rim_minus_surround_ppm: float
    rim_minus_core_ppm: float
    paramagnetic_edge_fraction: float
    qsm_mean_ppm: float
    surround_mean_ppm: float
    centroid_lps: tuple[float, float, float]
    source: str
    """``detected`` (the visit's own lesion) or ``outline of the other visit`` (measured where it would be)."""

    @property
    def centroid_ras(self) -> tuple[float, float, float]:
        x, y, z = self.centroid_lps
        return (-x, -y, z)

    @property
    def has_rim(self) -> bool:
        return rim_present(self.paramagnetic_edge_fraction, self.rim_minus_surround_ppm)


def rim_present(paramagnetic_edge_fraction: float, rim_minus_surround_ppm: float) -> bool:
    """The rim rule of the change classes: enough of the edge paramagnetic, and clearly so (NaN: no rim)."""
    return bool(paramagnetic_edge_fraction >= RIM_EDGE_FRACTION and rim_minus_surround_ppm >= RIM_CONTRAST_PPM)


@dataclass
class LesionChange:
    """One tracked lesion: which lesions it is at each visit, and how it changed."""

    change_id: int
    change: str
    baseline_ids: tuple[int, ...]
    followup_ids: tuple[int, ...]
    baseline: Measures | None
    followup: Measures | None
    evidence: str = ""
    """How a lesion without a rim was looked for (FLAIR or QSM contrast), when it was."""

    @property
    def relation(self) -> str:
        b, f = len(self.baseline_ids), len(self.followup_ids)
        if b and f:
            return {(1, 1): "one-to-one"}.get((b, f), "split" if b == 1 else "merged" if f == 1 else "split and merged")
        return "baseline only" if b else "follow-up only"


@dataclass
class ChangeTable:
    """Every tracked lesion of a baseline and a follow-up, and where each lies on the follow-up grid."""

    baseline: Visit
    followup: Visit
    alignment: VisitAlignment
    changes: list[LesionChange]
    followup_map: np.ndarray
    """uint16 ``change_id`` per voxel of the follow-up grid: the follow-up lesions of each tracked lesion, and
    for one the follow-up lacks, its baseline outline carried over."""
    baseline_map: np.ndarray
    """The same on the baseline grid: baseline lesions, and the follow-up outline of a lesion the baseline lacks."""
    years: float | None = None
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        from PRLDetectorLib.changes import CHANGE_CLASSES

        return {name: sum(c.change == name for c in self.changes) for name in CHANGE_CLASSES}


def track_lesions(baseline: Visit, followup: Visit, alignment: VisitAlignment) -> ChangeTable:
    """Match the two visits' lesions and classify every tracked lesion (see the module doc)."""
    check_order(baseline.acq_time, followup.acq_time)
    carried = _carry(baseline.labels, baseline.qsm, followup.qsm, alignment.inverse)
    groups = _groups(carried, followup.labels, followup.qsm, [int(i) for i in np.unique(baseline.labels) if i])
    base_rows, follow_rows = baseline.rows_by_id(), followup.rows_by_id()
    changes: list[LesionChange] = []
    followup_map = np.zeros(followup.labels.shape, np.uint16)
    baseline_map = np.zeros(baseline.labels.shape, np.uint16)
    carried_back = None
    for change_id, (base_ids, follow_ids) in enumerate(groups, start=1):
        before = _from_rows([base_rows[i] for i in base_ids], baseline.qsm) if base_ids else None
        after = _from_rows([follow_rows[i] for i in follow_ids], followup.qsm) if follow_ids else None
        evidence = ""
        if base_ids and follow_ids:
            kind = _matched_change(before, after)
        elif base_ids:
            footprint = np.isin(carried, base_ids)
            after, imaged = _measure_outline(followup, footprint, before.volume_mm3)
            if imaged < MIN_IMAGED_SHARE:
                kind, evidence = NOT_IMAGED, f"{imaged:.0%} of the baseline outline lies in the follow-up scan"
            elif after.has_rim:
                kind = PERSISTING
            else:
                still_there, evidence = _lesion_still_there(followup, footprint)
                kind = RESOLVED if still_there else DISAPPEARED
            followup_map[footprint & (followup_map == 0)] = change_id
        else:
            if carried_back is None:
                carried_back = _carry(followup.labels, followup.qsm, baseline.qsm, alignment.transform)
            footprint = np.isin(carried_back, follow_ids)
            before, imaged = _measure_outline(baseline, footprint, after.volume_mm3)
            kind = PERSISTING if imaged >= MIN_IMAGED_SHARE and before.has_rim else NEW
            if imaged < MIN_IMAGED_SHARE:
                evidence = f"{imaged:.0%} of the follow-up outline lies in the baseline scan"
            baseline_map[footprint & (baseline_map == 0)] = change_id
        followup_map[np.isin(followup.labels, follow_ids)] = change_id
        baseline_map[np.isin(baseline.labels, base_ids)] = change_id
        changes.append(LesionChange(change_id, kind, tuple(base_ids), tuple(follow_ids), before, after, evidence))
    years = None
    if baseline.acq_time and followup.acq_time:
        years = (followup.acq_time - baseline.acq_time).total_seconds() / (365.25 * 86400)
    table = ChangeTable(baseline, followup, alignment, changes, followup_map, baseline_map, years)
    logger.info("Tracked %d lesion(s): %s", len(changes),
                ", ".join(f"{n} {k}" for k, n in table.counts().items() if n) or "none")
    return table


def _carry(labels: np.ndarray, source: sitk.Image, target: sitk.Image, target_to_source: sitk.Transform) -> np.ndarray:
    """A label map moved onto ``target``'s grid; ``target_to_source`` maps target points to source points."""
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(source)
    moved = sitk.Resample(image, target, target_to_source, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return sitk.GetArrayFromImage(moved)


def _groups(carried: np.ndarray, followup: np.ndarray, grid: sitk.Image,
            baseline_ids: list[int]) -> list[tuple[list[int], list[int]]]:
    """Baseline and follow-up lesions that overlap, directly or through others, as (baseline ids, follow-up ids),
    ordered by the first baseline id, then the follow-up-only ones."""
    spacing = np.array(grid.GetSpacing()[::-1])
    radius = np.maximum(np.round(MATCH_MARGIN_MM / spacing).astype(int), 0)
    grown = ndimage.grey_dilation(carried, size=tuple(2 * radius + 1)) if radius.any() else carried
    # A lesion's own voxels keep its id where two grown lesions meet.
    grown = np.where(carried > 0, carried, grown)
    both = (grown > 0) & (followup > 0)
    pairs = set(zip(grown[both].tolist(), followup[both].tolist(), strict=True))
    base_ids = sorted(set(baseline_ids) | {b for b, _ in pairs})
    follow_ids = sorted(int(i) for i in np.unique(followup) if i)
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(node):
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for b, f in pairs:
        parent[find(("b", b))] = find(("f", f))
    members: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for b in base_ids:
        members.setdefault(find(("b", b)), ([], []))[0].append(b)
    for f in follow_ids:
        members.setdefault(find(("f", f)), ([], []))[1].append(f)
    return sorted(members.values(), key=lambda g: (not g[0], g[0][0] if g[0] else g[1][0]))


def _from_rows(rows: Sequence[dict], qsm: sitk.Image) -> Measures:
    """One visit's measurements of a tracked lesion from its lesion-table rows (several: volume-weighted)."""
    volumes = np.array([float(r["volume_mm3"]) for r in rows])
    weights = volumes / volumes.sum() if volumes.sum() > 0 else np.full(len(rows), 1 / len(rows))

    def mean(column: str) -> float:
        values = np.array([float(r[column]) for r in rows])
        ok = np.isfinite(values)
        return float((values[ok] * weights[ok]).sum() / weights[ok].sum()) if ok.any() else math.nan

    centroid = tuple(mean(f"centroid_lps_{axis}_mm") for axis in "xyz")
    return Measures(float(volumes.sum()), mean("rim_minus_surround_ppm"), mean("rim_minus_core_ppm"),
                    mean("paramagnetic_edge_fraction"), mean("qsm_mean_ppm"), mean("surround_mean_ppm"), centroid,
                    "detected")


def _matched_change(before: Measures, after: Measures) -> str:
    if not after.has_rim:
        return RESOLVED
    grown = after.volume_mm3 - before.volume_mm3
    if after.volume_mm3 >= ENLARGING_RATIO * before.volume_mm3 and grown >= ENLARGING_MIN_MM3:
        return ENLARGING
    return PERSISTING


def _measure_outline(visit: Visit, footprint: np.ndarray, expected_mm3: float) -> tuple[Measures, float]:
    """The other visit's lesion outline measured on this visit's QSM, and the share of it inside this scan's brain."""
    qsm = sitk.GetArrayViewFromImage(visit.qsm)
    inside = footprint & (qsm != 0)
    voxel = float(np.prod(visit.qsm.GetSpacing()))
    imaged = float(np.count_nonzero(inside) * voxel / expected_mm3) if expected_mm3 > 0 else 0.0
    if not inside.any():
        nan = math.nan
        return Measures(0.0, nan, nan, nan, nan, nan, (nan, nan, nan), "outline of the other visit"), imaged
    # Measured in a box around the outline (the surround reaches 3 mm), with the visit's own lesions there as
    # a second id so that they stay out of the outline's surround.
    spacing = np.array(visit.qsm.GetSpacing()[::-1])
    where = np.argwhere(inside)
    lo = np.maximum(where.min(0) - np.ceil(4.0 / spacing).astype(int), 0)
    hi = np.minimum(where.max(0) + np.ceil(4.0 / spacing).astype(int) + 1, inside.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    labels = np.where(visit.labels[box] > 0, 2, 0).astype(np.uint16)
    labels[inside[box]] = 1
    reference = visit.qsm[int(lo[2]):int(hi[2]), int(lo[1]):int(hi[1]), int(lo[0]):int(hi[0])]
    features: LesionFeatures = measure_lesions(labels, qsm[box], reference, workers=1)[0]
    return Measures(features.volume_mm3, features.rim_minus_surround_ppm, features.rim_minus_core_ppm,
                    features.paramagnetic_edge_fraction, features.qsm_mean_ppm, features.surround_mean_ppm,
                    features.centroid_lps, "outline of the other visit"), min(imaged, 1.0)


def _lesion_still_there(visit: Visit, footprint: np.ndarray) -> tuple[bool, str]:
    """Is there a lesion (without rim) where the outline lies? FLAIR tells; without FLAIR the rim is lost
    either way and the lesion is taken to be there (see the module doc)."""
    if visit.flair is not None:
        ratio = flair_ratio(visit.flair, visit.qsm, footprint, visit.labels > 0)
        if math.isfinite(ratio):
            return ratio >= FLAIR_LESION_RATIO, f"FLAIR {ratio:.2f}× the tissue around it"
    return True, NOT_CHECKED


def flair_ratio(flair: sitk.Image, qsm: sitk.Image, footprint: np.ndarray, other_lesions: np.ndarray) -> float:
    """Mean FLAIR inside the outline (its outer voxel layer left out) over the mean 1-3 mm around it, in the brain."""
    values = sitk.GetArrayViewFromImage(flair).astype(np.float64)
    brain = sitk.GetArrayViewFromImage(qsm) != 0
    inner = ndimage.binary_erosion(footprint)
    core = inner if inner.any() else footprint
    spacing = np.array(qsm.GetSpacing()[::-1])
    lo = np.maximum(np.argwhere(footprint).min(0) - np.ceil(3.5 / spacing).astype(int), 0)
    hi = np.minimum(np.argwhere(footprint).max(0) + np.ceil(3.5 / spacing).astype(int) + 1, footprint.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    distance = ndimage.distance_transform_edt(~footprint[box], sampling=spacing)
    shell = (distance > 1.0) & (distance <= 3.0) & brain[box] & ~other_lesions[box]
    if not shell.any() or not core.any():
        return math.nan
    around = float(values[box][shell].mean())
    return float(values[core].mean() / around) if around > 0 else math.nan
