"""The result folder of one patient: its file names, and the one way every writer puts files on disk.

``detect`` (and each patient of ``batch``) writes :data:`RESULT_FILES` into a folder at once; the marker,
``burden.json``, means "finished". A Slicer review export writes the same files (:data:`EXPORT_FILES`).

:func:`atomic_path` is the only write-to-temp-then-rename in the library: the pipeline's result folder, the
batch's cohort tables and exports, the Slicer export, the training dataset and the model folders all use it,
so a failure (or Ctrl-C) never leaves a half-written file or folder under the final name.

This module imports nothing heavy: every Dask worker (also those that only make reports) imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LABELS_NAME = "prl_labels.nii.gz"
"""Lesion ids on the QSM grid (0 = background)."""
SEGMENTATION_NAME = "prl.seg.nrrd"
"""The lesions as Slicer segments, one per lesion."""
LESIONS_NAME = "lesions.csv"
"""One row per lesion (:data:`PRLDetectorLib.detection.features.LESION_COLUMNS`)."""
BURDEN_NAME = "burden.json"
"""The patient's burden and how it was obtained; written with the rest, so its presence means finished."""

RESULT_FILES = (LABELS_NAME, SEGMENTATION_NAME, LESIONS_NAME, BURDEN_NAME)
"""The files of a ``detect`` result folder."""
RESULT_MARKER = BURDEN_NAME
"""Its presence means the patient is finished (the folder appears whole, see :func:`atomic_path`)."""
EXPORT_FILES = (LESIONS_NAME, BURDEN_NAME, SEGMENTATION_NAME, LABELS_NAME)
"""The files a Slicer review export writes: the result files, in the order the panel names them."""
CANDIDATES_NAME = "candidates.csv"
"""Stage 2's candidates (one row each: PRL probability, uncertainty, the lesion it became, its features);
written when the lesion classifier ran. ``prl-detect train-classifier`` learns from it and the reader's
statuses."""
REPORT_NAME = "report.html"
"""A patient's (or a cohort's) HTML report, next to the result files."""
DICOM_SEG_NAME = "prl_seg.dcm"
"""A DICOM SEG of the lesions on the QSM series, next to the result files."""

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """A temporary file (or, with ``folder``, folder) next to ``path`` that replaces ``path`` when the block succeeds.

    Write into the yielded path; on success it takes the place of ``path`` in one rename (an existing folder
    is moved aside first and removed after), on any failure it is removed and ``path`` is untouched. The
    temporary name keeps the file's extensions, so writers that choose a format by extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.partial-"
    if folder:
        partial = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix="".join(path.suffixes), dir=path.parent)
        os.close(handle)
        partial = Path(name)
    try:
        yield partial
        if folder:
            _replace_folder(partial, path)
        else:
            os.chmod(partial, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the permissions a plain open() would
            os.replace(partial, path)
    finally:
        if folder:
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _replace_folder(staging: Path, path: Path) -> None:
    if path.exists():
        retired = path.with_name(f".{path.name}.replaced-{time.time_ns()}")
        path.rename(retired)
        staging.rename(path)
        shutil.rmtree(retired)
    else:
        staging.rename(path)
