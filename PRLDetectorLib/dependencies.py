"""What the library needs installed, and how the Slicer module installs it: one pure plan, tested in CI.

Slicer's Python already holds packages that must not be replaced (its own SimpleITK build with Slicer's
IO, numpy, requests), and PyTorch must come through the PyTorch extension (PyTorch Utils), which picks
the build for the computer's GPU. So, as SlicerNNUnet does, nnU-Net is installed pinned and *without* its
dependencies; its dependencies and the library's are then installed only where missing or too old, with
pip constrained to keep what Slicer has (:class:`InstallPlan`).

:func:`check_nnunet_version` runs before inference: :mod:`PRLDetectorLib.detection.inference` overrides
private methods of nnU-Net's predictor, which may change between nnU-Net releases.

Importing this module loads nothing (``packaging`` is imported where it is used): the Slicer module reads
it at startup, before dependencies are installed, and on old Slicer versions to say which one it needs.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MINIMUM_SLICER_VERSION = (5, 8)
"""The first 3D Slicer release the module runs in: Python 3.12 (the library needs 3.10+), the parameter node
wrapper with ``Choice``/``WithinRange``, table column titles. ``CMakeLists.txt`` repeats it."""

NNUNET_VERSION = "2.8.1"
NNUNET_REQUIREMENT = f"nnunetv2=={NNUNET_VERSION}"
"""nnU-Net as pinned in ``pyproject.toml``; installed with ``--no-deps``."""

NNUNET_DEPENDENCIES: tuple[str, ...] = (
    "torch!=2.9.*,>=2.1.2",
    "acvl-utils<0.3,>=0.2.6",
    "dynamic-network-architectures<0.5,>=0.4.4",
    "tqdm",
    "scipy",
    "batchgenerators>=0.25.1",
    "numpy>=1.24",
    "scikit-learn",
    "scikit-image>=0.19.3",
    "SimpleITK>=2.2.1",
    "pandas",
    "graphviz",
    "tifffile",
    "requests",
    "nibabel",
    "matplotlib",
    "seaborn",
    "imagecodecs",
    "yacs",
    "batchgeneratorsv2>=0.3.2",
    "einops",
    "blosc2>=3.3.2",
)
"""nnunetv2 2.8.1's own requirements (its package metadata, without extras; a test compares them)."""

LIBRARY_REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("SimpleITK", "SimpleITK>=2.3"),
    ("nibabel", "nibabel>=5.0"),
    ("numpy", "numpy>=1.24"),
    ("scipy", "scipy>=1.10"),
    ("cc3d", "connected-components-3d>=3.12"),
    ("nilearn", "nilearn>=0.11"),
    ("slicerio", "slicerio>=1.1"),
    ("tqdm", "tqdm>=4.60"),
    ("lightgbm", "lightgbm>=4.3"),
    ("openvino", "openvino>=2025.1"),
)
"""(import name, requirement) of what Slicer runs of the library besides nnU-Net and torch (detection,
review, the phantom), pinned as in ``pyproject.toml``."""

PROVIDED_BY_SLICER: frozenset[str] = frozenset({"simpleitk", "numpy", "requests"})
"""Never installed or replaced by the plan: Slicer ships them (SimpleITK with Slicer's own IO)."""

TORCH = "torch"


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_requirement() -> str:
    """The torch versions nnU-Net accepts: what PyTorch Utils is asked for."""
    return next(r for r in NNUNET_DEPENDENCIES if canonical(_name(r)) == TORCH)


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)


