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

from dataclasses import dataclass

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.signal import fftconvolve

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
# Neighbouring directions (the 6 nearest) make the graph on which a rim's contiguity is measured.
_NEIGHBOURS = np.argsort(-(_DIRECTIONS @ _DIRECTIONS.T), axis=1)[:, 1:7]


def find_candidates(probability: np.ndarray, threshold: float, spacing_xyz: tuple[float, float, float],
                    min_mm3: float, flair_bright: np.ndarray | None = None,
                    connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Candidate lesion ids on the QSM grid: components of (probability >= threshold) [| FLAIR-bright]."""
    mask = probability >= threshold
    if flair_bright is not None:
        mask = mask | flair_bright
    components, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=connectivity, return_N=True,
                                              binary_image=True)
    labels = np.zeros(mask.shape, np.uint32)
    if n == 0:
        return labels, 0
    # Count and renumber the foreground voxels only (a few per mille of the volume), in cc3d's order.
    flat_index = np.flatnonzero(components)
    component_of_voxel = components.ravel()[flat_index]
    counts = np.bincount(component_of_voxel, minlength=n + 1)
    voxel_mm3 = float(np.prod(spacing_xyz))
    keep = counts * voxel_mm3 >= min_mm3
    keep[0] = False
    lookup = np.zeros(n + 1, np.uint32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1)
    labels.ravel()[flat_index] = lookup[component_of_voxel]
    return labels, int(keep.sum())


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
    """Resamples an image around a point onto an isotropic grid aligned with patient LPS axes."""

    def __init__(self, image: sitk.Image, default: float = 0.0, nearest: bool = False) -> None:
        self.image = image
        self.default = default
        self.interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear

    def __call__(self, centre_lps: np.ndarray, half_mm: float = PATCH_HALF_MM, step: float = PATCH_STEP_MM
                 ) -> np.ndarray:
        n = int(round(2 * half_mm / step)) + 1
        reference = sitk.Image([n, n, n], sitk.sitkFloat32)
        reference.SetSpacing((step, step, step))
        reference.SetOrigin(tuple(np.asarray(centre_lps, float) - half_mm))
        out = sitk.Resample(self.image, reference, sitk.Transform(), self.interpolator, self.default,
                            sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)  # (z, y, x) with axes along LPS


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


def ring_centre(patch: np.ndarray, brain: np.ndarray, step: float = PATCH_STEP_MM,
                search_mm: float = RECENTRE_MM) -> np.ndarray:
    """Offset (z, y, x, mm) from the patch centre of the point around which the map is most ring-like.

    Ring score = the brightest shell (radius 1.5-8 mm) minus the core (radius < 1.6 mm), searched within
    ``search_mm`` of the centre: a rim's centre is its lesion's core, wherever stage 1's outline put it.
    """
    values = np.where(brain, patch, np.nan)
    filled = np.where(brain, patch, np.nanmedian(values) if brain.any() else 0.0).astype(np.float32)
    core = fftconvolve(filled, _CORE_KERNEL, mode="same")
    shells = np.max([fftconvolve(filled, k, mode="same") for k in _RING_KERNELS], axis=0)
    score = shells - core
    n = patch.shape[0]
    r = _radius_grid(n, step)
    allowed = (r <= search_mm) & brain
    if not allowed.any():
        return np.zeros(3)
    score = np.where(allowed, score, -np.inf)
    best = np.array(np.unravel_index(int(np.argmax(score)), score.shape), float)
    return (best - (n - 1) / 2) * step


def _robust(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 1.0
    median = float(np.median(values))
    sd = 1.4826 * float(np.median(np.abs(values - median)))
    return median, max(sd, 1e-4)


def _largest_run(flags: np.ndarray) -> int:
    """Size of the largest connected set of flagged directions on the direction graph."""
    seen = np.zeros(flags.size, bool)
    best = 0
    for start in np.flatnonzero(flags):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            i = stack.pop()
            size += 1
            for j in _NEIGHBOURS[i]:
                if flags[j] and not seen[j]:
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
    step = PATCH_STEP_MM
    n = patch.shape[0]
    f: list[float] = []
    radii = np.arange(1, int(RAY_MAX_MM / RAY_STEP_MM) + 1) * RAY_STEP_MM
    c = (n - 1) / 2
    # directions are (x, y, z); the patch is (z, y, x)
    coords = c + (_DIRECTIONS[:, None, ::-1] * radii[None, :, None]) / step  # (rays, samples, zyx)
    values = ndimage.map_coordinates(np.where(inside, patch, ref), coords.reshape(-1, 3).T, order=1)
    values = values.reshape(len(_DIRECTIONS), len(radii)) - ref
    zone = (radii >= 1.5) & (radii <= 8.0)
    peak_index = np.argmax(np.where(zone[None, :], values, -np.inf), axis=1)
    peak = values[np.arange(len(values)), peak_index]
    peak_r = radii[peak_index]
    outer = np.array([values[i, (radii >= peak_r[i] + 1.5) & (radii <= peak_r[i] + 3.5)].mean()
                      if np.any((radii >= peak_r[i] + 1.5) & (radii <= peak_r[i] + 3.5)) else values[i, -1]
                      for i in range(len(values))])
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
    patch = qsm(centre)
    inside = brain(centre) > 0.5
    n = patch.shape[0]
    r = _radius_grid(n, step)
    ring_zone = inside & (r >= 7.0) & (r <= 12.0)
    ref, sd = _robust(patch[ring_zone])
    f: list[float] = []
    profile = []
    for k in range(PROFILE_MM):
        sel = inside & (r >= k) & (r < k + 1)
        profile.append(float(patch[sel].mean()) - ref if sel.any() else np.nan)
    profile = np.array(profile)
    f += list(profile) + list(profile / sd)
    core_sel = inside & (r < 1.6)
    core = float(patch[core_sel].mean()) - ref if core_sel.any() else np.nan
    core_max = float(patch[core_sel].max()) - ref if core_sel.any() else np.nan
    f += [core, core_max, sd]

    f += _ray_features(patch, inside, ref, sd, core)
    # The same rays from stage 1's centroid: the re-centring can land off a small lesion's core.
    inside0 = brain0
    ref0, sd0 = _robust(patch0[inside0 & (r >= 7.0) & (r <= 12.0)])
    core0_sel = inside0 & (r < 1.6)
    core0 = float(patch0[core0_sel].mean()) - ref0 if core0_sel.any() else np.nan
    f += _ray_features(patch0, inside0, ref0, sd0, core0)

    # The bright structure around the centre: a ring, a tube (vein) or a blob (microbleed, nucleus).
    bright = inside & (patch > ref + max(3 * sd, 0.03)) & (r <= 12.0)
    labels = cc3d.connected_components(bright, connectivity=26)
    near = np.unique(labels[(r <= 8.0) & bright])
    near = near[near > 0]
    structure = np.isin(labels, near) if near.size else np.zeros_like(bright)
    pts = np.argwhere(structure) * step
    lin, pla, sph = _eigen_shape(pts)
    count = max(int(structure.sum()), 1)
    f += [float(structure.sum()) * step**3, lin, pla, sph,
          float((structure & (r < 1.6)).sum()) / count, float((structure & (r > 8.0)).sum()) / count,
          float((inside & (patch < ref - max(3 * sd, 0.03)) & (r < 4.0)).sum()) / max(int((inside & (r < 4.0)).sum()), 1),
          float(np.nanmin(profile)) if np.isfinite(profile).any() else np.nan]

    if flair is not None:
        fp = flair(centre)
        fref, _ = _robust(fp[ring_zone])
        fref = max(abs(fref), 1e-3)

        def shell(lo, hi):
            sel = inside & (r >= lo) & (r < hi)
            return float(fp[sel].mean()) / fref - 1 if sel.any() else np.nan
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
    """uint32 candidate ids (z, y, x) on the QSM grid; 0 = background."""
    features: np.ndarray
    """(candidates, len(FEATURE_NAMES)) float32; row k describes candidate k + 1."""
    sources: list[str]
    """Per candidate: "network", "flair" or "both" (what made it a candidate)."""

    @property
    def count(self) -> int:
        return len(self.features)


def distances_to_brain_edge(brain: np.ndarray, spacing_zyx: np.ndarray, points: list[tuple[int, int, int]]
                            ) -> np.ndarray:
    """Distance (mm) from each voxel in ``points`` to the nearest voxel outside the brain (the volume's border
    counts as outside): what a Euclidean distance transform of the whole brain gives at those voxels, without
    making it (28 s on a 512 × 512 × 320 grid against ~1 s). The nearest outside voxel always touches the brain
    (its neighbour towards the point would be nearer otherwise), so a k-d tree of those border voxels answers."""
    from scipy.spatial import cKDTree

    if not points:
        return np.zeros(0)
    padded = np.pad(brain, 1)
    touching = np.zeros_like(padded)
    for axis in range(3):
        for shift in (1, -1):
            touching |= np.roll(padded, shift, axis=axis)
    border = np.argwhere(touching & ~padded).astype(np.float64) - 1  # back to unpadded indices
    where = np.asarray(points, dtype=np.float64)
    distances, _ = cKDTree(border * spacing_zyx).query(where * spacing_zyx)
    return np.where(brain[tuple(np.asarray(points).T)], distances, 0.0)


def find_case_candidates(qsm: sitk.Image, probability: np.ndarray, flair: sitk.Image | None,
                         threshold: float, min_mm3: float, connectivity: int = 26) -> CandidateSet:
    """Candidates of one case and their features.

    ``probability`` is stage 1's PRL probability on the QSM grid; ``flair`` the FLAIR channel on the QSM grid
    (brain-masked, as the QSM + FLAIR network sees it) or None. Candidates are the components of
    (probability ≥ ``threshold``) and, with FLAIR, of the FLAIR-bright lesions, at least ``min_mm3``.
    """
    spacing_xyz = qsm.GetSpacing()
    spacing_zyx = np.array(spacing_xyz[::-1])
    q = sitk.GetArrayViewFromImage(qsm)
    brain_np = (q != 0) & np.isfinite(q)
    bright = None
    if flair is not None:
        bright = flair_bright_mask(sitk.GetArrayViewFromImage(flair), brain_np, spacing_zyx)
    labels, n = find_candidates(probability, threshold, spacing_xyz, min_mm3, bright, connectivity)
    if n == 0:
        return CandidateSet(labels, np.zeros((0, len(FEATURE_NAMES)), np.float32), [])
    boxes = ndimage.find_objects(labels)
    insides = [labels[box] == i for i, box in enumerate(boxes, start=1)]
    voxels = [np.argwhere(inside) + np.array([s.start for s in box]) for inside, box in zip(insides, boxes, strict=True)]
    centroids = [index.mean(axis=0) for index in voxels]
    edge_mm = distances_to_brain_edge(
        brain_np, spacing_zyx, [tuple(np.clip(np.rint(c).astype(int), 0, np.array(q.shape) - 1)) for c in centroids])
    brain_img = sitk.GetImageFromArray(brain_np.astype(np.float32))
    brain_img.CopyInformation(qsm)
    qsm_patches = PatchSampler(sitk.Cast(qsm, sitk.sitkFloat32))
    brain_patches = PatchSampler(brain_img)
    flair_patches = PatchSampler(sitk.Cast(flair, sitk.sitkFloat32)) if flair is not None else None
    rows, sources = [], []
    voxel_mm3 = float(np.prod(spacing_xyz))
    for i, box in enumerate(boxes, start=1):
        inside, index, centroid = insides[i - 1], voxels[i - 1], centroids[i - 1]
        p = probability[box][inside]
        centre = np.array(qsm.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centroid[::-1])))
        extent = (index.max(0) - index.min(0) + 1) * spacing_zyx
        from_flair = float(bright[box][inside].mean()) if bright is not None else 0.0
        from_network = float((p >= threshold).mean())
        sources.append("both" if from_flair > 0 and from_network > 0 else "flair" if from_flair > 0 else "network")
        stage1 = {"mm3": inside.sum() * voxel_mm3, "extent_mm": float(extent.max()), "prob_max": float(p.max()),
                  "prob_mean": float(p.mean()), "prob_above_half": float((p >= 0.5).mean()),
                  "edge_mm": float(edge_mm[i - 1]), "from_flair": from_flair}
        rows.append(candidate_features(qsm_patches, brain_patches, flair_patches, centre, stage1))
    return CandidateSet(labels, np.stack(rows), sources)
