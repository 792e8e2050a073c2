"""Patient anatomy for the phantom: the MNI152 2009 template that ships inside nilearn, warped per patient.

The template gives grey matter, white matter and CSF probabilities on a 1 mm grid. On top of it this module
draws the deep grey nuclei as ellipsoids at their MNI coordinates and finds the ventricles, so that a
per-patient susceptibility (and FLAIR contrast) can be painted in template space and then pulled onto the
scanner grid through one random smooth deformation. Painting in template space and warping once is what
keeps a 1 mm whole-brain case at a few seconds: ITK resampling through a displacement field costs about
0.6 s per scalar channel here, so the warp is limited to two channels (susceptibility and tissue labels).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

# Tissue labels of the hard tissue map (template space and, after warping, the QSM grid).
BACKGROUND, CSF, GM, WM, VENTRICLE = 0, 1, 2, 3, 4
VEIN = 11  # set on the QSM grid only, where a vein was drawn
TISSUE_NAMES = {BACKGROUND: "background", CSF: "csf", GM: "gm", WM: "wm", VENTRICLE: "ventricle",
                VEIN: "vein"}

# Centre of the brain in the template (LPS, mm): the point that patient rotations and scalings turn about
# and the default centre of the whole-brain field of view.
BRAIN_CENTRE_LPS = np.array([0.0, 17.0, 8.0])
# Centre of small fields of view: periventricular white matter with the basal ganglia and midbrain just
# inside a 64 mm slab, so that small test cases still hold every kind of confounder.
WM_CENTRE_LPS = np.array([0.0, 12.0, 14.0])

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class Nucleus:
    """A deep grey nucleus drawn as a pair of mirrored ellipsoids (one per hemisphere)."""

    name: str
    label: int
    centres_ras_mm: tuple[tuple[float, float, float], ...]
    """Right-hemisphere centre(s) in MNI RAS; the left one is mirrored. Several centres make one structure
    out of several ellipsoids (caudate head + body)."""
    semi_axes_mm: tuple[tuple[float, float, float], ...]
    """Semi-axes along (left-right, anterior-posterior, inferior-superior) before the yaw."""
    yaw_deg: tuple[float, ...]
    """Rotation about the superior axis, mirrored for the left side."""
    chi_ppm: tuple[float, float]
    """Range the patient's susceptibility is drawn from (iron content varies with age)."""
    flair: float
    """Relative FLAIR signal (white matter is 0.45): iron shortens T2, so iron-rich nuclei look darker."""


# Listed in painting priority: an earlier nucleus keeps voxels a later one would also claim.
NUCLEI: tuple[Nucleus, ...] = (
    Nucleus("globus_pallidus", 5, ((19.0, -4.0, -1.0),), ((3.5, 9.0, 5.0),), (-20.0,), (0.15, 0.20), 0.36),
    Nucleus("putamen", 6, ((25.0, 2.0, 3.0),), ((5.0, 14.0, 10.0),), (-15.0,), (0.06, 0.10), 0.52),
    Nucleus("caudate", 7, ((13.0, 12.0, 10.0), (16.0, -8.0, 20.0)), ((5.0, 8.0, 8.0), (3.5, 12.0, 4.0)),
            (-10.0, -15.0), (0.045, 0.075), 0.56),
    Nucleus("red_nucleus", 8, ((5.0, -19.0, -9.0),), ((3.5, 4.5, 3.5),), (0.0,), (0.10, 0.14), 0.38),
    Nucleus("substantia_nigra", 9, ((11.0, -17.0, -12.0),), ((2.8, 7.5, 3.0),), (-30.0,), (0.13, 0.17), 0.36),
    Nucleus("dentate", 10, ((14.0, -57.0, -34.0),), ((6.0, 8.0, 6.0),), (30.0,), (0.08, 0.12), 0.40),
)
NUCLEUS_LABELS = tuple(n.label for n in NUCLEI)
TISSUE_NAMES.update({n.label: n.name for n in NUCLEI})


@dataclass
class Template:
    """The MNI152 2009 template with everything the phantom derives from it (arrays are z, y, x)."""

    reference: sitk.Image
    """A 1 mm image carrying the template geometry (LPS, direction diag(-1, -1, 1))."""
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    labels: np.ndarray
    """Hard tissue labels: background, CSF, GM, WM, ventricle, nuclei."""
    labels_image: sitk.Image


