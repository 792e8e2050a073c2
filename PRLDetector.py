"""PRL Detector: paramagnetic rim lesions of multiple sclerosis on QSM (+FLAIR), found by nnU-Net v2.

This file is wiring: the panel, the parameter node and a Logic that delegates to
:mod:`PRLDetectorLib.mrml.logic`. Everything that computes lives in ``PRLDetectorLib``.
"""

import importlib
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from vtkSlicerSegmentationsModuleMRMLPython import vtkMRMLSegmentationNode

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.settings import (
    CONNECTIVITIES,
    DEVICES,
    NO_CLASSIFIER,
    OPERATING_POINTS,
    DetectionSettings,
)

LIB_MODULES = (
    "errors", "settings", "results", "progress", "mrml.process", "detection.models", "detection.images",
    "detection.lesions", "detection.features", "detection.burden", "exports.segments", "detection.registration",
    "detection.inference", "cohort.evaluation", "detection.pipeline", "training.dataset", "phantom.anatomy",
    "phantom.lesions", "phantom.phantom", "training.training", "cohort.bids", "cohort.batch", "exports.dicom_seg",
    "cli.options", "cli.cohort", "cli.main", "mrml.bridge", "mrml.logic",
)
"""Library submodules in dependency order, for reloading; modules not imported are skipped, and loaded
modules missing from this list are reloaded after it."""

REQUIREMENTS = (
    ("nnunetv2", "nnunetv2==2.8.1"),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("nibabel", "nibabel>=5.0"),
    ("numpy", "numpy>=1.24"),
    ("scipy", "scipy>=1.10"),
    ("cc3d", "connected-components-3d>=3.12"),
    ("nilearn", "nilearn>=0.11"),
    ("slicerio", "slicerio>=1.1"),
    ("tqdm", "tqdm>=4.60"),
    ("lightgbm", "lightgbm>=4.3"),
)
"""(import name, pip requirement) of what Slicer runs of the library (detection, review, the phantom), pinned
as in pyproject.toml. PyTorch comes through the PyTorch extension instead."""

PAPER_TITLE = "Deep Learning-Based Automated Detection and Burden Assessment of Paramagnetic Rim Lesions on QSM in MS"
PAPER = f"Jeong E, Seo D, Moon HH, Yun H, Choi Y, Lee EJ. {PAPER_TITLE}. 2026."

_DEFAULTS = DetectionSettings()


#
# PRLDetector
#


class PRLDetector(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PRL Detector")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["PRLDetector developers"]
        self.parent.helpText = _(
            "Detects paramagnetic rim lesions (PRLs) of multiple sclerosis on a QSM map (optionally with FLAIR) "
            "with an nnU-Net v2 model, one segment per lesion, and reports the patient's PRL burden. Review each "
            "lesion (Confirm / Reject), correct the segments in the Segment Editor and press <b>Update burden</b>; "
            "export the results or add the corrected case to a training set.<br><br>"
            "The method follows: " + PAPER + "<br><br>"
            "This is a research tool, not a medical device."
        )
        self.parent.acknowledgementText = _(
            "The detection model is nnU-Net v2 (Isensee et al., Nature Methods 2021). The panel follows the "
            "scripted-module template of 3D Slicer and the child-process design of SlicerMONAIAuto3DSeg."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a phantom case made on this computer (nothing is downloaded)
#


def registerSampleData():
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="PRL Detector",
        sampleName="PRLPhantom",
        thumbnailFileName=os.path.join(iconsPath, "PRLDetector.png"),
        # Nothing to download: the custom downloader generates the case, so the lists are empty.
        uris=[],
        fileNames=[],
        nodeNames=[],
        customDownloader=loadPhantomSample,
    )


def loadPhantomSample(source=None):
    """Generate (once, into the cache folder) and load a phantom QSM with known PRLs."""
    with slicer.util.tryWithErrorDisplay(_("Could not create the phantom case."), waitCursor=True):
        if not ensureDependencies():
            return None
        cacheDir = Path(slicer.app.cachePath) / "PRLDetector"
        phantom = PRLDetectorLogic().loadPhantomCase(cacheDir)
        slicer.util.setSliceViewerLayers(background=phantom.qsm_node, fit=True)
        return [node for node in (phantom.qsm_node, phantom.flair_node) if node is not None]
    return None


#
# Dependencies
#


def missingRequirements() -> list[str]:
    return [requirement for module, requirement in REQUIREMENTS if importlib.util.find_spec(module) is None]


def ensureDependencies() -> bool:
    """Offer to install what the library needs; False when the user declines."""
    missing = missingRequirements()
    torchMissing = importlib.util.find_spec("torch") is None
    if not missing and not torchMissing:
        return True
    names = (["PyTorch"] if torchMissing else []) + missing
    if not slicer.util.confirmOkCancelDisplay(
        _("PRL Detector needs Python packages that are not installed yet:\n\n{names}\n\n"
          "Install them now? This downloads up to a few GB and takes several minutes.").format(names="\n".join(names)),
        windowTitle=_("Install PRL Detector dependencies"),
    ):
        return False
    try:
        with slicer.util.WaitCursor():
            if torchMissing:
                _installTorch()
            if missing:
                slicer.util.pip_install(missing)
    except Exception as error:
        logging.error("Installing %s failed: %s", names, error)
        raise InputError(
            _("Could not install {names}: this computer seems to be offline or the package index is not reachable. "
              "Connect to the internet and try again, or install the packages from wheel files with "
              "PythonSlicer -m pip install <wheels>.").format(names=", ".join(names))
        ) from None
    importlib.invalidate_caches()
    return True


def _installTorch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        # Without the PyTorch extension, pip's default build (CPU, or CUDA on Linux) is what we can get.
        slicer.util.pip_install("torch")
        return
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=False) is None:
        raise RuntimeError("the PyTorch extension could not install PyTorch")


