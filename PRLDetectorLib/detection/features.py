"""Per-lesion measurements: size, place, and the QSM rim a neuroradiologist judges a PRL by.

One pass over the volume finds every lesion's voxel count, bounding box and centroid
(:func:`PRLDetectorLib.detection.lesions.lesion_extents`); everything else is measured inside each lesion's
bounding box, padded by the width of the surround shell, so the cost follows the lesions, not the scan.

Zones of a lesion (distances are between voxel centres, in mm, with the voxel spacing taken into account):

* **rim**: lesion voxels within ``rim_mm`` of the nearest voxel outside the lesion, plus every lesion voxel
  with a face neighbour outside it, so that a rim thinner than a voxel is still the outermost layer;
* **core**: the other lesion voxels. A lesion too thin to have any has no core: ``core_mean_ppm`` and
  ``rim_minus_core_ppm`` are NaN;
* **surround**: voxels outside every lesion, more than 1 mm and at most 3 mm from this lesion, whose QSM
  is finite and non-zero (zero marks outside the brain mask in QSM maps). NaN when there are none.

``paramagnetic_edge_fraction`` is the share of the lesion's edge, by direction, that is paramagnetic. The
directions from the centroid are split into 48 sectors of equal solid angle (12 of azimuth in the axial
plane × 4 bands of elevation, in patient LPS space); a sector counts when it holds rim voxels, and it is
paramagnetic when their mean QSM exceeds ``surround_mean_ppm + paramagnetic_delta_ppm`` (0.02 ppm by
default, about the contrast of a visible rim). Counting directions rather than voxels keeps an elongated
lesion's long sides from outweighing its ends, the way a reader judges "rim around ≥ 2/3 of the edge".
It is NaN when there is no surround to compare with, or the lesion is a single voxel (no directions).

Non-finite QSM values are left out of every mean.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from PRLDetectorLib.detection.lesions import LesionExtents, lesion_extents
from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

RIM_MM = 1.5
SURROUND_INNER_MM = 1.0
SURROUND_OUTER_MM = 3.0
PARAMAGNETIC_DELTA_PPM = 0.02
AZIMUTH_SECTORS = 12
ELEVATION_BANDS = 4
# Distances such as 5 x 0.6 mm land on a zone's limit give or take float rounding; count them as on it.
_DISTANCE_TOLERANCE_MM = 1e-6


@dataclass(frozen=True)
class LesionFeatures:
    """Measurements of one lesion. QSM values are in ppm; NaN means "not measurable" (see module doc)."""

    lesion_id: int
    voxels: int
    volume_mm3: float
    centroid_lps: tuple[float, float, float]
    """Centroid in patient LPS space (x, y, z) mm, as ITK and SimpleITK give physical points."""
    centroid_ras: tuple[float, float, float]
    """Centroid in RAS space (x, y, z) mm, as Slicer shows it: (-L, -P, S)."""
    bbox_min_ijk: tuple[int, int, int]
    """First voxel of the bounding box, (x, y, z) index."""
    bbox_max_ijk: tuple[int, int, int]
    """Last voxel of the bounding box, (x, y, z) index, inclusive."""
    qsm_mean_ppm: float
    qsm_max_ppm: float
    probability_mean: float
    """Mean PRL probability over the lesion; NaN when no probability map was given."""
    rim_mean_ppm: float
    core_mean_ppm: float
    surround_mean_ppm: float
    rim_minus_core_ppm: float
    rim_minus_surround_ppm: float
    paramagnetic_edge_fraction: float
    prl_probability: float = math.nan
    """Stage 2's calibrated probability that the lesion is a PRL; NaN when no lesion classifier ran."""
    prl_uncertainty: float = math.nan
    """Spread (standard deviation) of that probability across the classifier's ensemble members."""

    def as_row(self) -> dict[str, int | float]:
        """Flat mapping with the keys of :data:`LESION_COLUMNS`, in that order."""
        row: dict[str, int | float] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in _VECTOR_COLUMNS:
                row.update(zip(_VECTOR_COLUMNS[field.name], value, strict=True))
            else:
                row[field.name] = value
        return row


