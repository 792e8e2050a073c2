"""Synthetic MS patients for tests, the demo and training: QSM (+FLAIR) with paramagnetic rim lesions.

A phantom is made the way a scan is: anatomy from the MNI152 2009 template (nilearn ships it), warped per
patient by a random affine and a smooth deformation; a susceptibility map with tissue contrast, iron-rich
deep grey nuclei, veins, microbleeds, rimless MS lesions and PRLs; a field from the dipole forward model with
noise inside the brain; and QSM from a thresholded k-space division (TKD), which brings the streaking,
underestimation and blur of real QSM. FLAIR, when asked for, lies on its own grid and is slightly misaligned.

Everything is deterministic by seed: the same seed gives byte-identical arrays. Each part of a case draws
from its own random stream, so asking for FLAIR or forcing the PRL count leaves the rest of the case
as it was.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import fft as sfft
from scipy import ndimage as ndi
from tqdm import tqdm

from PRLDetectorLib import __version__
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.phantom.anatomy import (
    BRAIN_CENTRE_LPS,
    CSF,
    GM,
    NUCLEI,
    VENTRICLE,
    WM,
    WM_CENTRE_LPS,
    draw_patient_transform,
    draw_tissue,
    load_template,
    template_chi,
    template_flair,
    warp,
)
from PRLDetectorLib.phantom.lesions import (
    CALCIFICATION,
    MICROBLEED,
    PRL,
    RIMLESS,
    Lesion,
    Scene,
    paint_lesion_veins,
    paint_veins,
    place_microbleed,
    place_ms_lesion,
    random_unit,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = f"prl-phantom 1 (PRLDetectorLib {__version__})"
WHOLE_BRAIN_EXTENT_MM = (182.0, 218.0, 182.0)
"""x, y, z: the classic MNI 1 mm box, large enough for the biggest head the random scaling makes."""
VARY_GRID_SPACINGS = ((1.0, 1.0, 1.0), (0.9, 0.9, 1.1), (1.1, 1.1, 1.1), (1.0, 1.0, 1.2))
FLAIR_SPACINGS = ((1.0, 1.0, 1.0), (1.2, 1.2, 1.2), (0.9, 0.9, 1.2), (1.1, 1.1, 1.1), (1.0, 1.0, 1.1))
RECONSTRUCTIONS = ("tkd", "tikhonov", "l2grad")
"""QSM inversions a varied phantom draws from: thresholded k-space division, Tikhonov-regularised division
and closed-form gradient-regularised (L2) inversion; each blurs, streaks and underestimates differently."""
VARIED_SPACINGS = ((1.0, 1.0, 1.0), (0.9, 0.9, 1.1), (0.75, 0.75, 0.75), (1.1, 1.1, 1.1), (0.6, 0.6, 1.2),
                   (0.5, 0.5, 2.0), (0.8, 0.8, 1.6))
"""QSM grids of varied phantoms: isotropic, near-isotropic and the anisotropic grids of 2D-like protocols."""
THICK_FLAIR_SPACINGS = ((0.9, 0.9, 3.0), (0.9, 0.9, 4.0), (0.7, 0.7, 5.0), (1.0, 1.0, 3.0))
"""2D multi-slice FLAIR: thick slices, whose slice axis may be axial, coronal or sagittal."""
MAX_PRL = 20
MIN_EXTENT_MM = 32.0
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
"""Grids are stored like the template and most scanners' NIfTI: a diagonal RAS affine."""
FLAIR_SCALE = 1000.0


@dataclass(frozen=True)
class Acquisition:
    """How a varied phantom's QSM (and FLAIR) were acquired and reconstructed; recorded in truth.json."""

    recon: str = "tkd"
    """One of :data:`RECONSTRUCTIONS`."""
    regularisation: float = 0.175
    """TKD threshold, Tikhonov lambda or gradient-regularisation lambda, by ``recon``."""
    b0_zyx: tuple[float, float, float] = (1.0, 0.0, 0.0)
    """Unit B0 direction in array (z, y, x) order: tilted away from the slice axis on an oblique slab."""
    noise_ppm: tuple[float, float] = (0.0008, 0.002)
    residual_ppm: tuple[float, float] = (0.002, 0.006)
    flair_thick: bool = False
    """FLAIR is 2D multi-slice (thick slices in a random orientation) rather than 3D."""


def draw_acquisition(rng: np.random.Generator, recons: tuple[str, ...] = RECONSTRUCTIONS) -> Acquisition:
    """A random site and protocol: reconstruction, its strength, B0 tilt (0-25 degrees), noise, FLAIR kind."""
    recon = str(recons[rng.integers(len(recons))])
    strength = {"tkd": (0.1, 0.25), "tikhonov": (0.003, 0.02), "l2grad": (0.002, 0.01)}[recon]
    tilt = np.deg2rad(rng.uniform(0.0, 25.0))
    azimuth = rng.uniform(0.0, 2 * np.pi)
    b0 = (float(np.cos(tilt)), float(np.sin(tilt) * np.sin(azimuth)), float(np.sin(tilt) * np.cos(azimuth)))
    noise_hi = rng.uniform(0.0015, 0.004)
    residual_hi = rng.uniform(0.004, 0.012)
    return Acquisition(recon, float(rng.uniform(*strength)), b0, (noise_hi / 2, noise_hi),
                       (residual_hi / 3, residual_hi), bool(rng.random() < 0.5))


