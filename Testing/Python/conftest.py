"""Shared fixtures: small phantom patients (real anatomy, real dipole physics) written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two CPU cores in CI: keep torch from oversubscribing them when nnU-Net runs in-process.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[2]
SMALL_EXTENT_MM = (96.0, 112.0, 72.0)


@pytest.fixture(scope="session")
def small_case(tmp_path_factory) -> Path:
    """One small-field-of-view phantom patient with QSM + FLAIR and three PRLs; returns its folder."""
    from PRLDetectorLib.phantom import generate_case, write_case

    out = tmp_path_factory.mktemp("phantom")
    case = generate_case("case_small", seed=4242, with_flair=True, extent_mm=SMALL_EXTENT_MM, n_prl=3)
    return write_case(case, out)


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    return REPO / "Resources" / "Models"


def require_model(name: str) -> Path:
    """The bundled model folder; a missing model is a failure, not a skip: it must ship."""
    path = REPO / "Resources" / "Models" / name
    assert (path / "dataset.json").is_file(), f"bundled model '{name}' is missing from {path.parent}"
    return path
