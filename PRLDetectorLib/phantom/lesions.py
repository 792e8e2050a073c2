"""Lesions, microbleeds and veins painted into a phantom's susceptibility map on the QSM grid.

Everything here works in grid millimetres, (z, y, x) order: voxel index times spacing. The grids of the
phantom are axis aligned, so distances and directions measured this way are physical ones.

A paramagnetic rim lesion (PRL) is an irregular ellipsoid in white matter whose outer 1-2 mm carry iron-laden
microglia: a rim more paramagnetic than white matter that covers most, but often not all, of the lesion edge.
Rimless lesions are the hard negatives: uniform, sometimes with a faint rim over a small part of the edge.
Microbleeds and veins are the bright confounders that are not lesions at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from PRLDetectorLib.phantom.anatomy import CSF, GM, NUCLEUS_LABELS, VEIN, VENTRICLE, WM

PRL, RIMLESS, MICROBLEED, CALCIFICATION = "prl", "rimless", "microbleed", "calcification"
GAP_VOXELS = 2
"""Lesions keep this many voxels apart, so 26-connected components never merge two of them."""
VEIN_CLEARANCE_VOXELS = 4
"""Veins stay this far from lesions, so a vein never passes for a rim in the lesion's surroundings."""
MIN_WM_FRACTION = 0.85


@dataclass
class Lesion:
    """One painted lesion or mimic; ``mask`` is its ground truth inside ``box`` of the QSM grid."""

    id: int
    cls: str
    box: tuple[slice, slice, slice]
    mask: np.ndarray
    nominal_diameter_mm: float
    rim_coverage: float = 0.0
    rim_thickness_mm: float = 0.0
    rim_ppm: float = 0.0
    """Mean rim susceptibility above white matter where the rim is present."""
    core_ppm: float = 0.0
    """Susceptibility of the lesion body relative to white matter (microbleeds: absolute peak)."""
    flair: float = 0.0
    """Relative FLAIR signal of the lesion (0 for mimics that FLAIR does not show)."""