@dataclass
class PhantomCase:
    """One synthetic patient. Images share the QSM grid except ``flair``, which has its own."""

    case_id: str
    qsm: sitk.Image
    flair: sitk.Image | None
    gt_prl: sitk.Image
    gt_instances: sitk.Image
    truth: dict
    tissue: sitk.Image | None = field(default=None, repr=False)
    """Tissue labels on the QSM grid (see ``anatomy.TISSUE_NAMES``); not written to disk."""
    chi: sitk.Image | None = field(default=None, repr=False)
    """The true susceptibility (ppm) the QSM was simulated from; not written to disk."""


# --- grids and arguments --------------------------------------------------------------------------------


def _triplet(value: float | tuple | list, name: str, low: float, high: float) -> tuple[float, float, float]:
    values = (value,) * 3 if np.isscalar(value) else tuple(value)
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        message = f"{name} must be a number or three numbers (x, y, z) in mm, not {value!r}."
        raise InputError(message) from None
    if len(values) != 3 or not all(low <= v <= high for v in values):
        raise InputError(f"{name} {value!r} is not one or three values between {low} and {high} mm.")
    return values


def _check_case_id(case_id: str) -> None:
    separators = any(c in str(case_id) for c in "/\\")
    plain = isinstance(case_id, str) and case_id not in ("", ".", "..") and not separators
    if not plain:
        raise InputError(f"Case id {case_id!r} is not a plain folder name; use something like case_000.")


