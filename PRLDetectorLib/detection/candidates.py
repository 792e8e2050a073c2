"""Stage 2 of PRL detection: candidate lesions and the rim measures a reader judges each one by.

Stage 1 (nnU-Net) runs at a high-sensitivity operating point; its lesions, and with FLAIR also the
FLAIR-bright lesions, are *candidates*. Each candidate is measured on a patch of its own, centred on the
lesion rather than on stage 1's outline (which follows a true PRL's rim poorly): the patch is resampled to
an isotropic 0.75 mm grid in patient space, so every acquisition grid looks alike, and re-centred on the
point around which the susceptibility is most ring-like. Then, from that centre: the radial susceptibility
profile, how much of the edge is paramagnetic and whether that part is contiguous (rays in 64 directions),
rim / core / surround contrasts, the shape of the bright structure (a vein is a tube, a microbleed a blob
with no core), FLAIR signal when FLAIR is there, distance to the brain edge, and stage 1's probability.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache

import cc3d
import numpy as np
import scipy.fft as sfft
import SimpleITK as sitk
from scipy import ndimage

from PRLDetectorLib.detection.features import map_in_threads  # as measure_lesions shares its lesions
from PRLDetectorLib.detection.lesions import painted

PATCH_STEP_MM = 0.75
PATCH_HALF_MM = 12.0
RECENTRE_MM = 3.0
N_RAYS = 64
RAY_STEP_MM = 0.75
RAY_MAX_MM = 9.0
RIM_DELTAS_PPM = (0.015, 0.03, 0.05)
RIM_DELTAS_SD = (2.0, 4.0)
RIM_SHARES = (0.3, 0.5, 0.7)
"""Rim directions relative to the rim's own strongest part (its 90th percentile of contrast)."""
PROFILE_MM = 10


def fibonacci_directions(n: int = N_RAYS) -> np.ndarray:
    """``n`` unit vectors spread evenly over the sphere (x, y, z)."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


_DIRECTIONS = fibonacci_directions()
# Neighbouring directions (the 6 nearest) make the graph on which a rim's contiguity is measured. Being the 6
# nearest is not mutual for 12 of the pairs, so the graph is directed: _largest_run walks it as it always has.
_NEIGHBOURS = np.argsort(-(_DIRECTIONS @ _DIRECTIONS.T), axis=1)[:, 1:7]
_NEIGHBOUR_LISTS = tuple(tuple(int(j) for j in row) for row in _NEIGHBOURS)


def find_candidates(probability: np.ndarray, threshold: float, spacing_xyz: tuple[float, float, float],
                    min_mm3: float, flair_bright: np.ndarray | None = None,
                    connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Candidate lesion ids on the QSM grid: components of (probability >= threshold) [| FLAIR-bright]."""
    labels, voxels = _candidates_and_voxels(probability, threshold, spacing_xyz, min_mm3, flair_bright, connectivity)
    return labels, voxels.count


@dataclass
class CandidateVoxels:
    """Every candidate voxel once, grouped by candidate (C order within each), as found when labelling."""

    flat_index: np.ndarray
    """Flat (C-order) indices in the candidate map."""
    ids: np.ndarray
    """The candidate id of each voxel (the map's dtype), ascending."""
    bounds: np.ndarray
    """Candidate k + 1 holds entries ``bounds[k]:bounds[k + 1]``."""
    shape: tuple[int, ...]

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> CandidateVoxels:
        return cls(np.zeros(0, np.intp), np.zeros(0, np.uint16), np.zeros(1, np.intp), tuple(shape))

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def flat(self, k: int) -> np.ndarray:
        """Flat indices of candidate ``k + 1``'s voxels."""
        return self.flat_index[self.bounds[k]:self.bounds[k + 1]]

    def index(self, k: int) -> np.ndarray:
        """(voxels, 3) z, y, x indices of candidate ``k + 1``'s voxels."""
        return np.stack(np.unravel_index(self.flat(k), self.shape), axis=1)


