"""nnU-Net v2 raw datasets: phantom cohorts for training, and the annotator's corrected cases for retraining.

Layout (nnU-Net's own): ``imagesTr/<case>_0000.nii.gz`` (QSM), ``imagesTr/<case>_0001.nii.gz`` (FLAIR, on
the QSM grid and masked to the QSM brain, exactly as :mod:`PRLDetectorLib.detection.pipeline` feeds it at inference),
``labelsTr/<case>.nii.gz`` (0 background, 1 PRL) and ``dataset.json``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.detection.images import read_image, validate_flair, validate_qsm
from PRLDetectorLib.detection.models import CHANNEL_NAMES, channel_role
from PRLDetectorLib.detection.registration import flair_channel
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import atomic_path

logger = logging.getLogger(__name__)

CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def dataset_json(channels: tuple[str, ...], n_cases: int, description: str = "") -> dict:
    return {
        "channel_names": {str(i): CHANNEL_NAMES[c] for i, c in enumerate(channels)},
        "labels": {"background": 0, "prl": 1},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "description": description or "Paramagnetic rim lesions (whole lesion) on QSM",
    }


def _channels_of(dataset_dir: Path) -> tuple[str, ...] | None:
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        return None
    names = json.loads(path.read_text(encoding="utf-8"))["channel_names"]
    return tuple(channel_role(names[k]) for k in sorted(names, key=int))


def model_inputs(qsm: sitk.Image, flair: sitk.Image | None) -> dict[str, sitk.Image]:
    """The network's input channels for one case, as at inference: FLAIR on the QSM grid, masked to the brain."""
    qsm, _ = validate_qsm(qsm)
    out = {"qsm": qsm}
    if flair is not None:
        flair, _ = validate_flair(flair)
        out["flair"], _ = flair_channel(flair, qsm)
    return out


def next_case_id(dataset_dir: str | Path) -> str:
    """The first ``case_NNNN`` the dataset does not hold yet (a case is in when its label is)."""
    labels_dir = Path(dataset_dir) / "labelsTr"
    taken = {p.name.removesuffix(".nii.gz") for p in labels_dir.glob("*.nii.gz")} if labels_dir.is_dir() else set()
    return next(f"case_{i:04d}" for i in range(len(taken) + 1) if f"case_{i:04d}" not in taken)


def add_case(
    dataset_dir: str | Path, qsm: sitk.Image, mask: sitk.Image | np.ndarray, flair: sitk.Image | None = None,
    case_id: str | None = None,
) -> str:
    """Add one case (QSM [+ FLAIR] + PRL mask on the QSM grid) to a raw dataset; return its case id.

    The first case fixes the dataset's channels; later cases must bring the same ones. An existing case id
    is never overwritten.
    """
    dataset_dir = Path(dataset_dir)
    channels = ("qsm", "flair") if flair is not None else ("qsm",)
    existing = _channels_of(dataset_dir)
    if existing is not None and existing != channels:
        want = " + ".join(c.upper() for c in existing)
        raise InputError(f"The dataset '{dataset_dir.name}' takes {want}; give the same inputs for every case.")
    if isinstance(mask, sitk.Image):
        if mask.GetSize() != qsm.GetSize():
            raise InputError("The mask is not on the QSM grid; resample it onto the QSM first.")
        mask = sitk.GetArrayFromImage(mask)
    if mask.shape != sitk.GetArrayViewFromImage(qsm).shape:
        raise InputError("The mask is not on the QSM grid; resample it onto the QSM first.")
    images_dir, labels_dir = dataset_dir / "imagesTr", dataset_dir / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    if case_id is None:
        case_id = next_case_id(dataset_dir)
    if not CASE_ID.match(case_id):
        raise InputError(f"The case id '{case_id}' has characters nnU-Net cannot use; use letters, digits, _ and -.")
    if (labels_dir / f"{case_id}.nii.gz").exists():
        raise InputError(f"The dataset already holds a case '{case_id}'; choose another case id.")

    inputs = model_inputs(qsm, flair)
    label = sitk.GetImageFromArray((np.asarray(mask) > 0).astype(np.uint8))
    label.CopyInformation(inputs["qsm"])
    for index, channel in enumerate(channels):
        with atomic_path(images_dir / f"{case_id}_{index:04d}.nii.gz") as partial:
            sitk.WriteImage(inputs[channel], str(partial), True)
    # The label last: its presence means the case is in (the next case id is chosen by the labels).
    with atomic_path(labels_dir / f"{case_id}.nii.gz") as partial:
        sitk.WriteImage(label, str(partial), True)
    n_cases = len(list(labels_dir.glob("*.nii.gz")))
    with atomic_path(dataset_dir / "dataset.json") as partial:
        partial.write_text(json.dumps(dataset_json(channels, n_cases), indent=2), encoding="utf-8")
    logger.info("Added %s to %s (%d cases)", case_id, dataset_dir, n_cases)
    return case_id


def add_case_files(
    dataset_dir: str | Path, qsm_path: str | Path, mask_path: str | Path, flair_path: str | Path | None = None,
    case_id: str | None = None,
) -> str:
    """:func:`add_case` from files; the mask may be a label map or a ``.seg.nrrd`` (any segment = PRL)."""
    from PRLDetectorLib.exports.segments import read_mask

    qsm = read_image(qsm_path, "QSM")
    flair = read_image(flair_path, "FLAIR") if flair_path else None
    mask = read_mask(mask_path, qsm)
    return add_case(dataset_dir, qsm, mask, flair, case_id)
