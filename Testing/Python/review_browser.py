"""The review page as a reader meets it: a ``prl-detect review`` server in a child process, and Chromium
driven by Playwright (the system's browser: ``make setup`` installs it, Playwright downloads none).

Used by ``test_review_page.py`` and by ``Testing/Scripts/review_screenshot.py`` (the README picture).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

VIEWS = ("axial", "coronal", "sagittal")
AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
"""The RAS coordinate each view's slice moves along (S, A, R)."""


def chromium_path() -> str:
    """The system's Chromium (``PRL_CHROMIUM`` overrides); missing is a failure, not a skip."""
    path = os.environ.get("PRL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is missing: `make setup` installs it (apt-get install chromium), or set PRL_CHROMIUM"
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@contextmanager
def review_server(results: Path, log: Path, *options: str, timeout: float = 240) -> Iterator[Server]:
    """``prl-detect review RESULTS`` on a free port, until the block ends (Ctrl-C, as a user stops it)."""
    port = free_port()
    command = [sys.executable, "-m", "PRLDetectorLib", "review", str(results), "--port", str(port), *options]
    with log.open("w", encoding="utf-8") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}/", port, process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the review server stopped (exit {process.returncode}):\n{server.log_text()}")
            try:
                with urllib.request.urlopen(server.url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the review server did not answer in {timeout:.0f} s:\n{server.log_text()}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, width: int = 1400, height: int = 900, timeout_ms: float = 120_000):
    """A tab on the page once the table is filled and the three views show an image."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(timeout_ms)
    page.goto(url)
    page.wait_for_selector("[data-lesion]")
    page.wait_for_function(
        "() => { const images = [...document.querySelectorAll('img.image-display-area')];"
        " return images.length === 3 && images.every(i => i.complete && i.naturalWidth > 0); }"
    )
    return page


def view_centre(page, view: str) -> tuple[float, float, float]:
    """The point at the centre of a view (RAS mm), as the page shows it from the slice node."""
    text = page.locator(f"[data-testid=view-{view}]").get_attribute("data-centre")
    return tuple(float(c) for c in text.split(","))


def view_pixels(page, view: str):
    """The view as the reader sees it (RGB, H × W × 3)."""
    import io

    import numpy as np
    from PIL import Image

    area = page.locator(f"[data-testid=view-{view}]").locator("xpath=..")
    return np.asarray(Image.open(io.BytesIO(area.screenshot())).convert("RGB")).astype(int)
