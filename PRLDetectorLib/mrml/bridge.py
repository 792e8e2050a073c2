"""MRML ↔ library: volume nodes ↔ SimpleITK images, lesions ↔ segments, lesion rows ↔ a table node.

The only module of the library that speaks MRML. It uses the MRML and Segmentations logic classes and
``slicer.util`` array helpers, never ``qt`` nor ``slicer.mrmlScene``: every function takes its scene or
nodes as arguments, so it runs inside Slicer and on slicer-core in CI alike.

Geometry: a volume node keeps origin and axis directions in RAS; SimpleITK keeps them in LPS. The voxel
array is the same (z, y, x) block in both. Converting flips the sign of the first two rows of the
direction matrix and of the first two origin coordinates, nothing else, so a round trip is exact.

Each lesion is one segment. The segment carries its lesion id and review status as tags, so they live
in the segmentation itself (and in a saved ``.seg.nrrd``); the lesion table is a view of the segments,
rebuilt by :func:`lesion_rows_from_segments`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from PRLDetectorLib.detection import headers
from PRLDetectorLib.detection.burden import Burden, compute_burden
from PRLDetectorLib.detection.features import LESION_COLUMNS, LesionFeatures
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.exports.segments import PRL_TERMINOLOGY, segment_color, segment_name

logger = logging.getLogger(__name__)

STATUS_COLUMN = "status"
NOTE_COLUMN = "note"
TABLE_COLUMNS: tuple[str, ...] = headers.view_order((*LESION_COLUMNS, STATUS_COLUMN, NOTE_COLUMN))
"""The lesion table node: the columns of ``lesions.csv``, the reader's verdict and note, in the order the
reader reads them (:mod:`~PRLDetectorLib.detection.headers`), the file-only ones last. Columns another tool
added to ``lesions.csv`` follow as text."""
CSV_COLUMNS: tuple[str, ...] = (*LESION_COLUMNS, STATUS_COLUMN, NOTE_COLUMN)
"""An exported ``lesions.csv``: the detection's columns in their order, the verdict and the note appended
(then any other column the table carries)."""

CANDIDATE, CONFIRMED, REJECTED = "candidate", "confirmed", "rejected"
STATUSES = (CANDIDATE, CONFIRMED, REJECTED)

STATUS_TAG = "PRLDetector.Status"
NOTE_TAG = "PRLDetector.Note"
LESION_ID_TAG = "PRLDetector.LesionID"
TABLE_REFERENCE_ROLE = "PRLDetector.LesionTable"
SEGMENTATION_REFERENCE_ROLE = "PRLDetector.Segmentation"

SURFACE_SEGMENT_LIMIT = 300
"""Above this many segments no 3D surfaces are made automatically: building them takes ~5 ms per segment, and
that many "lesions" means a threshold or a model gone wrong rather than a case to look at in 3D."""

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def show_vtk_warnings(show: bool) -> None:
    """Whether VTK (and MRML) print their warnings; errors are always printed."""
    vtk.vtkObject.SetGlobalWarningDisplay(int(show))


# -- volumes ------------------------------------------------------------------------------------------


def image_from_volume_node(volume_node) -> sitk.Image:
    """A copy of a scalar volume node's voxels as a SimpleITK image with the same geometry (in LPS).

    The node's own geometry is used; a parent transform is not applied (results are placed under the same
    transform instead, see :func:`segmentation_from_labels`). For a second volume measured with the first,
    :func:`image_in_frame_of` applies what the reader did in Slicer.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("The volume has no voxels; load an image into it first.")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"The volume '{volume_node.GetName()}' has several components per voxel; choose a scalar volume.")
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in volume_node.GetSpacing()))
    origin = np.array(volume_node.GetOrigin(), dtype=float)
    image.SetOrigin(tuple(_RAS_FROM_LPS @ origin))
    image.SetDirection(tuple((_RAS_FROM_LPS @ _direction_ras(volume_node)).ravel()))
    return image


