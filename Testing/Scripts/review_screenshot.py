"""Render the README picture of the review page: a phantom patient detected with the bundled QSM model,
served by ``prl-detect review`` and read in Chromium, mid-review (one lesion confirmed with a note, one
rejected, a third selected).

    .venv/bin/python Testing/Scripts/review_screenshot.py [--work /tmp/prl_review_shot] [--out review.png]

The default output is Resources/Screenshots/review.png, the picture the README shows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "Python"))

from review_browser import chromium, open_page, review_server, view_centre  # noqa: E402


def _cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "PRLDetectorLib", "-q", *map(str, args)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/prl_review_shot"))
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "review.png")
    args = parser.parse_args()
    cases, result = args.work / "cases", args.work / "patient_007"
    if not (result / "burden.json").is_file():
        _cli("phantom", "--out", cases, "--n", 1, "--seed", 3, "--extent-mm", 96, 112, 72)
        _cli("detect", "--qsm", cases / "case_000" / "qsm.nii.gz", "--out", result, "--device", "cpu", "--overwrite")
    with review_server(result, args.work / "review.log", "--reviewer", "A. Reader") as server, chromium() as browser:
        page = open_page(browser, server.url, width=1500, height=980)
        page.locator("[data-lesion='1'] [data-action=confirmed]").click()
        page.locator("[data-lesion='1']").click()
        page.locator("[data-testid=note] input").fill("complete paramagnetic rim, iso core")
        page.locator("[data-lesion='4'] [data-action=rejected]").click()
        page.locator("[data-lesion='3']").click()
        superior = float(page.locator("[data-lesion='3'] td").nth(5).inner_text())  # its S–I cell
        deadline = time.monotonic() + 60
        while abs(view_centre(page, "axial")[2] - superior) > 0.1 and time.monotonic() < deadline:
            time.sleep(0.3)
        time.sleep(2)  # the last PNG frames
        page.screenshot(path=str(args.out))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