def _make_grid(spacing: tuple[float, float, float], extent_mm: tuple[float, float, float],
               centre_lps: np.ndarray) -> sitk.Image:
    """An empty image whose voxel centres tile a box of ``extent_mm`` centred on ``centre_lps``."""
    size = [max(int(round(e / s)), 8) for e, s in zip(extent_mm, spacing, strict=True)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetDirection(DIRECTION)
    half = np.array([(n - 1) * s / 2 for n, s in zip(size, spacing, strict=True)])
    grid.SetOrigin(tuple(centre_lps - np.array(DIRECTION).reshape(3, 3) @ half))
    return grid


def _image_like(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _interpolation_matrix(n_fine: int, n_coarse: int) -> np.ndarray:
    """Linear interpolation from ``n_coarse`` nodes spanning the axis onto ``n_fine`` samples."""
    position = np.linspace(0.0, n_coarse - 1.0, n_fine)
    lower = np.minimum(np.floor(position).astype(int), n_coarse - 2)
    weight = position - lower
    matrix = np.zeros((n_fine, n_coarse), np.float32)
    matrix[np.arange(n_fine), lower] = 1.0 - weight
    matrix[np.arange(n_fine), lower + 1] = weight
    return matrix


def _smooth_noise(shape: tuple[int, ...], spacing_zyx: np.ndarray, rng: np.random.Generator,
                  correlation_mm: float) -> np.ndarray:
    """Zero-mean, unit-sd random texture, smooth over about ``correlation_mm``, as a (z, y, x) array.

    Coarse Gaussian noise is interpolated one axis at a time with small matrices: three BLAS products,
    several times faster than resampling the whole grid.
    """
    extent = np.array(shape) * np.asarray(spacing_zyx)
    nodes = [max(int(np.ceil(e / correlation_mm)) + 1, 2) for e in extent]
    coarse = ndi.gaussian_filter(rng.normal(size=nodes), 0.8, mode="wrap")
    coarse = ((coarse - coarse.mean()) / coarse.std()).astype(np.float32)
    mz, my, mx = (_interpolation_matrix(n, c) for n, c in zip(shape, nodes, strict=True))
    out = np.tensordot(coarse, mx, axes=([2], [1]))  # (cz, cy, nx)
    out = np.einsum("zyx,Yy->zYx", out, my)  # (cz, ny, nx)
    return np.tensordot(mz, out, axes=([1], [0]))


# --- QSM physics ---------------------------------------------------------------------------------------


def _dipole_kernel(shape: tuple[int, ...], spacing_zyx: np.ndarray,
                   b0_zyx: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> np.ndarray:
    """Unit dipole kernel D = 1/3 - (k.b)^2/k^2 in rfft layout; B0 along ``b0_zyx`` (default array axis 0)."""
    kz = sfft.fftfreq(shape[0], spacing_zyx[0]).astype(np.float32)[:, None, None]
    ky = sfft.fftfreq(shape[1], spacing_zyx[1]).astype(np.float32)[None, :, None]
    kx = sfft.rfftfreq(shape[2], spacing_zyx[2]).astype(np.float32)[None, None, :]
    k2 = kz**2 + ky**2 + kx**2
    k2[0, 0, 0] = 1.0
    if tuple(b0_zyx) == (1.0, 0.0, 0.0):
        kb = kz
    else:
        bz, by, bx = (np.float32(v) for v in b0_zyx)
        kb = kz * bz + ky * by + kx * bx
    kernel = np.float32(1 / 3) - kb**2 / k2
    # The mean is undetermined by the physics; passing it through keeps the CSF reference at zero.
    kernel[0, 0, 0] = 1 / 3
    return kernel


def _gaussian_transfer(shape: tuple[int, ...], spacing_zyx: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Fourier transform (rfft layout) of a Gaussian of standard deviation ``sigma_mm``."""
    kz = sfft.fftfreq(shape[0], spacing_zyx[0]).astype(np.float32)[:, None, None]
    ky = sfft.fftfreq(shape[1], spacing_zyx[1]).astype(np.float32)[None, :, None]
    kx = sfft.rfftfreq(shape[2], spacing_zyx[2]).astype(np.float32)[None, None, :]
    scale = np.float32(-2 * np.pi**2 * sigma_mm**2)
    # Separable: three 1-D factors multiply out to the 3-D transfer function.
    return np.exp(scale * kz**2) * np.exp(scale * ky**2) * np.exp(scale * kx**2)


def _convolve(volume: np.ndarray, kernel: np.ndarray, padded: tuple[int, ...]) -> np.ndarray:
    spectrum = sfft.rfftn(volume, s=padded, workers=2)
    spectrum *= kernel
    out = sfft.irfftn(spectrum, s=padded, workers=2)
    return out[: volume.shape[0], : volume.shape[1], : volume.shape[2]]


def _inverse_kernel(kernel: np.ndarray, padded: tuple[int, ...], spacing_zyx: np.ndarray,
                    acquisition: Acquisition) -> np.ndarray:
    """The k-space inversion of the dipole kernel a reconstruction method applies."""
    if acquisition.recon == "tkd":
        threshold = np.float32(acquisition.regularisation)
        inverse = np.where(kernel >= 0, np.float32(1.0) / threshold, np.float32(-1.0) / threshold)
        strong = np.abs(kernel) > threshold
        inverse[strong] = 1.0 / kernel[strong]
        return inverse
    if acquisition.recon == "tikhonov":
        return kernel / (kernel**2 + np.float32(acquisition.regularisation))
    # Closed-form L2 with a gradient penalty: lambda |2 pi k|^2 smooths fine detail, not the mean.
    kz = sfft.fftfreq(padded[0], spacing_zyx[0]).astype(np.float32)[:, None, None]
    ky = sfft.fftfreq(padded[1], spacing_zyx[1]).astype(np.float32)[None, :, None]
    kx = sfft.rfftfreq(padded[2], spacing_zyx[2]).astype(np.float32)[None, None, :]
    gradient2 = np.float32(4 * np.pi**2) * (kz**2 + ky**2 + kx**2)
    inverse = kernel / (kernel**2 + np.float32(acquisition.regularisation) * gradient2)
    inverse[0, 0, 0] = 1.0 / kernel[0, 0, 0]
    return inverse


def simulate_qsm(chi: np.ndarray, mask: np.ndarray, spacing_zyx: np.ndarray,
                 rng: np.random.Generator, acquisition: Acquisition | None = None) -> tuple[np.ndarray, dict]:
    """QSM as a scanner pipeline makes it: forward field, noise in the brain, TKD inversion, brain mask.

    The field is zero-padded before the FFT so the periodic convolution does not wrap; the local field is
    known only inside the brain (background field removal discards the rest), which is where the noise and
    a small residual background field go. TKD replaces 1/D near the magic-angle cone by +-1/threshold:
    that is what underestimates and streaks strong sources, as clinical QSM does.
    """
    padded = tuple(sfft.next_fast_len(n + 2 * max(16, n // 8), real=True) for n in chi.shape)
    kernel = _dipole_kernel(padded, spacing_zyx, acquisition.b0_zyx if acquisition else (1.0, 0.0, 0.0))
    # The acquisition does not resolve the voxel grid perfectly: a Gaussian point-spread function blurs the
    # field a little (sharp one-voxel rims would otherwise be crisper than any scanner makes them).
    psf_sigma_mm = rng.uniform(0.3, 0.5)
    blurred_kernel = kernel * _gaussian_transfer(padded, spacing_zyx, psf_sigma_mm)
    field_ppm = _convolve(chi.astype(np.float32), blurred_kernel, padded)
    del blurred_kernel

    noise_sd = rng.uniform(*(acquisition.noise_ppm if acquisition else (0.0008, 0.002)))
    # Array coils see the periphery better than the centre: the noise rises towards the middle of the brain.
    zyx = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in chi.shape]
    radius2 = zyx[0][:, None, None] ** 2 + zyx[1][None, :, None] ** 2 + zyx[2][None, None, :] ** 2
    noise = rng.standard_normal(chi.shape, dtype=np.float32) * (noise_sd * (1.3 - 0.25 * radius2))
    # Background field removal is never perfect: a smooth, low-order residual stays in the local field.
    axes = (zyx[0][:, None, None], zyx[1][None, :, None], zyx[2][None, None, :])
    coefficients = rng.normal(0.0, 1.0, 6)
    residual_ppm = rng.uniform(*(acquisition.residual_ppm if acquisition else (0.002, 0.006)))
    coefficients *= residual_ppm / max(float(np.abs(coefficients).sum()), 1e-6)
    terms = (*axes, *(a**2 for a in axes))
    residual = sum(np.float32(c) * term for c, term in zip(coefficients, terms, strict=True))
    local = (field_ppm + noise + residual) * mask

    if acquisition is None:
        threshold = rng.uniform(0.15, 0.2)
        inverse = np.where(kernel >= 0, np.float32(1.0 / threshold), np.float32(-1.0 / threshold))
        strong = np.abs(kernel) > threshold
        inverse[strong] = 1.0 / kernel[strong]
        recon = {"tkd_threshold": round(float(threshold), 4)}
    else:
        inverse = _inverse_kernel(kernel, padded, spacing_zyx, acquisition)
        recon = {"reconstruction": acquisition.recon, "regularisation": round(acquisition.regularisation, 5),
                 "b0_zyx": [round(v, 4) for v in acquisition.b0_zyx],
                 "b0_tilt_deg": round(float(np.rad2deg(np.arccos(min(1.0, abs(acquisition.b0_zyx[0]))))), 2)}
    qsm = _convolve(local, inverse, padded) * mask
    params = {**recon, "psf_sigma_mm": round(float(psf_sigma_mm), 3),
              "field_noise_ppm": round(float(noise_sd), 5),
              "residual_background_ppm": round(float(residual_ppm), 5)}
    return qsm.astype(np.float32), params


# --- FLAIR ---------------------------------------------------------------------------------------------


def _rigid_motion(rng: np.random.Generator, centre_lps: np.ndarray) -> tuple[sitk.Transform, dict]:
    """Head motion between the QSM and the FLAIR acquisitions: 1-3 degrees and 1-3 mm."""
    axis = random_unit(rng)[0]
    angle = np.deg2rad(rng.uniform(1.0, 3.0))
    shift = random_unit(rng)[0] * rng.uniform(1.0, 3.0)
    motion = sitk.VersorRigid3DTransform()
    motion.SetCenter(tuple(centre_lps))
    motion.SetRotation(tuple(axis), float(angle))
    motion.SetTranslation(tuple(shift))
    return motion, {"rotation_deg": round(float(np.rad2deg(angle)), 3),
                    "translation_mm": round(float(np.linalg.norm(shift)), 3)}


def _motion_matrices(motion: sitk.VersorRigid3DTransform) -> dict:
    """The head motion as 4x4 LPS matrices, both ways round.

    ``qsm_to_flair_lps`` maps a QSM-space point to the FLAIR-space point showing the same anatomy: it is the
    transform ``sitk.Resample(flair, qsm, transform)`` needs to align FLAIR with QSM (what registration
    should recover).
    """
    matrix = np.array(motion.GetMatrix()).reshape(3, 3)
    centre = np.array(motion.GetCenter())
    flair_to_qsm = np.eye(4)
    flair_to_qsm[:3, :3] = matrix
    flair_to_qsm[:3, 3] = np.array(motion.GetTranslation()) + centre - matrix @ centre
    return {"flair_to_qsm_lps": np.round(flair_to_qsm, 6).tolist(),
            "qsm_to_flair_lps": np.round(np.linalg.inv(flair_to_qsm), 6).tolist()}


def _lesion_flair(grid: sitk.Image, flair_grid: sitk.Image, motion: sitk.Transform, lesions: list[Lesion],
                  wm_signal: float) -> np.ndarray:
    """MS lesions' FLAIR signal above white matter, moved onto the FLAIR grid.

    Only the box around the lesions is resampled (a full-grid resample costs ~0.4 s); lesions sit in white
    matter, so adding (lesion - white matter) reproduces the lesion signal up to partial volume.
    """
    added = np.zeros(flair_grid.GetSize()[::-1], np.float32)
    contrast = np.zeros(grid.GetSize()[::-1], np.float32)
    for lesion in lesions:
        if lesion.flair > 0:
            contrast[lesion.box][lesion.mask] = lesion.flair - wm_signal
    nonzero = np.argwhere(contrast != 0)
    if nonzero.size == 0:
        return added
    lo_zyx, hi_zyx = nonzero.min(0), nonzero.max(0)
    corners = [grid.TransformIndexToPhysicalPoint([int(x), int(y), int(z)])
               for z in (lo_zyx[0], hi_zyx[0])
               for y in (lo_zyx[1], hi_zyx[1])
               for x in (lo_zyx[2], hi_zyx[2])]
    inverse = motion.GetInverse()
    # A FLAIR point p shows the QSM point motion(p): the lesion box lands at the inverse motion of its
    # corners.
    indices = np.array([flair_grid.TransformPhysicalPointToContinuousIndex(inverse.TransformPoint(c))
                        for c in corners])
    lo = np.maximum(np.floor(indices.min(0)).astype(int) - 2, 0)
    hi = np.minimum(np.ceil(indices.max(0)).astype(int) + 3, flair_grid.GetSize())
    if np.any(hi <= lo):
        return added
    target = flair_grid[int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])]
    source = _image_like(contrast, grid)
    added[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = warp(source, target, motion)
    return added


def simulate_flair(grid: sitk.Image, transform: sitk.Transform, lesions: list[Lesion],
                   rng: np.random.Generator, thick_rng: np.random.Generator | None = None,
                   ) -> tuple[sitk.Image, dict]:
    """FLAIR on its own grid: a different voxel size and extent, and the head moved a little.

    With ``thick_rng`` it is a 2D multi-slice FLAIR: 3-5 mm slices, axial, coronal or sagittal.
    """
    qsm_spacing = tuple(grid.GetSpacing())
    choices = [s for s in FLAIR_SPACINGS if not np.allclose(s, qsm_spacing)]
    spacing = choices[rng.integers(len(choices))]
    if thick_rng is not None:
        in_plane_x, in_plane_y, thick = THICK_FLAIR_SPACINGS[thick_rng.integers(len(THICK_FLAIR_SPACINGS))]
        slice_axis = int(thick_rng.integers(3))
        spacing = [in_plane_x, in_plane_y, in_plane_x]
        spacing[slice_axis] = thick
        spacing = tuple(spacing)
    # Grow the QSM box by a random margin on every side, so the two boxes overlap without coinciding.
    lower = np.array(grid.TransformIndexToPhysicalPoint((0, 0, 0)))
    upper = np.array(grid.TransformIndexToPhysicalPoint([n - 1 for n in grid.GetSize()]))
    lo, hi = np.minimum(lower, upper), np.maximum(lower, upper)
    lo -= rng.uniform(-2.0, 14.0, 3)
    hi += rng.uniform(-2.0, 14.0, 3)
    flair_grid = _make_grid(spacing, tuple(hi - lo), (lo + hi) / 2)

    motion, motion_info = _rigid_motion(rng, BRAIN_CENTRE_LPS)
    # A FLAIR voxel at p shows the anatomy found at motion(p) in QSM space.
    to_template = sitk.CompositeTransform(transform)
    to_template.AddTransform(motion)
    template = load_template()
    contrast, wm_signal = template_flair(template, rng)
    anatomy = warp(contrast, flair_grid, to_template)

    flair = anatomy + _lesion_flair(grid, flair_grid, motion, lesions, wm_signal)

    # A smooth multiplicative bias field, separable so it costs three 1-D polynomials.
    for axis, n in enumerate(flair.shape):
        t = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        a, b = rng.uniform(-0.12, 0.12, 2)
        shape = [1, 1, 1]
        shape[axis] = n
        flair *= np.exp(a * t + b * t**2).reshape(shape)
    sd = rng.uniform(0.015, 0.03)
    # Magnitude images have Rician noise: the modulus of signal plus complex Gaussian noise.
    real = rng.standard_normal(flair.shape, dtype=np.float32)
    real *= sd
    real += flair
    imaginary = rng.standard_normal(flair.shape, dtype=np.float32)
    imaginary *= sd
    magnitude = np.sqrt(np.square(real, out=real) + np.square(imaginary, out=imaginary))
    magnitude *= FLAIR_SCALE
    image = _image_like(np.clip(np.rint(magnitude), 0, 32767).astype(np.int16), flair_grid)
    info = {"spacing_mm": list(spacing), "size": list(flair_grid.GetSize()),
            "origin_lps_mm": [round(v, 4) for v in flair_grid.GetOrigin()], "noise_sd": round(float(sd), 4),
            "motion": motion_info, **_motion_matrices(motion)}
    return image, info


# --- lesions and counts --------------------------------------------------------------------------------


@dataclass
class _Counts:
    prl: int
    rimless: int
    microbleeds: int
    veins: int


def _draw_counts(rng: np.random.Generator, brain_fraction: float) -> _Counts:
    # About one patient in five has no PRL; among the others, 1-8 with a long tail (4 or more in ~40 %).
    prl_weights = _normalised([5, 4, 3.5, 3, 2, 1.5, 1, 0.7])
    prl = 0 if rng.random() < 0.22 else int(rng.choice(np.arange(1, 9), p=prl_weights))
    rimless = int(rng.integers(2, 11))
    microbleeds = int(rng.choice(np.arange(0, 5), p=_normalised([3, 3, 2, 1, 1])))
    veins = max(4, int(round(rng.integers(30, 56) * min(1.0, brain_fraction))))
    return _Counts(prl, rimless, microbleeds, veins)


def _normalised(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, float)
    return w / w.sum()


def _paint_lesions(scene: Scene, counts: _Counts, rng: np.random.Generator, forced_prl: bool,
                   extra_rng: np.random.Generator | None = None) -> list[Lesion]:
    flat = scene.labels.ravel()
    wm_voxels = np.flatnonzero(flat == WM)
    vent_voxels = np.flatnonzero(flat == VENTRICLE)
    calcifications = int(extra_rng.integers(0, 4)) if extra_rng is not None else 0
    total = counts.prl + counts.rimless + counts.microbleeds + calcifications
    # Ids are shuffled so that an instance id says nothing about the class.
    ids = iter(rng.permutation(np.arange(1, total + 1)))
    lesions: list[Lesion] = []
    if wm_voxels.size == 0:
        if counts.prl and forced_prl:
            raise InputError("The field of view holds no white matter for PRLs; use a larger extent_mm.")
        return lesions
    placed_prl = 0
    for cls, n in ((PRL, counts.prl), (RIMLESS, counts.rimless)):
        for _ in range(n):
            lesion_id = int(next(ids))
            # A forced PRL gets a few differently sized draws before the field of view counts as full.
            for _attempt in range(3 if cls == PRL and forced_prl else 1):
                lesion = place_ms_lesion(scene, rng, lesion_id, cls, wm_voxels, vent_voxels,
                                         partial_rim_rng=extra_rng)
                if lesion is not None:
                    break
            if lesion is None:
                # 300 tries found no room: the field of view is full, the next lesions would not fit either.
                break
            lesions.append(lesion)
            placed_prl += cls == PRL
        if cls == PRL and forced_prl and placed_prl < counts.prl:
            raise InputError(f"Only {placed_prl} of {counts.prl} PRLs fit in the field of view; "
                             "use a larger extent_mm or a smaller n_prl.")
    if len(lesions) < counts.prl + counts.rimless:
        logger.debug("Placed %d of %d MS lesions: the field of view is full", len(lesions),
                     counts.prl + counts.rimless)
    bleed_voxels = np.flatnonzero((flat == WM) | (flat == GM))
    for _ in range(counts.microbleeds):
        lesion = place_microbleed(scene, rng, int(next(ids)), bleed_voxels)
        if lesion is not None:
            lesions.append(lesion)
    if calcifications:
        # Calcified deep grey nuclei and parenchymal calcifications: diamagnetic, dark on QSM.
        calc_voxels = np.flatnonzero((flat == WM) | (flat == GM))
        for _ in range(calcifications):
            lesion = place_microbleed(scene, extra_rng, int(next(ids)), calc_voxels, cls=CALCIFICATION)
            if lesion is not None:
                lesions.append(lesion)
    # Lesions that found no room leave gaps in the shuffled ids: renumber 1..n, keeping the shuffled order.
    lookup = np.zeros(total + 1, np.uint16)
    for new_id, lesion in enumerate(sorted(lesions, key=lambda lesion: lesion.id), start=1):
        lookup[lesion.id] = new_id
        lesion.id = new_id
    scene.instances[...] = lookup[scene.instances]
    return sorted(lesions, key=lambda lesion: lesion.id)


def _lesion_truth(lesion: Lesion, grid: sitk.Image) -> dict:
    spacing = np.array(grid.GetSpacing())
    voxels = int(lesion.mask.sum())
    volume = voxels * float(np.prod(spacing))
    centroid_zyx = np.argwhere(lesion.mask).mean(axis=0) + np.array([s.start for s in lesion.box])
    lps = np.array(grid.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centroid_zyx[::-1])))
    return {
        "id": lesion.id,
        "class": lesion.cls,
        "center_lps_mm": [round(float(v), 3) for v in lps],
        "center_ras_mm": [round(float(v), 3) for v in lps * np.array([-1, -1, 1])],
        "diameter_mm": round(float((6 * volume / np.pi) ** (1 / 3)), 3),
        "volume_mm3": round(volume, 3),
        "rim_coverage": round(lesion.rim_coverage, 3),
        "rim_thickness_mm": round(lesion.rim_thickness_mm, 3),
        "voxels": voxels,
        "rim_ppm": round(lesion.rim_ppm, 4),
        "core_ppm": round(lesion.core_ppm, 4),
    }


# --- public API ----------------------------------------------------------------------------------------


def generate_case(case_id: str, seed: int, with_flair: bool = False, spacing_mm: float | tuple = 1.0,
                  extent_mm: float | tuple | None = None, n_prl: int | None = None,
                  acquisition: Acquisition | None = None) -> PhantomCase:
    """Simulate one patient.

    ``spacing_mm`` and ``extent_mm`` are one value or (x, y, z). Without ``extent_mm`` the grid covers the
    whole brain (182 x 218 x 182 mm); with it, a box of that size around the periventricular white matter,
    and every lesion lies inside. ``n_prl`` forces the number of PRLs; otherwise it is drawn (0 in about a
    fifth of patients).

    ``acquisition`` (see :func:`draw_acquisition`) makes a varied phantom: its QSM reconstruction, B0
    direction, noise and FLAIR kind, plus the look-alikes readers must reject: partial rims as bright as a
    PRL's, veins through or beside lesions, and diamagnetic calcifications. Without it the case is exactly
    what earlier versions made from the seed.
    """
    _check_case_id(case_id)
    spacing = _triplet(spacing_mm, "spacing_mm", 0.3, 3.0)
    extent = None if extent_mm is None else _triplet(extent_mm, "extent_mm", MIN_EXTENT_MM, 300.0)
    if n_prl is not None and not (isinstance(n_prl, (int, np.integer)) and 0 <= n_prl <= MAX_PRL):
        raise InputError(f"n_prl {n_prl!r} is not a whole number between 0 and {MAX_PRL}.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"Seed {seed!r} is not a non-negative whole number.")
    started = time.perf_counter()
    template = load_template()
    streams = np.random.SeedSequence(int(seed)).spawn(6)
    rng_anatomy, rng_counts, rng_lesions, rng_veins, rng_qsm, rng_flair = (
        np.random.default_rng(stream) for stream in streams)

    centre = BRAIN_CENTRE_LPS if extent is None else WM_CENTRE_LPS + rng_anatomy.uniform(-4.0, 4.0, 3)
    grid = _make_grid(spacing, extent or WHOLE_BRAIN_EXTENT_MM, centre)
    transform = draw_patient_transform(rng_anatomy, template)
    tissue = draw_tissue(rng_anatomy)
    labels = warp(template.labels_image, grid, transform, sitk.sitkNearestNeighbor)
    chi = warp(template_chi(template, tissue), grid, transform)
    mask = labels > 0
    spacing_zyx = np.array(spacing[::-1])

    voxel_mm3 = float(np.prod(spacing))
    brain_fraction = mask.sum() * voxel_mm3 / float(np.count_nonzero(template.labels))
    counts = _draw_counts(rng_counts, brain_fraction)
    if n_prl is not None:
        counts.prl = int(n_prl)
    scene = Scene.create(chi, labels, spacing_zyx, tissue.chi_wm)
    # Varied phantoms draw their extras from streams of their own, leaving the classic streams untouched.
    rng_extra = np.random.default_rng(np.random.SeedSequence([int(seed), 7])) if acquisition else None
    lesions = _paint_lesions(scene, counts, rng_lesions, forced_prl=n_prl is not None, extra_rng=rng_extra)
    centre_index = np.array(grid.TransformPhysicalPointToContinuousIndex(tuple(BRAIN_CENTRE_LPS)))[::-1]
    n_veins = paint_veins(scene, rng_veins, counts.veins, centre_index)
    if rng_extra is not None:
        n_veins += paint_lesion_veins(scene, rng_extra, lesions, share=0.3)

    # Tissue is not uniform: a faint smooth texture (fibre orientation, myelin, iron) in the parenchyma.
    parenchyma = (labels != 0) & (labels != CSF) & (labels != VENTRICLE)
    texture = _smooth_noise(chi.shape, spacing_zyx, rng_anatomy, 4.0)
    chi += texture * np.float32(rng_anatomy.uniform(0.003, 0.007)) * parenchyma
    qsm, qsm_info = simulate_qsm(chi, mask, spacing_zyx, rng_qsm, acquisition)

    instances = scene.instances
    gt_prl = np.zeros(instances.shape, np.uint8)
    for lesion in lesions:
        if lesion.cls == PRL:
            gt_prl[lesion.box][lesion.mask] = 1
    flair, flair_info = (None, None)
    if with_flair:
        thick_rng = rng_extra if acquisition is not None and acquisition.flair_thick else None
        flair, flair_info = simulate_flair(grid, transform, lesions, rng_flair, thick_rng)

    truth = {
        "case_id": case_id,
        "seed": int(seed),
        "spacing_mm": list(spacing),
        "size": list(grid.GetSize()),
        "origin_lps_mm": [round(v, 4) for v in grid.GetOrigin()],
        "prl_count": sum(lesion.cls == PRL for lesion in lesions),
        "rimless_count": sum(lesion.cls == RIMLESS for lesion in lesions),
        "microbleed_count": sum(lesion.cls == MICROBLEED for lesion in lesions),
        **({"calcification_count": sum(lesion.cls == CALCIFICATION for lesion in lesions)} if acquisition else {}),
        "lesions": [_lesion_truth(lesion, grid) for lesion in lesions],
        "veins": n_veins,
        "tissue_ppm": {"wm": round(tissue.chi_wm, 4), "gm": round(tissue.chi_gm, 4), "csf": 0.0,
                       **{n.name: round(tissue.chi_nuclei[n.name], 4) for n in NUCLEI}},
        "qsm": qsm_info,
        "flair": flair_info,
        "generator_version": GENERATOR_VERSION,
    }
    logger.debug("Generated %s in %.1f s (%d PRLs, %d lesions and mimics, %d veins)", case_id,
                 time.perf_counter() - started, truth["prl_count"], len(lesions), n_veins)
    return PhantomCase(
        case_id=case_id,
        qsm=_image_like(qsm, grid),
        flair=flair,
        gt_prl=_image_like(gt_prl, grid),
        gt_instances=_image_like(instances, grid),
        truth=truth,
        tissue=_image_like(scene.labels, grid),
        chi=_image_like(chi.astype(np.float32), grid),
    )


def write_case(case: PhantomCase, out_dir: Path) -> Path:
    """Write ``out_dir/<case_id>/``: QSM, FLAIR if any, both ground truths, truth.json; never overwrite."""
    folder = Path(out_dir) / case.case_id
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        message = f"Case folder {folder} already exists; choose another output folder or remove it."
        raise InputError(message) from None
    sitk.WriteImage(case.qsm, str(folder / "qsm.nii.gz"), useCompression=True)
    if case.flair is not None:
        sitk.WriteImage(case.flair, str(folder / "flair.nii.gz"), useCompression=True)
    sitk.WriteImage(case.gt_prl, str(folder / "gt_prl.nii.gz"), useCompression=True)
    sitk.WriteImage(case.gt_instances, str(folder / "gt_instances.nii.gz"), useCompression=True)
    (folder / "truth.json").write_text(json.dumps(case.truth, indent=2) + "\n", encoding="utf-8")
    return folder


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a cohort: independent streams from (seed, index), stable across runs."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def generate_cohort(out_dir: Path, n: int, seed: int, with_flair: bool = False,
                    spacing_mm: float | tuple = 1.0, extent_mm: float | tuple | None = None,
                    vary_grid: bool = False, progress: bool = True, vary_acquisition: bool = False,
                    recons: tuple[str, ...] = RECONSTRUCTIONS, negative_share: float | None = None,
                    ) -> list[Path]:
    """Generate and write ``n`` cases ``case_000``... into ``out_dir``; refuse if any case folder exists.

    With ``vary_grid`` each case draws its voxel size from a few realistic acquisition grids (recorded in
    its truth.json), which gives a model trained on the cohort some variety of resolution.

    With ``vary_acquisition`` each case also draws its acquisition (:func:`draw_acquisition`, from the
    reconstructions ``recons``) and its grid from :data:`VARIED_SPACINGS`, anisotropic ones included.
    ``negative_share`` makes that share of the cases (every k-th) PRL-negative, the rest draw their count.
    """
    unknown = [r for r in recons if r not in RECONSTRUCTIONS]
    if unknown or not recons:
        raise InputError(f"Reconstruction {', '.join(unknown) or '(none)'} is unknown; "
                         f"use some of {', '.join(RECONSTRUCTIONS)}.")
    if negative_share is not None and not 0.0 <= negative_share <= 1.0:
        raise InputError(f"PRL-negative share {negative_share} is outside [0, 1]; use e.g. 0.25.")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"Cohort size {n!r} is not a positive whole number.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"Seed {seed!r} is not a non-negative whole number.")
    out_dir = Path(out_dir)
    width = max(3, len(str(n - 1)))
    case_ids = [f"case_{i:0{width}d}" for i in range(n)]
    existing = [c for c in case_ids if (out_dir / c).exists()]
    if existing:
        raise InputError(f"Case folder {out_dir / existing[0]} already exists ({len(existing)} of {n}); "
                         "choose an empty output folder.")
    folders = []
    started = time.perf_counter()
    for index in tqdm(range(n), desc="Phantoms", unit="case", disable=not progress):
        spacing = spacing_mm
        if vary_grid:
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), index, 1]))
            spacing = VARY_GRID_SPACINGS[rng.integers(len(VARY_GRID_SPACINGS))]
        acquisition = None
        if vary_acquisition:
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), index, 2]))
            spacing = VARIED_SPACINGS[rng.integers(len(VARIED_SPACINGS))]
            acquisition = draw_acquisition(rng, tuple(recons))
        n_prl = None
        if negative_share:
            # Every k-th case is PRL-negative: exactly round(n * share) of them, spread over the cohort.
            n_negative = int(round(n * negative_share))
            if n_negative and index * n_negative // n != (index + 1) * n_negative // n:
                n_prl = 0
        case = generate_case(case_ids[index], case_seed(seed, index), with_flair=with_flair,
                             spacing_mm=spacing, extent_mm=extent_mm, n_prl=n_prl, acquisition=acquisition)
        folders.append(write_case(case, out_dir))
        logger.info("Wrote %s: %d PRLs, %d other lesions and mimics", folders[-1], case.truth["prl_count"],
                    len(case.truth["lesions"]) - case.truth["prl_count"])
    logger.info("Generated %d phantoms in %s in %.0f s", n, out_dir, time.perf_counter() - started)
    return folders