def image_in_frame_of(volume_node, frame_node) -> sitk.Image:
    """The volume as it lies in Slicer *relative to* ``frame_node``: in that node's own (untransformed) frame.

    A FLAIR the reader aligned to the QSM with a transform (or the QSM itself moved by one) is taken as the
    reader placed it: the transform from the FLAIR's parent frame to the QSM's parent frame is applied to a
    copy; the reader's nodes are never changed. A rigid (or axis-scaling) transform changes only the header
    (origin, axes, spacing), so no voxel is interpolated; one that shears the grid is resampled onto straight
    axes; a non-linear one is hardened on a temporary copy, which Slicer resamples.
    """
    matrix = relative_transform(volume_node, frame_node)
    if matrix is None:
        return image_from_volume_node(volume_node)
    if matrix is NON_LINEAR:
        return _hardened_copy(volume_node, frame_node)
    image = image_from_volume_node(volume_node)
    geometry = _moved_geometry(volume_node, matrix)
    if geometry is None:
        return _sheared(image, matrix)
    spacing, origin_ras, direction_ras = geometry
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(_RAS_FROM_LPS @ origin_ras))
    image.SetDirection(tuple((_RAS_FROM_LPS @ direction_ras).ravel()))
    return image


def _moved_geometry(volume_node, matrix_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(spacing, origin, axes) in RAS of the volume's grid moved by a linear transform; None when the moved
    axes are not orthogonal (a shear), which no image header can hold."""
    ijk_to_ras = matrix_ras @ _ijk_to_ras(volume_node)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    direction_ras = ijk_to_ras[:3, :3] / spacing
    if not np.allclose(direction_ras.T @ direction_ras, np.eye(3), atol=1e-6):
        return None
    return spacing, ijk_to_ras[:3, 3], direction_ras


def _sheared(image: sitk.Image, matrix_ras: np.ndarray) -> sitk.Image:
    """An image moved by a linear transform that shears its voxel axes (an affine registration may): no header
    holds that, so it is resampled (linearly) onto a grid with the image's spacing, the nearest orthonormal
    axes, and room for every moved voxel."""
    to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    moved = to_lps @ matrix_ras @ to_lps
    axes = moved[:3, :3] @ np.reshape(image.GetDirection(), (3, 3))
    u, _, vt = np.linalg.svd(axes)
    direction = u @ vt
    size = image.GetSize()
    corners = np.array([image.TransformIndexToPhysicalPoint([c * (n - 1) for c, n in zip(corner, size, strict=True)])
                        for corner in np.ndindex(2, 2, 2)])
    along = (corners @ moved[:3, :3].T + moved[:3, 3]) @ direction  # moved corners along the new axes
    spacing = np.array(image.GetSpacing())
    low, high = along.min(axis=0), along.max(axis=0)
    grid = sitk.Image([int(n) for n in np.ceil((high - low) / spacing - 1e-6).astype(int) + 1], image.GetPixelID())
    grid.SetSpacing(tuple(float(v) for v in spacing))
    grid.SetDirection(tuple(direction.ravel()))
    grid.SetOrigin(tuple(direction @ low))
    back = np.linalg.inv(moved)  # Resample maps each grid point back into the image
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(back[:3, :3].ravel()))
    transform.SetTranslation(tuple(back[:3, 3]))
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0, image.GetPixelID())


NON_LINEAR = np.full((4, 4), np.nan)
"""What :func:`relative_transform` returns for a transform that no matrix describes."""


def relative_transform(volume_node, frame_node) -> np.ndarray | None:
    """The RAS matrix from ``volume_node``'s parent frame to ``frame_node``'s (None when both share one frame,
    :data:`NON_LINEAR` when no matrix describes it)."""
    source = volume_node.GetParentTransformNode()
    target = frame_node.GetParentTransformNode() if frame_node is not None else None
    if source is target:
        return None
    between = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, between)
    linear = vtk.vtkTransform()
    if not slicer.vtkMRMLTransformNode.IsGeneralTransformLinear(between, linear):
        return NON_LINEAR
    array = slicer.util.arrayFromVTKMatrix(linear.GetMatrix())
    return None if np.allclose(array, np.eye(4), atol=1e-12) else array


def _hardened_copy(volume_node, frame_node) -> sitk.Image:
    scene = volume_node.GetScene()
    between = vtk.vtkGeneralTransform()
    target = frame_node.GetParentTransformNode() if frame_node is not None else None
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume_node.GetParentTransformNode(), target, between)
    with _temporary_nodes(scene):
        copy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "__PRLDetector_hardened__")
        copy.CopyOrientation(volume_node)
        voxels = vtk.vtkImageData()
        voxels.DeepCopy(volume_node.GetImageData())
        copy.SetAndObserveImageData(voxels)
        transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "__PRLDetector_transform__")
        transform.SetAndObserveTransformToParent(between)
        copy.SetAndObserveTransformNodeID(transform.GetID())
        copy.HardenTransform()
        return image_from_volume_node(copy)


def transform_record(volume_node, frame_node=None) -> dict | None:
    """What a reader's transform does to a volume, for ``burden.json``: the transform's name and the RAS matrix
    from the volume's frame to ``frame_node``'s (to the world when ``frame_node`` is None); None when there
    is nothing between the two."""
    matrix = relative_transform(volume_node, frame_node)
    if matrix is None:
        return None
    transform = volume_node.GetParentTransformNode()
    linear = matrix is not NON_LINEAR
    return {
        "volume": volume_node.GetName(),
        "transform": transform.GetName() if transform is not None else None,
        "relative_to": frame_node.GetName() if frame_node is not None else "world",
        "linear": linear,
        "matrix_ras": matrix.tolist() if linear else None,
        "resampled": not linear or _moved_geometry(volume_node, matrix) is None,
    }


def update_volume_node_from_image(volume_node, image: sitk.Image) -> None:
    """Give a volume node the voxels and geometry of a SimpleITK image."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("Only 3D scalar images can be shown as a volume; give a 3D scalar image.")
    slicer.util.updateVolumeFromArray(volume_node, sitk.GetArrayFromImage(image))
    _set_geometry(volume_node, image)


def add_volume_node(scene, image: sitk.Image, name: str, labelmap: bool = False):
    """Add a new scalar (or label map) volume node holding ``image``."""
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(class_name, name)
    update_volume_node_from_image(node, image)
    node.CreateDefaultDisplayNodes()
    return node


def set_window(volume_node, low: float, high: float) -> None:
    """Show a volume from ``low`` (black) to ``high`` (white)."""
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(low), float(high))


