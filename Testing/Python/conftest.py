"""Shared fixtures: small phantom patients (real anatomy, real dipole physics) written once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Two CPU cores in CI: keep torch from oversubscribing them when nnU-Net runs in-process.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Networks compiled for OpenVINO are cached per user; the tests keep theirs apart (and start without one).
os.environ.setdefault("PRLDETECTOR_CACHE_DIR", tempfile.mkdtemp(prefix="prl-test-cache-"))

REPO = Path(__file__).resolve().parents[2]
SMALL_EXTENT_MM = (96.0, 112.0, 72.0)


@pytest.fixture(scope="session")
def small_case(tmp_path_factory) -> Path:
    """One small-field-of-view phantom patient with QSM + FLAIR and three PRLs; returns its folder."""
    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    out = tmp_path_factory.mktemp("phantom")
    case = generate_case("case_small", seed=4242, with_flair=True, extent_mm=SMALL_EXTENT_MM, n_prl=3)
    return write_case(case, out)


@pytest.fixture(scope="session")
def sparse_case(tmp_path_factory) -> Path:
    """A small head (64×72×56 mm, two PRLs) in one corner of a 136×144×56 mm box whose far corner holds a
    stray non-zero speck, as a QSM pipeline may leave: nnU-Net's crop to the non-zero region keeps the whole
    box, and most of the box holds no brain. Returns the QSM file (``qsm.nii.gz``; the truth beside it)."""
    import numpy as np
    import SimpleITK as sitk

    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    case = write_case(generate_case("sparse", seed=4343, extent_mm=(64.0, 72.0, 56.0), n_prl=2),
                      tmp_path_factory.mktemp("sparse"))
    head = sitk.ReadImage(str(case / "qsm.nii.gz"))
    values = sitk.GetArrayFromImage(head)  # z, y, x
    box = np.zeros((values.shape[0], values.shape[1] + 72, values.shape[2] + 72), np.float32)
    box[:, : values.shape[1], : values.shape[2]] = values
    box[-3:, -3:, -3:] = 0.02
    image = sitk.GetImageFromArray(box)
    image.SetSpacing(head.GetSpacing())
    image.SetOrigin(head.GetOrigin())
    image.SetDirection(head.GetDirection())
    sitk.WriteImage(image, str(case / "qsm.nii.gz"))
    return case / "qsm.nii.gz"


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    return REPO / "Resources" / "Models"


def require_model(name: str) -> Path:
    """The bundled model folder; a missing model is a failure, not a skip: it must ship."""
    path = REPO / "Resources" / "Models" / name
    assert (path / "dataset.json").is_file(), f"bundled model '{name}' is missing from {path.parent}"
    return path


def run_cli(*args, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``prl-detect -q ARGS`` in a child process. Its output is decoded as UTF-8 by name: VTK (slicer-core,
    imported by other tests) leaves this process in the C locale."""
    return subprocess.run([sys.executable, "-m", "PRLDetectorLib", "-q", *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=timeout, env=env)


def assert_refused(done: subprocess.CompletedProcess, phrase: str) -> None:
    """Bad input: exit code 2, no traceback, and one last stderr line naming the problem."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("prl-detect: error: "), done.stderr
    assert phrase in lines[-1], lines[-1]