def _template_dir() -> Path:
    # find_spec locates nilearn without importing it (importing nilearn.datasets costs about a second).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise InputError("The phantom needs the MNI152 template shipped with nilearn; install nilearn>=0.11.")
    return Path(spec.origin).parent / "datasets" / "data"


def _ras_grid(reference: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI RAS coordinates (mm) of the template voxels, as broadcastable (z, y, x) arrays."""
    nx, ny, nz = reference.GetSize()
    ox, oy, oz = reference.GetOrigin()
    # direction diag(-1, -1, 1): LPS x = ox - i, y = oy - j; RAS flips the sign of x and y.
    x = (np.arange(nx) - ox).astype(np.float32)[None, None, :]
    y = (np.arange(ny) - oy).astype(np.float32)[None, :, None]
    z = (oz + np.arange(nz)).astype(np.float32)[:, None, None]
    return x, y, z


def _paint_nuclei(labels: np.ndarray, tissue_ok: np.ndarray, reference: sitk.Image) -> None:
    x, y, z = _ras_grid(reference)
    for nucleus in NUCLEI:
        parts = zip(nucleus.centres_ras_mm, nucleus.semi_axes_mm, nucleus.yaw_deg, strict=True)
        for centre, axes, yaw in parts:
            for side in (1.0, -1.0):
                theta = np.deg2rad(yaw * side)
                dx, dy, dz = x - side * centre[0], y - centre[1], z - centre[2]
                u = np.cos(theta) * dx + np.sin(theta) * dy
                v = -np.sin(theta) * dx + np.cos(theta) * dy
                inside = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (dz / axes[2]) ** 2 <= 1.0
                labels[inside & tissue_ok & (labels < NUCLEUS_LABELS[0])] = nucleus.label


def _ventricles(csf: np.ndarray, mask: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """Ventricular CSF: deep CSF in the central box of the brain, in large connected pieces."""
    x, y, z = _ras_grid(reference)
    central = (np.abs(x) < 32) & (y > -50) & (y < 38) & (z > -12) & (z < 40)
    # The depth test only needs distances up to 12 mm, so the transform runs on the central box plus a
    # 13 mm margin (a tenth of the template) instead of the whole volume.
    box = tuple(slice(max(int(i.min()) - 13, 0), int(i.max()) + 14) for i in np.nonzero(central))
    depth = np.zeros(mask.shape, np.float32)
    depth[box] = ndi.distance_transform_edt(mask[box])
    candidates = (csf > 0.5) & (depth > 12) & central
    components, n = ndi.label(candidates)
    sizes = ndi.sum(candidates, components, index=np.arange(1, n + 1))
    # Small deep CSF islands are sulcal fundi, not ventricles.
    return np.isin(components, 1 + np.flatnonzero(sizes > 200))


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Read the template from the nilearn package (no download) and derive tissue labels once per process."""
    folder = _template_dir()
    images = {}
    for key, name in TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"The MNI152 template file {path} is missing; reinstall nilearn>=0.11.")
        images[key] = sitk.ReadImage(str(path))
    reference = images["t1"]
    mask = sitk.GetArrayViewFromImage(images["t1"]) > 0
    gm = sitk.GetArrayFromImage(images["gm"]).astype(np.float32) / 255.0 * mask
    wm = sitk.GetArrayFromImage(images["wm"]).astype(np.float32) / 255.0 * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0).astype(np.float32)

    labels = np.zeros(mask.shape, np.uint8)
    probabilities = np.stack([csf, gm, wm])
    labels[mask] = (np.argmax(probabilities, axis=0) + CSF)[mask]
    labels[_ventricles(csf, mask, reference)] = VENTRICLE
    _paint_nuclei(labels, mask & (csf < 0.5), reference)

    labels_image = sitk.GetImageFromArray(labels)
    labels_image.CopyInformation(reference)
    logger.debug("Loaded the MNI152 template from %s", folder)
    return Template(reference, gm, wm, csf, labels, labels_image)


@dataclass
class PatientTissue:
    """Per-patient tissue properties drawn from the population ranges."""

    chi_wm: float
    chi_gm: float
    chi_nuclei: dict[str, float]


