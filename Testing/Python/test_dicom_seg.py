"""DICOM SEG export: PRLs go back to PACS as a SEG that references the QSM series they were found on."""

from __future__ import annotations

import random

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from PRLDetectorLib.detection.images import read_image
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.exports.dicom_seg import NONE_FOUND_LABEL, write_dicom_seg

SHAPE_ZYX = (6, 20, 24)
SPACING_XYZ = (0.8, 0.9, 1.5)
ORIGIN = (-10.0, 20.0, 30.0)


def write_mr_series(folder, shape_zyx=SHAPE_ZYX, spacing_xyz=SPACING_XYZ, origin=ORIGIN, shuffle_names=True,
                    values_ppm=None):
    """An MR series of single-frame files, QSM stored as int16 with a rescale of 0.001 ppm per unit.

    ``values_ppm`` (z, y, x) gives the QSM; by default it is noise.
    """
    if values_ppm is not None:
        shape_zyx = values_ppm.shape
    folder.mkdir(parents=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    slices = list(range(shape_zyx[0]))
    names = list(range(shape_zyx[0]))
    if shuffle_names:
        random.Random(1).shuffle(names)  # file order must not matter
    for k, name in zip(slices, names, strict=True):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"im{name:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^One", "P001", "19800101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20260101", "120000", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 5, k + 1
        ds.Manufacturer = "Test"
        ds.ImageType = ["DERIVED", "PRIMARY", "QSM"]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing_xyz[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing_xyz[1], spacing_xyz[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing_xyz[2]
        ds.Rows, ds.Columns = shape_zyx[1], shape_zyx[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 0.001
        pixels = (
            rng.integers(-100, 200, size=shape_zyx[1:], dtype=np.int16) if values_ppm is None
            else np.round(values_ppm[k] * 1000).astype(np.int16)
        )
        ds.PixelData = pixels.tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return folder


def labels_on(folder) -> sitk.Image:
    """Two lesions on the series grid: id 1 over slices 1-2, id 2 on slice 4 only."""
    reference = read_image(folder, "QSM")
    values = np.zeros(SHAPE_ZYX, dtype=np.uint16)
    values[1:3, 5:9, 6:10] = 1
    values[4, 12:15, 15:18] = 2
    labels = sitk.GetImageFromArray(values)
    labels.CopyInformation(reference)
    return labels


def test_the_seg_has_one_segment_per_lesion_on_the_frames_of_the_source_slices(tmp_path):
    folder = write_mr_series(tmp_path / "qsm")
    out = write_dicom_seg(labels_on(folder), folder, tmp_path / "prl_seg.dcm", {2: "PRL 2 (juxtacortical)"})

    seg = hd.seg.segread(out)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 2
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["PRL 1", "PRL 2 (juxtacortical)"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    source = pydicom.dcmread(next(folder.iterdir()))
    assert seg.PatientID == "P001" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    # Lesion 1 covers two slices, lesion 2 one: three frames, at the z of those slices.
    assert seg.NumberOfFrames == 3
    positions = sorted(
        (int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
         round(float(f.PlanePositionSequence[0].ImagePositionPatient[2]), 3))
        for f in seg.PerFrameFunctionalGroupsSequence
    )
    assert positions == [(1, 31.5), (1, 33.0), (2, 36.0)]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([0.9, 0.8])


def test_the_seg_pixels_read_back_as_the_lesions_on_the_source_slices(tmp_path):
    folder = write_mr_series(tmp_path / "qsm")
    labels = labels_on(folder)
    seg = hd.seg.segread(write_dicom_seg(labels, folder, tmp_path / "prl_seg.dcm"))

    by_uid = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in folder.iterdir()}
    expected = sitk.GetArrayFromImage(labels)
    for uid, dataset in by_uid.items():
        k = round((float(dataset.ImagePositionPatient[2]) - ORIGIN[2]) / SPACING_XYZ[2])
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid], segment_numbers=[1, 2], combine_segments=True,
            skip_overlap_checks=True, relabel=True,
        )[0]
        np.testing.assert_array_equal(mask, expected[k])


def test_a_patient_without_prls_gets_a_seg_saying_none_were_found(tmp_path):
    folder = write_mr_series(tmp_path / "qsm")
    labels = labels_on(folder) * 0
    seg = hd.seg.segread(write_dicom_seg(labels, folder, tmp_path / "prl_seg.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [NONE_FOUND_LABEL]
    assert seg.NumberOfFrames == SHAPE_ZYX[0]


def test_labels_on_another_grid_are_an_input_error(tmp_path):
    folder = write_mr_series(tmp_path / "qsm")
    wrong = sitk.Image(24, 20, 5, sitk.sitkUInt16)
    with pytest.raises(InputError, match="not on the grid of the DICOM series"):
        write_dicom_seg(wrong, folder, tmp_path / "prl_seg.dcm")


def test_a_finished_batch_patient_with_a_dicom_qsm_gets_its_seg_when_the_batch_resumes(tmp_path):
    from PRLDetectorLib.cohort.batch import Case, CaseExports, process_case
    from PRLDetectorLib.results import DICOM_SEG_NAME
    from PRLDetectorLib.settings import DetectionSettings

    folder = write_mr_series(tmp_path / "cases" / "p1" / "qsm")
    result = tmp_path / "out" / "p1"
    result.mkdir(parents=True)
    sitk.WriteImage(labels_on(folder), str(result / "prl_labels.nii.gz"))  # through NIfTI, as detect writes it
    (result / "burden.json").write_text("{}", encoding="utf-8")

    outcome = process_case(
        Case("p1", folder, None), tmp_path / "out", DetectionSettings(model="no-such-model"), CaseExports(dicom_seg=True)
    )
    assert outcome.status == "skipped", outcome.reason
    seg = hd.seg.segread(result / DICOM_SEG_NAME)
    assert seg.number_of_segments == 2 and seg.NumberOfFrames == 3
    assert [p.name for p in result.iterdir() if p.name.startswith(".")] == []  # no partial file left


def test_detect_with_dicom_seg_refuses_a_qsm_file_before_detecting(tmp_path):
    from PRLDetectorLib.cli.main import build_parser

    # No QSM file, no model: the refusal must come before anything of the detection is tried.
    out = tmp_path / "x"
    args = build_parser().parse_args(["detect", "--qsm", str(tmp_path / "qsm.nii.gz"), "--out", str(out), "--dicom-seg",
                                      "--model", "no-such-model"])
    with pytest.raises(InputError, match="DICOM series folder"):
        args.func(args)
    assert not out.exists()
