"""Reading and validating the input volumes (QSM, FLAIR) with SimpleITK.

Every check raises :class:`InputError` with one sentence that names the problem and the fix, so the CLI
and the Slicer widget can show it as it is.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# QSM in ppm rarely exceeds ±1 inside the brain (veins, haemorrhage ~1 ppm); the same map in ppb is 1000x.
PPB_ROBUST_LIMIT_PPM = 10.0
# The same map as a dimensionless SI susceptibility is 1e-6 x ppm (|χ| ~ 1e-7); a ppm map this flat is no map.
SI_ROBUST_LIMIT_PPM = 1e-3
TAIL_QUANTILE = 99.9
"""Bright and dark tails of the brain's histogram, at this percentile and its mirror, around the median."""
FLIPPED_TAIL_RATIO = 0.67
"""Paramagnetic veins, deep grey nuclei and bleeds make the bright tail the heavier (2-3.5x on phantoms): a
bright tail below 0.67 of the dark one is a flipped sign; below 1, a doubt worth a warning."""
NAN_BACKGROUND_SHARE = 0.5
"""NaN is the background when it makes at least this share of the voxels just outside the head."""
UNMASKED_SPREAD_RATIO = 3.0
"""A map with no zero background whose outer shell varies this much more than its centre holds non-brain."""


@dataclass(frozen=True)
class VolumeCheck:
    """What validation found and did, for the log and for ``burden.json``."""

    nonfinite_outside_head: int = 0
    """NaN voxels of the background outside the head, read as 0 (some QSM tools write NaN there)."""
    robust_max_abs: float = 0.0
    """99.5th percentile of |value| inside the head."""
    background: str = "zero"
    """What lies around the head: ``zero``, ``nan``, or ``none`` (the head fills the volume: a crop inside the
    brain, or an unmasked map)."""
    bright_dark_tail_ratio: float | None = None
    """QSM: the brain histogram's bright tail over its dark tail (> 1 when paramagnetic is positive)."""
    warnings: tuple[str, ...] = ()
    """What was doubtful but not refused, each in one sentence (also logged as a warning)."""


def read_image(path: str | Path, role: str = "image") -> sitk.Image:
    """Read a 3D scalar volume from NIfTI, NRRD, MHA or a DICOM series folder, as float32.

    ``role`` ("QSM", "FLAIR", …) names the input in error messages.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"The {role} '{path}' does not exist; check the path.")
    if path.is_dir():
        return as_3d_float(_read_dicom_folder(path, role), role, path.name)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        image = _read_nifti_once(path, role)
        if image is not None:
            return image
    image = as_3d_float(_read_file(path, role), role, path.name)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        image = _restore_nifti_nonfinite(path, image)
    return image


def _read_nifti_once(path: Path, role: str) -> sitk.Image | None:
    """A plain 3-D scalar NIfTI volume decompressed once: voxels (NaN/Inf kept) from nibabel, geometry from
    ITK's reading of the header alone, so the image is the one ITK would give. None when the file is not
    such a volume (4-D, vectors, a header nibabel refuses): the general path reads it then."""
    import nibabel

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        nifti = nibabel.load(str(path))
    except Exception:  # not a NIfTI either reader accepts: the general path words the error
        return None
    size = reader.GetSize()
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1 or nifti.shape != size:
        return None
    if not np.issubdtype(nifti.get_data_dtype(), np.number) or np.issubdtype(nifti.get_data_dtype(), np.complexfloating):
        return None
    if min(size) < 2:
        return None
    try:
        values = np.asarray(nifti.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error):
        raise InputError(
            f"The {role} '{path.name}' has a readable header but its voxel data is truncated or corrupt; "
            "export or copy the file again."
        ) from None
    image = sitk.GetImageFromArray(values.transpose(2, 1, 0))
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image


def _restore_nifti_nonfinite(path: Path, image: sitk.Image) -> sitk.Image:
    """Put back the NaN/Inf voxels of a NIfTI file that ITK's reader turns into 0.

    Validation must see them: NaN outside the head is a QSM tool's background, NaN inside it is a hole in
    the map that must not pass silently as 0 ppm.
    """
    import nibabel

    try:
        raw = np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception:  # nibabel refuses some files ITK reads; then ITK's values stand
        return image
    if not np.issubdtype(raw.dtype, np.floating) or raw.size != np.prod(image.GetSize()):
        return image
    raw = raw.reshape(image.GetSize(), order="F").transpose(2, 1, 0)  # z, y, x like the image's array
    bad = ~np.isfinite(raw)
    if not bad.any():
        return image
    values = sitk.GetArrayFromImage(image)
    values[bad] = raw[bad].astype(np.float32)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


def _read_file(path: Path, role: str) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(
            f"The {role} '{path.name}' is not an image SimpleITK can read; give a NIfTI, NRRD or MHA file "
            "or a folder holding one DICOM series."
        ) from None
    truncated = InputError(
        f"The {role} '{path.name}' has a readable header but its voxel data is truncated or corrupt; "
        "export or copy the file again."
    )
    # ITK's NIfTI reader zero-fills a short file without complaint, so NIfTI is checked here first.
    if path.name.lower().endswith((".nii", ".nii.gz")) and not _nifti_is_complete(path):
        raise truncated
    try:
        return reader.Execute()
    except RuntimeError:
        raise truncated from None


def _nifti_is_complete(path: Path) -> bool:
    """True when a NIfTI-1/2 file (plain or gzip) holds all the voxel bytes its header promises."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                header = handle.read(544)
                length = len(header)
                while block := handle.read(1 << 22):
                    length += len(block)
        else:
            with open(path, "rb") as handle:
                header = handle.read(544)
            length = path.stat().st_size
    except (OSError, EOFError, zlib.error):
        return False
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return True  # not a header we know: let ITK decide
    n_voxels = int(np.prod([max(d, 1) for d in dims[1 : 1 + max(min(dims[0], 7), 0)]]))
    return length >= offset + n_voxels * bitpix // 8


