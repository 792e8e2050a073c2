"""Result folders as ``detect`` writes them, made from a phantom's ground truth instead of a network.

Reports, BIDS derivatives and the batch's resume logic only read result folders, so their tests need no
model: the "prediction" here is the true PRL map, measured and written by the real pipeline functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.detection.burden import compute_burden
from PRLDetectorLib.detection.features import measure_lesions
from PRLDetectorLib.detection.lesions import relabel_consecutive
from PRLDetectorLib.detection.models import ModelInfo
from PRLDetectorLib.detection.pipeline import DetectionResult, write_result
from PRLDetectorLib.settings import DetectionSettings

TINY_EXTENT_MM = (64.0, 72.0, 56.0)
TRUTH_MODEL = ModelInfo(name="truth", path=Path("truth"), channels=("qsm",), folds=("0",), card={"version": "test"})


def write_phantom(folder: Path, case_id: str, seed: int, n_prl: int, with_flair: bool = True) -> Path:
    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    return write_case(generate_case(case_id, seed=seed, with_flair=with_flair, extent_mm=TINY_EXTENT_MM, n_prl=n_prl), folder)


def write_truth_result(qsm_path: Path, gt_prl: Path, gt_instances: Path, out_dir: Path, flair_path: Path | None = None,
                       model: ModelInfo = TRUTH_MODEL) -> Path:
    """Write ``out_dir`` as detect would have with ``model``, had it found exactly the true PRLs."""
    qsm = sitk.ReadImage(str(qsm_path), sitk.sitkFloat32)
    prl = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_prl))) > 0
    instances = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_instances)))
    labels = relabel_consecutive(np.where(prl, instances, 0), by_volume=True).astype(np.uint16)
    lesions = measure_lesions(labels, sitk.GetArrayViewFromImage(qsm), qsm, labels > 0)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(qsm)
    probability = sitk.GetImageFromArray((labels > 0).astype(np.float32))
    probability.CopyInformation(qsm)
    result = DetectionResult(
        labels=label_image, probability=probability, lesions=lesions, burden=compute_burden(lesions),
        model=model, settings=DetectionSettings(),
    )
    inputs = {"qsm": qsm_path, **({"flair": flair_path} if flair_path else {})}
    return write_result(result, out_dir, inputs)


def write_truth_result_of_case(case_dir: Path, out_dir: Path, with_flair: bool = True,
                               model: ModelInfo = TRUTH_MODEL) -> Path:
    flair = case_dir / "flair.nii.gz"
    return write_truth_result(
        case_dir / "qsm.nii.gz", case_dir / "gt_prl.nii.gz", case_dir / "gt_instances.nii.gz", out_dir,
        flair if with_flair and flair.is_file() else None, model,
    )
