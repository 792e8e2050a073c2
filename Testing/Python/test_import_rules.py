"""The library's wings import downward only (see each wing's ``__init__.py``), and no two modules import each other.

Every import counts: at module level, inside functions, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "PRLDetectorLib"
CORE = "core"
"""The top-level modules (settings, errors, results, progress, the package itself): the floor of every wing."""

MAY_IMPORT = {
    CORE: {CORE},
    "detection": {CORE, "detection", "exports"},
    "exports": {CORE, "exports", "detection"},
    "cohort": {CORE, "detection", "exports", "cohort"},
    "training": {CORE, "detection", "exports", "training"},
    "phantom": {CORE, "detection", "exports", "phantom"},
    "longitudinal": {CORE, "detection", "exports", "cohort", "longitudinal"},
    "mrml": {CORE, "detection", "exports", "cohort", "training", "phantom", "longitudinal", "mrml"},
    "review": {CORE, "detection", "exports", "mrml", "review"},
    "cli": {CORE, "detection", "exports", "cohort", "training", "phantom", "longitudinal", "mrml", "review", "cli"},
}
"""Wing → the wings it may import. Only cli (and ``__main__``, which runs it) may import cli."""
MRML_PACKAGES = {"slicer", "vtk", "mrml", "MRMLCorePython", "vtkSlicerSegmentationsModuleMRMLPython"}
"""Top-level names that mean the Slicer scene; only the mrml wing imports them."""
QT_PACKAGES = {"qt", "ctk", "PythonQt"}
WEB_PACKAGES = {"trame", "trame_client", "trame_server", "trame_vuetify", "trame_rca", "trame_slicer"}
"""The browser page's packages; only the review wing imports them."""
LIGHT_MODULES = ("PRLDetectorLib.results", "PRLDetectorLib.cohort.batch", "PRLDetectorLib.cli.main")
"""Imported by every Dask worker or on every command: they must not load torch or nnU-Net on import."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(LIB.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(library modules, other top-level packages) that ``path`` imports anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    library, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # "from package import module" imports the module; "from module import name" the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "PRLDetectorLib":
                while target not in modules:  # a name inside a module: the module is what is imported
                    target = target.rpartition(".")[0]
                if target != name:
                    library.add(target)
            elif target:
                others.add(target.split(".")[0])
    return library, others


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (LIB / parts[1]).is_dir()) else CORE


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_the_library_has_its_wings_each_saying_what_it_may_import():
    for wing in MAY_IMPORT:
        if wing == CORE:
            continue
        init = LIB / wing / "__init__.py"
        assert init.is_file(), f"{wing}/ has no __init__.py"
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{wing}/__init__.py does not say what the wing is for"
        assert "import" in ast.get_docstring(tree), f"{wing}/__init__.py does not say what the wing may import"
        # Light: importing a wing must not load anything (torch and nnU-Net load only where they are used).
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], f"{wing}/__init__.py imports"


def test_every_wing_imports_only_the_wings_below_it(graph):
    wrong = []
    for module, (library, _) in graph.items():
        if module == "PRLDetectorLib.__main__":
            continue  # `python -m PRLDetectorLib` runs the CLI: the one module besides cli that may import it
        allowed = MAY_IMPORT[_wing(module)]
        wrong += [f"{module} imports {target}" for target in sorted(library) if _wing(target) not in allowed]
    assert not wrong, "\n".join(wrong)


def test_nothing_outside_cli_imports_cli(graph):
    wrong = [
        f"{module} imports {target}"
        for module, (library, _) in graph.items()
        for target in library
        if _wing(target) == "cli" and _wing(module) != "cli" and module != "PRLDetectorLib.__main__"
    ]
    assert not wrong, "\n".join(wrong)


def test_only_the_mrml_wing_imports_slicer_vtk_or_mrml_and_nothing_imports_qt(graph):
    for module, (_, others) in graph.items():
        assert not others & QT_PACKAGES, f"{module} imports {others & QT_PACKAGES}"
        if _wing(module) != "mrml":
            assert not others & MRML_PACKAGES, f"{module} imports {others & MRML_PACKAGES}; only mrml/ may"


def test_only_the_review_wing_imports_the_web_packages(graph):
    wrong = [f"{module} imports {sorted(others & WEB_PACKAGES)}" for module, (_, others) in graph.items()
             if others & WEB_PACKAGES and _wing(module) != "review"]
    assert not wrong, "\n".join(wrong)


def test_no_two_modules_import_each_other_even_through_others(graph):
    """No cycle in the module import graph (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node][0]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"modules that import each other: {cycles}"


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_do_not_load_torch_on_import(module):
    code = f"import sys, {module}; heavy = [m for m in ('torch', 'nnunetv2') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"