_VECTOR_COLUMNS = {
    "centroid_lps": ("centroid_lps_x_mm", "centroid_lps_y_mm", "centroid_lps_z_mm"),
    "centroid_ras": ("centroid_ras_x_mm", "centroid_ras_y_mm", "centroid_ras_z_mm"),
    "bbox_min_ijk": ("bbox_min_i", "bbox_min_j", "bbox_min_k"),
    "bbox_max_ijk": ("bbox_max_i", "bbox_max_j", "bbox_max_k"),
}

LESION_COLUMNS: tuple[str, ...] = tuple(
    column for field in fields(LesionFeatures) for column in _VECTOR_COLUMNS.get(field.name, (field.name,))
)
"""CSV column order of the lesion table. New columns are only ever appended."""
OPTIONAL_COLUMNS = frozenset({"prl_probability", "prl_uncertainty"})
"""Columns a lesion table written before the lesion classifier lacks; read as NaN."""

_INT_COLUMNS = frozenset({"lesion_id", "voxels", *_VECTOR_COLUMNS["bbox_min_ijk"], *_VECTOR_COLUMNS["bbox_max_ijk"]})


def measure_lesions(
    labels: np.ndarray,
    qsm: np.ndarray,
    reference: sitk.Image,
    probability: np.ndarray | None = None,
    rim_mm: float = RIM_MM,
    *,
    paramagnetic_delta_ppm: float = PARAMAGNETIC_DELTA_PPM,
    workers: int | None = None,
) -> list[LesionFeatures]:
    """Measure every lesion of the instance map ``labels``, in ascending id order.

    ``labels``, ``qsm`` (ppm) and ``probability`` are (z, y, x) arrays on the grid of ``reference``, the
    image that gives spacing, origin and direction. ``workers`` threads share the lesions (default: one
    per CPU core, at most 4); the distance transforms release the GIL, so threads do run in parallel.
    """
    labels = np.asarray(labels)
    qsm = np.asarray(qsm)
    expected = tuple(reversed(reference.GetSize()))
    if reference.GetDimension() != 3:
        raise InputError(f"The reference image has {reference.GetDimension()} dimensions, not 3; pass a 3D image.")
    for name, array in (("lesion label map", labels), ("QSM", qsm), ("probability map", probability)):
        if array is not None and np.shape(array) != expected:
            raise InputError(
                f"The {name} has shape {np.shape(array)} but the reference image is {expected} (z, y, x); "
                "pass arrays on the reference grid."
            )
    if not rim_mm > 0:
        raise InputError(f"Rim width {rim_mm} mm is not positive; use a width such as {RIM_MM} mm.")
    if probability is not None:
        probability = np.asarray(probability)

    extents = lesion_extents(labels)
    grid = _Grid.of(reference)
    # TransformContinuousIndexToPhysicalPoint, vectorised: origin + D · (index ⊙ spacing).
    centroids_lps = grid.to_lps(extents.centroid_zyx)

    def measure(row: int) -> LesionFeatures:
        return _measure_lesion(
            extents, row, centroids_lps[row], labels, qsm, probability, grid, rim_mm, paramagnetic_delta_ppm
        )

    lesions = map_in_threads(measure, len(extents), workers)
    logger.info("Measured %d lesion(s).", len(lesions))
    return lesions


def map_in_threads(function, count: int, workers: int | None = None) -> list:
    """``[function(i) for i in range(count)]``, shared by ``workers`` threads (default: one per usable CPU core,
    at most 4); for work that releases the GIL (numpy, SimpleITK)."""
    workers = min(workers or min(_usable_cpus(), 4), count)
    if workers <= 1:
        return [function(i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, range(count)))