def _candidates_and_voxels(probability: np.ndarray, threshold: float, spacing_xyz: tuple[float, float, float],
                           min_mm3: float, flair_bright: np.ndarray | None, connectivity: int
                           ) -> tuple[np.ndarray, CandidateVoxels]:
    """:func:`find_candidates`'s map, and its voxels grouped by candidate."""
    mask = probability >= threshold
    if flair_bright is not None:
        mask = mask | flair_bright
    # Count and renumber the foreground voxels only (a few per mille of the volume), in cc3d's order; and label
    # only the box around them: cropping keeps the raster order of the voxels, so cc3d numbers the components as
    # it would on the whole volume, without a 4-byte id for every voxel of it.
    flat_index = np.flatnonzero(mask)
    if flat_index.size == 0:
        return np.zeros(mask.shape, np.uint16), CandidateVoxels.empty(mask.shape)
    index = np.unravel_index(flat_index, mask.shape)
    lo = [int(axis.min()) for axis in index]
    box = tuple(slice(a, int(axis.max()) + 1) for a, axis in zip(lo, index, strict=True))
    components, n = cc3d.connected_components(np.ascontiguousarray(mask[box]), connectivity=connectivity,
                                              return_N=True, binary_image=True)
    local = np.ravel_multi_index(tuple(axis - a for axis, a in zip(index, lo, strict=True)), components.shape)
    del index
    component_of_voxel = components.ravel()[local]
    counts = np.bincount(component_of_voxel, minlength=n + 1)
    voxel_mm3 = float(np.prod(spacing_xyz))
    keep = counts * voxel_mm3 >= min_mm3
    keep[0] = False
    kept = int(keep.sum())
    del components
    # Two bytes a voxel whenever the ids fit (a case has tens of candidates; the map is held to the end).
    dtype = np.uint16 if kept < 2**16 else np.uint32
    lookup = np.zeros(n + 1, dtype)
    lookup[keep] = np.arange(1, kept + 1)
    candidate_of_voxel = lookup[component_of_voxel]
    labels = painted(mask.shape, flat_index, candidate_of_voxel, dtype)
    order = np.argsort(candidate_of_voxel, kind="stable")  # by candidate, C order within each
    ids = candidate_of_voxel[order]
    start = int(np.searchsorted(ids, 1))  # voxels of components too small to keep come first, as id 0
    bounds = np.searchsorted(ids, np.arange(1, kept + 2)) - start
    return labels, CandidateVoxels(flat_index[order[start:]], ids[start:], bounds, mask.shape)