@dataclass(frozen=True)
class InstallPlan:
    """What to install into Slicer's Python, in this order.

    ``torch``: the version specifier to give PyTorch Utils (None when the installed torch fits).
    ``no_deps``: requirements installed with ``--no-deps`` (nnU-Net). ``packages``: missing or too old
    requirements, installed with pip under ``constraints`` (``name==version`` of what Slicer provides and of
    the installed torch, so that no dependency replaces them). ``conflicts``: what Slicer provides in a
    version a requirement does not accept; left alone and reported.
    """

    torch: str | None = None
    no_deps: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.no_deps and not self.packages

    def describe(self) -> list[str]:
        """One line per thing to install, for the question to the user."""
        lines = [f"PyTorch (torch{self.torch}), through the PyTorch extension"] if self.torch is not None else []
        lines += [f"{r} (without its dependencies)" for r in self.no_deps]
        return lines + list(self.packages)

    def pip_arguments(self, constraints_file: str) -> list[list[str]]:
        """The ``pip install`` argument lists, in order (``constraints_file`` holds :attr:`constraints`)."""
        commands = [["--no-deps", *self.no_deps]] if self.no_deps else []
        if self.packages:
            commands.append((["-c", constraints_file] if self.constraints else []) + list(self.packages))
        return commands


def install_plan(installed: Mapping[str, str | None]) -> InstallPlan:
    """The plan for an environment whose installed distributions are ``installed`` (name → version; a
    missing name or None: not installed; an empty version: installed, version unknown)."""
    from packaging.requirements import Requirement

    versions = {canonical(name): version for name, version in installed.items() if version is not None}
    wanted: dict[str, Requirement] = {}
    for text in (*NNUNET_DEPENDENCIES, *(r for _, r in LIBRARY_REQUIREMENTS)):
        requirement = Requirement(text)
        name = canonical(requirement.name)
        if name in wanted:
            wanted[name].specifier &= requirement.specifier
        else:
            wanted[name] = requirement

    def fits(name: str) -> bool:
        version = versions.get(name)
        return version is not None and (version == "" or wanted[name].specifier.contains(version, prereleases=True))

    torch = None if fits(TORCH) else str(wanted[TORCH].specifier)
    packages, constraints, conflicts = [], [], []
    for name, requirement in wanted.items():
        if name == TORCH:
            continue
        if name in PROVIDED_BY_SLICER:
            if versions.get(name):
                constraints.append(f"{requirement.name}=={versions[name]}")
            if not fits(name):
                conflicts.append(f"{requirement} (Slicer has {versions.get(name) or 'none'})")
        elif not fits(name):
            packages.append(str(requirement))
    if versions.get(TORCH) and torch is None:
        constraints.append(f"torch=={versions[TORCH]}")
    no_deps = () if versions.get("nnunetv2") == NNUNET_VERSION else (NNUNET_REQUIREMENT,)
    return InstallPlan(torch, no_deps, tuple(packages), tuple(sorted(constraints)), tuple(conflicts))


def installed_versions(names: Iterable[str] | None = None) -> dict[str, str | None]:
    """Versions of the distributions the plan looks at, as installed in this Python (None: not installed)."""
    if names is None:
        names = {"nnunetv2", *(_name(r) for r in NNUNET_DEPENDENCIES), *(_name(r) for _, r in LIBRARY_REQUIREMENTS)}
    return {name: installed_version(name) for name in names}


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if canonical(name) in PROVIDED_BY_SLICER and _importable(name):
            return ""  # built into Slicer without package metadata
        return None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_nnunet_version(version: str | None = None) -> None:
    """Refuse an nnU-Net release other than :data:`NNUNET_VERSION`'s minor release; warn on another patch.

    ``version`` defaults to the installed one.
    """
    from PRLDetectorLib.errors import InputError

    version = installed_version("nnunetv2") if version is None else version
    fix = f"install it with `pip install {NNUNET_REQUIREMENT}` (in 3D Slicer: press Detect PRLs and accept the install)"
    if not version:
        raise InputError(f"nnU-Net v2 is not installed; {fix}.")
    if version == NNUNET_VERSION:
        return
    if version.split(".")[:2] != NNUNET_VERSION.split(".")[:2]:
        raise InputError(
            f"nnU-Net {version} is installed, but PRL Detector runs nnU-Net {NNUNET_VERSION}: its inference overrides "
            f"private methods of nnU-Net's predictor, which change between releases; {fix}."
        )
    logger.warning(
        "nnU-Net %s is installed; PRL Detector is tested with %s (its inference overrides private nnU-Net methods). "
        "If detection fails or looks wrong, install nnunetv2==%s.", version, NNUNET_VERSION, NNUNET_VERSION,
    )