def geometry_image(volume_node) -> sitk.Image:
    """An empty (1-byte) image on the node's grid: the ``reference`` the library's measurements need."""
    dims = volume_node.GetImageData().GetDimensions()
    image = sitk.Image([int(d) for d in dims], sitk.sitkUInt8)
    image.SetSpacing(tuple(float(s) for s in volume_node.GetSpacing()))
    image.SetOrigin(tuple(_RAS_FROM_LPS @ np.array(volume_node.GetOrigin(), dtype=float)))
    image.SetDirection(tuple((_RAS_FROM_LPS @ _direction_ras(volume_node)).ravel()))
    return image


def _ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _direction_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])


def _set_geometry(volume_node, image: sitk.Image) -> None:
    volume_node.SetSpacing(*image.GetSpacing())
    volume_node.SetOrigin(*(_RAS_FROM_LPS @ np.array(image.GetOrigin(), dtype=float)))
    direction_ras = _RAS_FROM_LPS @ np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction_ras[r, c])
    volume_node.SetIJKToRASDirectionMatrix(matrix)


def _array_on_reference(labels, reference_node) -> np.ndarray:
    array = sitk.GetArrayFromImage(labels) if isinstance(labels, sitk.Image) else np.asarray(labels)
    expected = tuple(reversed(reference_node.GetImageData().GetDimensions()))
    if array.shape != expected:
        raise InputError(
            f"The label map has shape {array.shape} but '{reference_node.GetName()}' is {expected} (z, y, x); "
            "resample the labels onto that volume first."
        )
    return array


# -- segmentations ------------------------------------------------------------------------------------