#
# PRLDetectorParameterNode
#


@parameterNodeWrapper
class PRLDetectorParameterNode:
    """The panel's state, saved with the scene. The detection settings mirror DetectionSettings."""

    qsmVolume: slicer.vtkMRMLScalarVolumeNode
    flairVolume: slicer.vtkMRMLScalarVolumeNode
    model: str = _DEFAULTS.model
    device: Annotated[str, Choice(DEVICES)] = _DEFAULTS.device
    tta: bool = _DEFAULTS.tta
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = _DEFAULTS.threshold
    minLesionMm3: Annotated[float, WithinRange(0.0, 10000.0)] = _DEFAULTS.min_lesion_mm3
    connectivity: Annotated[int, Choice(CONNECTIVITIES)] = _DEFAULTS.connectivity
    minRimCoverage: Annotated[float, WithinRange(0.0, 1.0)] = _DEFAULTS.min_rim_coverage
    operatingPoint: Annotated[str, Choice((*OPERATING_POINTS, NO_CLASSIFIER))] = _DEFAULTS.operating_point
    outputSegmentation: vtkMRMLSegmentationNode
    lesionTable: slicer.vtkMRMLTableNode


SETTINGS_PARAMETERS = {
    "model": "model",
    "device": "device",
    "tta": "tta",
    "threshold": "threshold",
    "min_lesion_mm3": "minLesionMm3",
    "connectivity": "connectivity",
    "min_rim_coverage": "minRimCoverage",
    "operating_point": "operatingPoint",
}
"""DetectionSettings field → parameter node name."""


def settingsFromParameterNode(parameterNode) -> DetectionSettings:
    return DetectionSettings(**{field: getattr(parameterNode, name) for field, name in SETTINGS_PARAMETERS.items()})


#
# PRLDetectorWidget
#


class _PanelLogHandler(logging.Handler):
    """Shows the library's log records in the panel's log box."""

    def __init__(self, textEdit):
        super().__init__(logging.INFO)
        self.textEdit = textEdit
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record):
        try:
            self.textEdit.appendPlainText(self.format(record))
        except Exception:  # the widget may already be gone while Slicer shuts down
            pass


class PRLDetectorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._logHandler = None
        self._updatingModelComboBox = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PRLDetector.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PRLDetectorLogic()

        self._logHandler = _PanelLogHandler(self.ui.logTextEdit)
        for name in ("PRLDetectorLib", __name__):
            logging.getLogger(name).addHandler(self._logHandler)
        logging.getLogger("PRLDetectorLib").setLevel(logging.INFO)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollDetection)

        self.installMenu = qt.QMenu(self.ui.installModelButton)
        fromZip = self.installMenu.addAction(_("From a .zip archive…"))
        fromZip.connect("triggered()", lambda: self.onInstallModel(fromZip=True))
        fromFolder = self.installMenu.addAction(_("From a folder…"))
        fromFolder.connect("triggered()", lambda: self.onInstallModel(fromZip=False))
        self.ui.installModelButton.setMenu(self.installMenu)

        self.ui.loadQsmButton.connect("clicked(bool)", lambda: self.onLoadVolume("qsmVolume"))
        self.ui.loadFlairButton.connect("clicked(bool)", lambda: self.onLoadVolume("flairVolume"))
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.lesionTableView.connect("selectionChanged()", self.onLesionSelected)
        self.ui.confirmButton.connect("clicked(bool)", lambda: self.onSetStatus("confirmed"))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.onSetStatus("rejected"))
        self.ui.candidateButton.connect("clicked(bool)", lambda: self.onSetStatus("candidate"))
        self.ui.editSegmentsButton.connect("clicked(bool)", self.onEditSegments)
        self.ui.updateBurdenButton.connect("clicked(bool)", self.onUpdateBurden)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.addTrainingCaseButton.connect("clicked(bool)", self.onAddTrainingCase)
        self.ui.loadGroundTruthButton.connect("clicked(bool)", self.onLoadGroundTruth)
        self.ui.splitSegmentationButton.connect("clicked(bool)", self.onSplitSegmentation)

        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cleanup()
            self._run = None
        self.pollTimer.stop()
        for name in ("PRLDetectorLib", __name__):
            logging.getLogger(name).removeHandler(self._logHandler)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self.cancelDetection()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        listed = [f"PRLDetectorLib.{name}" for name in LIB_MODULES]
        others = sorted(n for n in sys.modules if n.startswith("PRLDetectorLib.") and n not in listed)
        for name in listed + others:
            module = sys.modules.get(name)
            if module is not None:
                logging.debug("Reloading %s", name)
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    # -- parameter node ---------------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.qsmVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.qsmVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: PRLDetectorParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # The .ui gives each bound widget a SlicerParameterName; the model list is filled here instead,
            # because installed models change at run time.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self.selectModelInComboBox(p.model if p else "")
        running = self._run is not None
        if p and p.qsmVolume and self.currentModelName():
            self.ui.applyButton.toolTip = _("Detect PRLs in the QSM volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select a QSM volume and a model.")
            self.ui.applyButton.enabled = running
        segmentation = p.outputSegmentation if p else None
        table = self.logic.linkedTable(segmentation)
        if p and table is not p.lesionTable:
            p.lesionTable = table
        if self.ui.lesionTableView.mrmlTableNode() is not table:
            self.ui.lesionTableView.setMRMLTableNode(table)
        for button in (self.ui.updateBurdenButton, self.ui.editSegmentsButton, self.ui.exportButton,
                       self.ui.addTrainingCaseButton, self.ui.splitSegmentationButton):
            button.enabled = segmentation is not None and not running
        self.showBurden(self.burdenOrNone(segmentation, table))
        self.updateStatusButtons()

    def burdenOrNone(self, segmentation, table):
        if segmentation is None or table is None:
            return None
        try:
            return self.logic.burden(segmentation)
        except ImportError:
            # A scene with a review, opened before the dependencies are installed: nothing to show yet.
            return None

    # -- models -----------------------------------------------------------------------------------------

    def populateModels(self) -> None:
        self._updatingModelComboBox = True
        try:
            self.ui.modelComboBox.clear()
            self._models = {model.path.name: model for model in self.logic.availableModels()}
            for name, model in self._models.items():
                channels = " + ".join(c.upper() for c in model.channels)
                self.ui.modelComboBox.addItem(f"{model.title} ({channels})", name)
            if not self._models:
                self.ui.modelComboBox.addItem(_("(no model installed: use Install model…)"), "")
        finally:
            self._updatingModelComboBox = False
        self.selectModelInComboBox(self._parameterNode.model if self._parameterNode else _DEFAULTS.model)

    def currentModelName(self) -> str:
        return self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or ""

    def selectModelInComboBox(self, name: str) -> None:
        index = self.ui.modelComboBox.findData(name) if name else -1
        if index < 0 and ("/" in name or "\\" in name):
            # A model folder set by a script: list it as it is.
            self._updatingModelComboBox = True
            self.ui.modelComboBox.addItem(name, name)
            self._updatingModelComboBox = False
            index = self.ui.modelComboBox.findData(name)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            wasBlocked = self.ui.modelComboBox.blockSignals(True)
            self.ui.modelComboBox.currentIndex = index
            self.ui.modelComboBox.blockSignals(wasBlocked)
        self.showModelCard(name if index >= 0 else "")
        if index < 0 and name:
            self.ui.modelCardLabel.text = _("The model '{name}' is not installed; choose another or install it.").format(name=name)

    def onModelSelected(self, index: int) -> None:
        if self._updatingModelComboBox or not self._parameterNode:
            return
        name = self.ui.modelComboBox.itemData(index) or ""
        if name != self._parameterNode.model:
            self._parameterNode.model = name
        self.showModelCard(name)

    def showModelCard(self, name: str) -> None:
        model = getattr(self, "_models", {}).get(name)
        if model is None:
            self.ui.modelCardLabel.text = _("Model folder: {name}").format(name=name) if name else _("No model selected.")
            return
        card = model.card
        channels = " + ".join(c.upper() for c in model.channels)
        self.ui.modelCardLabel.text = (
            f"<b>{card.get('title', model.name)}</b> — version {model.version}, inputs {channels}, "
            f"folds {', '.join(model.folds)}<br>{card.get('description', '')}"
        )

    def onInstallModel(self, fromZip: bool) -> None:
        if fromZip:
            source = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Install PRL model"), "", _("nnU-Net model archive (*.zip)"))
        else:
            source = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Install PRL model from folder"))
        if not source:
            return
        with slicer.util.tryWithErrorDisplay(_("The model was not installed."), waitCursor=True):
            model = self.logic.installModel(source)
            self.populateModels()
            self._parameterNode.model = model.path.name
            slicer.util.showStatusMessage(_("Installed model {name}").format(name=model.title), 3000)

    # -- inputs ------------------------------------------------------------------------------------------

    def onLoadVolume(self, parameterName: str) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load volume"), "",
            _("Volumes (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd);;All files (*)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the volume."), waitCursor=True):
            setattr(self._parameterNode, parameterName, slicer.util.loadVolume(path))

    # -- detection ------------------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._run is not None:
            self.cancelDetection()
            return
        with slicer.util.tryWithErrorDisplay(_("Detection could not start."), waitCursor=True):
            if not ensureDependencies():
                return
            p = self._parameterNode
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self._run = self.logic.startDetection(p.qsmVolume, p.flairVolume, settingsFromParameterNode(p))
            self.setRunning(True)
            self.pollTimer.start()

    def setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Detect PRLs")
        for widget in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton):
            widget.enabled = not running
        self.onParameterNodeModified()

    def onPollDetection(self) -> None:
        from PRLDetectorLib.mrml.process import Finished, Progress

        if self._run is None:
            self.pollTimer.stop()
            return
        for event in self._run.poll():
            if isinstance(event, Progress):
                self.ui.progressBar.value = round(100 * event.fraction)
                self.ui.progressBar.setFormat(f"%p%  {event.message}")
            elif isinstance(event, Finished):
                self.onDetectionFinished(event)
                return

    def cancelDetection(self) -> None:
        # Killing the tree takes at most a few seconds; the Finished event then ends the run in onPollDetection.
        with slicer.util.WaitCursor():
            self._run.cancel()
        self.onPollDetection()

    def onDetectionFinished(self, finished) -> None:
        self.pollTimer.stop()
        run, self._run = self._run, None
        try:
            if finished.cancelled:
                self.ui.progressBar.value = 0
                self.ui.progressBar.setFormat(_("Cancelled"))
                return
            with slicer.util.tryWithErrorDisplay(_("Detection failed."), waitCursor=True):
                review = run.load()
                self.showReview(review)
        finally:
            run.cleanup()
            self.setRunning(False)

    # -- review ----------------------------------------------------------------------------------------------

    def showReview(self, review) -> None:
        p = self._parameterNode
        p.outputSegmentation = review.segmentation_node
        p.lesionTable = review.table_node
        qsm = self.logic.referenceVolume(review.segmentation_node)
        if qsm is not None:
            slicer.util.setSliceViewerLayers(background=qsm, fit=True)
        self.showBurden(review.burden)

    def showBurden(self, burden) -> None:
        if burden is None:
            for label in (self.ui.prlCountLabel, self.ui.totalVolumeLabel, self.ui.positiveGe1Label, self.ui.positiveGe4Label):
                label.text = "–"
            return
        yes, no = _("yes"), _("no")
        self.ui.prlCountLabel.text = str(burden.prl_count)
        self.ui.totalVolumeLabel.text = f"{burden.total_volume_mm3:.1f} mm³"
        self.ui.positiveGe1Label.text = yes if burden.positive_ge1 else no
        self.ui.positiveGe4Label.text = yes if burden.positive_ge4 else no

    def selectedLesionId(self) -> int | None:
        table = self._parameterNode.lesionTable if self._parameterNode else None
        view = self.ui.lesionTableView
        if table is None or view.selectionModel() is None:
            return None
        indexes = view.selectionModel().selectedIndexes()
        if not indexes:
            return None
        row = view.sortFilterProxyModel().mapToSource(indexes[0]).row()
        column = table.GetTable().GetColumnByName("lesion_id")
        if column is None or not 0 <= row < table.GetNumberOfRows():
            return None
        return int(column.GetValue(row))

    def updateStatusButtons(self) -> None:
        selected = self.selectedLesionId() is not None
        for button in (self.ui.confirmButton, self.ui.rejectButton, self.ui.candidateButton):
            button.enabled = selected and self._run is None

    def onLesionSelected(self) -> None:
        self.updateStatusButtons()
        lesionId = self.selectedLesionId()
        if lesionId is None:
            return
        segmentation = self._parameterNode.outputSegmentation
        center = self.logic.lesionCenter(segmentation, lesionId)
        if center is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*center, True)
        segmentId = self.logic.segmentIdOfLesion(segmentation, lesionId)
        editorNode = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if segmentId and editorNode is not None and editorNode.GetSegmentationNode() is segmentation:
            editorNode.SetSelectedSegmentID(segmentId)

    def onSetStatus(self, status: str) -> None:
        lesionId = self.selectedLesionId()
        if lesionId is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not change the lesion's status.")):
            self.showBurden(self.logic.setStatus(self._parameterNode.outputSegmentation, lesionId, status))

    def onEditSegments(self) -> None:
        segmentation = self._parameterNode.outputSegmentation
        segmentId = self.logic.segmentIdOfLesion(segmentation, self.selectedLesionId()) if self.selectedLesionId() else None
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(self.logic.referenceVolume(segmentation))
        if segmentId:
            editor.setCurrentSegmentID(segmentId)

    def onUpdateBurden(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not update the burden."), waitCursor=True):
            self.showReview(self.logic.updateBurden(self._parameterNode.outputSegmentation))

    # -- export and annotation --------------------------------------------------------------------------------

    def onExport(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Export PRL results to folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            segmentation = self._parameterNode.outputSegmentation
            existing = self.logic.existingExportFiles(folder)
            if existing and not slicer.util.confirmOkCancelDisplay(
                    _("{folder} already holds {files}. Replace them?").format(folder=folder, files=", ".join(existing))):
                return
            paths = self.logic.export(segmentation, folder, overwrite=True)
            slicer.util.showStatusMessage(_("Exported {n} files to {folder}").format(n=len(paths), folder=folder), 5000)
            self.onParameterNodeModified()

    def onAddTrainingCase(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("nnU-Net raw dataset folder (created if empty)"))
        if not folder:
            return
        caseId = qt.QInputDialog.getText(
            slicer.util.mainWindow(), _("Add case to training set"),
            _("Case id (letters, digits, _ and -; empty for the next free one):"))
        with slicer.util.tryWithErrorDisplay(_("The case was not added."), waitCursor=True):
            p = self._parameterNode
            added = self.logic.addTrainingCase(p.outputSegmentation, folder, p.flairVolume, caseId.strip() or None)
            slicer.util.showStatusMessage(_("Added case {case} to {folder}").format(case=added, folder=folder), 5000)

    def onLoadGroundTruth(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load ground-truth PRL mask"), "",
            _("Masks (*.seg.nrrd *.nii *.nii.gz *.nrrd *.mha);;All files (*)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the mask."), waitCursor=True):
            if not ensureDependencies():
                return
            p = self._parameterNode
            self.showReview(self.logic.loadGroundTruth(path, p.qsmVolume, p.connectivity))

    def onSplitSegmentation(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not split the segmentation."), waitCursor=True):
            p = self._parameterNode
            segmentation = p.outputSegmentation
            qsm = self.logic.referenceVolume(segmentation) or p.qsmVolume
            self.showReview(self.logic.splitSegmentation(segmentation, qsm, p.connectivity))


#
# PRLDetectorLogic
#


class PRLDetectorLogic(ScriptedLoadableModuleLogic):
    """Runs without the panel: every method delegates to :class:`PRLDetectorLib.mrml.logic.SceneLogic`.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("PRLDetector")
        review = logic.detect(getNode("QSM"))           # waits; review.segmentation_node, .table_node, .burden
        logic.export(review.segmentation_node, "/tmp/prl")
    """

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self._core = None

    def getParameterNode(self):
        return PRLDetectorParameterNode(super().getParameterNode())

    @property
    def core(self):
        """The scene logic, created on first use: its imports need the installed dependencies."""
        scene = self._scene or slicer.mrmlScene
        if self._core is None or self._core.scene is not scene:
            from PRLDetectorLib.mrml.logic import SceneLogic

            self._core = SceneLogic(scene, pythonSlicerExecutable(), slicer.util.startupEnvironment(), modelsDirectory())
        return self._core

    # Models (no heavy imports: usable before dependencies are installed)

    def availableModels(self):
        from PRLDetectorLib.detection.models import bundled_models

        return bundled_models([modelsDirectory()])

    def installModel(self, source):
        from PRLDetectorLib.detection.models import install_model

        return install_model(source, modelsDirectory())

    # Detection

    def startDetection(self, qsmNode, flairNode, settings: DetectionSettings):
        return self.core.start_detection(qsmNode, flairNode, settings)

    def detect(self, qsmNode, flairNode=None, settings: DetectionSettings | None = None, progress=None,
               waitForCompletion: bool = True, inProcess: bool = False):
        """Blocking detection for scripts and tests (child process, or in this process with ``inProcess``)."""
        if not waitForCompletion:
            return self.startDetection(qsmNode, flairNode, settings or DetectionSettings())
        if inProcess:
            return self.core.detect_in_process(qsmNode, flairNode, settings, progress)
        return self.core.detect(qsmNode, flairNode, settings, progress)

    # Review

    def updateBurden(self, segmentationNode):
        return self.core.update_burden(segmentationNode)

    def setStatus(self, segmentationNode, lesionId: int, status: str):
        return self.core.set_status(segmentationNode, lesionId, status)

    def burden(self, segmentationNode):
        return self.core.burden(segmentationNode)

    def lesionCenter(self, segmentationNode, lesionId: int):
        return self.core.lesion_center_ras(segmentationNode, lesionId)

    def segmentIdOfLesion(self, segmentationNode, lesionId: int):
        from PRLDetectorLib.mrml.bridge import segment_id_of_lesion

        return segment_id_of_lesion(segmentationNode, lesionId)

    def linkedTable(self, segmentationNode):
        if segmentationNode is None:
            return None
        return segmentationNode.GetNodeReference("PRLDetector.LesionTable")

    def referenceVolume(self, segmentationNode):
        if segmentationNode is None:
            return None
        return segmentationNode.GetNodeReference(vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())

    # Export and annotation

    def existingExportFiles(self, folder) -> list:
        from PRLDetectorLib.results import EXPORT_FILES

        return [name for name in EXPORT_FILES if (Path(folder) / name).exists()]

    def export(self, segmentationNode, folder, overwrite: bool = False):
        return self.core.export(segmentationNode, folder, overwrite)

    def addTrainingCase(self, segmentationNode, datasetFolder, flairNode=None, caseId=None):
        return self.core.add_training_case(segmentationNode, datasetFolder, flairNode, caseId)

    def loadGroundTruth(self, path, qsmNode, connectivity: int = 26):
        return self.core.load_ground_truth(path, qsmNode, connectivity)

    def splitSegmentation(self, segmentationNode, qsmNode, connectivity: int = 26):
        return self.core.split_segmentation(segmentationNode, qsmNode, connectivity)

    def loadPhantomCase(self, folder, seed: int = 0, withFlair: bool = True, extentMm=None):
        """A phantom QSM (+FLAIR) with known PRLs, generated locally; ``.ground_truth_path`` is its PRL mask."""
        return self.core.load_phantom_case(folder, seed, withFlair, extentMm)


def pythonSlicerExecutable() -> str:
    """PythonSlicer runs Python with Slicer's packages; the child process runs the library's CLI with it."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which("PythonSlicer") or sys.executable)


def modelsDirectory() -> Path:
    """Where installed models go: beside Slicer's user settings, kept across Slicer versions."""
    return Path(slicer.app.slicerUserSettingsFilePath).parent / "PRLDetector" / "Models"


#
# PRLDetectorTest
#


class PRLDetectorTest(ScriptedLoadableModuleTest):
    """The CI scenario (Testing/Python/test_slicer_logic.py) inside Slicer, on slicer.mrmlScene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_review_of_a_phantom_case()

    def test_review_of_a_phantom_case(self):
        import tempfile

        import numpy as np

        from PRLDetectorLib.mrml import bridge

        self.delayDisplay("Creating a phantom case")
        logic = PRLDetectorLogic()
        workDir = Path(tempfile.mkdtemp(prefix="PRLDetectorTest-"))
        phantom = logic.loadPhantomCase(workDir / "phantom", seed=3, withFlair=False, extentMm=48)
        qsmNode, groundTruth = phantom.qsm_node, phantom.ground_truth_path

        self.delayDisplay("Detecting PRLs with the bundled QSM model (child process)")
        review = logic.detect(qsmNode, settings=DetectionSettings(model="qsm"))
        segmentation = review.segmentation_node
        lesions = bridge.lesion_segments(segmentation)
        self.assertEqual(len(lesions), review.table_node.GetNumberOfRows())
        self.assertEqual([s.name for s in lesions], [f"PRL {i}" for i in range(1, len(lesions) + 1)])
        self.assertIs(logic.referenceVolume(segmentation), qsmNode)

        self.delayDisplay("Reviewing on the ground truth: delete one lesion, erase half of another")
        review = logic.loadGroundTruth(groundTruth, qsmNode)
        segmentation = review.segmentation_node
        before = {int(r["lesion_id"]): r for r in bridge.rows_from_table(review.table_node)}
        self.assertGreaterEqual(len(before), 2)
        first, second = sorted(before)[:2]
        segmentation.GetSegmentation().RemoveSegment(bridge.segment_id_of_lesion(segmentation, first))
        secondId = bridge.segment_id_of_lesion(segmentation, second)
        mask = bridge.labels_from_segmentation(segmentation, qsmNode, [secondId]) > 0
        voxels = np.flatnonzero(mask)
        mask.ravel()[voxels[: voxels.size // 2]] = False
        bridge.set_segment_from_array(segmentation, secondId, mask, qsmNode)
        after = logic.updateBurden(segmentation)
        rows = {int(r["lesion_id"]): r for r in bridge.rows_from_table(after.table_node)}
        self.assertEqual(len(rows), len(before) - 1)
        self.assertEqual(rows[second]["voxels"], int(before[second]["voxels"]) - int(before[second]["voxels"]) // 2)
        self.assertEqual(after.burden.prl_count, review.burden.prl_count - 1)

        self.delayDisplay("Exporting")
        paths = logic.export(segmentation, workDir / "export")
        for path in paths.values():
            self.assertTrue(path.exists(), path)
        self.delayDisplay("Test passed")