def draw_tissue(rng: np.random.Generator) -> PatientTissue:
    # One iron factor shared by all nuclei: an older patient has more iron in every nucleus, not in one.
    iron = rng.uniform(0.9, 1.1)
    nuclei = {n.name: float(np.clip(rng.uniform(*n.chi_ppm) * iron, 0.03, 0.25)) for n in NUCLEI}
    return PatientTissue(chi_wm=float(rng.uniform(-0.04, -0.02)), chi_gm=float(rng.uniform(0.01, 0.03)),
                         chi_nuclei=nuclei)


def template_chi(template: Template, tissue: PatientTissue) -> sitk.Image:
    """Susceptibility (ppm) in template space; CSF is the zero reference, as in CSF-referenced QSM."""
    chi = template.gm * tissue.chi_gm + template.wm * tissue.chi_wm
    for nucleus in NUCLEI:
        chi[template.labels == nucleus.label] = tissue.chi_nuclei[nucleus.name]
    image = sitk.GetImageFromArray(chi.astype(np.float32))
    image.CopyInformation(template.reference)
    return image


def template_flair(template: Template, rng: np.random.Generator) -> tuple[sitk.Image, float]:
    """Relative FLAIR signal in template space (CSF nulled, white matter mid-grey, grey matter brighter),
    and the white-matter signal it used."""
    csf_signal = rng.uniform(0.06, 0.14)
    gm_signal = rng.uniform(0.58, 0.66)
    wm_signal = rng.uniform(0.42, 0.48)
    flair = template.csf * csf_signal + template.gm * gm_signal + template.wm * wm_signal
    flair[template.labels == VENTRICLE] = csf_signal * 0.6
    for nucleus in NUCLEI:
        flair[template.labels == nucleus.label] = nucleus.flair
    image = sitk.GetImageFromArray(flair.astype(np.float32))
    image.CopyInformation(template.reference)
    return image, float(wm_signal)


def _random_rotation(rng: np.random.Generator, sigma_deg: float, limit_deg: float) -> np.ndarray:
    angles = np.deg2rad(np.clip(rng.normal(0.0, sigma_deg, 3), -limit_deg, limit_deg))
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*angles)
    return np.array(transform.GetMatrix()).reshape(3, 3)


def draw_patient_transform(rng: np.random.Generator, template: Template) -> sitk.Transform:
    """A transform from scanner space (LPS mm) to template space: random affine, then smooth deformation.

    The affine carries head size (scale 0.92-1.08, a little anisotropy), head tilt (a few degrees) and
    position; the displacement field, smooth over about 3 cm, gives each patient their own gyri and
    ventricles (a few mm).
    """
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    matrix = _random_rotation(rng, sigma_deg=2.5, limit_deg=6.0) @ np.diag(scale)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(BRAIN_CENTRE_LPS))
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetTranslation(tuple(rng.uniform(-4.0, 4.0, 3)))

    node_mm = 10.0
    ref = template.reference
    extent = np.array(ref.GetSize()) * np.array(ref.GetSpacing())
    nodes = (np.ceil(extent / node_mm).astype(int) + 5)[::-1]
    field = np.stack([ndi.gaussian_filter(rng.normal(size=nodes), 1.5, mode="constant") for _ in range(3)],
                     axis=-1)
    rms = np.sqrt(np.mean(np.sum(field**2, axis=-1)))
    field *= rng.uniform(1.5, 3.0) / max(rms, 1e-9)
    displacement = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    displacement.SetSpacing((node_mm,) * 3)
    displacement.SetDirection(ref.GetDirection())
    displacement.SetOrigin(ref.TransformContinuousIndexToPhysicalPoint((-2 * node_mm,) * 3))
    deformation = sitk.DisplacementFieldTransform(displacement)
    # CompositeTransform applies the last transform first: scanner point -> affine -> deformation.
    return sitk.CompositeTransform([deformation, affine])


def warp(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
         interpolator: int = sitk.sitkLinear) -> np.ndarray:
    """Pull ``image`` onto the grid of ``reference`` through ``transform``; returns a (z, y, x) array."""
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, transform, interpolator, 0.0))
