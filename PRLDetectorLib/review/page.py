"""The review page: a patient's QSM (and FLAIR) in Slicer's axial, coronal and sagittal slice views with
its lesions, the lesion table, Confirm / Reject / Undecided and a note per lesion, the burden, Save.

A thin layer like the Slicer module's panel: opening a result, a status, a note, centring the views on a
lesion, the burden and saving are the scene Logic's (:class:`PRLDetectorLib.mrml.logic.SceneLogic`), which
the panel calls too; this module only lays them out in a browser with trame and trame-slicer.

One server serves one reader at a time: every browser tab shares the same scene and state.
"""

from __future__ import annotations

import logging
import math
import sys
from datetime import datetime
from pathlib import Path

import SimpleITK as sitk
from trame.app import get_server
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_rca.encoders import RcaImageEncoder
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.segmentation import BrushDiameterMode, SegmentationEffectErase, SegmentationEffectPaint
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import VAppLayout

from PRLDetectorLib.detection.features import OPTIONAL_COLUMNS, READER_COLUMNS, reader_cell
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.mrml import bridge
from PRLDetectorLib.mrml.logic import OpenedResult, SceneLogic

logger = logging.getLogger(__name__)

REVIEWED_IN = "PRL review page (prl-detect review)"
LAYOUT_ID = "PRL review"
FILL_OPACITY = 0.2
"""The lesions' fill in slice views; low, so that the rim a reader judges shows through (the outline stays)."""
STATUS_WORDS = {bridge.CANDIDATE: "Undecided", bridge.CONFIRMED: "Confirmed", bridge.REJECTED: "Rejected"}
STATUS_BUTTONS = ((bridge.CONFIRMED, "Confirm", "success"), (bridge.REJECTED, "Reject", "error"),
                  (bridge.CANDIDATE, "Undecided", "grey"))
EDIT_EFFECTS = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase}
"""trame-slicer's segment editor effects the page offers on the selected lesion ("look" is none)."""
BRUSH_MM = 3.0
VIEW_AXES = {"Axial": "S", "Coronal": "A", "Sagittal": "R"}
"""The RAS axis each slice view moves along: its offset is that coordinate of the slice (mm)."""

_STYLE = """
.prl-table td, .prl-table th { padding: 2px 8px !important; white-space: nowrap; font-size: 13px; }
.prl-table tr.selected td { background: #fff3c4 !important; }
.prl-table tr { cursor: pointer; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px;
          vertical-align: middle; border: 1px solid #0004; }
.view-offset { position: absolute; top: 4px; left: 8px; z-index: 5; color: #fff; font: 13px monospace;
               text-shadow: 0 0 3px #000; pointer-events: none; }
"""


