"""A result folder's images read back for a reader: the QSM, and the FLAIR on the QSM grid as detection
aligned it, with the windows they are shown in (the patient report and the review page).

``detect`` records the paths of its inputs in ``burden.json`` (``inputs``) and, for FLAIR, the alignment it
made (``flair_alignment``); nothing here registers again unless that record cannot say.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import RESULT_MARKER

logger = logging.getLogger(__name__)

QSM_WINDOW_PPM = (-0.15, 0.25)
"""QSM is shown from −0.15 to 0.25 ppm: paramagnetic rims bright, white matter mid-grey."""
FLAIR_PERCENTILES = (1.0, 99.5)
"""FLAIR has no unit: its window runs between these percentiles of the brain's values."""


@dataclass(frozen=True)
class ResultImages:
    qsm: sitk.Image
    flair: sitk.Image | None
    """On the QSM grid; None when detection had no FLAIR and none was given."""
    brain: np.ndarray
    """(z, y, x) head mask of the QSM."""
    flair_window: tuple[float, float] | None


def read_result_images(result_dir: str | Path, record: dict, flair_path: str | Path | None = None,
                       qsm_path: str | Path | None = None) -> ResultImages:
    """The QSM detection read (from the recorded path, or ``qsm_path``: the same QSM moved), and FLAIR (the
    recorded one, or ``flair_path``) on the QSM grid.

    A FLAIR that detection used is placed exactly as detection recorded it; another FLAIR (a QSM-only
    model's patient may have one) is aligned as detection would align it (the alignment is deterministic).
    """
    from PRLDetectorLib.detection.images import head_mask, read_image

    inputs = record.get("inputs", {})
    if qsm_path is None and "qsm" not in inputs:
        raise InputError(f"{Path(result_dir) / RESULT_MARKER} names no QSM input; run detection again for this patient.")
    qsm_path = Path(qsm_path or inputs["qsm"]["path"])
    if not qsm_path.exists():
        raise InputError(
            f"The QSM of '{result_dir}' is no longer at {qsm_path}; put it back there (burden.json records that path)."
        )
    qsm = read_image(qsm_path, "QSM")
    brain = head_mask(sitk.GetArrayViewFromImage(qsm))
    recorded = inputs.get("flair", {}).get("path")
    flair_path = flair_path or recorded
    if not flair_path:
        return ResultImages(qsm, None, brain, None)
    if not Path(flair_path).exists():
        raise InputError(f"The FLAIR of '{result_dir}' is no longer at {flair_path}; put it back there.")
    from PRLDetectorLib.detection.registration import flair_as_recorded, flair_to_qsm_grid

    original = read_image(flair_path, "FLAIR")
    same_file = str(flair_path) == str(recorded)
    flair = flair_as_recorded(original, qsm, record.get("flair_alignment")) if same_file else None
    if flair is None:
        flair, _ = flair_to_qsm_grid(original, qsm)
    values = sitk.GetArrayViewFromImage(flair)[brain]
    window = None
    if values.size:
        low, high = np.percentile(values, FLAIR_PERCENTILES)
        window = (float(low), float(high if high > low else low + 1))
    return ResultImages(qsm, flair, brain, window)