def _usable_cpus() -> int:
    # A container may grant fewer cores than the machine has; the affinity mask knows.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class _Grid:
    spacing_xyz: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    @classmethod
    def of(cls, image: sitk.Image) -> _Grid:
        return cls(
            spacing_xyz=np.asarray(image.GetSpacing(), dtype=float),
            origin=np.asarray(image.GetOrigin(), dtype=float),
            direction=np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
        )

    @property
    def spacing_zyx(self) -> np.ndarray:
        return self.spacing_xyz[::-1]

    def to_lps(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical LPS points (n, 3) of continuous (z, y, x) indices (n, 3)."""
        return self.origin + self.vectors_to_lps(index_zyx)

    def vectors_to_lps(self, index_zyx: np.ndarray) -> np.ndarray:
        """LPS displacement (mm) of (z, y, x) index displacements: direction · (index ⊙ spacing)."""
        return (index_zyx[:, ::-1] * self.spacing_xyz) @ self.direction.T


def _measure_lesion(
    extents: LesionExtents,
    row: int,
    centroid_lps: np.ndarray,
    labels: np.ndarray,
    qsm: np.ndarray,
    probability: np.ndarray | None,
    grid: _Grid,
    rim_mm: float,
    paramagnetic_delta_ppm: float,
) -> LesionFeatures:
    lesion_id = int(extents.ids[row])
    lo, hi = extents.bbox_min_zyx[row], extents.bbox_max_zyx[row]
    # The surround shell reaches SURROUND_OUTER_MM beyond the lesion, so the box needs no more margin.
    pad = np.ceil(SURROUND_OUTER_MM / grid.spacing_zyx - 1e-9).astype(np.int64)
    box_lo = np.maximum(lo - pad, 0)
    box_hi = np.minimum(hi + 1 + pad, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(box_lo, box_hi, strict=True))
    tight = tuple(slice(a, b) for a, b in zip(lo - box_lo, hi + 1 - box_lo, strict=True))

    zones = _lesion_zones(labels[box], lesion_id, tight, grid.spacing_zyx, rim_mm)
    qsm_box = qsm[box]
    lesion_q = _finite(qsm_box[zones.lesion])
    rim_q = qsm_box[zones.rim]
    rim_mean = _mean(rim_q)
    core_mean = _mean(qsm_box[zones.core])
    surround_q = qsm_box[zones.surround]
    surround_mean = _mean(surround_q[surround_q != 0])  # zero QSM is outside the brain mask
    # Directions of the rim voxels from the centroid, in LPS mm, for the angular sectors.
    offsets_lps = grid.vectors_to_lps(np.argwhere(zones.rim) + box_lo - extents.centroid_zyx[row])
    edge_fraction = _paramagnetic_fraction(offsets_lps, rim_q, surround_mean + paramagnetic_delta_ppm)

    x, y, z = (float(v) for v in centroid_lps)
    return LesionFeatures(
        lesion_id=lesion_id,
        voxels=int(extents.voxels[row]),
        volume_mm3=float(extents.voxels[row] * np.prod(grid.spacing_xyz)),
        centroid_lps=(x, y, z),
        centroid_ras=(-x, -y, z),
        bbox_min_ijk=(int(lo[2]), int(lo[1]), int(lo[0])),
        bbox_max_ijk=(int(hi[2]), int(hi[1]), int(hi[0])),
        qsm_mean_ppm=_mean(lesion_q),
        qsm_max_ppm=float(lesion_q.max()) if lesion_q.size else math.nan,
        probability_mean=_mean(probability[box][zones.lesion]) if probability is not None else math.nan,
        rim_mean_ppm=rim_mean,
        core_mean_ppm=core_mean,
        surround_mean_ppm=surround_mean,
        rim_minus_core_ppm=rim_mean - core_mean,
        rim_minus_surround_ppm=rim_mean - surround_mean,
        paramagnetic_edge_fraction=edge_fraction,
    )


@dataclass(frozen=True)
class _Zones:
    lesion: np.ndarray
    rim: np.ndarray
    core: np.ndarray
    surround: np.ndarray


def _lesion_zones(
    labels_box: np.ndarray, lesion_id: int, tight: tuple[slice, ...], spacing_zyx: np.ndarray, rim_mm: float
) -> _Zones:
    """Boolean masks of the lesion, its rim and core, and its surround shell, within the padded box."""
    lesion = labels_box == lesion_id
    # Depth is computed on the tight box with a one-voxel margin of "outside", so a lesion touching the
    # image border is measured as if the scan ended there.
    inner = np.pad(lesion[tight], 1)
    depth = ndimage.distance_transform_edt(inner, sampling=spacing_zyx)
    lesion_tight = inner[1:-1, 1:-1, 1:-1]
    rim_tight = lesion_tight & (depth[1:-1, 1:-1, 1:-1] <= rim_mm + _DISTANCE_TOLERANCE_MM)
    # Lesion voxels with a face neighbour outside belong to the rim whatever rim_mm is (slicing is far
    # cheaper than ndimage.binary_erosion on boxes this small).
    interior = (
        inner[:-2, 1:-1, 1:-1] & inner[2:, 1:-1, 1:-1]
        & inner[1:-1, :-2, 1:-1] & inner[1:-1, 2:, 1:-1]
        & inner[1:-1, 1:-1, :-2] & inner[1:-1, 1:-1, 2:]
    )
    rim_tight |= lesion_tight & ~interior
    rim = np.zeros_like(lesion)
    rim[tight] = rim_tight
    core = lesion & ~rim

    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing_zyx)
    surround = (
        (labels_box == 0)
        & (distance > SURROUND_INNER_MM + _DISTANCE_TOLERANCE_MM)
        & (distance <= SURROUND_OUTER_MM + _DISTANCE_TOLERANCE_MM)
    )
    return _Zones(lesion=lesion, rim=rim, core=core, surround=surround)


def _paramagnetic_fraction(offsets_lps: np.ndarray, rim_q: np.ndarray, threshold: float) -> float:
    """Share of occupied direction sectors whose rim voxels are, on average, above ``threshold``."""
    finite = np.isfinite(rim_q)
    offsets_lps, rim_q = offsets_lps[finite], rim_q[finite]
    radius = np.linalg.norm(offsets_lps, axis=1)
    away = radius > 0
    if not np.isfinite(threshold) or not np.any(away):
        return math.nan
    offsets_lps, rim_q, radius = offsets_lps[away], rim_q[away], radius[away]
    azimuth = np.arctan2(offsets_lps[:, 1], offsets_lps[:, 0])
    # Bands of equal width in sin(elevation) have equal solid angle.
    sin_elevation = offsets_lps[:, 2] / radius
    azimuth_bin = np.clip(((azimuth + np.pi) / (2 * np.pi) * AZIMUTH_SECTORS).astype(int), 0, AZIMUTH_SECTORS - 1)
    band = np.clip(((sin_elevation + 1) / 2 * ELEVATION_BANDS).astype(int), 0, ELEVATION_BANDS - 1)
    sector = azimuth_bin * ELEVATION_BANDS + band
    n_sectors = AZIMUTH_SECTORS * ELEVATION_BANDS
    count = np.bincount(sector, minlength=n_sectors)
    total = np.bincount(sector, weights=rim_q.astype(np.float64), minlength=n_sectors)
    occupied = count > 0
    paramagnetic = total[occupied] / count[occupied] > threshold
    return float(np.count_nonzero(paramagnetic) / np.count_nonzero(occupied))


def rim_covers(paramagnetic_edge_fraction: float, min_coverage: float) -> bool:
    """The rim check of one lesion: its paramagnetic rim covers at least ``min_coverage`` of its edge (a
    coverage that cannot be measured, NaN, shows no rim)."""
    return bool(paramagnetic_edge_fraction >= min_coverage * (1 - 1e-9))


def lesions_without_rim(lesions: Iterable[LesionFeatures], min_coverage: float) -> list[int]:
    """Ids of the lesions that fail the rim check at ``min_coverage``."""
    return [lesion.lesion_id for lesion in lesions if not rim_covers(lesion.paramagnetic_edge_fraction, min_coverage)]


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _mean(values: np.ndarray) -> float:
    values = _finite(values)
    return float(values.mean(dtype=np.float64)) if values.size else math.nan


def write_lesions_csv(path: str | Path, lesions: Iterable[LesionFeatures]) -> None:
    """Write the lesion table, one row per lesion in :data:`LESION_COLUMNS` order; NaN is an empty cell."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=LESION_COLUMNS)
        writer.writeheader()
        for lesion in lesions:
            writer.writerow({column: format_cell(column, value) for column, value in lesion.as_row().items()})


def read_lesions_csv(path: str | Path) -> list[dict[str, int | float | str]]:
    """Read a lesion table written by :func:`write_lesions_csv`, with numbers typed and empty cells NaN.

    Columns that are not in :data:`LESION_COLUMNS` (added by hand or by another tool) are kept as text.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Lesion table {path} does not exist; pass the CSV that detection wrote.")
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [column for column in LESION_COLUMNS
                   if column not in (reader.fieldnames or ()) and column not in OPTIONAL_COLUMNS]
        if missing:
            raise InputError(
                f"Lesion table {path} lacks the column(s) {', '.join(missing)}; pass a table written by PRLDetector."
            )
        rows = []
        for line, raw in enumerate(reader, start=2):
            try:
                row = {column: _parse_cell(column, text) for column, text in raw.items() if column is not None}
                for column in LESION_COLUMNS:
                    if column in OPTIONAL_COLUMNS:
                        row.setdefault(column, math.nan)  # a table from before the classifier: appended, as written
                rows.append(row)
            except ValueError as error:
                raise InputError(f"Lesion table {path}, line {line}, holds a value that is not a number: {error}.") from None
    return rows


def format_cell(column: str, value: int | float | str, missing: str = "") -> str:
    """A lesion table cell as every writer of a lesion table spells it: ``lesions.csv`` of detect and of a
    Slicer export, the batch's ``lesions.csv``, the BIDS dseg TSV (which says ``missing="n/a"`` for NaN).

    Ids, voxel counts and bounding boxes are integers; millimetres keep 3 decimals, the rest 6. Text (a
    column that is not a measurement, such as the reader's ``status``) is written as it is.
    """
    if isinstance(value, str):
        return value
    if column in _INT_COLUMNS:
        return str(int(value))
    if math.isnan(value):
        return missing
    # Micrometres and micro-ppm are below anything a scan resolves; shorter cells read better.
    decimals = 3 if column.endswith(("_mm", "_mm3")) else 6
    return repr(round(float(value), decimals))


def _parse_cell(column: str, text: str | None) -> int | float | str:
    text = text or ""
    if column not in LESION_COLUMNS:
        return text
    if column in _INT_COLUMNS:
        return int(text)
    return float(text) if text else math.nan


READER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("lesion_id", "PRL", "{:d}"),
    ("volume_mm3", "volume (mm³)", "{:.1f}"),
    ("centroid_ras_x_mm", "R–L (mm)", "{:.1f}"),
    ("centroid_ras_y_mm", "A–P (mm)", "{:.1f}"),
    ("centroid_ras_z_mm", "S–I (mm)", "{:.1f}"),
    ("prl_probability", "PRL probability", "{:.2f}"),
    ("prl_uncertainty", "± (ensemble)", "{:.2f}"),
    ("probability_mean", "network probability", "{:.2f}"),
    ("rim_minus_surround_ppm", "rim − surround (ppb)", "{:.0f}"),
    ("rim_minus_core_ppm", "rim − core (ppb)", "{:.0f}"),
    ("paramagnetic_edge_fraction", "paramagnetic edge", "{:.0%}"),
)
"""The lesion table in a reader's words, for the patient report and the review page: (column, heading, format)."""
PPB_COLUMNS = frozenset({"rim_minus_surround_ppm", "rim_minus_core_ppm"})
"""Rim contrasts are a few hundredths of a ppm: readers see them in ppb."""


def reader_cell(column: str, fmt: str, value) -> str:
    """A lesion table cell as a reader sees it: ppb for rim contrasts, "–" for a missing value."""
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if column in PPB_COLUMNS:
        value = value * 1000.0
    return fmt.format(int(value) if fmt == "{:d}" else value)