def table_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(column, heading, format) of the lesion table, in the report's words; the lesion classifier's columns
    only when it ran (a value in any row)."""
    return [
        (column, heading, fmt) for column, heading, fmt in READER_COLUMNS
        if column != "lesion_id"
        and (column not in OPTIONAL_COLUMNS or any(not math.isnan(_number(row.get(column))) for row in rows))
    ]


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class ReviewPage:
    """The page for one or more result folders (a ``detect`` result, or the patients of a batch output)."""

    def __init__(self, folders: list[Path], reviewer: str = "", server=None):
        if not folders:
            raise InputError("There is no result folder to review.")
        self.server = get_server(server, client_type="vue3")
        self.folders = {folder.name: Path(folder) for folder in folders}
        self.slicer = SlicerApp()
        self.logic = SceneLogic(self.slicer.scene)
        self.opened: OpenedResult | None = None
        # PNG: a reading tool must not blur a 1 mm rim with JPEG artefacts.
        register_rca_factories(self.slicer.view_manager, self.server, slice_view_ui_f=self._slice_view_ui,
                               rca_encoder=RcaImageEncoder.PNG)
        self.layout = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        views = [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                 ViewLayoutDefinition.sagittal_view()]
        self.layout.register_layout(LAYOUT_ID, Layout(LayoutDirection.Horizontal, views))
        self.layout.set_layout(LAYOUT_ID)
        for view in self.slicer.view_manager.get_slice_views():
            # The browser reports a view's size after the page is built: fit the slice to it then.
            view.interactor().AddObserver("WindowResizeEvent", lambda *_, view=view: self._fit(view))
        self._prime_slice_views()

        state = self.server.state
        state.trame__title = "PRL review"
        state.update({
            "patients": list(self.folders), "patient": None, "previous_patient": None,
            "reviewer": reviewer, "lesions": [], "columns": [], "selected": None, "note": "",
            "burden": {}, "unsaved": False, "message": "", "message_kind": "info",
            "backgrounds": [], "background": "QSM", "edit_mode": "look", "brush_mm": BRUSH_MM,
            "active_edit": "look", "active_edit_lesion": None,
        })
        self.server.trigger("select_lesion")(self.select_lesion)
        self.server.trigger("set_status")(self.set_status)
        self.server.trigger("save")(self.save)
        self.server.trigger("discard")(self.discard)
        state.change("patient")(self._on_patient)
        state.change("note")(self._on_note)
        state.change("background")(self._on_background)
        state.change("edit_mode", "brush_mm")(self._on_edit_mode)
        self._activating_editor = False
        self.slicer.segmentation_editor.segmentation_modified.connect(self._on_segments_edited)
        self._build_ui()
        first = next(iter(self.folders))
        self.open(first)
        state.patient = first

    def _prime_slice_views(self) -> None:
        """Show a placeholder volume once, before any segmentation exists.

        trame-slicer 2.0.0 adds a slice view's image actor to its renderer when the view first gets a
        background volume. A segmentation shown before that has its actors in front of the image actor in the
        renderer, and its fill is then blended with black instead of with the image (measured: a 50 % fill of
        (255, 38, 124) gave (128, 19, 62) wherever it lay). Opening a result adds QSM and lesions together, so
        the actor must exist first.
        """
        placeholder = bridge.add_volume_node(self.slicer.scene, sitk.Image(2, 2, 2, sitk.sitkFloat32), "placeholder")
        self.slicer.display_manager.show_volume_in_slice_background(placeholder)
        self.slicer.display_manager.show_volume_in_slice_background(None)
        bridge.remove_nodes(self.slicer.scene, [placeholder])

    # -- opening --------------------------------------------------------------------------------------

    def _on_patient(self, patient, **_) -> None:
        state = self.server.state
        if patient is None or (self.opened is not None and self.opened.folder == self.folders[patient]):
            return
        if state.unsaved:
            self._say(f"{state.previous_patient} has unsaved changes: Save them, or Discard them first.", "error")
            state.patient = state.previous_patient
            return
        self.open(patient)

    def open(self, patient: str) -> None:
        state = self.server.state
        state.edit_mode = "look"
        self.slicer.segmentation_editor.deactivate_effect()
        state.update({"active_edit": "look", "active_edit_lesion": None})
        if self.opened is not None:
            self.logic.close_result(self.opened)
            self.opened = None
        try:
            self.opened = self.logic.open_result(self.folders[patient])
        except InputError as error:
            state.update({"lesions": [], "burden": {}, "selected": None, "previous_patient": patient})
            self._say(str(error), "error")
            return
        opened = self.opened
        bridge.set_fill_opacity(opened.review.segmentation_node, FILL_OPACITY)
        state.backgrounds = ["QSM", "FLAIR"] if opened.flair_node is not None else ["QSM"]
        state.background = "QSM"
        self.slicer.display_manager.show_volume_in_slice_background(opened.qsm_node)
        for view in self.slicer.view_manager.get_slice_views():
            view.fit_view_to_content()
        state.update({"previous_patient": patient, "selected": None, "note": "", "unsaved": False})
        self._refresh()
        self._say(f"Opened {opened.folder}.", "info")

    def _fit(self, view) -> None:
        view.fit_view_to_content()
        if self.opened is not None and self.server.state.selected is not None:
            self.logic.centre_views_on_lesion(self.opened.review.segmentation_node, self.server.state.selected)

    def _on_background(self, background, **_) -> None:
        if self.opened is None:
            return
        node = self.opened.flair_node if background == "FLAIR" and self.opened.flair_node else self.opened.qsm_node
        self.slicer.display_manager.show_volume_in_slice_background(node)

    # -- reviewing ------------------------------------------------------------------------------------

    @property
    def _segmentation(self):
        if self.opened is None:
            raise InputError("No patient is open.")
        return self.opened.review.segmentation_node

    def select_lesion(self, lesion_id: int) -> None:
        state = self.server.state
        try:
            center = self.logic.centre_views_on_lesion(self._segmentation, int(lesion_id))
        except InputError as error:
            self._say(str(error), "error")
            return
        state.selected = int(lesion_id)
        state.note = next((row["note"] for row in state.lesions if row["id"] == state.selected), "")
        self._on_edit_mode()
        if center is not None:
            self._say(f"PRL {lesion_id} at RAS ({center[0]:.1f}, {center[1]:.1f}, {center[2]:.1f}) mm.", "info")

    def set_status(self, lesion_id: int, status: str) -> None:
        try:
            self.logic.set_status(self._segmentation, int(lesion_id), status)
        except InputError as error:
            self._say(str(error), "error")
            return
        self.server.state.unsaved = True
        self._refresh()

    def _on_note(self, note, **_) -> None:
        state = self.server.state
        if state.selected is None or self.opened is None:
            return
        current = next((row["note"] for row in state.lesions if row["id"] == state.selected), None)
        if current is None or " ".join(str(note).split()) == current:
            return
        self.logic.set_note(self._segmentation, state.selected, note)
        state.unsaved = True
        self._refresh()

    def _on_edit_mode(self, **_) -> None:
        """Paint or erase the selected lesion with trame-slicer's segment editor (the panel's Segment Editor)."""
        state = self.server.state
        editor = self.slicer.segmentation_editor
        segment_id = None
        if self.opened is not None and state.selected is not None:
            segment_id = bridge.segment_id_of_lesion(self._segmentation, state.selected)
        if state.edit_mode not in EDIT_EFFECTS or segment_id is None:
            editor.deactivate_effect()
            state.update({"active_edit": "look", "active_edit_lesion": None})
            return
        self._activating_editor = True
        try:
            if editor.active_segmentation_node is not self._segmentation:
                editor.set_active_segmentation(self._segmentation, self.opened.qsm_node)
            editor.set_active_segment_id(segment_id)
            effect = editor.set_active_effect_type(EDIT_EFFECTS[state.edit_mode])
            effect.set_brush_diameter(float(state.brush_mm), BrushDiameterMode.Absolute)
        finally:
            self._activating_editor = False
        # What the views do now, as the server set it up: the toggle is the reader's wish, this is the fact (a
        # stroke made before it arrives would still paint, or do nothing).
        state.update({"active_edit": state.edit_mode, "active_edit_lesion": state.selected})

    def _on_segments_edited(self, *_) -> None:
        """A stroke changed a segment: measure the lesions again (the panel's Update burden)."""
        if self._activating_editor or self.opened is None:
            return
        try:
            self.opened.review = self.logic.update_burden(self._segmentation)
        except InputError as error:
            self._say(str(error), "error")
            return
        with self.server.state:
            self.server.state.unsaved = True
            self._refresh()

    def save(self) -> None:
        state = self.server.state
        try:
            self.logic.save_review(self._segmentation, str(state.reviewer or ""), REVIEWED_IN)
        except InputError as error:
            self._say(str(error), "error")
            return
        state.unsaved = False
        self._refresh()
        self._say(f"Saved the review of {self.opened.folder.name} at {datetime.now():%H:%M:%S} "
                  f"(lesions.csv, burden.json, prl.seg.nrrd, prl_labels.nii.gz).", "success")

    def discard(self) -> None:
        patient = self.server.state.previous_patient
        self.open(patient)  # as last saved: open() closes the patient's nodes first
        self._say(f"Reopened {patient} as last saved.", "info")

    # -- state ------------------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """The table and burden from the Logic's lesion table and segments."""
        state = self.server.state
        review = self.opened.review
        rows = bridge.rows_from_table(review.table_node)
        segments = {s.lesion_id: s for s in bridge.lesion_segments(review.segmentation_node)}
        columns = table_columns(rows)
        lesions = []
        for row in rows:
            lesion_id = int(row["lesion_id"])
            segment = segments.get(lesion_id)
            color = segment.color if segment else (0.5, 0.5, 0.5)
            lesions.append({
                "id": lesion_id,
                "name": segment.name if segment else f"PRL {lesion_id}",
                "color": "#" + "".join(f"{round(255 * c):02x}" for c in color),
                "status": row[bridge.STATUS_COLUMN],
                "status_words": STATUS_WORDS.get(row[bridge.STATUS_COLUMN], row[bridge.STATUS_COLUMN]),
                "note": row.get(bridge.NOTE_COLUMN, ""),
                "cells": [reader_cell(c, fmt, _number(row.get(c))) for c, _, fmt in columns],
                "centre": [row["centroid_ras_x_mm"], row["centroid_ras_y_mm"], row["centroid_ras_z_mm"]],
            })
        burden = bridge.burden_from_rows(rows)
        counts = {status: sum(1 for row in rows if row[bridge.STATUS_COLUMN] == status) for status in STATUS_WORDS}
        state.update({
            "lesions": lesions,
            "columns": [heading for _, heading, _ in columns],
            "burden": {
                "prl_count": burden.prl_count,
                "total_volume": f"{burden.total_volume_mm3:.1f}",
                "positive_ge1": "yes" if burden.positive_ge1 else "no",
                "positive_ge4": "yes" if burden.positive_ge4 else "no",
                "confirmed": counts[bridge.CONFIRMED],
                "rejected": counts[bridge.REJECTED],
                "undecided": counts[bridge.CANDIDATE],
            },
        })

    def _say(self, message: str, kind: str) -> None:
        (logger.warning if kind == "error" else logger.info)("%s", message)
        self.server.state.update({"message": message, "message_kind": kind})

    # -- layout -------------------------------------------------------------------------------------------

    def _slice_view_ui(self, server, view_id: str, view) -> None:
        from trame_slicer.app.logic.slice_view_logic import connect_slice_view_slider_to_state
        from trame_slicer.app.ui.slider import Slider

        slider = connect_slice_view_slider_to_state(server, view)
        orientation = view.get_orientation()
        axis = VIEW_AXES[orientation]
        key = f"centre_{orientation.lower()}"
        server.state[key] = [0.0, 0.0, 0.0]
        slice_node = self.slicer.scene.GetNodeByID(view.get_view_node_id())

        def on_view_modified(*_):
            server.state[key] = [round(c, 3) for c in bridge.slice_centre_ras(slice_node)]

        view.modified.connect(on_view_modified)
        html.Div(
            f"{orientation}  {axis} {{{{ {key}[{'RAS'.index(axis)}].toFixed(1) }}}} mm",
            classes="view-offset",
            raw_attrs=[f'data-testid="view-{orientation.lower()}"', f':data-centre="{key}.join(\',\')"'],
        )
        with html.Div(style="position: absolute; bottom: 0; left: 0; width: 100%;"):
            Slider(typed_state=slider, theme="dark", dense=True)

    def _build_ui(self) -> None:
        with VAppLayout(self.server, full_height=True) as layout:
            self.ui = layout
            client.Style(_STYLE)
            with v3.VAppBar(density="compact", color="blue-grey-darken-3"):
                v3.VAppBarTitle("PRL review")
                v3.VSelect(
                    v_model=("patient",), items=("patients",), label="Patient", density="compact",
                    hide_details=True, style="max-width: 260px", classes="mr-4", variant="outlined",
                    raw_attrs=['data-testid="patient"'],
                )
                with v3.VBtnToggle(v_model=("background",), mandatory=True, density="compact", classes="mr-4",
                                   v_show=("backgrounds.length > 1",), variant="outlined"):
                    v3.VBtn("{{ name }}", v_for="name in backgrounds", key="name", value=("name",), size="small")
                v3.VTextField(
                    v_model=("reviewer",), label="Reviewer", density="compact", hide_details=True,
                    style="max-width: 220px", variant="outlined", classes="mr-2",
                    raw_attrs=['data-testid="reviewer"'],
                )
                v3.VBtn("Save", click="trigger('save')", color=("unsaved ? 'amber' : 'white'",), variant="flat",
                        classes="mr-2", raw_attrs=['data-testid="save"'])
                v3.VBtn("Discard changes", click="trigger('discard')", variant="text", disabled=("!unsaved",),
                        raw_attrs=['data-testid="discard"'])
            with v3.VMain(), html.Div(style="display: flex; flex-direction: column; height: calc(100vh - 48px);"):
                with html.Div(style="height: 52vh; display: flex; background: #000;"):
                    self.layout.initialize_layout_grid(layout)
                self._burden_bar()
                self._lesion_table()

    def _burden_bar(self) -> None:
        with html.Div(classes="d-flex align-center px-3 py-1 flex-wrap", style="gap: 18px; font-size: 14px;",
                      raw_attrs=['data-testid="burden"']):
            html.Span("PRLs <b data-testid='burden-count'>{{ burden.prl_count }}</b>")
            html.Span("total volume <b data-testid='burden-volume'>{{ burden.total_volume }}</b> mm³")
            html.Span("PRL-positive (≥ 1) <b>{{ burden.positive_ge1 }}</b>")
            html.Span("≥ 4 PRLs <b>{{ burden.positive_ge4 }}</b>")
            html.Span("{{ burden.confirmed }} confirmed · {{ burden.rejected }} rejected · "
                      "{{ burden.undecided }} undecided", classes="text-medium-emphasis")
            html.Span("unsaved changes", v_show=("unsaved",), classes="text-amber-darken-3 font-weight-bold")
            html.Span("{{ message }}", classes=("message_kind == 'error' ? 'text-red' : "
                                                "message_kind == 'success' ? 'text-green-darken-2' : "
                                                "'text-medium-emphasis'",),
                      raw_attrs=['data-testid="message"'])

    def _lesion_table(self) -> None:
        with html.Div(style="flex: 1; overflow: auto;", classes="px-2"):
            with v3.VTable(density="compact", classes="prl-table", fixed_header=True,
                           raw_attrs=['data-testid="lesions"']):
                with html.Thead(), html.Tr():
                    html.Th("Lesion")
                    html.Th("Status")
                    html.Th("{{ heading }}", v_for="heading in columns", key="heading")
                    html.Th("Note")
                with html.Tbody():
                    with html.Tr(
                        v_for="row in lesions", key="row.id",
                        classes=("row.id === selected ? 'selected' : ''",),
                        click="trigger('select_lesion', [row.id])",
                        raw_attrs=[':data-lesion="row.id"', ':data-status="row.status"'],
                    ):
                        with html.Td():
                            html.Span(classes="swatch", style=("{ background: row.color }",))
                            html.Span("{{ row.name }}")
                        with html.Td():
                            for status, words, color in STATUS_BUTTONS:
                                v3.VBtn(
                                    words, size="x-small", classes="mr-1",
                                    color=(f"row.status === '{status}' ? '{color}' : undefined",),
                                    variant=(f"row.status === '{status}' ? 'flat' : 'outlined'",),
                                    raw_attrs=[f'@click.stop="trigger(\'set_status\', [row.id, \'{status}\'])"',
                                               f'data-action="{status}"'],
                                )
                        html.Td("{{ cell }}", v_for="(cell, i) in row.cells", key="i", style="text-align: right")
                        html.Td("{{ row.note }}", style="max-width: 260px; overflow: hidden; text-overflow: ellipsis")
            with html.Div(v_if=("selected !== null",), classes="d-flex align-center py-2", style="gap: 12px"):
                html.Span("Note on PRL {{ selected }}:")
                v3.VTextField(v_model=("note",), density="compact", hide_details=True, variant="outlined",
                              placeholder="what you saw (saved with the review)", style="max-width: 520px",
                              raw_attrs=['data-testid="note"'])
                html.Span("Outline:")
                with v3.VBtnToggle(v_model=("edit_mode",), mandatory=True, density="compact", variant="outlined",
                                   raw_attrs=['data-testid="edit-mode"']):
                    for mode, words in (("look", "Look"), ("paint", "Paint"), ("erase", "Erase")):
                        v3.VBtn(words, value=mode, size="small", raw_attrs=[f'data-mode="{mode}"'])
                v3.VSlider(v_model=("brush_mm",), min=1, max=10, step=0.5, density="compact", hide_details=True,
                           style="max-width: 160px", thumb_label=True, v_show=("edit_mode !== 'look'",))
                html.Span("brush {{ brush_mm }} mm", v_show=("edit_mode !== 'look'",))
                html.Span(
                    "{{ active_edit === 'paint' ? 'painting' : 'erasing' }} PRL {{ active_edit_lesion }}",
                    v_show=("active_edit !== 'look'",), classes="text-medium-emphasis",
                    raw_attrs=['data-testid="active-edit"', ':data-mode="active_edit"',
                               ':data-edit-lesion="active_edit_lesion"'],
                )


def serve(folders: list[Path], host: str, port: int, reviewer: str = "", verbose: bool = False) -> None:
    """Serve the review page until Ctrl-C (the command line checked the address and port first)."""
    if not verbose:
        bridge.show_vtk_warnings(False)  # trame-slicer 2.0.0 sets off a VTK 9.6 deprecation warning on every resize
    page = ReviewPage(folders, reviewer)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    page.server.controller.on_server_ready.add(
        lambda **_: logger.info("Review page for %d patient(s) at %s (Ctrl-C stops it)", len(folders), url)
    )
    argv = sys.argv
    sys.argv = argv[:1]  # trame parses sys.argv for options of its own; prl-detect's are not theirs
    try:
        page.server.start(port=port, host=host, open_browser=False, show_connection_info=False, timeout=0)
    except OSError as error:
        raise InputError(f"Cannot serve on {host}:{port} ({error.strerror}); choose another --port.") from None
    finally:
        sys.argv = argv
