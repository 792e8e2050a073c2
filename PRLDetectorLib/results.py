"""The result folder of one patient: its file names, and the one way every writer puts files on disk.

``detect`` (and each patient of ``batch``) writes :data:`RESULT_FILES` into a folder at once; the marker,
``burden.json``, means "finished". A Slicer review export writes the same files (:data:`EXPORT_FILES`).

:func:`atomic_path` is the only write-to-temp-then-rename in the library: the pipeline's result folder, the
batch's cohort tables and exports, the Slicer export, the training dataset and the model folders all use it,
so a failure (or Ctrl-C) never leaves a half-written file or folder under the final name.

This module imports nothing heavy: every Dask worker (also those that only make reports) imports it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PRLDetectorLib.errors import InputError

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



def read_record(result_dir: str | Path) -> dict:
    """The ``burden.json`` of a result folder: the burden and how it was obtained (inputs, model, settings)."""
    marker = Path(result_dir) / RESULT_MARKER
    if not marker.is_file():
        raise InputError(f"'{result_dir}' holds no {RESULT_MARKER}; give the output folder of detect or of one batch patient.")
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"'{marker}' is not readable JSON ({error}); run detection again for this patient.") from None


def patient_folders(out_dir: str | Path) -> list[Path]:
    """The patients of a batch output: its sub-folders that hold a finished result, sorted by name."""
    out_dir = Path(out_dir)
    return sorted(p for p in out_dir.iterdir() if (p / RESULT_MARKER).is_file()) if out_dir.is_dir() else []


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path, folder: bool = False, replace: bool | None = None) -> Iterator[Path]:
    """A temporary file (or, with ``folder``, folder) next to ``path`` that becomes ``path`` when the block succeeds.

    Write into the yielded path; on success it takes the place of ``path`` in one rename, on any failure it
    is removed and ``path`` is untouched. The temporary name keeps the file's extensions, so writers that
    choose a format by extension work. Both get the permissions the umask gives a plain ``open``/``mkdir``.

    ``replace``: whether an existing ``path`` may be replaced (an existing folder is moved aside first and
    removed after). By default a file is replaced and a folder is not: a folder is created exclusively, so
    of two runs writing the same folder one wins and the other gets an :class:`InputError`, and nothing is
    replaced that the caller did not ask to replace.
    """
    path = Path(path)
    replace = not folder if replace is None else replace
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.partial-"
    if folder:
        partial = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        os.chmod(partial, 0o777 & ~_UMASK)  # mkdtemp makes 0700, which other users of a shared server cannot open
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix="".join(path.suffixes), dir=path.parent)
        os.close(handle)
        partial = Path(name)
        os.chmod(partial, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the permissions a plain open() would
    try:
        yield partial
        if replace:
            _replace(partial, path, folder)
        else:
            _create(partial, path)
    finally:
        if folder:
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _replace(staging: Path, path: Path, folder: bool) -> None:
    if folder and path.exists():
        retired = path.with_name(f".{path.name}.replaced-{time.time_ns()}")
        path.rename(retired)
        staging.rename(path)
        shutil.rmtree(retired)
    else:
        os.replace(staging, path)


def _create(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path`` only if nothing is there (an empty folder holds nothing to lose)."""
    appeared = InputError(
        f"'{path}' was written by another run while this one worked (the same output twice?); it is left as it "
        "is: give this run another output."
    )
    if staging.is_dir():
        try:
            # rename(2) onto a folder fails unless that folder is empty: the check and the move are one step.
            os.rename(staging, path)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise appeared from None
            raise
        return
    try:
        os.link(staging, path)  # fails if path exists: a file is created exclusively the same way
    except FileExistsError:
        raise appeared from None
    staging.unlink()


def review_folders(path: str | Path) -> list[Path]:
    """The result folders under ``path``: itself when it is one, else the patients of a batch output."""
    path = Path(path)
    return [path] if (path / RESULT_MARKER).is_file() else patient_folders(path)
