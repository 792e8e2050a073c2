"""What the PRL Detector module does to a scene, without Qt: detect, review, update, export.

The Logic class of ``PRLDetector.py`` delegates here, so scripts, the module self-test and the CI tests
(on slicer-core's MRML scene) run the same code as the panel. Detection runs in a child process
(:class:`DetectionRun`, the library's CLI) so that Slicer stays responsive and a run can be cancelled;
:meth:`SceneLogic.detect` waits for it, :meth:`SceneLogic.detect_in_process` skips the child process and
keeps the model loaded between cases.

A review is a segmentation node (one segment per lesion, tagged with its lesion id and status) and a
lesion table node built from it; :meth:`SceneLogic.update_burden` re-measures the segments as the reader
left them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.detection.burden import Burden
from PRLDetectorLib.detection.features import format_cell, measure_lesions, read_lesions_csv
from PRLDetectorLib.detection.lesions import find_lesions
from PRLDetectorLib.detection.models import (
    ModelInfo,
    bundled_models,
    check_channels,
    install_model,
    resolve_model,
)
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.longitudinal.alignment import align_visits
from PRLDetectorLib.longitudinal.rows import CHANGE_COLUMNS, change_row
from PRLDetectorLib.longitudinal.tracking import ChangeTable, Visit, track_lesions
from PRLDetectorLib.mrml import bridge
from PRLDetectorLib.mrml.process import (
    EXIT_INPUT_ERROR,
    ChildProcess,
    Event,
    Finished,
    Output,
    Progress,
    python_module_command,
)
from PRLDetectorLib.results import (
    BURDEN_NAME,
    EXPORT_FILES,
    LABELS_NAME,
    LESIONS_NAME,
    SEGMENTATION_NAME,
    atomic_path,
    read_record,
)
from PRLDetectorLib.settings import DetectionSettings

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]

LIBRARY_PARENT = Path(__file__).resolve().parents[2]
"""The folder that holds ``PRLDetectorLib``: the child process imports the library from here."""

PROBABILITY_REFERENCE_ROLE = "PRLDetector.Probability"
SETTINGS_ATTRIBUTE = "PRLDetector.Settings"
RECORD_ATTRIBUTE = "PRLDetector.ResultRecord"
"""The burden.json of an opened result folder: an export keeps what it says about inputs, model and grid."""
RESULT_FOLDER_ATTRIBUTE = "PRLDetector.ResultFolder"
"""Where an opened result folder lies: :meth:`SceneLogic.save_review` writes back there."""
MODEL_ATTRIBUTE = "PRLDetector.Model"
TRANSFORMS_ATTRIBUTE = "PRLDetector.InputTransforms"
CLI_ERROR_PREFIX = "prl-detect: error: "


@dataclass
class OpenedResult:
    """A result folder opened for review: where it lies, its burden.json, its volumes and its review."""

    folder: Path
    record: dict
    qsm_node: object
    flair_node: object | None
    review: LesionReview


@dataclass
class PhantomNodes:
    """A phantom case in the scene, and where its ground-truth PRL mask lies on disk."""

    qsm_node: object
    flair_node: object | None
    ground_truth_path: Path
    truth: dict


@dataclass
class VisitComparison:
    """Two reviewed visits compared: the change table node (one row per tracked lesion) and what it came from."""

    table_node: object
    changes: ChangeTable


@dataclass
class LesionReview:
    """The nodes of one case under review and its burden (rejected lesions left out)."""

    segmentation_node: object
    table_node: object
    burden: Burden


def input_transforms(qsm_node, flair_node=None) -> dict[str, dict]:
    """The reader's transforms that detection honours, as ``burden.json`` records them (empty when none).

    Detection measures in the QSM's own scanner frame: the QSM's voxels and header are used as they are and
    the results are put under the QSM's transform, so they move with it. A FLAIR is taken as the reader placed
    it relative to the QSM (see :func:`bridge.image_in_frame_of`); automatic registration then starts from there.
    """
    record = {}
    qsm = bridge.transform_record(qsm_node)
    if qsm is not None:
        qsm["applied"] = "QSM used in its scanner frame; the results are placed under the same transform"
        record["qsm"] = qsm
    flair = bridge.transform_record(flair_node, qsm_node) if flair_node is not None else None
    if flair is not None:
        how = "resampled on a copy" if flair["resampled"] else "its header moved on a copy (no interpolation)"
        flair["applied"] = f"FLAIR taken as the reader aligned it to the QSM: {how}"
        record["flair"] = flair
    return record

BASELINE_REFERENCE_ROLE = "PRLDetector.BaselineSegmentation"
FOLLOWUP_REFERENCE_ROLE = "PRLDetector.FollowupSegmentation"
REGISTRATION_ATTRIBUTE = "PRLDetector.Registration"


def output_name(qsm_node) -> str:
    return f"{qsm_node.GetName()} PRLs"


def table_name(qsm_node) -> str:
    return f"{qsm_node.GetName()} PRL lesions"


class DetectionRun:
    """One detection in a child process: inputs written as NIfTI, the CLI run, its results loaded.

    ``start`` returns at once; poll or wait, then ``load`` the result into the scene. ``cancel`` kills the
    child's process tree; the scene is not touched until ``load``.
    """

    def __init__(
        self,
        logic: SceneLogic,
        qsm_node,
        flair_node,
        settings: DetectionSettings,
        model: ModelInfo,
    ):
        self.logic = logic
        self.qsm_node = qsm_node
        self.flair_node = flair_node
        self.settings = settings
        self.model = model
        self.work_dir = Path(tempfile.mkdtemp(prefix="PRLDetector-"))
        self.out_dir = self.work_dir / "result"
        self.child: ChildProcess | None = None
        self.input_transforms: dict[str, dict] = {}
        self.progress = 0.0
        self.message = ""

    def command(self, qsm_path: Path, flair_path: Path | None) -> list[str]:
        s = self.settings
        args = ["detect", "--qsm", qsm_path, "--out", self.out_dir, "--model", self.model.path,
                "--device", s.device, "--tta" if s.tta else "--no-tta", "--threshold", repr(float(s.threshold)),
                "--min-lesion-mm3", repr(float(s.min_lesion_mm3)), "--connectivity", int(s.connectivity),
                "--min-rim-coverage", repr(float(s.min_rim_coverage)), "--operating-point", s.operating_point,
                "--progress-lines"]
        if flair_path is not None:
            args[3:3] = ["--flair", flair_path]
        return python_module_command(self.logic.python_executable, "PRLDetectorLib", args)

    def environment(self) -> dict[str, str]:
        env = dict(self.logic.base_env if self.logic.base_env is not None else os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LIBRARY_PARENT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        qsm_path = self.work_dir / "qsm.nii"
        sitk.WriteImage(bridge.image_from_volume_node(self.qsm_node), str(qsm_path))
        flair_path = None
        if self.flair_node is not None:
            flair_path = self.work_dir / "flair.nii"
            sitk.WriteImage(bridge.image_in_frame_of(self.flair_node, self.qsm_node), str(flair_path))
        self.input_transforms = input_transforms(self.qsm_node, self.flair_node)
        _log_transforms(self.input_transforms)
        self.child = ChildProcess(self.command(qsm_path, flair_path), env=self.environment(), cwd=LIBRARY_PARENT)
        logger.info("Detecting PRLs in '%s' with model '%s'", self.qsm_node.GetName(), self.model.name)
        self.child.start()

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def poll(self) -> list[Event]:
        """Queued events since the last call; child log lines also go to the log."""
        events = self.child.poll() if self.child else []
        for event in events:
            self._note(event)
        return events

    def _note(self, event: Event) -> None:
        if isinstance(event, Progress):
            self.progress, self.message = event.fraction, event.message
        elif isinstance(event, Output):
            logger.info("%s", _strip_level(event.text))

    def wait(self, progress: ProgressCallback | None = None, timeout: float | None = None) -> Finished:
        def on_event(event: Event) -> None:
            self._note(event)
            if progress is not None and isinstance(event, Progress):
                progress(event.fraction, event.message)

        assert self.child is not None
        return self.child.wait(timeout=timeout, on_event=on_event)

    def cancel(self) -> None:
        if self.child is not None:
            self.child.cancel()
        logger.info("Detection cancelled; the scene is unchanged.")

    def raise_for_failure(self) -> None:
        finished = self.child.finished if self.child else None
        if finished is None:
            raise RuntimeError("Detection has not finished yet.")
        if finished.cancelled:
            raise InputError("Detection was cancelled; nothing was added to the scene.")
        if finished.returncode == EXIT_INPUT_ERROR:
            raise InputError(finished.error.removeprefix(CLI_ERROR_PREFIX) or "Detection refused its inputs.")
        if finished.returncode != 0:
            tail = "\n".join(self.child.stderr_tail[-15:])
            raise RuntimeError(f"Detection failed (exit code {finished.returncode}):\n{tail}")

    def load(self) -> LesionReview:
        """Add the result to the scene: a new segmentation node and lesion table (never replacing one)."""
        self.raise_for_failure()
        labels = sitk.ReadImage(str(self.out_dir / LABELS_NAME))
        rows = read_lesions_csv(self.out_dir / LESIONS_NAME)
        review = self.logic.show_detection(self.qsm_node, sitk.GetArrayFromImage(labels), rows)
        record = json.loads((self.out_dir / BURDEN_NAME).read_text(encoding="utf-8"))
        _annotate(review.segmentation_node, record.get("settings", self.settings.to_dict()), record.get("model", {}),
                  self.input_transforms)
        return review

    def cleanup(self) -> None:
        if self.running:
            self.cancel()
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _strip_level(text: str) -> str:
    for level in ("DEBUG ", "INFO ", "WARNING ", "ERROR "):
        if text.startswith(level):
            return text[len(level):]
    return text


def _annotate(segmentation_node, settings: Mapping, model: Mapping, transforms: Mapping | None = None) -> None:
    segmentation_node.SetAttribute(SETTINGS_ATTRIBUTE, json.dumps(dict(settings)))
    segmentation_node.SetAttribute(MODEL_ATTRIBUTE, json.dumps({k: model.get(k) for k in ("name", "version", "path")}))
    segmentation_node.SetAttribute(TRANSFORMS_ATTRIBUTE, json.dumps(dict(transforms or {})))


def _log_transforms(transforms: Mapping[str, Mapping]) -> None:
    for role, record in transforms.items():
        logger.info("%s '%s' is moved by transform '%s' in Slicer: %s.", role.upper(), record["volume"],
                    record["transform"], record["applied"])


class SceneLogic:
    """Everything the module does to one MRML scene.

    ``python_executable`` and ``base_env`` are what the child process runs with (inside Slicer: PythonSlicer
    and Slicer's startup environment); ``models_dir`` is where installed models go.
    """

    def __init__(
        self,
        scene,
        python_executable: str | Path | None = None,
        base_env: Mapping[str, str] | None = None,
        models_dir: str | Path | None = None,
    ):
        self.scene = scene
        self.python_executable = str(python_executable or sys.executable)
        self.base_env = dict(base_env) if base_env is not None else None
        self.models_dir = Path(models_dir) if models_dir else None
        self._detector = None

    # -- models -------------------------------------------------------------------------------------

    def _extra_dirs(self) -> list[Path]:
        return [self.models_dir] if self.models_dir else []

    def available_models(self) -> list[ModelInfo]:
        return bundled_models(self._extra_dirs())

    def resolve_model(self, name_or_path: str) -> ModelInfo:
        return resolve_model(name_or_path, self._extra_dirs())

    def install_model(self, source: str | Path) -> ModelInfo:
        if self.models_dir is None:
            raise InputError("No folder for installed models is set; give models_dir to the logic.")
        return install_model(source, self.models_dir)

    # -- detection ----------------------------------------------------------------------------------

    def _check_inputs(self, qsm_node, flair_node, settings: DetectionSettings) -> ModelInfo:
        if qsm_node is None:
            raise InputError("No QSM volume is selected; load a QSM map and select it as input.")
        if qsm_node.GetImageData() is None:
            raise InputError(f"The QSM volume '{qsm_node.GetName()}' holds no voxels; load the image again.")
        if flair_node is not None and flair_node.GetImageData() is None:
            raise InputError(f"The FLAIR volume '{flair_node.GetName()}' holds no voxels; load it again or clear it.")
        settings.validate()
        model = self.resolve_model(settings.model)
        check_channels(model, {"qsm", "flair"} if flair_node is not None else {"qsm"})
        return model

    def start_detection(self, qsm_node, flair_node, settings: DetectionSettings) -> DetectionRun:
        """Validate, write the inputs and start the child process; poll the returned run."""
        model = self._check_inputs(qsm_node, flair_node, settings)
        run = DetectionRun(self, qsm_node, flair_node, settings, model)
        try:
            run.start()
        except BaseException:
            run.cleanup()
            raise
        return run

    def detect(
        self,
        qsm_node,
        flair_node=None,
        settings: DetectionSettings | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> LesionReview:
        """Detect PRLs in a child process and wait for it (for scripts and tests)."""
        run = self.start_detection(qsm_node, flair_node, settings or DetectionSettings())
        try:
            run.wait(progress, timeout)
            return run.load()
        finally:
            run.cleanup()

    def detect_in_process(
        self,
        qsm_node,
        flair_node=None,
        settings: DetectionSettings | None = None,
        progress: ProgressCallback | None = None,
    ) -> LesionReview:
        """Detect PRLs in this process; the model stays loaded for the next case with the same settings."""
        from PRLDetectorLib.detection.pipeline import Detector

        settings = settings or DetectionSettings()
        self._check_inputs(qsm_node, flair_node, settings)
        if self._detector is None or self._detector.settings != settings:
            self._detector = Detector(dataclasses.replace(settings), self._extra_dirs())
        qsm = bridge.image_from_volume_node(qsm_node)
        flair = bridge.image_in_frame_of(flair_node, qsm_node) if flair_node is not None else None
        transforms = input_transforms(qsm_node, flair_node)
        _log_transforms(transforms)
        result = self._detector.detect(qsm, flair, progress)
        rows = bridge.rows_with_status(result.lesions, {})
        probability = bridge.add_volume_node(self.scene, result.probability, f"{qsm_node.GetName()} PRL probability")
        probability.HideFromEditorsOn()
        if qsm_node.GetParentTransformNode() is not None:
            probability.SetAndObserveTransformNodeID(qsm_node.GetParentTransformNode().GetID())
        review = self.show_detection(qsm_node, sitk.GetArrayFromImage(result.labels), rows)
        review.segmentation_node.SetNodeReferenceID(PROBABILITY_REFERENCE_ROLE, probability.GetID())
        bridge.place_next_to(self.scene, probability, qsm_node)
        model = {"name": result.model.name, "version": result.model.version, "path": str(result.model.path)}
        _annotate(review.segmentation_node, settings.to_dict(), model, transforms)
        return review

    def show_detection(self, qsm_node, labels: np.ndarray, rows: Sequence[Mapping[str, object]]) -> LesionReview:
        """A new segmentation node and lesion table for detected lesions (ids in ``labels`` = rows' lesion_id)."""
        statuses = {int(row["lesion_id"]): str(row.get(bridge.STATUS_COLUMN, bridge.CANDIDATE)) for row in rows}
        ids_in_labels = {int(i) for i in np.unique(labels) if i}
        if ids_in_labels != set(statuses):
            raise RuntimeError(
                f"The label map holds lesions {sorted(ids_in_labels)} but the lesion table {sorted(statuses)}."
            )
        segmentation_node = bridge.segmentation_from_labels(
            self.scene, labels, qsm_node, self.scene.GenerateUniqueName(output_name(qsm_node)), statuses=statuses
        )
        rows = [{**row, bridge.STATUS_COLUMN: statuses[int(row["lesion_id"])]} for row in rows]
        table_node = bridge.lesion_table_node(self.scene, rows, self.scene.GenerateUniqueName(table_name(qsm_node)))
        bridge.link_table(segmentation_node, table_node)
        bridge.place_next_to(self.scene, table_node, qsm_node)
        burden = bridge.burden_from_rows(rows)
        logger.info("%d lesion(s) in '%s'.", len(rows), segmentation_node.GetName())
        return LesionReview(segmentation_node, table_node, burden)

    # -- review ---------------------------------------------------------------------------------------

    def _reference(self, segmentation_node):
        if segmentation_node is None:
            raise InputError("No PRL segmentation is selected; run detection or load a ground-truth mask first.")
        qsm_node = bridge.reference_volume(segmentation_node)
        if qsm_node is None or qsm_node.GetImageData() is None:
            raise InputError(
                f"The segmentation '{segmentation_node.GetName()}' has no QSM volume as reference geometry; "
                "set it in the Segmentations module (Reference geometry) and try again."
            )
        return qsm_node

    def update_burden(self, segmentation_node) -> LesionReview:
        """Re-measure every lesion from the segments as they are now, keeping names and statuses.

        A segment is one lesion whatever its shape (several pieces stay one lesion); a deleted segment
        leaves the table; a segment drawn by the reader gets the next lesion id and a row.
        """
        qsm_node = self._reference(segmentation_node)
        segments = bridge.claim_new_segments(segmentation_node)
        labels = bridge.labels_from_segmentation(segmentation_node, qsm_node, [s.segment_id for s in segments])
        qsm = bridge.image_from_volume_node(qsm_node)
        probability_node = segmentation_node.GetNodeReference(PROBABILITY_REFERENCE_ROLE)
        probability = (
            sitk.GetArrayFromImage(bridge.image_from_volume_node(probability_node)) if probability_node else None
        )
        measured = {m.lesion_id: m for m in measure_lesions(labels, sitk.GetArrayViewFromImage(qsm), qsm, probability)}
        table_node = bridge.linked_table(segmentation_node)
        previous = {int(r["lesion_id"]): r for r in bridge.rows_from_table(table_node)} if table_node else {}

        rows = []
        for value, segment in enumerate(segments, start=1):
            lesion = measured.get(value)
            if lesion is None:
                logger.info("Segment '%s' is empty; it is left out of the table.", segment.name)
                continue
            row = {
                **dataclasses.replace(lesion, lesion_id=segment.lesion_id).as_row(),
                bridge.STATUS_COLUMN: segment.status,
                bridge.NOTE_COLUMN: segment.note,
            }
            old = previous.get(segment.lesion_id)
            if old is not None and _same_voxels(old, row):
                # An untouched lesion keeps what was measured without the segments: its PRL probability (the
                # classifier judged this outline; an edited one is the reader's call now, and its status says
                # what they decided), the mean probability when the probability map is not in the scene, and
                # any column another tool added to lesions.csv.
                row.update({k: v for k, v in old.items() if k not in row or _is_nan(row[k])})
            rows.append(row)

        if table_node is None:
            table_node = bridge.lesion_table_node(self.scene, rows, self.scene.GenerateUniqueName(table_name(qsm_node)))
            bridge.link_table(segmentation_node, table_node)
            bridge.place_next_to(self.scene, table_node, qsm_node)
        else:
            bridge.lesion_table_node(self.scene, rows, table_node.GetName(), table_node)
        count = segmentation_node.GetSegmentation().GetNumberOfSegments()
        if 0 < count <= bridge.SURFACE_SEGMENT_LIMIT:
            segmentation_node.CreateClosedSurfaceRepresentation()
        burden = bridge.burden_from_rows(rows)
        logger.info(
            "Updated '%s': %d lesion(s), %d PRL(s) after review, %.1f mm³.",
            segmentation_node.GetName(), len(rows), burden.prl_count, burden.total_volume_mm3,
        )
        return LesionReview(segmentation_node, table_node, burden)

    def set_status(self, segmentation_node, lesion_id: int, status: str) -> Burden:
        """Confirm or reject a lesion (or put it back to candidate); return the new burden."""
        segment_id = bridge.segment_id_of_lesion(segmentation_node, lesion_id)
        if segment_id is None:
            raise InputError(f"Lesion {lesion_id} has no segment any more; press Update burden to refresh the table.")
        bridge.set_lesion_status(segmentation_node, segment_id, status)
        table_node = bridge.linked_table(segmentation_node)
        rows = bridge.rows_from_table(table_node) if table_node else []
        for row in rows:
            if int(row["lesion_id"]) == lesion_id:
                row[bridge.STATUS_COLUMN] = status
        if table_node is not None:
            bridge.lesion_table_node(self.scene, rows, table_node.GetName(), table_node)
        logger.info("Lesion %d is %s.", lesion_id, status)
        return bridge.burden_from_rows(rows)

    def set_note(self, segmentation_node, lesion_id: int, note: str) -> None:
        """The reader's note on a lesion (one line; saved as a segment tag and in lesions.csv's ``note``)."""
        segment_id = bridge.segment_id_of_lesion(segmentation_node, lesion_id)
        if segment_id is None:
            raise InputError(f"Lesion {lesion_id} has no segment any more; press Update burden to refresh the table.")
        bridge.set_lesion_note(segmentation_node, segment_id, note)
        table_node = bridge.linked_table(segmentation_node)
        if table_node is not None:
            rows = bridge.rows_from_table(table_node)
            note = next(s.note for s in bridge.lesion_segments(segmentation_node) if s.segment_id == segment_id)
            for row in rows:
                if int(row["lesion_id"]) == lesion_id:
                    row[bridge.NOTE_COLUMN] = note
            bridge.lesion_table_node(self.scene, rows, table_node.GetName(), table_node)

    def burden(self, segmentation_node) -> Burden:
        table_node = bridge.linked_table(segmentation_node)
        return bridge.burden_from_table(table_node) if table_node else bridge.burden_from_rows([])

    def lesion_center_ras(self, segmentation_node, lesion_id: int) -> tuple[float, float, float] | None:
        """Where to centre the slice views for a lesion: its centroid, in world RAS."""
        table_node = bridge.linked_table(segmentation_node)
        row = next((r for r in bridge.rows_from_table(table_node) if int(r["lesion_id"]) == lesion_id), None) if table_node else None
        if row is None:
            segment_id = bridge.segment_id_of_lesion(segmentation_node, lesion_id)
            return bridge.segment_center_ras(segmentation_node, segment_id) if segment_id else None
        point = [float(row["centroid_ras_x_mm"]), float(row["centroid_ras_y_mm"]), float(row["centroid_ras_z_mm"])]
        transform = segmentation_node.GetParentTransformNode()
        if transform is not None:
            import vtk

            to_world = vtk.vtkGeneralTransform()
            transform.GetTransformToWorld(to_world)
            point = list(to_world.TransformPoint(point))
        return tuple(point)

    def centre_views_on_lesion(self, segmentation_node, lesion_id: int) -> tuple[float, float, float] | None:
        """Centre every slice view on a lesion (its centroid); return that point, None if the lesion is gone."""
        center = self.lesion_center_ras(segmentation_node, lesion_id)
        if center is not None:
            bridge.centre_slice_views(self.scene, center)
        return center

    # -- result folders ----------------------------------------------------------------------------------

    def open_result(self, folder: str | Path, qsm_path: str | Path | None = None,
                    qsm_name: str | None = None) -> OpenedResult:
        """Open a ``detect`` result folder (or one batch patient) for review, as it was last saved.

        The QSM (and FLAIR, on the QSM grid as detection aligned it) come from the paths ``burden.json``
        records (``qsm_path``: the same QSM moved elsewhere); the lesions are the segments of ``prl.seg.nrrd``
        with the statuses and notes a review saved (a file straight from ``detect`` has candidates); the table
        is ``lesions.csv`` as measured. ``qsm_name`` names the QSM node (default: "<folder> QSM").
        """
        from PRLDetectorLib.detection.result_images import QSM_WINDOW_PPM, read_result_images

        folder = Path(folder)
        record = read_record(folder)
        for name in (SEGMENTATION_NAME, LESIONS_NAME):
            if not (folder / name).is_file():
                raise InputError(f"'{folder}' holds no {name}; it is not a complete PRLDetector result.")
        rows = read_lesions_csv(folder / LESIONS_NAME)
        images = read_result_images(folder, record, qsm_path=qsm_path)
        case = folder.name
        added = []
        try:
            qsm_node = bridge.add_volume_node(self.scene, images.qsm, qsm_name or self.scene.GenerateUniqueName(f"{case} QSM"))
            added.append(qsm_node)
            bridge.set_window(qsm_node, *QSM_WINDOW_PPM)
            flair_node = None
            if images.flair is not None:
                flair_node = bridge.add_volume_node(self.scene, images.flair, self.scene.GenerateUniqueName(f"{case} FLAIR"))
                added.append(flair_node)
                if images.flair_window:
                    bridge.set_window(flair_node, *images.flair_window)
            segmentation_node = bridge.read_segmentation_file(
                self.scene, folder / SEGMENTATION_NAME, self.scene.GenerateUniqueName(output_name(qsm_node))
            )
            added.append(segmentation_node)
        except BaseException:
            bridge.remove_nodes(self.scene, added)
            raise
        bridge.use_reference_volume(segmentation_node, qsm_node)
        bridge.adopt_result_segments(segmentation_node, rows)
        segments = {s.lesion_id: s for s in bridge.claim_new_segments(segmentation_node)}
        measured = set(segments) == {int(row["lesion_id"]) for row in rows}
        # The segments hold the statuses and notes; the table shows them beside the measurements.
        table_rows = [
            {**row, bridge.STATUS_COLUMN: segments[int(row["lesion_id"])].status,
             bridge.NOTE_COLUMN: segments[int(row["lesion_id"])].note}
            for row in rows
        ] if measured else rows
        table_node = bridge.lesion_table_node(self.scene, table_rows, self.scene.GenerateUniqueName(table_name(qsm_node)))
        bridge.link_table(segmentation_node, table_node)
        bridge.show_segmentation(segmentation_node)
        segmentation_node.SetAttribute(RECORD_ATTRIBUTE, json.dumps(record))
        segmentation_node.SetAttribute(RESULT_FOLDER_ATTRIBUTE, str(folder.resolve()))
        _annotate(segmentation_node, record.get("settings", {}), record.get("model", {}))
        review = LesionReview(segmentation_node, table_node, bridge.burden_from_rows(table_rows))
        if not measured:
            # A segment drawn in Slicer and saved without Update burden, or a table edited by hand: measure now.
            review = self.update_burden(segmentation_node)
        logger.info("Opened %s: %d lesion(s), %d PRL(s) not rejected.", folder, len(segments), review.burden.prl_count)
        return OpenedResult(folder, record, qsm_node, flair_node, review)

    def result_folder(self, segmentation_node) -> Path | None:
        """The result folder a review was opened from (None for a detection or a mask made in the scene)."""
        folder = segmentation_node.GetAttribute(RESULT_FOLDER_ATTRIBUTE) if segmentation_node else None
        return Path(folder) if folder else None

    def save_review(self, segmentation_node, reviewer: str, reviewed_in: str = "3D Slicer (PRL Detector)") -> dict[str, Path]:
        """Save the review into the result folder it was opened from, with the reviewer's name."""
        folder = self.result_folder(segmentation_node)
        if folder is None:
            raise InputError("This review was not opened from a result folder; use Export to choose a folder.")
        if not reviewer.strip():
            raise InputError("Type your name as reviewer before saving: the files record who reviewed them.")
        return self.export(segmentation_node, folder, overwrite=True, reviewer=reviewer, reviewed_in=reviewed_in)

    def close_result(self, opened: OpenedResult) -> None:
        """Remove an opened result's nodes from the scene."""
        review = opened.review
        bridge.remove_nodes(self.scene, (review.table_node, review.segmentation_node, opened.flair_node, opened.qsm_node))

    # -- ground truth -------------------------------------------------------------------------------------

    def split_into_lesions(self, mask: np.ndarray, qsm_node, connectivity: int = 26, name: str | None = None) -> LesionReview:
        """A reviewed segmentation from an annotator's mask: one confirmed segment per connected lesion."""
        qsm = bridge.geometry_image(qsm_node)
        labels = find_lesions(np.asarray(mask) > 0, qsm.GetSpacing(), 0.0, connectivity)
        if not labels.any():
            raise InputError("The mask is empty on the QSM grid; check that it belongs to this QSM.")
        segmentation_node = bridge.segmentation_from_labels(
            self.scene, labels, qsm_node,
            self.scene.GenerateUniqueName(name or f"{qsm_node.GetName()} ground-truth PRLs"),
            default_status=bridge.CONFIRMED,
        )
        return self.update_burden(segmentation_node)

    def load_ground_truth(self, path: str | Path, qsm_node, connectivity: int = 26) -> LesionReview:
        """Read a label map or ``.seg.nrrd`` (any grid; resampled onto the QSM) and split it into lesions."""
        from PRLDetectorLib.exports.segments import read_mask

        if qsm_node is None:
            raise InputError("Select the QSM the ground truth belongs to first.")
        mask = read_mask(path, bridge.geometry_image(qsm_node))
        stem = Path(path).name.split(".")[0]
        return self.split_into_lesions(mask, qsm_node, connectivity, f"{stem} PRLs")

    def split_segmentation(self, segmentation_node, qsm_node, connectivity: int = 26) -> LesionReview:
        """Split every segment of an existing segmentation (e.g. a ground truth drawn as one segment)."""
        labels = bridge.labels_from_segmentation(segmentation_node, qsm_node)
        return self.split_into_lesions(labels, qsm_node, connectivity, f"{segmentation_node.GetName()} lesions")

    # -- sample data -------------------------------------------------------------------------------------------

    def load_phantom_case(
        self, folder: str | Path, seed: int = 0, with_flair: bool = True, extent_mm: float | None = None,
        case_id: str = "PRLPhantom",
    ) -> PhantomNodes:
        """Load a phantom case with known PRLs, generated on this computer the first time (nothing is downloaded)."""
        from PRLDetectorLib.detection.images import read_image
        from PRLDetectorLib.phantom.sample import generated_case

        case_dir = generated_case(folder, case_id, seed, with_flair, extent_mm)
        qsm_node = bridge.add_volume_node(self.scene, read_image(case_dir / "qsm.nii.gz", "QSM"), f"{case_id} QSM")
        flair_node = None
        if (case_dir / "flair.nii.gz").is_file():
            flair_node = bridge.add_volume_node(self.scene, read_image(case_dir / "flair.nii.gz", "FLAIR"), f"{case_id} FLAIR")
        truth = json.loads((case_dir / "truth.json").read_text(encoding="utf-8"))
        logger.info("Phantom '%s': %d PRL(s); ground truth in %s", case_id, truth.get("prl_count", 0), case_dir / "gt_prl.nii.gz")
        return PhantomNodes(qsm_node, flair_node, case_dir / "gt_prl.nii.gz", truth)

    def load_sample_case(self, folder: str | Path, extent_mm: float | None = None) -> PhantomNodes:
        """The sample data "PRLPhantom" (QSM + FLAIR, the same case SampleData loads), from ``folder``."""
        from PRLDetectorLib.phantom.sample import SAMPLE_NAME, SAMPLE_SEED

        return self.load_phantom_case(folder, SAMPLE_SEED, True, extent_mm, SAMPLE_NAME)

    # -- follow-up visits ----------------------------------------------------------------------------------

    def load_result(self, result_dir: str | Path, qsm_path: str | Path | None = None, name: str | None = None) -> LesionReview:
        """A ``detect`` result folder in the scene as a review of its lesions (e.g. an earlier visit): what
        :meth:`open_result` opens, its QSM named ``name``."""
        return self.open_result(result_dir, qsm_path, name).review

    def _visit(self, segmentation_node, name: str, flair_node=None) -> Visit:
        """A reviewed visit as the comparison sees it: the lesions not rejected, measured as they are now."""
        review = self.update_burden(segmentation_node)
        qsm_node = self._reference(segmentation_node)
        rows = [r for r in bridge.rows_from_table(review.table_node) if r[bridge.STATUS_COLUMN] != bridge.REJECTED]
        kept = [s for s in bridge.lesion_segments(segmentation_node) if s.status != bridge.REJECTED]
        values = bridge.labels_from_segmentation(segmentation_node, qsm_node, [s.segment_id for s in kept])
        labels = np.array([0] + [s.lesion_id for s in kept], dtype=np.uint16)[values]
        qsm = sitk.Cast(bridge.image_from_volume_node(qsm_node), sitk.sitkFloat32)

        def flair() -> sitk.Image:
            from PRLDetectorLib.detection.registration import flair_to_qsm_grid

            return flair_to_qsm_grid(bridge.image_from_volume_node(flair_node), qsm)[0]

        return Visit(name, qsm, labels, rows, flair if flair_node is not None else None, segmentation_node.GetName())

    def compare_visits(self, baseline_segmentation, followup_segmentation, baseline_flair=None, followup_flair=None,
                       name: str | None = None) -> VisitComparison:
        """Register the follow-up's QSM to the baseline's, track the PRLs of the two reviews and show the changes
        as a table node (one row per tracked lesion, the columns of ``changes.csv``)."""
        if baseline_segmentation is None or followup_segmentation is None:
            raise InputError("Choose the PRL segmentation of both visits (run detection or load a result for each).")
        if baseline_segmentation is followup_segmentation:
            raise InputError("The baseline and the follow-up are the same segmentation; choose one of each visit.")
        baseline = self._visit(baseline_segmentation, "baseline", baseline_flair)
        followup = self._visit(followup_segmentation, "follow-up", followup_flair)
        changes = track_lesions(baseline, followup, align_visits(baseline.qsm, followup.qsm))
        table_node = self.scene.AddNewNodeByClass(
            "vtkMRMLTableNode", self.scene.GenerateUniqueName(name or f"{followup_segmentation.GetName()} changes"))
        _fill_change_table(table_node, [change_row(change) for change in changes.changes])
        table_node.SetNodeReferenceID(BASELINE_REFERENCE_ROLE, baseline_segmentation.GetID())
        table_node.SetNodeReferenceID(FOLLOWUP_REFERENCE_ROLE, followup_segmentation.GetID())
        table_node.SetAttribute(REGISTRATION_ATTRIBUTE, json.dumps(changes.alignment.to_dict()))
        bridge.place_next_to(self.scene, table_node, self._reference(followup_segmentation))
        logger.info("Compared '%s' with '%s': %s", baseline_segmentation.GetName(), followup_segmentation.GetName(),
                    ", ".join(f"{n} {k}" for k, n in changes.counts().items() if n) or "no PRL at either visit")
        return VisitComparison(table_node, changes)

    def change_positions(self, table_node, row: int) -> tuple[tuple[float, float, float] | None, tuple[float, float, float] | None]:
        """Where a tracked lesion lies at baseline and at follow-up (world RAS, each visit's segmentation's
        transform applied); None for a visit where it cannot be placed."""
        if table_node is None or not 0 <= row < table_node.GetNumberOfRows():
            return None, None
        table = table_node.GetTable()
        out = []
        for visit, role in (("baseline", BASELINE_REFERENCE_ROLE), ("followup", FOLLOWUP_REFERENCE_ROLE)):
            point = [float(table.GetColumnByName(f"{visit}_centroid_ras_{axis}_mm").GetValue(row)) for axis in "xyz"]
            if not all(math.isfinite(v) for v in point):
                out.append(None)
                continue
            segmentation = table_node.GetNodeReference(role)
            transform = segmentation.GetParentTransformNode() if segmentation is not None else None
            if transform is not None:
                import vtk

                to_world = vtk.vtkGeneralTransform()
                transform.GetTransformToWorld(to_world)
                point = list(to_world.TransformPoint(point))
            out.append(tuple(point))
        return out[0], out[1]

    # -- export ---------------------------------------------------------------------------------------------

    def export(
        self, segmentation_node, out_dir: str | Path, overwrite: bool = False, reviewer: str = "",
        reviewed_in: str = "3D Slicer (PRL Detector)",
    ) -> dict[str, Path]:
        """Write lesions.csv, burden.json, prl.seg.nrrd and prl_labels.nii.gz of the review as it is now.

        The burden is updated first, so the files agree with the segments. The label map holds the lesions
        the reader did not reject, valued by lesion id; the table and the ``.seg.nrrd`` keep every lesion with
        its status and note. A review of an opened result folder keeps what its burden.json said (inputs,
        model, settings, grid) and adds the review. The four files replace the old ones together: all are
        written first, ``burden.json`` (the result's marker) is renamed into place last, and a failure
        before that leaves the old files as they were.
        """
        out_dir = Path(out_dir)
        paths = {name: out_dir / name for name in EXPORT_FILES}
        existing = [p.name for p in paths.values() if p.exists()]
        if existing and not overwrite:
            raise InputError(f"'{out_dir}' already holds {', '.join(existing)}; choose another folder or allow overwriting.")
        review = self.update_burden(segmentation_node)
        qsm_node = self._reference(segmentation_node)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Files keep lesion order (the panel may show the most probable PRL first).
        rows = sorted(bridge.rows_from_table(review.table_node), key=lambda row: int(row["lesion_id"]))
        kept = [s for s in bridge.lesion_segments(segmentation_node) if s.status != bridge.REJECTED]
        values = bridge.labels_from_segmentation(segmentation_node, qsm_node, [s.segment_id for s in kept])
        lookup = np.array([0] + [s.lesion_id for s in kept], dtype=np.uint16)
        label_image = sitk.GetImageFromArray(lookup[values])
        label_image.CopyInformation(bridge.geometry_image(qsm_node))
        record = {
            **(_json_attribute(segmentation_node, RECORD_ATTRIBUTE) or {
                "settings": _json_attribute(segmentation_node, SETTINGS_ATTRIBUTE),
                "model": _json_attribute(segmentation_node, MODEL_ATTRIBUTE),
            }),
            "burden": review.burden.to_dict(),
            "lesion_ids": [int(r["lesion_id"]) for r in rows if r[bridge.STATUS_COLUMN] != bridge.REJECTED],
            "rejected_lesion_ids": [int(r["lesion_id"]) for r in rows if r[bridge.STATUS_COLUMN] == bridge.REJECTED],
            "confirmed_lesion_ids": [int(r["lesion_id"]) for r in rows if r[bridge.STATUS_COLUMN] == bridge.CONFIRMED],
            "reviewed_in": reviewed_in,
            "reviewer": " ".join(reviewer.split()),
            "reviewed_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "qsm": qsm_node.GetName(),
            "segmentation": segmentation_node.GetName(),
            "input_transforms": _json_attribute(segmentation_node, TRANSFORMS_ATTRIBUTE) or {},
        }
        with ExitStack() as stack:
            # Entered first, left last: burden.json is renamed into place after the other three.
            partial = {name: stack.enter_context(atomic_path(paths[name])) for name in (BURDEN_NAME, *(n for n in paths if n != BURDEN_NAME))}
            _write_rows_csv(partial[LESIONS_NAME], rows)
            sitk.WriteImage(label_image, str(partial[LABELS_NAME]), True)
            bridge.write_segmentation_file(segmentation_node, partial[SEGMENTATION_NAME])
            partial[BURDEN_NAME].write_text(json.dumps(record, indent=2), encoding="utf-8")
        logger.info("Saved the review of '%s' to %s", segmentation_node.GetName(), out_dir)
        return paths

    def add_training_case(
        self, segmentation_node, dataset_dir: str | Path, flair_node=None, case_id: str | None = None,
        ask_case_id: Callable[[str], str | None] | None = None,
    ) -> str | None:
        """Add the QSM (+FLAIR) and the reviewed mask (rejected lesions left out) to an nnU-Net raw dataset.

        ``case_id`` None takes the next free id. ``ask_case_id`` (the panel's question) is given that id and
        returns the one to use, or None when the reader cancels: then nothing is written and None returned.
        """
        from PRLDetectorLib.training.dataset import add_case, next_case_id

        qsm_node = self._reference(segmentation_node)
        if ask_case_id is not None:
            case_id = ask_case_id(case_id or next_case_id(dataset_dir))
            if case_id is None:
                logger.info("Adding the case to '%s' was cancelled; nothing was written.", dataset_dir)
                return None
        kept = [s.segment_id for s in bridge.lesion_segments(segmentation_node) if s.status != bridge.REJECTED]
        mask = (bridge.labels_from_segmentation(segmentation_node, qsm_node, kept) > 0).astype(np.uint8)
        qsm = bridge.image_from_volume_node(qsm_node)
        flair = bridge.image_in_frame_of(flair_node, qsm_node) if flair_node is not None else None
        return add_case(dataset_dir, qsm, mask, flair, case_id)


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _fill_change_table(table_node, rows: Sequence[Mapping[str, object]]) -> None:
    """The change rows in a locked table node: text columns as text, ids as integers, the rest as numbers."""
    import vtk

    text = {"change", "relation", "baseline_ids", "followup_ids", "baseline_measured_from", "followup_measured_from",
            "evidence"}
    table = vtk.vtkTable()
    for column in CHANGE_COLUMNS:
        array = vtk.vtkStringArray() if column in text else vtk.vtkIntArray() if column == "change_id" else vtk.vtkDoubleArray()
        array.SetName(column)
        array.SetNumberOfValues(len(rows))
        for index, row in enumerate(rows):
            value = row[column]
            array.SetValue(index, str(value) if column in text else int(value) if column == "change_id" else float(value))
        table.AddColumn(array)
    was_modifying = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)
    table_node.EndModify(was_modifying)


def _same_voxels(old: Mapping[str, object], new: Mapping[str, object]) -> bool:
    keys = ("voxels", "bbox_min_i", "bbox_min_j", "bbox_min_k", "bbox_max_i", "bbox_max_j", "bbox_max_k")
    if any(int(old.get(k, -1)) != int(new[k]) for k in keys):
        return False
    centroid = ("centroid_ras_x_mm", "centroid_ras_y_mm", "centroid_ras_z_mm")
    # lesions.csv keeps micrometres; a changed lesion moves its centroid by far more.
    return all(abs(float(old.get(k, math.nan)) - float(new[k])) <= 1e-3 for k in centroid)


def _write_rows_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """The lesions.csv layout (NaN as an empty cell) with the reader's status and note, then any other column."""
    columns = [*bridge.CSV_COLUMNS, *bridge.extra_columns(rows)]
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: format_cell(column, row.get(column, "")) for column in columns})


def _json_attribute(node, name: str):
    text = node.GetAttribute(name)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