def ensure_segmentation_converters() -> None:
    """Register the segment representation converters (the Segmentations module does it in the app)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.ConstructRepresentationObjectByRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()):
        return
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        factory.RegisterConverterRule(rule())


@dataclass(frozen=True)
class LesionSegment:
    """One segment as a lesion: where it is in the segmentation and what the reader said about it."""

    segment_id: str
    name: str
    lesion_id: int | None
    """None for a segment the reader drew (no lesion id yet)."""
    status: str
    note: str = ""
    color: tuple[float, float, float] = (1.0, 1.0, 0.0)
    """RGB 0-1, as the slice views draw it."""


def segmentation_from_labels(
    scene,
    labels: sitk.Image | np.ndarray,
    reference_node,
    name: str,
    statuses: Mapping[int, str] | None = None,
    names: Mapping[int, str] | None = None,
    default_status: str = CANDIDATE,
):
    """A new segmentation node with one segment per lesion id of ``labels`` (on ``reference_node``'s grid).

    Segment ``PRL_<id>`` is named "PRL <id>" with its own colour, a lesion terminology entry and the lesion
    id and status as tags. The segmentation takes the reference volume's geometry, parent transform and
    place in the subject hierarchy (its study), and is shown in slice views and in 3D.
    """
    ensure_segmentation_converters()
    array = _array_on_reference(labels, reference_node)
    ids = [int(i) for i in np.unique(array) if i != 0]
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation_node.CreateDefaultDisplayNodes()
    use_reference_volume(segmentation_node, reference_node)
    if ids:
        # The import maps label value v to the v-th segment id, so number the lesions 1..n without gaps.
        consecutive = np.zeros(max(ids) + 1, dtype=np.uint16)
        consecutive[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
        _import_labels(scene, consecutive[array], reference_node, segmentation_node, [f"PRL_{i}" for i in ids])
    segmentation = segmentation_node.GetSegmentation()
    for lesion_id in ids:
        segment = segmentation.GetSegment(f"PRL_{lesion_id}")
        segment.SetName((names or {}).get(lesion_id, segment_name(lesion_id)))
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*segment_color(lesion_id))
        segment.SetColorAutoGenerated(False)
        segment.SetTag(segment.GetTerminologyEntryTagName(), PRL_TERMINOLOGY)
        segment.SetTag(LESION_ID_TAG, str(lesion_id))
        segment.SetTag(STATUS_TAG, (statuses or {}).get(lesion_id, default_status))
    show_segmentation(segmentation_node)
    return segmentation_node


def _import_labels(scene, array: np.ndarray, reference_node, segmentation_node, segment_ids: Sequence[str]) -> None:
    """Import label value v of ``array`` into ``segment_ids[v - 1]``."""
    with _temporary_nodes(scene):
        labelmap = _labelmap_on(scene, reference_node, "__PRLDetector_import__")
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(array, dtype=np.uint16))
        names = vtk.vtkStringArray()
        for segment_id in segment_ids:
            names.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, names):
            raise RuntimeError("Slicer could not import the lesion label map into the segmentation.")


def use_reference_volume(segmentation_node, reference_node) -> None:
    """Make ``reference_node`` the segmentation's reference geometry (the grid lesions are measured on)."""
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation_node.SetNodeReferenceID(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), reference_node.GetID()
    )
    if reference_node.GetParentTransformNode():
        segmentation_node.SetAndObserveTransformNodeID(reference_node.GetParentTransformNode().GetID())
    place_next_to(segmentation_node.GetScene(), segmentation_node, reference_node)


def show_segmentation(segmentation_node) -> None:
    """Visible in slice views (fill and outline) and in 3D as closed surfaces."""
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)
    display.SetVisibility3D(True)
    count = segmentation_node.GetSegmentation().GetNumberOfSegments()
    if 0 < count <= SURFACE_SEGMENT_LIMIT:
        segmentation_node.CreateClosedSurfaceRepresentation()
    elif count > SURFACE_SEGMENT_LIMIT:
        logger.warning(
            "%d segments: no 3D surfaces were made (Show 3D in the Segmentations module makes them).", count
        )


def set_fill_opacity(segmentation_node, opacity: float) -> None:
    """How opaque the lesions' fill is in slice views (their outline stays): low, so the rim shows through."""
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetOpacity2DFill(float(opacity))


