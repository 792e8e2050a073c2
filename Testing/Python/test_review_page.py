"""The review page for real: ``prl-detect review`` serving a ``detect`` result (and a batch output), and
Chromium reading it: the Slicer views show the lesions, the table is lesions.csv, a row centres the views,
Reject changes the burden and Save writes it.

One detection (bundled QSM model, CPU, a 64 × 64 × 48 mm phantom) is made per session; every server gets
its own copy of it, since Save writes into the folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import slicerio
from conftest import assert_refused, require_model, run_cli
from review_browser import (
    AXIS,
    VIEWS,
    chromium,
    free_port,
    open_page,
    review_server,
    view_centre,
    view_pixels,
)

from PRLDetectorLib.detection.features import read_lesions_csv
from PRLDetectorLib.detection.headers import view_rows

REVIEWER = "A. Reader"


@pytest.fixture(scope="session")
def detected(tmp_path_factory) -> Path:
    """A real ``detect`` result: three lesions on the smallest phantom that has some."""
    require_model("qsm")
    root = tmp_path_factory.mktemp("review")
    done = run_cli("phantom", "--out", root / "cases", "--n", 1, "--seed", 3, "--extent-mm", 64, 64, 48)
    assert done.returncode == 0, done.stderr
    # With the lesion classifier, as a reader gets it: the table is sorted by PRL probability and an edited lesion
    # loses its probability (and moves). The sensitive point, so that a retrained classifier still calls several.
    done = run_cli("detect", "--qsm", root / "cases" / "case_000" / "qsm.nii.gz", "--out", root / "result",
                   "--device", "cpu", "--operating-point", "sensitive")
    assert done.returncode == 0, done.stderr
    assert len(read_lesions_csv(root / "result" / "lesions.csv")) >= 2, "the phantom should give several lesions"
    return root / "result"


@pytest.fixture(scope="module")
def result(detected, tmp_path_factory) -> Path:
    return Path(shutil.copytree(detected, tmp_path_factory.mktemp("served") / "patient"))


@pytest.fixture(scope="module")
def server(result, tmp_path_factory):
    with review_server(result, tmp_path_factory.mktemp("log") / "review.log") as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with chromium() as running:
        yield running


@pytest.fixture
def page(browser, server):
    tab = open_page(browser, server.url)
    yield tab
    tab.close()


def _rows(folder: Path) -> list[dict]:
    return read_lesions_csv(folder / "lesions.csv")


def _colours(folder: Path) -> dict[int, np.ndarray]:
    """Each lesion's colour as the result's prl.seg.nrrd gives it to Slicer (0-255)."""
    segments = slicerio.read_segmentation(str(folder / "prl.seg.nrrd"), skip_voxels=True)["segments"]
    return {int(s["id"].removeprefix("PRL_")): np.array(s["color"]) * 255 for s in segments}


def _wait(condition, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not change in {timeout:.0f} s")
        time.sleep(0.2)


def _centred_on(page, centre, tolerance: float = 1.0) -> bool:
    return all(np.allclose(view_centre(page, view), centre, atol=tolerance) for view in VIEWS)


def _centre(row: dict) -> tuple[float, float, float]:
    return row["centroid_ras_x_mm"], row["centroid_ras_y_mm"], row["centroid_ras_z_mm"]


def _status(page, lesion_id: int) -> str:
    return page.locator(f"[data-lesion='{lesion_id}']").get_attribute("data-status")


def test_the_three_slice_views_draw_every_lesion_in_its_own_colour(page, result):
    colours = _colours(result)
    for row in _rows(result):
        lesion_id = int(row["lesion_id"])
        page.locator(f"[data-lesion='{lesion_id}']").click()
        _wait(lambda row=row: _centred_on(page, _centre(row)), what=f"the views for lesion {lesion_id}")
        for view in VIEWS:
            # The outline is drawn in the segment's own colour, and the PNG frames keep it exactly.
            _wait(lambda view=view, colour=colours[lesion_id]: _pixels_of(view_pixels(page, view), colour) >= 20,
                  timeout=30, what=f"the {view} view's drawing of lesion {lesion_id}")


def _pixels_of(pixels: np.ndarray, colour: np.ndarray) -> int:
    return int((np.abs(pixels - colour).max(axis=2) <= 12).sum())


def test_the_table_has_one_row_per_lesion_of_lesions_csv_in_a_readers_words(page, result):
    rows = view_rows(_rows(result))  # most probable PRL first, as a reader reviews them
    table = page.locator("[data-lesion]")
    assert table.count() == len(rows)
    assert [int(table.nth(i).get_attribute("data-lesion")) for i in range(len(rows))] == [r["lesion_id"] for r in rows]
    probabilities = [r["prl_probability"] for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    headings = page.locator("[data-testid=lesions] th").all_inner_texts()
    for heading in ("volume (mm³)", "R–L (mm)", "A–P (mm)", "S–I (mm)", "rim − surround (ppb)", "Status", "Note"):
        assert heading in headings, headings
    volume = headings.index("volume (mm³)")
    for i, row in enumerate(rows):
        cells = table.nth(i).locator("td").all_inner_texts()
        assert cells[0].strip() == f"PRL {row['lesion_id']}"
        assert cells[volume] == f"{row['volume_mm3']:.1f}"
        assert table.nth(i).locator("[data-action]").count() == 3  # Confirm, Reject, Undecided


def test_clicking_a_row_centres_every_view_on_that_lesion(page, result):
    rows = _rows(result)
    spacing = 1.0  # the phantom's voxels are 1 mm: "within a voxel"
    page.locator(f"[data-lesion='{rows[0]['lesion_id']}']").click()
    _wait(lambda: _centred_on(page, _centre(rows[0]), spacing), what="the slice views")
    for row in (rows[-1], rows[0]):
        assert not _centred_on(page, _centre(row), spacing)
        page.locator(f"[data-lesion='{row['lesion_id']}']").click()
        _wait(lambda row=row: _centred_on(page, _centre(row), spacing), what="the slice views")
        for view in VIEWS:
            # Each view's slice passes through the lesion's centre: its offset along its own axis.
            assert abs(view_centre(page, view)[AXIS[view]] - _centre(row)[AXIS[view]]) <= spacing, view
        assert f"S {row['centroid_ras_z_mm']:.1f} mm" in page.locator("[data-testid=view-axial]").inner_text()


def test_reject_changes_the_burden_on_the_page_and_after_save_on_disk(page, result):
    rows = _rows(result)
    before = json.loads((result / "burden.json").read_text(encoding="utf-8"))
    count = int(page.locator("[data-testid=burden-count]").inner_text())
    volume = float(page.locator("[data-testid=burden-volume]").inner_text())
    assert (count, volume) == (before["burden"]["prl_count"], round(before["burden"]["total_volume_mm3"], 1))

    rejected = rows[0]
    page.locator(f"[data-lesion='{rejected['lesion_id']}'] [data-action=rejected]").click()
    _wait(lambda: page.locator("[data-testid=burden-count]").inner_text() == str(count - 1), what="the burden")
    assert float(page.locator("[data-testid=burden-volume]").inner_text()) == pytest.approx(
        volume - rejected["volume_mm3"], abs=0.05)
    assert _status(page, rejected["lesion_id"]) == "rejected"
    confirmed = rows[1]
    page.locator(f"[data-lesion='{confirmed['lesion_id']}'] [data-action=confirmed]").click()
    _wait(lambda: _status(page, confirmed["lesion_id"]) == "confirmed", what="the status")
    page.locator(f"[data-lesion='{confirmed['lesion_id']}']").click()
    page.locator("[data-testid=note] input").fill("rim on three sides")
    _wait(lambda: "rim on three sides" in page.locator(f"[data-lesion='{confirmed['lesion_id']}']").inner_text(),
          what="the note in the table")
    # Nothing is written before Save.
    assert json.loads((result / "burden.json").read_text(encoding="utf-8")) == before

    page.locator("[data-testid=save]").click()
    _wait(lambda: "Type your name" in page.locator("[data-testid=message]").inner_text(), what="the refusal")
    assert json.loads((result / "burden.json").read_text(encoding="utf-8")) == before
    page.locator("[data-testid=reviewer] input").fill(REVIEWER)
    page.locator("[data-testid=save]").click()
    _wait(lambda: "Saved" in page.locator("[data-testid=message]").inner_text(), what="the save")

    record = json.loads((result / "burden.json").read_text(encoding="utf-8"))
    assert record["burden"]["prl_count"] == count - 1
    assert record["burden"]["total_volume_mm3"] == pytest.approx(before["burden"]["total_volume_mm3"]
                                                                 - rejected["volume_mm3"])
    assert record["rejected_lesion_ids"] == [rejected["lesion_id"]]
    assert record["confirmed_lesion_ids"] == [confirmed["lesion_id"]]
    assert record["reviewer"] == REVIEWER and record["inputs"] == before["inputs"]
    saved = {int(r["lesion_id"]): r for r in _rows(result)}
    assert saved[rejected["lesion_id"]]["status"] == "rejected"
    assert (saved[confirmed["lesion_id"]]["status"], saved[confirmed["lesion_id"]]["note"]) == (
        "confirmed", "rim on three sides")
    tags = {s["id"]: s["tags"] for s in slicerio.read_segmentation(str(result / "prl.seg.nrrd"), skip_voxels=True)["segments"]}
    assert tags[f"PRL_{rejected['lesion_id']}"]["PRLDetector.Status"] == "rejected"


def test_the_mouse_wheel_moves_a_views_slice(page, result):
    axial = page.locator("[data-testid=view-axial]").locator("xpath=..")
    before = view_centre(page, "axial")[2]
    box = axial.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    _wait(lambda: view_centre(page, "axial")[2] != before, what="the axial slice")
    assert abs(view_centre(page, "axial")[2] - before) == pytest.approx(1.0, abs=0.01)  # one 1 mm slice


def _edit_mode(page, mode: str, lesion_id: int) -> None:
    """Choose Paint / Erase / Look and wait until the server says its editor does that to this lesion: a stroke
    sent before would still paint (what made erase-after-paint fail on a loaded machine)."""
    page.locator(f"[data-testid=edit-mode] [data-mode={mode}]").click()
    active = page.locator("[data-testid=active-edit]")
    _wait(lambda: active.get_attribute("data-mode") == mode
          and (mode == "look" or active.get_attribute("data-edit-lesion") == str(lesion_id)), what=f"the {mode} tool")


def test_paint_and_erase_change_the_selected_lesion_and_the_burden_follows(page, result):
    row = _rows(result)[1]
    assert view_rows(_rows(result))[-1]["lesion_id"] != row["lesion_id"], "the edited lesion should have to move"
    lesion = page.locator(f"[data-lesion='{row['lesion_id']}']")
    lesion.click()
    _wait(lambda: _centred_on(page, _centre(row)), what="the slice views")
    volume_column = page.locator("[data-testid=lesions] th").all_inner_texts().index("volume (mm³)")

    def volume() -> float:
        return float(lesion.locator("td").nth(volume_column).inner_text())

    def burden() -> float:
        return float(page.locator("[data-testid=burden-volume]").inner_text())

    start, start_burden = volume(), burden()
    box = page.locator("[data-testid=view-axial]").locator("xpath=..").bounding_box()
    x, y = box["x"] + box["width"] / 2 + 45, box["y"] + box["height"] / 2  # beside the lesion, ~6 mm off its centre

    def stroke():
        page.mouse.move(x, y)
        page.mouse.down()
        for step in range(1, 6):
            page.mouse.move(x + 3 * step, y + 2 * step)
        page.mouse.up()

    _edit_mode(page, "paint", row["lesion_id"])
    assert page.locator("[data-testid=active-edit]").inner_text() == f"painting PRL {row['lesion_id']}"
    stroke()
    painted = _wait(lambda: volume() > start and volume(), what="the painted lesion's volume")
    assert burden() == pytest.approx(start_burden + painted - start, abs=0.15)
    assert "unsaved changes" in page.locator("[data-testid=burden]").inner_text()
    # The edited lesion has lost its PRL probability (the classifier judged the old outline) and moved in the
    # table, which is sorted by it, to its end: it stays the selected row and the lesion the tools work on.
    _wait(lambda: page.locator("[data-lesion]").last.get_attribute("data-lesion") == str(row["lesion_id"]),
          what="the edited lesion at the end of the table")
    assert lesion.get_attribute("class") == "selected"
    _edit_mode(page, "erase", row["lesion_id"])
    stroke()
    erased = _wait(lambda: volume() < painted and volume(), what="the erased lesion's volume")
    assert erased <= painted - 1
    _edit_mode(page, "look", row["lesion_id"])
    page.locator("[data-testid=reviewer] input").fill(REVIEWER)
    page.locator("[data-testid=save]").click()
    _wait(lambda: "Saved" in page.locator("[data-testid=message]").inner_text(), what="the save")
    saved = {int(r["lesion_id"]): r for r in _rows(result)}[row["lesion_id"]]
    assert saved["volume_mm3"] == pytest.approx(volume(), abs=0.05)


def test_a_second_server_on_the_same_port_is_refused_with_a_sentence(server, result):
    done = run_cli("review", result, "--port", server.port, timeout=120)
    assert_refused(done, f"Port {server.port} on 127.0.0.1 is already in use")


def test_folders_that_are_not_results_are_refused_before_anything_is_served(tmp_path):
    assert_refused(run_cli("review", tmp_path / "missing", timeout=120), "is not a folder")
    assert_refused(run_cli("review", tmp_path, timeout=120), "is neither a detect result")


def test_another_address_than_loopback_needs_the_flag_and_says_what_it_exposes(result, monkeypatch, capsys):
    import PRLDetectorLib.review.page as page_module
    from PRLDetectorLib.cli.main import main

    served = []
    monkeypatch.setattr(page_module, "serve", lambda folders, host, port, *_, **__: served.append((host, port)))
    port = free_port()
    assert main(["review", str(result), "--port", str(port)]) == 0
    assert served[-1] == ("127.0.0.1", port) and "WARNING" not in capsys.readouterr().err
    assert main(["review", str(result), "--host", "0.0.0.0", "--port", str(port)]) == 0
    assert served[-1] == ("0.0.0.0", port)
    assert "WARNING Serving on 0.0.0.0: anyone who can reach" in capsys.readouterr().err


def test_a_batch_output_lists_its_patients_and_keeps_unsaved_work_from_being_left(detected, browser, tmp_path):
    batch = tmp_path / "batch"
    for name in ("patient_a", "patient_b"):
        shutil.copytree(detected, batch / name)
    (batch / "burden.csv").write_text("case_id\npatient_a\npatient_b\n", encoding="utf-8")
    with review_server(batch, tmp_path / "batch.log", "--reviewer", REVIEWER) as running:
        page = open_page(browser, running.url)
        page.locator("[data-testid=patient]").click()
        options = page.locator(".v-list-item-title").all_inner_texts()
        assert options == ["patient_a", "patient_b"]
        page.keyboard.press("Escape")
        first = _rows(batch / "patient_a")[0]["lesion_id"]
        page.locator(f"[data-lesion='{first}'] [data-action=rejected]").click()
        _wait(lambda: _status(page, first) == "rejected", what="the status")
        page.locator("[data-testid=patient]").click()
        page.locator(".v-list-item-title", has_text="patient_b").click()
        _wait(lambda: "unsaved changes" in page.locator("[data-testid=message]").inner_text(), what="the refusal")
        assert _status(page, first) == "rejected"
        page.locator("[data-testid=save]").click()
        _wait(lambda: "Saved" in page.locator("[data-testid=message]").inner_text(), what="the save")
        page.locator("[data-testid=patient]").click()
        page.locator(".v-list-item-title", has_text="patient_b").click()
        _wait(lambda: "patient_b" in page.locator("[data-testid=message]").inner_text(), what="the second patient")
        _wait(lambda: _status(page, first) == "candidate", what="patient_b's table")
        page.close()
    assert json.loads((batch / "patient_a" / "burden.json").read_text(encoding="utf-8"))["rejected_lesion_ids"] == [first]
    assert "rejected_lesion_ids" not in json.loads((batch / "patient_b" / "burden.json").read_text(encoding="utf-8"))