@dataclass
class Scene:
    """The QSM-grid arrays that painting reads and changes."""

    chi: np.ndarray
    labels: np.ndarray
    spacing: np.ndarray
    """Voxel size in (z, y, x) order, mm."""
    chi_wm: float
    occupied: np.ndarray
    """Voxels taken by a lesion or its gap; later lesions stay out."""
    near_lesion: np.ndarray
    """Voxels near a lesion, where no vein may pass."""
    instances: np.ndarray

    @classmethod
    def create(cls, chi: np.ndarray, labels: np.ndarray, spacing_zyx: np.ndarray, chi_wm: float) -> Scene:
        return cls(chi, labels, np.asarray(spacing_zyx, float), chi_wm, np.zeros(chi.shape, bool),
                   np.zeros(chi.shape, bool), np.zeros(chi.shape, np.uint16))

    def box_around(self, centre: np.ndarray, half_mm: float, margin: int = 2) -> tuple[slice, ...] | None:
        """Index box covering ``half_mm`` around ``centre`` (index), or None if it leaves the grid."""
        half = np.ceil(half_mm / self.spacing).astype(int)
        lo = np.floor(centre).astype(int) - half
        hi = np.floor(centre).astype(int) + half + 1
        if np.any(lo < margin) or np.any(hi > np.array(self.chi.shape) - margin):
            return None
        return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))

    def offsets_mm(self, box: tuple[slice, ...], centre: np.ndarray) -> np.ndarray:
        """(…, 3) array of voxel positions in ``box`` relative to ``centre``, in mm."""
        axes = [(np.arange(s.start, s.stop) - c) * sp
                for s, c, sp in zip(box, centre, self.spacing, strict=True)]
        grids = np.meshgrid(*axes, indexing="ij")
        return np.stack(grids, axis=-1)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (from a random unit quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def random_unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _angular_field(rng: np.random.Generator, n_terms: int,
                   amplitude: float) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth random function on the sphere: a few low-frequency plane waves in the direction cosine."""
    axes = random_unit(rng, n_terms)
    freqs = rng.uniform(0.8, 3.0, n_terms)
    phases = rng.uniform(0, 2 * np.pi, n_terms)
    weights = rng.uniform(0.3, 1.0, n_terms)
    weights *= amplitude / weights.sum()

    def field(directions: np.ndarray) -> np.ndarray:
        cosines = directions @ axes.T
        return np.sum(weights * np.cos(np.pi * freqs * cosines + phases), axis=-1)

    return field


@dataclass
class _Shape:
    """An irregular ellipsoid: semi-axes, orientation and a smooth radial perturbation."""

    semi_axes: np.ndarray
    rotation: np.ndarray
    bumps: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def draw(cls, rng: np.random.Generator, diameter_mm: float, irregularity: float) -> _Shape:
        ratios = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
        # Scaled to the volume of a sphere of that diameter: "diameter" stays the equivalent diameter.
        semi = diameter_mm / 2 * ratios / np.cbrt(np.prod(ratios))
        return cls(semi, random_rotation(rng), _angular_field(rng, 4, irregularity))

    def footprint(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask of voxel centres inside the shape, and their unit directions from the centre."""
        radius = np.linalg.norm(offsets, axis=-1, keepdims=True)
        directions = offsets / np.maximum(radius, 1e-6)
        rho = np.linalg.norm((offsets @ self.rotation) / self.semi_axes, axis=-1)
        return rho <= 1.0 + self.bumps(directions), directions


def _rim_weight(mask: np.ndarray, directions: np.ndarray, spacing: np.ndarray, thickness_mm: float,
                coverage: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Rim amplitude (0..~1.25) over the lesion box and the fraction of the lesion edge it covers.

    The rim is the band within ``thickness_mm`` of the lesion edge; a random gap direction leaves the part
    of the edge facing it uncovered. The gap is sized on the outermost voxel layer, so the reported
    coverage is what the voxels carry, not just what was asked for.
    """
    padded = np.pad(mask, 1)
    depth = ndi.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    mean_spacing = float(np.mean(spacing))
    # A voxel centre at depth d lies d - spacing/2 inside the edge; the ramp softens the band by one voxel.
    radial = np.clip((thickness_mm + 0.5 * mean_spacing - depth) / mean_spacing + 0.5, 0.0, 1.0) * mask
    edge = mask & (depth <= 1.5 * float(np.max(spacing)))
    gap_axis = random_unit(rng)[0]
    facing = directions @ gap_axis
    if coverage >= 0.999:
        angular = np.ones(mask.shape)
    else:
        # Edge voxels facing the gap axis least are covered first: the threshold is the coverage quantile.
        threshold = np.quantile(facing[edge], coverage)
        angular = np.clip((threshold - facing) / 0.15 + 0.5, 0.0, 1.0)
    covered = float(np.mean(angular[edge] >= 0.5)) if edge.any() else 0.0
    # Iron is not spread evenly along a rim: a smooth +-25 % modulation along the edge.
    modulation = 1.0 + _angular_field(rng, 3, 0.25)(directions)
    return radial * angular * modulation, covered


def _pick_wm_centre(scene: Scene, rng: np.random.Generator, wm_voxels: np.ndarray, vent_voxels: np.ndarray,
                    radius_mm: float) -> np.ndarray:
    """A candidate lesion centre (index): half next to the ventricles (as MS lesions are), half anywhere
    in white matter."""
    shape = scene.chi.shape
    if vent_voxels.size and rng.random() < 0.5:
        start = np.array(np.unravel_index(rng.choice(vent_voxels), shape), float)
        offset = random_unit(rng)[0] * (radius_mm + rng.uniform(1.0, 8.0))
        return start + offset / scene.spacing
    return np.array(np.unravel_index(rng.choice(wm_voxels), shape), float) + rng.uniform(-0.5, 0.5, 3)


def _claim(scene: Scene, lesion: Lesion) -> None:
    scene.instances[lesion.box][lesion.mask] = lesion.id
    # A full 3x3x3 element: the gap must hold diagonally too, or 26-connectivity would merge neighbours.
    cube = np.ones((3, 3, 3), bool)
    for margin, target in ((GAP_VOXELS, scene.occupied), (VEIN_CLEARANCE_VOXELS, scene.near_lesion)):
        grown = ndi.binary_dilation(np.pad(lesion.mask, margin), cube, iterations=margin)
        lo = np.array([s.start for s in lesion.box]) - margin
        dst_lo = np.maximum(lo, 0)
        dst_hi = np.minimum(lo + grown.shape, target.shape)
        src_lo = dst_lo - lo
        src_hi = src_lo + (dst_hi - dst_lo)
        target[tuple(map(slice, dst_lo, dst_hi))] |= grown[tuple(map(slice, src_lo, src_hi))]


def place_ms_lesion(scene: Scene, rng: np.random.Generator, lesion_id: int, cls: str, wm_voxels: np.ndarray,
                    vent_voxels: np.ndarray, max_tries: int = 300, partial_rim_rng: np.random.Generator | None = None,
                    ) -> Lesion | None:
    """Draw a PRL or a rimless lesion, find room for it in white matter, and paint it; None if no room.

    With ``partial_rim_rng`` (the varied-acquisition phantoms), about a third of the non-PRL lesions get a rim
    as bright and thick as a PRL's over only 15-55 % of their edge: the partial rims a reader must not call.
    """
    if cls == PRL:
        diameter = rng.uniform(5.0, 14.0)
        core = rng.uniform(0.0, 0.02)
        # Mostly clearly visible rims with a tail of subtle ones, as in clinical series; the weakest
        # (+0.06 ppm over 1 mm) come out of the QSM at barely +0.02 ppm over white matter.
        rim = rng.triangular(0.06, 0.10, 0.15)
        coverage = rng.uniform(0.67, 1.0)
        thickness = rng.uniform(1.0, 2.0)
    else:
        diameter = rng.uniform(3.0, 15.0)
        # Iso, mildly hyper or hypo: demyelination raises susceptibility, iron loss can lower it.
        options = [rng.uniform(-0.005, 0.005), rng.uniform(0.005, 0.025), rng.uniform(-0.025, -0.005)]
        core = float(rng.choice(options))
        faint_rim = rng.random() < 0.3
        rim = rng.uniform(0.02, 0.05) if faint_rim else 0.0
        coverage = rng.uniform(0.1, 0.3) if faint_rim else 0.0
        thickness = rng.uniform(1.0, 1.5) if faint_rim else 0.0
        if partial_rim_rng is not None and partial_rim_rng.random() < 0.35:
            rim = partial_rim_rng.triangular(0.06, 0.10, 0.15)
            coverage = partial_rim_rng.uniform(0.15, 0.55)
            thickness = partial_rim_rng.uniform(1.0, 2.0)
    shape = _Shape.draw(rng, diameter, irregularity=rng.uniform(0.08, 0.22))
    half = float(shape.semi_axes.max()) * 1.25 + 1.0
    for _ in range(max_tries):
        centre = _pick_wm_centre(scene, rng, wm_voxels, vent_voxels, diameter / 2)
        box = scene.box_around(centre, half)
        # Cheap rejections first: most failed tries end here, before the footprint is computed.
        if box is None:
            continue
        voxel = tuple(np.rint(centre).astype(int))
        if scene.labels[voxel] != WM or scene.occupied[voxel]:
            continue
        mask, directions = shape.footprint(scene.offsets_mm(box, centre))
        if mask.sum() < 4 or scene.occupied[box][mask].any():
            continue
        tissue = scene.labels[box][mask]
        if np.mean(tissue == WM) < MIN_WM_FRACTION or np.any(tissue == VENTRICLE):
            continue
        break
    else:
        return None

    delta = np.full(mask.shape, core)
    covered = 0.0
    if rim > 0:
        weight, covered = _rim_weight(mask, directions, scene.spacing, thickness, coverage, rng)
        # The rim replaces the core signal where it is present: rim values are "above white matter".
        delta = delta * (1 - np.clip(weight, 0, 1)) + rim * weight
    # A lesion replaces the white matter it sits in (the tissue texture is added later, over lesions too).
    scene.chi[box][mask] = scene.chi_wm + delta[mask]
    lesion = Lesion(lesion_id, cls, box, mask, float(diameter), rim_coverage=covered,
                    rim_thickness_mm=float(thickness) if rim > 0 else 0.0, rim_ppm=float(rim),
                    core_ppm=float(core), flair=float(rng.uniform(0.85, 1.05)))
    _claim(scene, lesion)
    return lesion


def place_microbleed(scene: Scene, rng: np.random.Generator, lesion_id: int, candidates: np.ndarray,
                     max_tries: int = 200, cls: str = MICROBLEED) -> Lesion | None:
    """A 2-5 mm hemosiderin deposit at +0.4-1.0 ppm with a halo that blooms beyond its ground truth.

    ``cls=CALCIFICATION`` draws a diamagnetic calcification instead: 2-6 mm at -0.1 to -0.4 ppm.
    """
    diameter = rng.uniform(2.0, 5.0) if cls == MICROBLEED else rng.uniform(2.0, 6.0)
    radius = diameter / 2
    peak = rng.uniform(0.4, 1.0) if cls == MICROBLEED else -rng.uniform(0.1, 0.4)
    for _ in range(max_tries):
        centre = np.array(np.unravel_index(rng.choice(candidates), scene.chi.shape), float)
        centre += rng.uniform(-0.5, 0.5, 3)
        box = scene.box_around(centre, radius + 4.0)
        if box is None:
            continue
        distance = np.linalg.norm(scene.offsets_mm(box, centre), axis=-1)
        mask = distance <= radius
        if not mask.any():
            mask = distance <= distance.min()
        # The blooming halo reaches past the deposit: keep it off every other lesion.
        if scene.instances[box].any() or scene.occupied[box][mask].any():
            continue
        if np.any(np.isin(scene.labels[box][mask], NUCLEUS_LABELS)):
            continue
        break
    else:
        return None
    mean_spacing = float(np.mean(scene.spacing))
    occupancy = np.clip((radius - distance) / mean_spacing + 0.5, 0.0, 1.0)
    halo = 0.2 * np.exp(-((distance / (radius + 1.5)) ** 2))
    scene.chi[box] += peak * np.maximum(occupancy, halo)
    lesion = Lesion(lesion_id, cls, box, mask, float(diameter), core_ppm=float(peak))
    _claim(scene, lesion)
    return lesion


# --- veins -------------------------------------------------------------------------------------------


class _Walker:
    """Traces smooth random curves through allowed tissue of the scene."""

    def __init__(self, scene: Scene, rng: np.random.Generator) -> None:
        self.scene = scene
        self.rng = rng
        self.limit = np.array(scene.chi.shape) - 3

    def index(self, point_mm: np.ndarray) -> tuple[int, ...] | None:
        idx = np.rint(point_mm / self.scene.spacing).astype(int)
        if np.any(idx < 2) or np.any(idx > self.limit):
            return None
        return tuple(idx)

    def label(self, point_mm: np.ndarray) -> int:
        idx = self.index(point_mm)
        return -1 if idx is None else int(self.scene.labels[idx])

    def free(self, point_mm: np.ndarray) -> bool:
        idx = self.index(point_mm)
        return idx is not None and not self.scene.near_lesion[idx]

    def walk(self, start: np.ndarray, direction: np.ndarray, length_mm: float, allowed: tuple[int, ...],
             wiggle: float, project: Callable[[np.ndarray], np.ndarray | None] | None = None,
             grace_mm: float = 0.0, step: float = 0.5) -> np.ndarray:
        points = [start]
        point, heading = start.copy(), direction / np.linalg.norm(direction)
        drift = np.zeros(3)
        travelled = 0.0
        while travelled < length_mm:
            # Heading changes through a slowly varying drift, so curves bend smoothly instead of jittering.
            drift = 0.85 * drift + wiggle * self.rng.normal(size=3)
            heading = heading + drift * step
            heading /= np.linalg.norm(heading)
            candidate = point + step * heading
            if project is not None:
                candidate = project(candidate)
                if candidate is None:
                    break
                heading = (candidate - point) / max(np.linalg.norm(candidate - point), 1e-6)
            if not self.free(candidate):
                break
            if travelled > grace_mm and self.label(candidate) not in allowed:
                break
            point = candidate
            points.append(point)
            travelled += step
        return np.array(points)


def _outward_from(scene: Scene, voxel: np.ndarray, labels: tuple[int, ...],
                  radius: int = 5) -> np.ndarray | None:
    """Unit direction pointing away from the nearby mass of ``labels`` (e.g. away from the ventricle)."""
    lo = np.maximum(voxel - radius, 0)
    hi = np.minimum(voxel + radius + 1, scene.labels.shape)
    local = np.isin(scene.labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], labels)
    if not local.any():
        return None
    mass = (np.argwhere(local) + lo).mean(axis=0)
    away = (voxel - mass) * scene.spacing
    norm = np.linalg.norm(away)
    return away / norm if norm > 1e-6 else None


def _surface_projector(walker: _Walker, centre_mm: np.ndarray) -> Callable[[np.ndarray], np.ndarray | None]:
    """Moves a point along the ray from the brain centre to just inside the brain surface."""

    def project(point: np.ndarray) -> np.ndarray | None:
        ray = point - centre_mm
        ray /= np.linalg.norm(ray)
        probe = point - 6.0 * ray
        last_inside = None
        for _ in range(28):
            idx = walker.index(probe)
            if idx is None:
                return None  # the surface lies beyond the field of view
            if walker.scene.labels[idx] == 0:
                break
            last_inside = probe.copy()
            probe = probe + 0.5 * ray
        else:
            return None
        return None if last_inside is None else last_inside - 0.5 * ray

    return project


def _surface_point(walker: _Walker, centre_mm: np.ndarray, direction: np.ndarray) -> np.ndarray | None:
    """Where the ray from the brain centre leaves the brain, if that happens inside the field of view."""
    for distance in np.arange(10.0, 130.0, 0.5):
        point = centre_mm + distance * direction
        idx = walker.index(point)
        if idx is None:
            return None
        if walker.scene.labels[idx] == 0:
            return centre_mm + (distance - 1.0) * direction
    return None


def _render_tube(scene: Scene, points: np.ndarray, diameter_mm: float, chi_ppm: float,
                 respect_lesions: bool = True) -> None:
    # Resample the curve densely so the distance to the polyline is well approximated by the nearest point.
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arclength = np.concatenate([[0.0], np.cumsum(seg)])
    dense_s = np.arange(0.0, arclength[-1] + 1e-6, 0.2)
    dense = np.stack([np.interp(dense_s, arclength, points[:, k]) for k in range(3)], axis=1)
    radius = diameter_mm / 2
    mean_spacing = float(np.mean(scene.spacing))
    reach = radius + 1.5 * mean_spacing
    lo = np.maximum(np.floor((dense.min(0) - reach) / scene.spacing).astype(int), 0)
    hi = np.minimum(np.ceil((dense.max(0) + reach) / scene.spacing).astype(int) + 1, scene.chi.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    axes = [np.arange(a, b) * sp for a, b, sp in zip(lo, hi, scene.spacing, strict=True)]
    voxels = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    distance, _ = cKDTree(dense).query(voxels, distance_upper_bound=reach)
    weight = np.clip((radius - distance) / mean_spacing + 0.5, 0.0, 1.0).reshape(hi - lo)
    if respect_lesions:
        weight[scene.near_lesion[box]] = 0.0  # veins never come close to a lesion
    chi_box = scene.chi[box]
    scene.chi[box] = chi_box * (1 - weight) + chi_ppm * weight
    labels_box = scene.labels[box]
    labels_box[(weight >= 0.5) & (labels_box != 0)] = VEIN


def paint_lesion_veins(scene: Scene, rng: np.random.Generator, lesions: list[Lesion], share: float) -> int:
    """Veins that run through or past MS lesions (the central vein sign, or a vein grazing the edge).

    A vein crossing a rimless lesion is bright at two points of its edge, the look-alike of a partial rim.
    Returns how many were drawn.
    """
    drawn = 0
    for lesion in lesions:
        if lesion.cls not in (PRL, RIMLESS) or rng.random() >= share:
            continue
        inside = np.argwhere(lesion.mask)
        centre = (inside.mean(axis=0) + np.array([b.start for b in lesion.box])) * scene.spacing
        radius = lesion.nominal_diameter_mm / 2
        direction = random_unit(rng)[0]
        # Through the centre (central vein) or offset to pass the edge.
        offset = np.cross(direction, random_unit(rng)[0])
        offset /= max(float(np.linalg.norm(offset)), 1e-6)
        offset *= 0.0 if rng.random() < 0.5 else rng.uniform(0.6, 1.3) * radius
        length = rng.uniform(15.0, 30.0)
        t = np.linspace(-length / 2, length / 2, 60)[:, None]
        bend = random_unit(rng)[0] * rng.uniform(0.0, 0.02)
        points = centre + offset + t * direction + (t**2) * bend
        lo = np.zeros(3)
        hi = (np.array(scene.chi.shape) - 1) * scene.spacing
        points = points[np.all((points >= lo) & (points <= hi), axis=1)]
        if len(points) < 16:
            continue
        _render_tube(scene, points, rng.uniform(0.8, 1.5), rng.uniform(0.2, 0.4), respect_lesions=False)
        drawn += 1
    return drawn


def paint_veins(scene: Scene, rng: np.random.Generator, n_veins: int, brain_centre_index: np.ndarray) -> int:
    """Draw up to ``n_veins`` veins (medullary, subependymal, cortical); returns how many were drawn."""
    walker = _Walker(scene, rng)
    flat = scene.labels.ravel()
    vent_voxels = np.flatnonzero(flat == VENTRICLE)
    centre_mm = brain_centre_index * scene.spacing
    drawn = 0
    for _ in range(n_veins * 6):
        if drawn >= n_veins:
            break
        kind = rng.choice(["medullary", "subependymal", "cortical"], p=[0.5, 0.2, 0.3])
        if kind != "cortical" and vent_voxels.size == 0:
            kind = "cortical"
        diameter = rng.uniform(1.0, 2.0)
        chi = rng.uniform(0.3, 0.45)
        if kind == "cortical":
            direction = random_unit(rng)[0]
            direction[0] = abs(direction[0])  # cortical veins run over the convexity, above the centre
            start = _surface_point(walker, centre_mm, direction)
            if start is None:
                continue
            tangent = np.cross(direction, random_unit(rng)[0])
            points = walker.walk(start, tangent, rng.uniform(20, 50), (GM, WM, CSF), wiggle=0.10,
                                 project=_surface_projector(walker, centre_mm))
            diameter = rng.uniform(1.5, 2.0)
        else:
            voxel = np.array(np.unravel_index(rng.choice(vent_voxels), scene.labels.shape))
            outward = _outward_from(scene, voxel, (VENTRICLE,))
            if outward is None:
                continue
            start = voxel * scene.spacing + outward * 1.5
            if kind == "medullary":
                points = walker.walk(start, outward, rng.uniform(15, 35), (WM, GM, VEIN), wiggle=0.12,
                                     grace_mm=3.0)
                diameter = rng.uniform(1.0, 1.5)
            else:
                tangent = np.cross(outward, random_unit(rng)[0])
                allowed = (WM, GM, VENTRICLE, *NUCLEUS_LABELS)
                points = walker.walk(start, tangent, rng.uniform(10, 25), allowed, wiggle=0.06)
        if len(points) < 16:  # under 8 mm: a dot, not a vein
            continue
        _render_tube(scene, points, diameter, chi)
        drawn += 1
    return drawn