def lesion_segments(segmentation_node) -> list[LesionSegment]:
    """Every segment, in segmentation order, with its lesion id (None when drawn by hand) and status."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        out.append(
            LesionSegment(
                segment_id=segment_id,
                name=segment.GetName(),
                lesion_id=_int_tag(segment, LESION_ID_TAG),
                status=_status_tag(segment),
                note=_text_tag(segment, NOTE_TAG),
                color=tuple(float(c) for c in segment.GetColor()),
            )
        )
    return out


def _int_tag(segment, tag: str) -> int | None:
    value = vtk.reference("")
    if not segment.GetTag(tag, value):
        return None
    try:
        return int(str(value))
    except ValueError:
        return None


def _text_tag(segment, tag: str) -> str:
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else ""


def _status_tag(segment) -> str:
    value = vtk.reference("")
    if segment.GetTag(STATUS_TAG, value) and str(value) in STATUSES:
        return str(value)
    return CANDIDATE


def claim_new_segments(segmentation_node, status: str = CONFIRMED) -> list[LesionSegment]:
    """Give segments drawn by the reader (no lesion id yet, or a duplicated one) the next free lesion ids.

    A segment the reader drew is a lesion the reader saw, so it starts as ``confirmed``.
    """
    segmentation = segmentation_node.GetSegmentation()
    current = lesion_segments(segmentation_node)
    used: set[int] = set()
    for lesion in current:
        if lesion.lesion_id is not None and lesion.lesion_id not in used:
            used.add(lesion.lesion_id)
    next_id = max(used, default=0) + 1
    seen: set[int] = set()
    for lesion in current:
        if lesion.lesion_id is not None and lesion.lesion_id not in seen:
            seen.add(lesion.lesion_id)
            continue
        segment = segmentation.GetSegment(lesion.segment_id)
        segment.SetTag(LESION_ID_TAG, str(next_id))
        if lesion.lesion_id is None:
            segment.SetTag(STATUS_TAG, status)
            if not _has_tag(segment, segment.GetTerminologyEntryTagName()):
                segment.SetTag(segment.GetTerminologyEntryTagName(), PRL_TERMINOLOGY)
        logger.info("Segment '%s' is lesion %d.", lesion.name, next_id)
        seen.add(next_id)
        next_id += 1
    return lesion_segments(segmentation_node)


def _has_tag(segment, tag: str) -> bool:
    value = vtk.reference("")
    return bool(segment.GetTag(tag, value)) and bool(str(value))


def set_segment_from_array(segmentation_node, segment_id: str, mask: np.ndarray, reference_node) -> None:
    """Replace a segment's voxels by a (z, y, x) mask on ``reference_node``'s grid, as a paint or erase would."""
    ensure_segmentation_converters()
    array = (_array_on_reference(mask, reference_node) > 0).astype(np.uint8)
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"The segmentation has no segment '{segment_id}'.")
    scene = segmentation_node.GetScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    with _temporary_nodes(scene):
        labelmap = _labelmap_on(scene, reference_node, "__PRLDetector_edit__")
        slicer.util.updateVolumeFromArray(labelmap, array)
        # The voxels in the segmentation's own frame (its parent transform), as the Segment Editor gives them.
        image = logic.CreateOrientedImageDataFromVolumeNode(labelmap, segmentation_node.GetParentTransformNode())
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"Slicer could not replace the voxels of segment '{segment_id}'.")


def set_lesion_status(segmentation_node, segment_id: str, status: str) -> None:
    if status not in STATUSES:
        raise InputError(f"Status '{status}' is not one of {', '.join(STATUSES)}.")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"The segmentation has no segment '{segment_id}'; it may have been deleted. Update the burden.")
    segment.SetTag(STATUS_TAG, status)


def set_lesion_note(segmentation_node, segment_id: str, note: str) -> None:
    """The reader's note on a lesion, kept as a segment tag (so a saved ``.seg.nrrd`` carries it); one line."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"The segmentation has no segment '{segment_id}'; it may have been deleted. Update the burden.")
    segment.SetTag(NOTE_TAG, " ".join(str(note).split()))


_DETECT_SEGMENT_ID = re.compile(r"PRL_(\d+)")