def _read_dicom_folder(path: Path, role: str) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)) or ()
    if not series_ids:
        raise InputError(
            f"The {role} folder '{path.name}' holds no DICOM series; give a folder with one DICOM series "
            "or an image file."
        )
    if len(series_ids) > 1:
        raise InputError(
            f"The {role} folder '{path.name}' holds {len(series_ids)} DICOM series; give a folder that "
            "holds only the series to use."
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError:
        raise InputError(
            f"The {role} DICOM series in '{path.name}' could not be read (missing or corrupt slices); "
            "export the series again."
        ) from None


def as_3d_float(image: sitk.Image, role: str = "image", name: str = "") -> sitk.Image:
    """Return a 3D float32 scalar image, or raise InputError for 2D, 4D and multi-component images."""
    label = f"The {role}" + (f" '{name}'" if name else "")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{label} has {image.GetNumberOfComponentsPerPixel()} components per voxel; give a scalar "
            "(single-component) 3D volume."
        )
    size = image.GetSize()
    if image.GetDimension() == 4:
        if size[3] != 1:
            raise InputError(
                f"{label} is 4D with {size[3]} volumes; extract the one 3D volume to use (for QSM, the "
                "echo-combined susceptibility map)."
            )
        image = image[:, :, :, 0]
    elif image.GetDimension() != 3:
        raise InputError(f"{label} is {image.GetDimension()}D; give a 3D volume.")
    if min(image.GetSize()) < 2:
        raise InputError(f"{label} is a single slice ({'×'.join(map(str, image.GetSize()))}); give a 3D volume.")
    return sitk.Cast(image, sitk.sitkFloat32)


def head_mask(values: np.ndarray) -> np.ndarray:
    """Voxels inside the head: the filled support of finite non-zero values.

    Filling holes makes a NaN blob *inside* the brain count as inside, while the NaN/zero background that
    QSM tools write around the brain stays outside.
    """
    support = np.isfinite(values) & (values != 0)
    return ndimage.binary_fill_holes(support)


def where(mask: np.ndarray, image: sitk.Image) -> str:
    """Where the voxels of ``mask`` (z, y, x array order) are, for a message: a voxel among them near their
    middle, as an index and in scanner coordinates, and the box they span."""
    found = np.argwhere(mask)
    middle = found[np.argmin(((found - found.mean(0)) ** 2).sum(1))]
    index = [int(i) for i in middle[::-1]]
    point = image.TransformIndexToPhysicalPoint(index)
    low, high = found.min(0)[::-1], found.max(0)[::-1]
    span = ", ".join(f"{a}-{b}" for a, b in zip(low, high, strict=True))
    return (f"around voxel [{', '.join(map(str, index))}] (LPS {', '.join(f'{c:.1f}' for c in point)} mm), "
            f"spanning voxels [{span}]")


def _shell(inside: np.ndarray) -> np.ndarray:
    """The voxels just outside the head (6-neighbours of it, within the volume)."""
    return ndimage.binary_dilation(inside) & ~inside


