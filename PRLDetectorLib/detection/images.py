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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# QSM in ppm rarely exceeds ±1 inside the brain (veins, haemorrhage ~1 ppm); the same map in ppb is 1000x.
PPB_ROBUST_LIMIT_PPM = 10.0


@dataclass(frozen=True)
class VolumeCheck:
    """What validation found and did, for the log and for ``burden.json``."""

    nonfinite_outside_head: int = 0
    """NaN/Inf voxels outside the head, read as 0 (some QSM tools write NaN there)."""
    robust_max_abs: float = 0.0
    """99.5th percentile of |value| inside the head."""


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


def clean_volume(image: sitk.Image, role: str) -> tuple[sitk.Image, VolumeCheck]:
    """Check finite values and content; return the image with outside-head NaN/Inf set to 0."""
    values = sitk.GetArrayViewFromImage(image)
    nonfinite = ~np.isfinite(values)
    inside = head_mask(values)
    n_nonfinite = int(nonfinite.sum())
    if n_nonfinite:
        bad_inside = int((nonfinite & inside).sum())
        if bad_inside:
            raise InputError(
                f"The {role} has {bad_inside} NaN or infinite voxels inside the head; fix the map "
                "(for QSM, rerun the inversion or fill those voxels) and try again."
            )
        logger.info("%s: %d NaN/Inf voxels outside the head read as 0.", role, n_nonfinite)
        cleaned = np.where(nonfinite, np.float32(0), values).astype(np.float32)
        out = sitk.GetImageFromArray(cleaned)
        out.CopyInformation(image)
        image, values = out, cleaned
    if not inside.any():
        raise InputError(f"The {role} is all zero; check that the right file was exported.")
    robust = float(np.percentile(np.abs(values[inside]), 99.5))
    if robust == 0.0:
        raise InputError(f"The {role} is zero almost everywhere inside the head; check the export.")
    return image, VolumeCheck(nonfinite_outside_head=n_nonfinite, robust_max_abs=robust)


def validate_qsm(image: sitk.Image) -> tuple[sitk.Image, VolumeCheck]:
    """Clean a QSM map and check it is in ppm."""
    image, check = clean_volume(image, "QSM")
    if check.robust_max_abs > PPB_ROBUST_LIMIT_PPM:
        raise InputError(
            f"The QSM looks like ppb, not ppm (99.5th percentile of |χ| inside the head is "
            f"{check.robust_max_abs:.0f}); divide it by 1000 or export it in ppm."
        )
    return image, check


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
