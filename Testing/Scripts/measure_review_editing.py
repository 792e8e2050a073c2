"""How reliably the review page's Paint / Erase change a lesion: paint and erase strokes in turn, over the same path.

A real ``prl-detect review`` server on a ``detect`` result, real headless Chromium. For each stroke: choose the
tool, wait until the server reports it active on the selected lesion ("painting PRL n"), draw 6 mouse moves
beside the lesion, and wait up to 30 s for the lesion's volume in the table to change in the tool's direction.
Prints one line per stroke and the count that changed the lesion, with the latency from mouse-up.

Usage: .venv/bin/python Testing/Scripts/measure_review_editing.py RESULT_FOLDER [--strokes 20]
(the folder is copied first: nothing is saved into it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Python"))

from review_browser import chromium, open_page, review_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("--strokes", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prl_edit_"))
    result = Path(shutil.copytree(args.result, work / "patient"))
    changed, latencies = 0, []
    with review_server(result, work / "review.log") as server, chromium() as browser:
        page = open_page(browser, server.url)
        row = page.locator("[data-lesion]").nth(0)
        lesion_id = row.get_attribute("data-lesion")
        lesion = page.locator(f"tr[data-lesion='{lesion_id}']")
        lesion.click()
        volume_column = page.locator("[data-testid=lesions] th").all_inner_texts().index("volume (mm³)")

        def volume() -> float:
            return float(lesion.locator("td").nth(volume_column).inner_text())

        axial = page.locator("[data-testid=view-axial]").locator("xpath=..")
        box = axial.bounding_box()
        x, y = box["x"] + box["width"] / 2 + 45, box["y"] + box["height"] / 2
        for stroke in range(args.strokes):
            mode = "paint" if stroke % 2 == 0 else "erase"
            page.locator(f"[data-testid=edit-mode] [data-mode={mode}]").click()
            active = page.locator("[data-testid=active-edit]")
            deadline = time.monotonic() + 30
            while not (active.get_attribute("data-mode") == mode and active.get_attribute("data-edit-lesion") == lesion_id):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            before = volume()
            page.mouse.move(x, y)
            page.mouse.down()
            for step in range(1, 6):
                page.mouse.move(x + 3 * step, y + 2 * step)
            page.mouse.up()
            released = time.monotonic()
            after = before
            while time.monotonic() - released < 30:
                after = volume()
                if (after > before) if mode == "paint" else (after < before):
                    break
                time.sleep(0.1)
            ok = (after > before) if mode == "paint" else (after < before)
            changed += ok
            if ok:
                latencies.append(time.monotonic() - released)
            print(f"stroke {stroke + 1:2d} {mode:5s} volume {before:7.1f} → {after:7.1f} mm³ "
                  f"{'changed' if ok else 'UNCHANGED'}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    summary = f"{changed} of {args.strokes} strokes changed the lesion"
    if latencies:
        summary += (f"; {min(latencies):.1f}–{max(latencies):.1f} s after mouse-up "
                    f"(median {statistics.median(latencies):.1f} s)")
    print(summary)


if __name__ == "__main__":
    main()
