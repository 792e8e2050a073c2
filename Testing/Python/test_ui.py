"""The panel without Slicer: the .ui parses, and PRLDetector.py agrees with it and with the library.

PRLDetector.py imports ``qt`` and so cannot be imported here; it is read as source with ``ast``.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path

import pytest

from PRLDetectorLib.settings import CONNECTIVITIES, DEVICES, DetectionSettings

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "PRLDetector.py"
UI = REPO / "Resources" / "UI" / "PRLDetector.ui"
ICON = REPO / "Resources" / "Icons" / "PRLDetector.png"

# Widget classes the parameter node wrapper can bind, by parameter type (see slicer.parameterNodeWrapper).
BINDABLE = {
    "node": {"qMRMLNodeComboBox"},
    "bool": {"QCheckBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "str": {"QLineEdit", "QComboBox"},
}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI).getroot()


@pytest.fixture(scope="module")
def module_source():
    return MODULE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def module_tree(module_source):
    return ast.parse(module_source)


def _widgets(ui) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ui.iter("widget")}


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)


def _constant(tree: ast.Module, name: str):
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not defined in PRLDetector.py")


def _parameter_fields(tree) -> dict[str, str]:
    """Parameter name → annotation source, from the @parameterNodeWrapper class."""
    cls = _class(tree, "PRLDetectorParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def _kind(annotation: str) -> str:
    if "vtkMRML" in annotation:
        return "node"
    inner = annotation.removeprefix("Annotated[").split(",")[0].strip("]")
    return inner


def _property(widget: ET.Element, name: str):
    prop = widget.find(f"property[@name='{name}']")
    if prop is None or len(prop) == 0:
        return None
    return prop[0].text


def test_the_ui_file_is_a_qmrmlwidget_named_like_the_module(ui):
    assert ui.tag == "ui"
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "PRLDetector"


def test_every_widget_the_module_uses_exists_in_the_ui(ui, module_source):
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", module_source))
    assert used, "the module uses no widget?"
    missing = sorted(used - set(_widgets(ui)))
    assert not missing, f"PRLDetector.py uses widgets the .ui does not define: {missing}"


def test_widget_names_are_unique(ui):
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names))


def test_every_custom_widget_class_is_declared(ui):
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, custom - declared


def test_every_mrml_widget_gets_the_scene(ui):
    mrml = {w.get("name") for w in ui.iter("widget") if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")}
    connected = {c.findtext("receiver") for c in ui.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml <= connected, mrml - connected


def test_bound_widgets_name_parameters_of_the_parameter_node_with_a_widget_that_can_show_them(ui, module_tree):
    parameters = _parameter_fields(module_tree)
    bound = {}
    for widget in ui.iter("widget"):
        name = _property(widget, "SlicerParameterName")
        if name is not None:
            assert name in parameters, f"{widget.get('name')} binds unknown parameter '{name}'"
            kind = _kind(parameters[name])
            assert widget.get("class") in BINDABLE[kind], f"{widget.get('name')} cannot show a {kind}"
            if widget.get("class") == "QComboBox":
                assert "Choice(" in parameters[name], f"a combo box needs a Choice for '{name}'"
            bound[name] = widget
    # The model list changes at run time, so it is filled by code, not bound.
    assert set(parameters) - set(bound) == {"model", "lesionTable", "changeTable"}


def test_the_parameter_node_mirrors_the_detection_settings(module_tree, module_source):
    mapping = _constant(module_tree, "SETTINGS_PARAMETERS")
    assert set(mapping) == {f.name for f in fields(DetectionSettings)}
    parameters = _parameter_fields(module_tree)
    assert set(mapping.values()) <= set(parameters)
    assert "Choice(DEVICES)" in parameters["device"] and "Choice(CONNECTIVITIES)" in parameters["connectivity"]
    assert set(DEVICES) == {"auto", "cuda", "mps", "cpu"} and set(CONNECTIVITIES) == {6, 18, 26}
    # Defaults come from DetectionSettings itself, not from copies of its numbers.
    cls = _class(module_tree, "PRLDetectorParameterNode")
    defaults = {n.target.id: ast.unparse(n.value) for n in cls.body if isinstance(n, ast.AnnAssign) and n.value}
    for field, parameter in mapping.items():
        assert defaults[parameter] == f"_DEFAULTS.{field}"


def test_the_widgets_start_at_the_default_settings(ui):
    widgets = _widgets(ui)
    defaults = DetectionSettings()
    assert float(_property(widgets["thresholdSliderWidget"], "value")) == defaults.threshold
    assert float(_property(widgets["minLesionSpinBox"], "value")) == defaults.min_lesion_mm3
    assert _property(widgets["ttaCheckBox"], "checked") in (None, "false")
    assert defaults.tta is False
    low, high = (float(_property(widgets["thresholdSliderWidget"], p)) for p in ("minimum", "maximum"))
    assert 0 < low < defaults.threshold < high < 1


SLICER_RUNS = ("mrml.logic", "mrml.bridge", "detection.pipeline", "phantom.phantom", "training.dataset", "exports.segments")
"""Library modules that run in Slicer or in its detection child process."""
PROVIDED = {"slicer", "vtk", "torch", "packaging"}
"""Slicer brings slicer, vtk and packaging; torch comes through the PyTorch extension; nnunetv2 has its own pin."""
PIP_NAMES = {"cc3d": "connected-components-3d"}


def _third_party_imports(modules) -> set[str]:
    """Top-level third-party packages imported (anywhere in the file) by ``modules`` and the library
    modules they import, transitively."""
    lib = REPO / "PRLDetectorLib"
    seen, found, todo = set(), set(), list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((lib / f"{name.replace('.', '/')}.py").read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + (
                    [f"{node.module}.{a.name}" for a in node.names] if node.module.startswith("PRLDetectorLib") else []
                )
            for imported in names:
                top, _, rest = imported.partition(".")
                if top == "PRLDetectorLib":
                    if rest and (lib / f"{rest.replace('.', '/')}.py").is_file():
                        todo.append(rest)
                elif top not in sys.stdlib_module_names:
                    found.add(top)
    return found


def test_dependencies_offered_in_slicer_cover_what_slicer_runs_as_the_library_pins_them():
    from PRLDetectorLib.dependencies import LIBRARY_REQUIREMENTS, NNUNET_REQUIREMENT

    requirements = dict(LIBRARY_REQUIREMENTS)
    # pyproject's dependency array holds one quoted requirement per line (tomllib is 3.11+).
    block = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.S | re.M).group(1)
    declared = set(re.findall(r'"([^"]+)"', block))
    assert {*requirements.values(), NNUNET_REQUIREMENT} <= declared, set(requirements.values()) - declared
    from PRLDetectorLib.dependencies import NNUNET_DEPENDENCIES

    # nnU-Net's own dependencies come with it (its install plan), e.g. batchgenerators, acvl_utils.
    with_nnunet = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].replace("-", "_").lower() for r in NNUNET_DEPENDENCIES}
    needed = _third_party_imports(SLICER_RUNS) - PROVIDED - {"nnunetv2"} - with_nnunet
    # The phantom reads the MNI template files that nilearn ships, without importing nilearn.
    needed.add("nilearn")
    assert needed <= set(requirements), f"Slicer would not offer to install {sorted(needed - set(requirements))}"
    for module in requirements:
        assert requirements[module].startswith(PIP_NAMES.get(module, module))
    # torch comes through the PyTorch extension (GPU-aware), not as a pinned pip requirement.
    assert "torch" not in requirements


def test_slicer_installs_torch_through_pytorch_utils_and_nnunet_by_the_tested_plan(module_tree):
    functions = {f.name: ast.unparse(f) for f in module_tree.body if isinstance(f, ast.FunctionDef)}
    ensure = functions["ensureDependencies"]
    assert "install_plan(installed_versions())" in ensure and "plan.pip_arguments(" in ensure
    assert "slicer.util.pip_install(arguments)" in ensure
    torch = functions["_installTorch"]
    assert "installTorch(askConfirmation=False, torchVersionRequirement=versionRequirement)" in torch
    assert "pip_install" not in torch, "pip's default torch is a multi-GB CUDA build on Linux: never fall back to it"
    # The module says which Slicer it needs before anything else can fail.
    calls = [ast.unparse(n) for n in module_tree.body if isinstance(n, ast.Expr)]
    assert "checkSlicerVersion(int(slicer.app.majorVersion), int(slicer.app.minorVersion))" in calls
    assert "MINIMUM_SLICER_VERSION" in functions["checkSlicerVersion"]


def test_reload_reloads_the_library_modules_it_lists_in_order_then_any_others(module_tree):
    listed = _constant(module_tree, "LIB_MODULES")
    missing = [name for name in listed if not (REPO / "PRLDetectorLib" / f"{name.replace('.', '/')}.py").is_file()]
    assert not missing, f"LIB_MODULES names modules that do not exist: {missing}"
    source = MODULE.read_text(encoding="utf-8")
    assert "importlib.reload" in source and 'startswith("PRLDetectorLib.")' in source
    assert "import imp\n" not in source


def test_the_module_is_titled_categorised_and_cites_the_study(module_source):
    assert '_("PRL Detector")' in module_source
    assert '"Segmentation"' in module_source
    assert "Jeong" in module_source
    assert "Deep Learning-Based Automated Detection and Burden Assessment of Paramagnetic Rim Lesions" in module_source


def test_the_logic_and_library_core_do_not_use_qt():
    for path in (REPO / "PRLDetectorLib").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"qt", "ctk", "PythonQt"}, path.name
        if path.parent.name != "mrml":
            assert "slicer" not in imported, f"{path.name} speaks MRML; only the mrml wing may"


def test_the_icon_is_a_128_pixel_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_the_build_lists_the_module_its_library_and_its_resources():
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for text in ("slicerMacroBuildScriptedModule", "set(MODULE_NAME PRLDetector)", "${MODULE_NAME}.py",
                 "PRLDetectorLib/*.py", "Resources/UI/",
                 "Resources/Icons/", "Resources/Models/", "EXTENSION_CATEGORY \"Segmentation\"", "add_subdirectory(Testing)"):
        assert text in top, text
    assert "slicer_add_python_unittest" in (REPO / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")


def test_the_case_id_dialog_tells_cancel_from_an_empty_answer(module_tree, module_source):
    """PythonQt's QInputDialog.getText returns "" on Cancel, which the Logic reads as "the next free id": the
    widget asks with a dialog whose result it checks, and the Logic adds nothing when the answer is None."""
    assert "QInputDialog.getText" not in module_source
    widget = _class(module_tree, "PRLDetectorWidget")
    methods = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "askCaseId=self.askCaseId" in methods["onAddTrainingCase"]
    assert "if added is None" in methods["onAddTrainingCase"]
    assert "exec_() != qt.QDialog.Accepted" in methods["askCaseId"] and "return None" in methods["askCaseId"]


def test_the_panel_hides_the_file_only_columns(module_tree):
    """The widget hides the columns the Logic names (bridge.hidden_columns, tested on slicer-core: LPS copies,
    voxel-index boxes, an empty PRL probability) in the panel's table view."""
    widget = _class(module_tree, "PRLDetectorWidget")
    methods = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "setColumnHidden" in methods["showLesionTable"]
    assert "self.logic.hiddenLesionColumns(table)" in methods["showLesionTable"]
    assert "self.showLesionTable(table)" in methods["onParameterNodeModified"]
    logic = {f.name: ast.unparse(f) for f in _class(module_tree, "PRLDetectorLogic").body if isinstance(f, ast.FunctionDef)}
    assert "hidden_columns(tableNode)" in logic["hiddenLesionColumns"]


def test_the_sample_phantom_goes_through_sampledatas_own_download_so_code_can_load_it(module_tree):
    """SampleData.downloadSample never calls a custom downloader: the source's URIs generate the case instead
    (PRLDetectorLib.phantom.sample, tested in test_sample_data.py), and the self-test loads it from code."""
    functions = {f.name: ast.unparse(f) for f in module_tree.body if isinstance(f, ast.FunctionDef)}
    register = functions["registerSampleData"]
    assert "customDownloader" not in register and "sample_source_arguments(" in register
    assert "def __str__" in register, "SampleData compares sources by their text, which must not generate the files"
    test = ast.unparse(_class(module_tree, "PRLDetectorTest"))
    assert 'SampleData.downloadSample("PRLPhantom")' in test.replace("'", '"')
    logic = {f.name: ast.unparse(f) for f in _class(module_tree, "PRLDetectorLogic").body if isinstance(f, ast.FunctionDef)}
    assert "load_sample_case(sampleCacheDirectory())" in logic["loadSampleCase"]