def flair_bright_mask(flair: np.ndarray, brain: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """FLAIR-hyperintense voxels: above the brain's median by 4 robust standard deviations (lightly smoothed)."""
    if not brain.any():
        return np.zeros(flair.shape, bool)
    smooth = ndimage.gaussian_filter(flair.astype(np.float32), sigma=0.6 / np.asarray(spacing_zyx))
    inside = smooth[brain]
    median = float(np.median(inside))
    sd = 1.4826 * float(np.median(np.abs(inside - median))) or 1.0
    eroded = ndimage.binary_erosion(brain, iterations=2)
    return (smooth > median + 4.0 * sd) & eroded


class PatchSampler:
    """Resamples an image around a point onto an isotropic grid aligned with patient LPS axes.

    One ITK thread per patch: a 33³ patch is too small to share, and candidates are measured in parallel instead
    (the resampling releases the GIL). Every output voxel is computed alike whatever the thread count.
    """

    def __init__(self, image: sitk.Image | None, default: float = 0.0, nearest: bool = False) -> None:
        self.image = image
        self.default = default
        self.interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear

    def __call__(self, centre_lps: np.ndarray, half_mm: float = PATCH_HALF_MM, step: float = PATCH_STEP_MM
                 ) -> np.ndarray:
        n = int(round(2 * half_mm / step)) + 1
        resample = sitk.ResampleImageFilter()
        resample.SetSize([n, n, n])
        resample.SetOutputSpacing((step, step, step))
        resample.SetOutputOrigin(tuple(np.asarray(centre_lps, float) - half_mm))
        resample.SetTransform(sitk.Transform())
        resample.SetInterpolator(self.interpolator)
        resample.SetDefaultPixelValue(self.default)
        resample.SetOutputPixelType(sitk.sitkFloat32)
        resample.SetNumberOfThreads(1)
        return sitk.GetArrayFromImage(resample.Execute(self.image))  # (z, y, x) with axes along LPS


class BrainPatchSampler(PatchSampler):
    """A :class:`PatchSampler` of a 0/1 brain mask that skips the resampling where it cannot matter.

    Linear interpolation of a mask that is 1 at every voxel a patch's points read gives exactly 1.0 everywhere
    (a lerp between equal values returns them), so a patch whose whole footprint, with a voxel of margin,
    lies in the brain and in the image is known without resampling: most candidates sit deep in the brain.
    The mask is copied into an ITK image only when a patch first needs resampling.
    """

    def __init__(self, brain: np.ndarray, reference: sitk.Image) -> None:
        super().__init__(None)
        self.brain = brain
        self.reference = reference
        self._lock = threading.Lock()

    def _mask_image(self) -> sitk.Image:
        with self._lock:
            if self.image is None:
                image = sitk.GetImageFromArray(self.brain.view(np.uint8))  # read as the same 0.0 / 1.0 as floats
                image.CopyInformation(self.reference)
                self.image = image
            return self.image

    def __call__(self, centre_lps: np.ndarray, half_mm: float = PATCH_HALF_MM, step: float = PATCH_STEP_MM
                 ) -> np.ndarray:
        n = int(round(2 * half_mm / step)) + 1
        first = np.asarray(centre_lps, float) - half_mm
        corners = [self.reference.TransformPhysicalPointToContinuousIndex(
            tuple(first + (n - 1) * step * np.array(corner))) for corner in np.ndindex(2, 2, 2)]
        lo = np.floor(np.min(corners, axis=0)).astype(int) - 1  # (x, y, z)
        hi = np.ceil(np.max(corners, axis=0)).astype(int) + 1
        inside_image = (lo >= 0).all() and (hi < np.array(self.reference.GetSize())).all()
        if inside_image and self.brain[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1].all():
            return np.ones((n, n, n), np.float32)
        self._mask_image()
        return super().__call__(centre_lps, half_mm, step)


def _radius_grid(n: int, step: float) -> np.ndarray:
    c = (n - 1) / 2
    z, y, x = np.meshgrid(*(np.arange(n) - c for _ in range(3)), indexing="ij")
    return np.sqrt(x**2 + y**2 + z**2) * step


def _shell_kernel(r_lo: float, r_hi: float, step: float) -> np.ndarray:
    half = int(np.ceil(r_hi / step))
    r = _radius_grid(2 * half + 1, step)
    k = ((r >= r_lo) & (r < r_hi)).astype(np.float32)
    return k / max(k.sum(), 1.0)


_CORE_KERNEL = _shell_kernel(0.0, 1.6, PATCH_STEP_MM)
_RING_KERNELS = [_shell_kernel(r, r + 1.5, PATCH_STEP_MM) for r in (1.5, 2.5, 3.5, 4.5, 5.5, 6.5)]
_KERNEL_HALF = max(k.shape[0] for k in [*_RING_KERNELS, _CORE_KERNEL]) // 2
"""Voxels the widest ring kernel reaches from its centre."""
_RAY_RADII = np.arange(1, int(RAY_MAX_MM / RAY_STEP_MM) + 1) * RAY_STEP_MM
_RAY_ZONE = (_RAY_RADII >= 1.5) & (_RAY_RADII <= 8.0)


def _beyond_peak_windows() -> tuple[np.ndarray, np.ndarray]:
    """Per peak sample: the first sample 1.5-3.5 mm beyond it and how many there are (radii are contiguous)."""
    first, count = np.zeros(len(_RAY_RADII), int), np.zeros(len(_RAY_RADII), int)
    for k, peak_r in enumerate(_RAY_RADII):
        window = np.flatnonzero((_RAY_RADII >= peak_r + 1.5) & (_RAY_RADII <= peak_r + 3.5))
        if window.size:
            first[k], count[k] = window[0], window.size
    return first, count


_BEYOND_FIRST, _BEYOND_COUNT = _beyond_peak_windows()


class _PatchGeometry:
    """What depends on the patch's size only: its radius grid, the voxels of each zone the features read (flat
    indices in C order, so a zone's values come out in the order a boolean mask gives them and their means and
    medians are the same to the bit) and the rays' sample points."""

    def __init__(self, n: int, step: float) -> None:
        self.r = _radius_grid(n, step)
        r = self.r.ravel()
        self.ring_zone = np.flatnonzero((r >= 7.0) & (r <= 12.0))
        self.profile_shells = [np.flatnonzero((r >= k) & (r < k + 1)) for k in range(PROFILE_MM)]
        self.core = np.flatnonzero(r < 1.6)
        self.near = np.flatnonzero(r < 4.0)
        self.beyond_8 = np.flatnonzero(r > 8.0)
        self.within_8 = self.r <= 8.0
        self.within_12 = self.r <= 12.0
        c = (n - 1) / 2
        # directions are (x, y, z); the patch is (z, y, x)
        coords = c + (_DIRECTIONS[:, None, ::-1] * _RAY_RADII[None, :, None]) / step  # (rays, samples, zyx)
        self.ray_coords = coords.reshape(-1, 3).T
        self._shells: dict[tuple[float, float], np.ndarray] = {}

    def shell(self, lo: float, hi: float) -> np.ndarray:
        if (lo, hi) not in self._shells:
            r = self.r.ravel()
            self._shells[(lo, hi)] = np.flatnonzero((r >= lo) & (r < hi))
        return self._shells[(lo, hi)]


def _values_in(values: np.ndarray, inside: np.ndarray, zone: np.ndarray) -> np.ndarray:
    """``values[inside & zone_mask]`` for a zone given by its flat indices."""
    return values.ravel()[zone][inside.ravel()[zone]]


@lru_cache(maxsize=4)
def _ring_spectra(size: int) -> np.ndarray:
    """The spectra of the core kernel then the ring kernels, each centred on index 0 of a ``size``³ cube."""
    kernels = [_CORE_KERNEL, *_RING_KERNELS]
    stack = np.zeros((len(kernels), size, size, size), np.float32)
    for layer, kernel in zip(stack, kernels, strict=True):
        half = kernel.shape[0] // 2
        at = np.arange(-half, half + 1) % size
        layer[np.ix_(at, at, at)] = kernel
    return sfft.rfftn(stack, axes=(1, 2, 3))


def ring_scores(filled: np.ndarray, reach: int) -> np.ndarray:
    """Ring score (brightest shell minus core) of the cube of voxels within ``reach`` of the patch centre (each
    axis), as ``fftconvolve(filled, kernel, mode="same")`` gives it there, for the core and each ring kernel.

    Only that cube is wanted, so the convolutions are circular ones on the smallest window around it that holds
    every voxel the kernels reach from it (31³ for the 33³ patch, in a 32³ transform): with a kernel of half-width
    h and the cube at h … h + 2·reach of a window of size m ≥ 2·(reach + h) + 1, no sum wraps around. The
    inverse transform is taken axis by axis, keeping only the cube's rows after each axis.
    """
    n = filled.shape[0]
    centre = (n - 1) // 2
    half = _KERNEL_HALF
    width = 2 * (reach + half) + 1
    size = sfft.next_fast_len(width, real=True)
    window = np.zeros((size, size, size), np.float32)
    lo = centre - reach - half
    # Outside the patch the convolution sees zeros, as fftconvolve's padding does.
    src = slice(max(lo, 0), min(lo + width, n))
    dst = slice(src.start - lo, src.stop - lo)
    window[dst, dst, dst] = filled[src, src, src]
    spectra = sfft.rfftn(window) * _ring_spectra(size)
    keep = slice(half, half + 2 * reach + 1)
    spectra = sfft.ifft(spectra, axis=1)[:, keep]
    spectra = sfft.ifft(spectra, axis=2)[:, :, keep]
    convolved = sfft.irfft(spectra, n=size, axis=3)[..., keep]
    return convolved[1:].max(axis=0) - convolved[0]


@lru_cache(maxsize=4)
def _patch_geometry(n: int, step: float) -> _PatchGeometry:
    return _PatchGeometry(n, step)


def ring_centre(patch: np.ndarray, brain: np.ndarray, step: float = PATCH_STEP_MM,
                search_mm: float = RECENTRE_MM) -> np.ndarray:
    """Offset (z, y, x, mm) from the patch centre of the point around which the map is most ring-like.

    Ring score = the brightest shell (radius 1.5-8 mm) minus the core (radius < 1.6 mm), searched within
    ``search_mm`` of the centre: a rim's centre is its lesion's core, wherever stage 1's outline put it.
    Outside the brain the map is filled with its median inside.
    """
    n = patch.shape[0]
    centre = (n - 1) // 2
    reach = int(np.floor(search_mm / step + 1e-9))
    cube = (slice(centre - reach, centre + reach + 1),) * 3
    allowed = (_patch_geometry(n, step).r[cube] <= search_mm) & brain[cube]
    if not allowed.any():
        return np.zeros(3)
    half = _KERNEL_HALF
    seen = (slice(max(centre - reach - half, 0), centre + reach + half + 1),) * 3
    if brain[seen].all():
        filled = patch.astype(np.float32, copy=False)  # the fill value reaches no score that is looked at
    else:
        filled = np.where(brain, patch, np.nanmedian(patch[brain])).astype(np.float32)
    score = np.where(allowed, ring_scores(filled, reach), -np.inf)
    best = np.array(np.unravel_index(int(np.argmax(score)), score.shape), float) + centre - reach
    return (best - (n - 1) / 2) * step


def _robust(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 1.0
    median = float(np.median(values))
    sd = 1.4826 * float(np.median(np.abs(values - median)))
    return median, max(sd, 1e-4)


def _largest_run(flags: np.ndarray) -> int:
    """Size of the largest connected set of flagged directions on the direction graph (walked from each flagged
    direction not yet reached, in index order, along the directed neighbour lists)."""
    flagged = flags.tolist()
    seen = [False] * len(flagged)
    best = 0
    for start, on in enumerate(flagged):
        if not on or seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            i = stack.pop()
            size += 1
            for j in _NEIGHBOUR_LISTS[i]:
                if flagged[j] and not seen[j]:
                    seen[j] = True
                    stack.append(j)
        best = max(best, size)
    return best


def _eigen_shape(points: np.ndarray) -> tuple[float, float, float]:
    if len(points) < 4:
        return 0.0, 0.0, 0.0
    cov = np.cov(points.T)
    lam = np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1]
    if lam[0] <= 0:
        return 0.0, 0.0, 0.0
    return float((lam[0] - lam[1]) / lam[0]), float((lam[1] - lam[2]) / lam[0]), float(lam[2] / lam[0])


def _names() -> list[str]:
    names = [f"profile_{k}_ppm" for k in range(PROFILE_MM)] + [f"profile_{k}_sd" for k in range(PROFILE_MM)]
    names += ["core_ppm", "core_max_ppm", "local_sd_ppm"]
    for prefix in ("", "centroid_"):
        for d in RIM_DELTAS_PPM:
            names += [f"{prefix}rim_cover_{d}", f"{prefix}rim_contig_{d}"]
        for d in RIM_DELTAS_SD:
            names += [f"{prefix}rim_cover_{d}sd", f"{prefix}rim_contig_{d}sd"]
        names += [f"{prefix}ray_contrast_q{q}" for q in (10, 25, 50, 75, 90)]
        names += [f"{prefix}ray_contrast_q{q}_sd" for q in (10, 25, 50, 75, 90)]
        for share in RIM_SHARES:
            names += [f"{prefix}rim_cover_{share}max", f"{prefix}rim_contig_{share}max"]
        names += [f"{prefix}peak_radius_mm", f"{prefix}peak_radius_sd_mm", f"{prefix}outer_drop_q50"]
    names += ["bright_mm3", "bright_linearity", "bright_planarity", "bright_sphericity", "bright_centre_share",
              "bright_far_share", "dark_share", "profile_min_ppm"]
    names += ["flair_core", "flair_ring", "flair_outer", "flair_radius_mm"]
    names += ["cand_mm3", "cand_extent_mm", "prob_max", "prob_mean", "prob_above_half", "edge_mm",
              "recentre_mm", "from_flair"]
    return names


FEATURE_NAMES: tuple[str, ...] = tuple(_names())
"""Column order of a candidate's feature vector; a classifier records the names it was trained on."""


def _ray_features(patch: np.ndarray, inside: np.ndarray, ref: float, sd: float, core: float) -> list[float]:
    """Rays from the patch centre: per direction, the brightest point between 1.5 and 8 mm and what lies
    beyond it; a direction is rim when that point stands above the core, the tissue outside and the
    surround. Coverage and contiguity of rim directions at several contrasts, contrast quantiles, radii."""
    geometry = _patch_geometry(patch.shape[0], PATCH_STEP_MM)
    f: list[float] = []
    radii = _RAY_RADII
    values = ndimage.map_coordinates(np.where(inside, patch, ref), geometry.ray_coords, order=1)
    values = values.reshape(len(_DIRECTIONS), len(radii)) - ref
    rays = np.arange(len(values))
    peak_index = np.argmax(np.where(_RAY_ZONE[None, :], values, -np.inf), axis=1)
    peak = values[rays, peak_index]
    peak_r = radii[peak_index]
    # The mean of the samples 1.5-3.5 mm beyond the peak (the last sample where there are none), summed left to
    # right and divided as np.mean does it, so that every ray's value is the same to the bit.
    first, count = _BEYOND_FIRST[peak_index], _BEYOND_COUNT[peak_index]
    total = values[rays, first]
    for extra in range(1, int(_BEYOND_COUNT.max())):
        total = np.where(count > extra, total + values[rays, np.minimum(first + extra, len(radii) - 1)], total)
    outer = np.where(count > 0, (total.astype(np.float64) / np.maximum(count, 1)).astype(values.dtype),
                     values[:, -1])
    core_ref = 0.0 if np.isnan(core) else core
    contrast = peak - max(core_ref, 0.0)
    drop = peak - outer
    for d in RIM_DELTAS_PPM:
        flags = (contrast > d) & (drop > d / 2) & (peak > d)
        f += [float(flags.mean()), _largest_run(flags) / len(flags)]
    for d in RIM_DELTAS_SD:
        flags = (contrast > d * sd) & (drop > d * sd / 2) & (peak > d * sd)
        f += [float(flags.mean()), _largest_run(flags) / len(flags)]
    qs = np.percentile(contrast, (10, 25, 50, 75, 90))
    f += list(qs) + list(qs / sd)
    # Relative to the brightest part of the rim: a reconstruction that halves every contrast leaves these be.
    strongest = max(float(qs[-1]), 1e-4)
    for share in RIM_SHARES:
        flags = (contrast >= share * strongest) & (drop > 0) & (peak > 0)
        f += [float(flags.mean()), _largest_run(flags) / len(flags)]
    f += [float(np.median(peak_r)), float(np.std(peak_r)), float(np.median(drop))]

    return f


def candidate_features(qsm: PatchSampler, brain: PatchSampler, flair: PatchSampler | None,
                       centre_lps: np.ndarray, stage1: dict[str, float]) -> np.ndarray:
    """The feature vector of one candidate (see :data:`FEATURE_NAMES`); NaN where not measurable."""
    step = PATCH_STEP_MM
    patch0 = qsm(centre_lps)
    brain0 = brain(centre_lps) > 0.5
    offset_zyx = ring_centre(patch0, brain0)
    centre = np.asarray(centre_lps, float) + offset_zyx[::-1]
    if offset_zyx.any():
        patch = qsm(centre)
        inside = brain(centre) > 0.5
    else:  # not moved: the very same grid, so the very same patch
        patch, inside = patch0, brain0
    n = patch.shape[0]
    geometry = _patch_geometry(n, step)
    ref, sd = _robust(_values_in(patch, inside, geometry.ring_zone))
    f: list[float] = []
    profile = []
    for shell in geometry.profile_shells:
        values = _values_in(patch, inside, shell)
        profile.append(float(values.mean()) - ref if values.size else np.nan)
    profile = np.array(profile)
    f += list(profile) + list(profile / sd)
    core_values = _values_in(patch, inside, geometry.core)
    core = float(core_values.mean()) - ref if core_values.size else np.nan
    core_max = float(core_values.max()) - ref if core_values.size else np.nan
    f += [core, core_max, sd]

    f += _ray_features(patch, inside, ref, sd, core)
    # The same rays from stage 1's centroid: the re-centring can land off a small lesion's core.
    inside0 = brain0
    ref0, sd0 = _robust(_values_in(patch0, inside0, geometry.ring_zone))
    core0_values = _values_in(patch0, inside0, geometry.core)
    core0 = float(core0_values.mean()) - ref0 if core0_values.size else np.nan
    f += _ray_features(patch0, inside0, ref0, sd0, core0)

    # The bright structure around the centre: a ring, a tube (vein) or a blob (microbleed, nucleus).
    bright = inside & (patch > ref + max(3 * sd, 0.03)) & geometry.within_12
    labels, n_bright = cc3d.connected_components(bright, connectivity=26, return_N=True)
    near = np.unique(labels[geometry.within_8 & bright])
    near = near[near > 0]
    if near.size:
        touches = np.zeros(n_bright + 1, bool)
        touches[near] = True
        structure = touches[labels]
    else:
        structure = np.zeros_like(bright)
    pts = np.argwhere(structure) * step
    lin, pla, sph = _eigen_shape(pts)
    size = int(structure.sum())
    count = max(size, 1)
    flat = structure.ravel()
    near_inside = inside.ravel()[geometry.near]
    dark = (patch.ravel()[geometry.near] < ref - max(3 * sd, 0.03)) & near_inside
    f += [float(size) * step**3, lin, pla, sph,
          float(flat[geometry.core].sum()) / count, float(flat[geometry.beyond_8].sum()) / count,
          float(dark.sum()) / max(int(near_inside.sum()), 1),
          float(np.nanmin(profile)) if np.isfinite(profile).any() else np.nan]

    if flair is not None:
        fp = flair(centre)
        fref, _ = _robust(_values_in(fp, inside, geometry.ring_zone))
        fref = max(abs(fref), 1e-3)

        def shell(lo, hi):
            values = _values_in(fp, inside, geometry.shell(lo, hi))
            return float(values.mean()) / fref - 1 if values.size else np.nan
        fcore, fring, fouter = shell(0, 2), shell(2, 5), shell(5, 8)
        fradius = 0.0
        if np.isfinite(fcore):
            half = fcore / 2
            for k in np.arange(0.5, 10.0, 0.5):
                if shell(k, k + 0.75) > half:
                    fradius = float(k)
                else:
                    break
        f += [fcore, fring, fouter, fradius]
    else:
        f += [np.nan] * 4
    f += [stage1["mm3"], stage1["extent_mm"], stage1["prob_max"], stage1["prob_mean"], stage1["prob_above_half"],
          stage1["edge_mm"], float(np.linalg.norm(offset_zyx)), stage1["from_flair"]]
    return np.array(f, np.float32)


@dataclass
class CandidateSet:
    """Stage 2's view of one case: candidate ids on the QSM grid and one feature row per candidate."""

    labels: np.ndarray
    """Candidate ids (z, y, x) on the QSM grid, uint16 (uint32 beyond 65535 candidates); 0 = background."""
    features: np.ndarray
    """(candidates, len(FEATURE_NAMES)) float32; row k describes candidate k + 1."""
    sources: list[str]
    """Per candidate: "network", "flair" or "both" (what made it a candidate)."""
    voxels: CandidateVoxels = field(repr=False)
    """Every candidate's voxels in ``labels``, as found when labelling."""

    @property
    def count(self) -> int:
        return len(self.features)

    def foreground(self) -> tuple[np.ndarray, np.ndarray]:
        """The flat indices of every candidate voxel and its candidate id (by candidate, C order within each):
        :func:`~PRLDetectorLib.detection.lesions.foreground_ids` of ``labels`` without scanning the map."""
        return self.voxels.flat_index, self.voxels.ids


def distances_to_brain_edge(brain: np.ndarray, spacing_zyx: np.ndarray, points: list[tuple[int, int, int]]
                            ) -> np.ndarray:
    """Distance (mm) from each voxel in ``points`` to the nearest voxel outside the brain (the volume's border
    counts as outside): what a Euclidean distance transform of the whole brain gives at those voxels, without
    making it (28 s on a 512 × 512 × 320 grid against ~1 s). The nearest outside voxel always touches the brain
    (its neighbour towards the point would be nearer otherwise), so a k-d tree of those border voxels answers."""
    from scipy.spatial import cKDTree

    if not points:
        return np.zeros(0)
    border = _outside_voxels_touching(np.pad(brain, 1)).astype(np.float64) - 1  # back to unpadded indices
    where = np.asarray(points, dtype=np.float64)
    # An unbalanced tree without shrunk node boxes: built in half the time and queried ten times faster here (the
    # border voxels lie on a surface); the nearest neighbour, and so each distance, is the same whatever the tree.
    tree = cKDTree(border * spacing_zyx, balanced_tree=False, compact_nodes=False)
    distances, _ = tree.query(where * spacing_zyx)
    return np.where(brain[tuple(np.asarray(points).T)], distances, 0.0)


def _outside_voxels_touching(mask: np.ndarray) -> np.ndarray:
    """``np.argwhere`` of the voxels outside ``mask`` with a face neighbour inside it (``mask`` must be False on its
    border). Worked on bits packed along x, eight voxels a byte: the whole volume is read once, not six times."""
    packed = np.packbits(mask, axis=-1)  # the first voxel of a byte is its top bit
    touching = np.zeros_like(packed)
    for axis in (0, 1):
        earlier, later = [slice(None)] * 3, [slice(None)] * 3
        earlier[axis], later[axis] = slice(None, -1), slice(1, None)
        touching[tuple(later)] |= packed[tuple(earlier)]
        touching[tuple(earlier)] |= packed[tuple(later)]
    touching |= packed >> 1  # the voxel before, within the byte
    touching[..., 1:] |= packed[..., :-1] << 7  # ... and across the byte boundary
    touching |= packed << 1  # the voxel after
    touching[..., :-1] |= packed[..., 1:] >> 7
    touching &= ~packed
    z, y, byte = np.nonzero(touching)
    bits = np.unpackbits(touching[z, y, byte][:, None], axis=1).astype(bool)  # (voxel byte, 8)
    row, bit = np.nonzero(bits)
    x = byte[row] * 8 + bit
    keep = x < mask.shape[2]  # the padding bits of the last byte
    return np.stack([z[row], y[row], x], axis=1)[keep]


def find_case_candidates(qsm: sitk.Image, probability: np.ndarray, flair: sitk.Image | None,
                         threshold: float, min_mm3: float, connectivity: int = 26, workers: int | None = None
                         ) -> CandidateSet:
    """Candidates of one case and their features.

    ``probability`` is stage 1's PRL probability on the QSM grid; ``flair`` the FLAIR channel on the QSM grid
    (brain-masked, as the QSM + FLAIR network sees it) or None. Candidates are the components of
    (probability ≥ ``threshold``) and, with FLAIR, of the FLAIR-bright lesions, at least ``min_mm3``.
    ``workers`` threads share the candidates (default: one per CPU core, at most 4); resampling and the FFTs
    release the GIL. Each row is computed alone, so the result does not depend on the number of threads.
    """
    spacing_xyz = qsm.GetSpacing()
    spacing_zyx = np.array(spacing_xyz[::-1])
    q = sitk.GetArrayViewFromImage(qsm)
    brain_np = (q != 0) & np.isfinite(q)
    bright = None
    if flair is not None:
        bright = flair_bright_mask(sitk.GetArrayViewFromImage(flair), brain_np, spacing_zyx)
    labels, voxels = _candidates_and_voxels(probability, threshold, spacing_xyz, min_mm3, bright, connectivity)
    n = voxels.count
    if n == 0:
        return CandidateSet(labels, np.zeros((0, len(FEATURE_NAMES)), np.float32), [], voxels)
    indices = [voxels.index(k) for k in range(n)]
    centroids = [index.mean(axis=0) for index in indices]
    edge_mm = distances_to_brain_edge(
        brain_np, spacing_zyx, [tuple(np.clip(np.rint(c).astype(int), 0, np.array(q.shape) - 1)) for c in centroids])
    qsm_patches = PatchSampler(_as_float32(qsm))
    brain_patches = BrainPatchSampler(brain_np, qsm)
    flair_patches = PatchSampler(_as_float32(flair)) if flair is not None else None
    sources, stage1s = [], []
    voxel_mm3 = float(np.prod(spacing_xyz))
    for i, index in enumerate(indices):
        flat = voxels.flat(i)
        p = probability.flat[flat]
        extent = (index.max(0) - index.min(0) + 1) * spacing_zyx
        from_flair = float(bright.flat[flat].mean()) if bright is not None else 0.0
        from_network = float((p >= threshold).mean())
        sources.append("both" if from_flair > 0 and from_network > 0 else "flair" if from_flair > 0 else "network")
        stage1s.append({"mm3": len(flat) * voxel_mm3, "extent_mm": float(extent.max()), "prob_max": float(p.max()),
                        "prob_mean": float(p.mean()), "prob_above_half": float((p >= 0.5).mean()),
                        "edge_mm": float(edge_mm[i]), "from_flair": from_flair})

    centres = [np.array(qsm.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centroid[::-1])))
               for centroid in centroids]

    def features(i: int) -> np.ndarray:
        return candidate_features(qsm_patches, brain_patches, flair_patches, centres[i], stage1s[i])

    return CandidateSet(labels, np.stack(map_in_threads(features, n, workers)), sources, voxels)


def _as_float32(image: sitk.Image) -> sitk.Image:
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)
