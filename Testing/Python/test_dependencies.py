"""The install plan for Slicer's Python (pure, so CI runs it), the nnU-Net version check, the minimum Slicer."""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path

import pytest

from PRLDetectorLib import dependencies
from PRLDetectorLib.dependencies import (
    LIBRARY_REQUIREMENTS,
    NNUNET_DEPENDENCIES,
    NNUNET_REQUIREMENT,
    NNUNET_VERSION,
    check_nnunet_version,
    install_plan,
    installed_versions,
)
from PRLDetectorLib.errors import InputError

REPO = Path(__file__).resolve().parents[2]

SLICER_AS_SHIPPED = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "requests": "2.32.3", "scipy": "1.14.1"}
"""A fresh Slicer: its own numpy, SimpleITK and requests (and scipy), no torch, no nnU-Net."""


def _pyproject_dependencies() -> set[str]:
    block = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.S | re.M)
    return set(re.findall(r'"([^"]+)"', block.group(1)))


def _names(requirements) -> set[str]:
    return {dependencies.canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def test_the_pinned_nnunet_and_its_dependencies_are_the_ones_installed_and_declared():
    assert NNUNET_REQUIREMENT in _pyproject_dependencies()
    assert {r for _, r in LIBRARY_REQUIREMENTS} <= _pyproject_dependencies()
    assert importlib.metadata.version("nnunetv2") == NNUNET_VERSION
    own = [r for r in importlib.metadata.requires("nnunetv2") if "extra ==" not in r]
    assert sorted(NNUNET_DEPENDENCIES) == sorted(own), "nnunetv2's requirements changed: update NNUNET_DEPENDENCIES"


def test_a_fresh_slicer_gets_torch_through_pytorch_utils_nnunet_without_dependencies_and_the_rest_constrained():
    plan = install_plan(SLICER_AS_SHIPPED)
    assert plan.torch is not None and plan.torch.count(",") == 1
    assert ">=2.1.2" in plan.torch and "!=2.9.*" in plan.torch
    assert plan.no_deps == (NNUNET_REQUIREMENT,)
    installed = _names(plan.packages)
    # What Slicer has (and torch) is never installed by pip ...
    assert not installed & {"numpy", "simpleitk", "requests", "torch", "nnunetv2"}
    # ... and pinned, so that no dependency replaces it.
    assert set(plan.constraints) == {"numpy==1.26.4", "SimpleITK==2.4.0", "requests==2.32.3"}
    # Everything else nnU-Net and the library need and Slicer lacks.
    wanted = _names(NNUNET_DEPENDENCIES) | _names(r for _, r in LIBRARY_REQUIREMENTS)
    assert installed == wanted - {"numpy", "simpleitk", "requests", "torch", "scipy"}
    assert "scipy" not in installed, "scipy 1.14 already fits scipy>=1.10"
    assert "connected-components-3d>=3.12" in plan.packages and "acvl-utils<0.3,>=0.2.6" in plan.packages
    assert plan.conflicts == ()
    assert plan.describe()[:2] == [f"PyTorch (torch{plan.torch}), through the PyTorch extension",
                                   f"{NNUNET_REQUIREMENT} (without its dependencies)"]


def test_the_plan_gives_pip_its_arguments_in_order():
    plan = install_plan({**SLICER_AS_SHIPPED, "torch": "2.5.1"})
    commands = plan.pip_arguments("/tmp/c.txt")
    assert commands[0] == ["--no-deps", NNUNET_REQUIREMENT]
    assert commands[1][:2] == ["-c", "/tmp/c.txt"] and commands[1][2:] == list(plan.packages)
    assert plan.torch is None and "torch==2.5.1" in plan.constraints


def test_an_environment_that_has_everything_needs_nothing_and_this_one_has_everything():
    assert install_plan(installed_versions()).empty, install_plan(installed_versions())


def test_another_nnunet_or_a_torch_nnunet_refuses_is_replaced_and_too_old_a_package_is_upgraded():
    complete = {name: version for name, version in installed_versions().items() if version is not None}
    plan = install_plan({**complete, "nnunetv2": "2.6.2", "torch": "2.9.0", "nibabel": "4.0.2"})
    assert plan.no_deps == (NNUNET_REQUIREMENT,)
    assert plan.torch is not None and "torch==2.9.0" not in plan.constraints
    assert plan.packages == ("nibabel>=5.0",)


def test_what_slicer_ships_is_left_alone_even_when_too_old_and_said_so():
    plan = install_plan({**SLICER_AS_SHIPPED, "numpy": "1.21.0"})
    assert "numpy" not in _names(plan.packages)
    assert plan.conflicts == ("numpy>=1.24 (Slicer has 1.21.0)",)


def test_the_nnunet_release_the_inference_was_written_for_passes_another_patch_warns_another_release_is_refused(caplog):
    check_nnunet_version(NNUNET_VERSION)
    major, minor, patch = NNUNET_VERSION.split(".")
    with caplog.at_level(logging.WARNING, logger="PRLDetectorLib.dependencies"):
        check_nnunet_version(f"{major}.{minor}.{int(patch) + 1}")
    assert "tested with" in caplog.text
    with pytest.raises(InputError, match=rf"nnU-Net {major}\.{int(minor) + 1}\.0 is installed.*private methods.*"
                                         rf"pip install nnunetv2=={re.escape(NNUNET_VERSION)}"):
        check_nnunet_version(f"{major}.{int(minor) + 1}.0")
    with pytest.raises(InputError, match="not installed"):
        check_nnunet_version("")


def test_inference_refuses_another_nnunet_release_before_it_overrides_anything(monkeypatch):
    from PRLDetectorLib.detection import inference

    monkeypatch.setattr(dependencies, "installed_version", lambda name: "2.5.0" if name == "nnunetv2" else None)
    with pytest.raises(InputError, match="nnU-Net 2.5.0 is installed"):
        inference._make_predictor_class()


def test_the_minimum_slicer_is_declared_once_for_the_build_and_the_module():
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    declared = re.search(r'set\(PRLDetector_MINIMUM_SLICER_VERSION "(\d+)\.(\d+)"\)', cmake)
    assert declared and tuple(map(int, declared.groups())) == dependencies.MINIMUM_SLICER_VERSION
    assert "VERSION_LESS PRLDetector_MINIMUM_SLICER_VERSION" in cmake and "FATAL_ERROR" in cmake
