"""DICOM SEG export of the PRLs, for a QSM that came from a DICOM series: the result goes back to PACS.

The SEG references the QSM series it was found on (same patient, study and frame of reference), one
segment per lesion (``PRL 1`` … ``PRL n``, SNOMED "Lesion", algorithm type AUTOMATIC, ``PRLDetector`` as
the algorithm), one frame per source slice that holds the lesion. A patient without PRLs gets a SEG
with one empty segment, so that "none found" is a result PACS shows too, not a missing file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib import __version__
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import LABELS_NAME

logger = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 9900
NONE_FOUND_LABEL = "PRL (none found)"
_GRID_TOLERANCE_VOXELS = 0.01


def read_series_datasets(dicom_folder: Path) -> list:
    """The pydicom datasets of the one DICOM series in ``dicom_folder``, in SimpleITK's slice order."""
    import pydicom

    dicom_folder = Path(dicom_folder)
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(dicom_folder)) or ()
    if len(series_ids) != 1:
        raise InputError(
            f"'{dicom_folder}' holds {len(series_ids)} DICOM series; the SEG needs the folder of the one QSM "
            "series the PRLs were found on."
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom_folder), series_ids[0])
    return [pydicom.dcmread(name) for name in files]


def write_dicom_seg(
    labels: sitk.Image, dicom_folder: Path, out_path: Path, lesion_names: Mapping[int, str] | None = None
) -> Path:
    """Write the lesion-id map ``labels`` (on the grid of the series in ``dicom_folder``) as a DICOM SEG.

    ``lesion_names`` maps lesion ids to segment labels (default ``PRL <id>``). Segments are numbered
    1..n in ascending lesion id.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets = read_series_datasets(dicom_folder)
    values = sitk.GetArrayFromImage(labels)
    frames = _frames_of(labels, values, datasets, Path(dicom_folder))
    ids = [int(i) for i in np.unique(values) if i != 0]
    names = lesion_names or {}
    algorithm = hd.AlgorithmIdentificationSequence(
        name="PRLDetector", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )

    def describe(number: int, label: str) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )

    if ids:
        # Segment numbers must run 1..n: map lesion ids onto them in ascending order.
        lookup = np.zeros(int(values.max()) + 1, dtype=np.uint16)
        lookup[ids] = np.arange(1, len(ids) + 1)
        pixel_array = lookup[frames]
        descriptions = [describe(n, names.get(i, f"PRL {i}")) for n, i in enumerate(ids, start=1)]
    else:
        pixel_array = np.zeros_like(frames, dtype=np.uint8)
        descriptions = [describe(1, NONE_FOUND_LABEL)]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="PRLDetector",
        manufacturer_model_name="PRLDetector nnU-Net v2",
        software_versions=__version__,
        device_serial_number="0",
        series_description="PRLs (PRLDetector)",
        content_label="PRL",
        content_description="Paramagnetic rim lesions",
        omit_empty_frames=bool(ids),
    )
    out_path = Path(out_path)
    seg.save_as(out_path)
    logger.info("Wrote DICOM SEG %s: %d segment(s) over %d source slice(s)", out_path, len(descriptions), len(datasets))
    return out_path


def _frames_of(labels: sitk.Image, values: np.ndarray, datasets: list, folder: Path) -> np.ndarray:
    """The label slice under each source dataset, in the datasets' order: (n_datasets, rows, columns)."""
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    if labels.GetSize()[:2] != (columns, rows) or labels.GetSize()[2] != len(datasets):
        raise InputError(
            f"The PRL labels ({'×'.join(map(str, labels.GetSize()))}) are not on the grid of the DICOM series in "
            f"'{folder.name}' ({columns}×{rows}×{len(datasets)}); export the SEG from the result of that series."
        )
    frames = np.empty((len(datasets), rows, columns), dtype=values.dtype)
    for n, dataset in enumerate(datasets):
        position = tuple(float(v) for v in dataset.ImagePositionPatient)
        index = labels.TransformPhysicalPointToContinuousIndex(position)
        k = int(round(index[2]))
        if max(abs(index[0]), abs(index[1]), abs(index[2] - k)) > _GRID_TOLERANCE_VOXELS or not 0 <= k < len(datasets):
            raise InputError(
                f"Slice {n + 1} of the DICOM series in '{folder.name}' does not lie on the grid of the PRL labels; "
                "export the SEG from the result of that series."
            )
        frames[n] = values[k]
    return frames


def write_result_dicom_seg(result_dir: Path, dicom_folder: Path, out_path: Path) -> Path:
    """The SEG of a result folder of ``detect`` (``prl_labels.nii.gz``) on the QSM series it came from."""
    labels = sitk.ReadImage(str(Path(result_dir) / LABELS_NAME))
    return write_dicom_seg(labels, dicom_folder, out_path)