def adopt_result_segments(segmentation_node, rows: Sequence[Mapping[str, object]]) -> None:
    """Tag the segments of a result's ``prl.seg.nrrd`` as lesions, as :func:`segmentation_from_labels` would.

    A file from a review already carries lesion ids, statuses and notes as tags. A file written by ``detect``
    names its segments ``PRL_<lesion id>``; their status and note come from ``rows`` (``lesions.csv``), or
    they are candidates.
    """
    by_id = {int(row["lesion_id"]): row for row in rows}
    segmentation = segmentation_node.GetSegmentation()
    for lesion in lesion_segments(segmentation_node):
        segment = segmentation.GetSegment(lesion.segment_id)
        lesion_id = lesion.lesion_id
        if lesion_id is None:
            match = _DETECT_SEGMENT_ID.fullmatch(lesion.segment_id)
            if match is None:
                continue  # drawn by a reader: claim_new_segments numbers it
            lesion_id = int(match.group(1))
            segment.SetTag(LESION_ID_TAG, str(lesion_id))
        row = by_id.get(lesion_id, {})
        if not _has_tag(segment, STATUS_TAG):
            status = str(row.get(STATUS_COLUMN) or CANDIDATE)
            segment.SetTag(STATUS_TAG, status if status in STATUSES else CANDIDATE)
        if not _has_tag(segment, NOTE_TAG) and row.get(NOTE_COLUMN):
            segment.SetTag(NOTE_TAG, str(row[NOTE_COLUMN]))


def segment_id_of_lesion(segmentation_node, lesion_id: int) -> str | None:
    for lesion in lesion_segments(segmentation_node):
        if lesion.lesion_id == lesion_id:
            return lesion.segment_id
    return None


def labels_from_segmentation(segmentation_node, reference_node, segment_ids: Sequence[str] | None = None) -> np.ndarray:
    """The segments as a uint16 (z, y, x) label map on ``reference_node``'s grid: segment n → value n (1-based).

    ``segment_ids`` picks and orders the segments (default: all, in segmentation order). Where segments
    overlap, the later one wins. A segment in several pieces keeps one value.
    """
    ensure_segmentation_converters()
    if segment_ids is None:
        segment_ids = [s.segment_id for s in lesion_segments(segmentation_node)]
    shape = tuple(reversed(reference_node.GetImageData().GetDimensions()))
    if not segment_ids:
        return np.zeros(shape, dtype=np.uint16)
    scene = segmentation_node.GetScene()
    with _temporary_nodes(scene):
        labelmap = _labelmap_on(scene, reference_node, "__PRLDetector_export__")
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        )
        if not ok:
            raise RuntimeError("Slicer could not export the segments to a label map.")
        array = np.array(slicer.util.arrayFromVolume(labelmap), dtype=np.uint16, copy=True)
    if array.shape != shape:
        raise RuntimeError(f"The exported label map is {array.shape}, not the reference grid {shape}.")
    return array