def clean_volume(image: sitk.Image, role: str) -> tuple[sitk.Image, VolumeCheck]:
    """Check finite values and content; return the image with its NaN background set to 0.

    Inf is refused wherever it is. NaN is taken as background only where it clearly is: around the head when
    it is what surrounds it (a QSM tool's NaN background), or away from the head (a frame); NaN inside the
    head, or a NaN patch on the edge of a head otherwise surrounded by zeros, is a hole in the map and refused.
    """
    values = sitk.GetArrayViewFromImage(image)
    infinite = np.isinf(values)
    if infinite.any():
        raise InputError(
            f"The {role} has {int(infinite.sum())} infinite voxel(s) {where(infinite, image)}; Inf is never a valid "
            "value: fix the map where it was made (for QSM, the inversion or its mask) and try again."
        )
    nan = np.isnan(values)
    inside = head_mask(values)
    background = "zero"
    if nan.any():
        holes = nan & inside
        if holes.any():
            raise InputError(
                f"The {role} has {int(holes.sum())} NaN voxel(s) inside the head {where(holes, image)}; fix the map "
                "(for QSM, rerun the inversion or fill those voxels) and try again."
            )
        shell = _shell(inside)
        on_edge = nan & shell
        if on_edge.any():
            if on_edge.sum() < NAN_BACKGROUND_SHARE * shell.sum():
                patch = nan & ~inside
                labels, _ = ndimage.label(patch)
                patch = np.isin(labels, np.unique(labels[on_edge]))
                raise InputError(
                    f"The {role} has {int(patch.sum())} NaN voxel(s) on the edge of the head {where(patch, image)}, "
                    "where the rest of its background is 0: a hole in the map, not background; fix the map (for "
                    "QSM, the mask or the inversion there) and try again."
                )
            background = "nan"
        logger.info("%s: %d NaN voxels outside the head read as 0.", role, int(nan.sum()))
        cleaned = np.where(nan, np.float32(0), values).astype(np.float32)
        out = sitk.GetImageFromArray(cleaned)
        out.CopyInformation(image)
        image, values = out, cleaned
    if not inside.any():
        raise InputError(f"The {role} is all zero; check that the right file was exported.")
    if background == "zero" and inside.mean() > 0.99:
        background = "none"
    robust = float(np.percentile(np.abs(values[inside]), 99.5))
    if robust == 0.0:
        raise InputError(f"The {role} is zero almost everywhere inside the head; check the export.")
    return image, VolumeCheck(nonfinite_outside_head=int(nan.sum()), robust_max_abs=robust, background=background)


def tail_ratio(values: np.ndarray) -> float:
    """The bright tail of ``values`` over its dark tail (99.9th and 0.1th percentiles, from the median)."""
    low, median, high = np.percentile(values, [100 - TAIL_QUANTILE, 50, TAIL_QUANTILE])
    return float((high - median) / max(median - low, 1e-12))


def _outer(shape: tuple[int, ...]) -> np.ndarray:
    """The outer tenth of the volume on every side (at least 2 voxels)."""
    thickness = [max(2, n // 10) for n in shape]
    outer = np.ones(shape, dtype=bool)
    outer[tuple(slice(t, n - t) for t, n in zip(thickness, shape, strict=True))] = False
    return outer


def _centre(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The central half of the volume along every axis."""
    return tuple(slice(n // 4, n - n // 4) for n in shape)


def outer_spread_ratio(values: np.ndarray) -> float:
    """How much more the outer tenth of the volume varies than its centre (median absolute deviations)."""
    centre = _centre(values.shape)

    def spread(x: np.ndarray) -> float:
        return float(np.median(np.abs(x - np.median(x))))

    return spread(values[_outer(values.shape)]) / max(spread(values[centre]), 1e-12)


def validate_qsm(image: sitk.Image) -> tuple[sitk.Image, VolumeCheck]:
    """Clean a QSM map and check it is what the models were trained on: ppm, paramagnetic positive, masked."""
    image, check = clean_volume(image, "QSM")
    robust = check.robust_max_abs
    if robust > PPB_ROBUST_LIMIT_PPM:
        raise InputError(
            f"The QSM looks like ppb, not ppm (99.5th percentile of |χ| inside the head is "
            f"{robust:.0f}); divide it by 1000 or export it in ppm."
        )
    if robust < SI_ROBUST_LIMIT_PPM:
        raise InputError(
            f"The QSM looks like dimensionless SI susceptibility, not ppm (99.5th percentile of |χ| inside the "
            f"head is {robust:.2g}); multiply it by 1e6 or export it in ppm."
        )
    values = sitk.GetArrayViewFromImage(image)
    warnings = []
    ratio = None
    if check.background == "none" and (spread := outer_spread_ratio(values)) >= UNMASKED_SPREAD_RATIO:
        # The noise around the head fills both tails of the histogram: the sign cannot be judged.
        warnings.append(
            f"The QSM has no zero background and its outer part varies {spread:.0f} times more than its centre: "
            "it looks unmasked, so nnU-Net normalises it over the whole volume instead of the brain (and its sign "
            "convention cannot be checked); mask it with its brain mask for results like the model's training."
        )
    else:
        ratio = tail_ratio(values[head_mask(values)])
        if ratio < FLIPPED_TAIL_RATIO:
            raise InputError(
                f"The QSM looks sign-flipped: its dark tail is {1 / ratio:.1f} times its bright one, so veins and "
                "deep grey nuclei are dark; PRL models take paramagnetic as positive: multiply the map by -1."
            )
        if ratio < 1.0:
            warnings.append(
                f"The QSM's dark tail is heavier than its bright one (ratio {ratio:.2f}); check that paramagnetic "
                "(veins, deep grey nuclei) is positive."
            )
    for warning in warnings:
        logger.warning("%s", warning)
    ratio = None if ratio is None else round(ratio, 3)
    return image, replace(check, bright_dark_tail_ratio=ratio, warnings=tuple(warnings))


def validate_flair(image: sitk.Image) -> tuple[sitk.Image, VolumeCheck]:
    return clean_volume(image, "FLAIR")


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def file_sha256(path: str | Path) -> str:
    """Checksum of an input file (or of every file of a DICOM folder, in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