def centre_slice_views(scene, ras: Sequence[float]) -> None:
    """Centre every slice view on a point (world RAS) and move each slice through it, as Slicer's jump does."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *[float(c) for c in ras], slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def slice_centre_ras(slice_node) -> tuple[float, float, float]:
    """The point at the centre of a slice view (world RAS); its slice passes through it."""
    matrix = slice_node.GetSliceToRAS()
    return tuple(float(matrix.GetElement(row, 3)) for row in range(3))


def segment_center_ras(segmentation_node, segment_id: str) -> tuple[float, float, float] | None:
    """Centre of a segment in world RAS (None for an empty segment)."""
    center = segmentation_node.GetSegmentCenterRAS(segment_id)
    return None if center is None else tuple(float(c) for c in center)


def write_segmentation_file(segmentation_node, path: str | Path) -> Path:
    """Save as ``.seg.nrrd`` on the reference grid, not cropped, so it overlays the QSM one to one."""
    path = Path(path)
    scene = segmentation_node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(str(path))
        storage.SetCropToMinimumExtent(False)
        storage.SetUseCompression(True)
        if not storage.WriteData(segmentation_node):
            raise InputError(f"The segmentation could not be written to '{path}'; check that the folder is writable.")
    finally:
        scene.RemoveNode(storage)
    return path


def read_segmentation_file(scene, path: str | Path, name: str | None = None):
    """Load a ``.seg.nrrd`` into a new segmentation node."""
    ensure_segmentation_converters()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The segmentation '{path}' does not exist; check the path.")
    import slicerio

    try:
        # MRML's reader aborts the whole process on some malformed files (measured on slicer-core 5.11):
        # read it once in Python first, so a broken file is a sentence, not a crash.
        slicerio.read_segmentation(str(path))
    except Exception:  # slicerio and pynrrd raise plain exceptions for malformed files
        raise InputError(f"'{path.name}' is not a segmentation Slicer can read; save it again as .seg.nrrd.") from None
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name.removesuffix(".seg.nrrd"))
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise InputError(f"'{path.name}' is not a segmentation Slicer can read; save it again as .seg.nrrd.")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def _labelmap_on(scene, reference_node, name: str):
    """A temporary label map node on ``reference_node``'s grid *where the reference is in the world*: under the
    same parent transform. Slicer maps between a label map and a segmentation through their transforms, so a
    label map outside the reference's transform would move the lesions by that transform (twice on a round trip).
    """
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    labelmap.CopyOrientation(reference_node)
    transform = reference_node.GetParentTransformNode()
    if transform is not None:
        labelmap.SetAndObserveTransformNodeID(transform.GetID())
    return labelmap


def remove_nodes(scene, nodes: Iterable) -> None:
    """Remove nodes and what belongs to them only (display and storage nodes), as Slicer's Data module does."""
    for node in nodes:
        if node is None or node.GetScene() is not scene:
            continue
        owned = []
        if node.IsA("vtkMRMLDisplayableNode"):
            owned += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            owned += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for item in owned:
            if item is not None and item.GetScene() is scene:
                scene.RemoveNode(item)


@contextmanager
def _temporary_nodes(scene):
    """Remove every node added to the scene inside the block (a temporary volume, its display and colours)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and not node.IsA("vtkMRMLSubjectHierarchyNode"):
                scene.RemoveNode(node)


# -- subject hierarchy ---------------------------------------------------------------------------------


def place_next_to(scene, node, reference_node) -> None:
    """Put ``node`` in the subject-hierarchy folder or study that holds ``reference_node``."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    reference_item = _item_of(hierarchy, reference_node)
    item = _item_of(hierarchy, node)
    parent = hierarchy.GetItemParent(reference_item)
    if parent and item and parent != hierarchy.GetItemParent(item):
        hierarchy.SetItemParent(item, parent)


def _item_of(hierarchy, node) -> int:
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        # Inside Slicer every node gets an item when added; on slicer-core nothing does that for us.
        item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    return item


# -- lesion table ----------------------------------------------------------------------------------------


def _lesion_column_types() -> dict[str, type]:
    """int or float for every lesion column, read from the LesionFeatures fields in column order."""
    types: dict[str, type] = {}
    columns = iter(LESION_COLUMNS)
    for field in fields(LesionFeatures):
        annotation = str(field.type)
        kind = int if "int" in annotation.replace("tuple", "") else float
        width = annotation.count(",") + 1 if annotation.startswith("tuple") else 1
        for _ in range(width):
            types[next(columns)] = kind
    return types


COLUMN_TYPES: dict[str, type] = {**_lesion_column_types(), STATUS_COLUMN: str, NOTE_COLUMN: str}


def _number(value: object) -> float:
    try:
        return float(value)  # lesions.csv gives extra columns as text; an empty cell is "not measured"
    except (TypeError, ValueError):
        return math.nan


def lesion_from_row(row: Mapping[str, object]) -> LesionFeatures:
    """Rebuild the LesionFeatures of a table row (the inverse of ``LesionFeatures.as_row``)."""
    columns = iter(LESION_COLUMNS)
    values = {}
    for field in fields(LesionFeatures):
        annotation = str(field.type)
        if annotation.startswith("tuple"):
            width = annotation.count(",") + 1
            values[field.name] = tuple(COLUMN_TYPES[c](row[c]) for c in [next(columns) for _ in range(width)])
        else:
            column = next(columns)
            values[field.name] = COLUMN_TYPES[column](row[column])
    return LesionFeatures(**values)


def extra_columns(rows: Sequence[Mapping[str, object]]) -> list[str]:
    """Columns of the rows beyond :data:`TABLE_COLUMNS` (added to ``lesions.csv`` by another tool), in order."""
    extra: dict[str, None] = {}
    for row in rows:
        extra.update((column, None) for column in row if column not in COLUMN_TYPES)
    return list(extra)


def lesion_table_node(scene, rows: Sequence[Mapping[str, object]], name: str, table_node=None):
    """Fill (or create) a table node with the lesion rows: the lesions.csv columns, ``status`` and ``note``,
    then any other column of the rows as text.

    Columns keep their machine names (scripts and exports read them); the table shows the reader's headers
    (:mod:`~PRLDetectorLib.detection.headers`) and, when the rows have a PRL probability, the most probable
    lesion first.
    """
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    columns = TABLE_COLUMNS
    rows = headers.view_rows(rows)
    table = vtk.vtkTable()
    for column in (*columns, *extra_columns(rows)):
        kind = COLUMN_TYPES.get(column, str)
        array = vtk.vtkStringArray() if kind is str else vtk.vtkIntArray() if kind is int else vtk.vtkDoubleArray()
        array.SetName(column)
        array.SetNumberOfValues(len(rows))
        for index, row in enumerate(rows):
            value = row.get(column, CANDIDATE if column == STATUS_COLUMN else "" if kind is str else math.nan)
            if kind is str:
                array.SetValue(index, str(value))
            elif kind is int:
                array.SetValue(index, int(value))
            else:
                array.SetValue(index, _number(value))
        table.AddColumn(array)
    was_modifying = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    for column in columns:
        table_node.SetColumnTitle(column, headers.header(column))
        table_node.SetColumnDescription(column, f"{column} in lesions.csv")  # the header's tooltip
        if headers.unit(column):
            table_node.SetColumnUnitLabel(column, headers.unit(column))
    # Statuses change through Confirm/Reject so that the segment tags stay the truth; measurements are
    # measurements. Nobody types into this table.
    table_node.SetLocked(True)
    table_node.EndModify(was_modifying)
    return table_node


def hidden_columns(table_node) -> set[str]:
    """Columns of the table node the panel does not show (see :func:`headers.hidden_in_view`)."""
    return headers.hidden_in_view(rows_from_table(table_node)) if table_node is not None else set()


def rows_from_table(table_node) -> list[dict[str, object]]:
    table = table_node.GetTable()
    columns = [table.GetColumn(i) for i in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row: dict[str, object] = {}
        for column in columns:
            name = column.GetName()
            kind = COLUMN_TYPES.get(name, str)
            value = column.GetValue(r)
            row[name] = str(value) if kind is str else kind(value)
        rows.append(row)
    return rows


def link_table(segmentation_node, table_node) -> None:
    segmentation_node.SetNodeReferenceID(TABLE_REFERENCE_ROLE, table_node.GetID())
    table_node.SetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE, segmentation_node.GetID())


def linked_table(segmentation_node):
    return segmentation_node.GetNodeReference(TABLE_REFERENCE_ROLE) if segmentation_node else None


def linked_segmentation(table_node):
    return table_node.GetNodeReference(SEGMENTATION_REFERENCE_ROLE) if table_node else None


def reference_volume(segmentation_node):
    return segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())


def rows_with_status(lesions: Iterable[LesionFeatures], statuses: Mapping[int, str]) -> list[dict[str, object]]:
    return [{**lesion.as_row(), STATUS_COLUMN: statuses.get(lesion.lesion_id, CANDIDATE)} for lesion in lesions]


def burden_from_rows(rows: Sequence[Mapping[str, object]]) -> Burden:
    """The burden of the lesions the reader did not reject."""
    lesions = [lesion_from_row(row) for row in rows]
    rejected = [int(row["lesion_id"]) for row in rows if row.get(STATUS_COLUMN) == REJECTED]
    return compute_burden(lesions, excluded_ids=rejected)


def burden_from_table(table_node) -> Burden:
    return burden_from_rows(rows_from_table(table_node))
