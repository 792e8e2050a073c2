"""Progress: the line a detection child process writes for Slicer, and progress for people.

``PRLDETECTOR_PROGRESS <fraction 0..1> <message>``: written by ``prl-detect detect --progress-lines``
(:mod:`PRLDetectorLib.cli.main`), parsed by :func:`PRLDetectorLib.mrml.process.parse_progress_line`.

For people, :func:`step_progress` and :func:`count_progress` draw a tqdm bar on a terminal, with the log
written above it instead of through it; when stderr is not a terminal (a pipe, a log file) they log one
line per step instead, so a log holds no carriage-return redraws.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PROGRESS_PREFIX = "PRLDETECTOR_PROGRESS"
"""First word of a progress line."""
LOGGER_NAME = "PRLDetectorLib"
"""The library's logger, whose console handler the bar writes log records above."""

logger = logging.getLogger(__name__)


def progress_line(fraction: float, message: str) -> str:
    """One progress line, as :func:`PRLDetectorLib.mrml.process.parse_progress_line` reads it."""
    return f"{PROGRESS_PREFIX} {fraction:.3f} {message}"


def on_terminal(stream=None) -> bool:
    """True when ``stream`` (stderr by default, where bars and the log go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def step_of(message: str) -> str:
    """The step a progress message belongs to: ``Network tile 3/24`` and ``Network tile 4/24`` are one."""
    return re.sub(r"\d+", "#", message)


@contextmanager
def _bar(**options) -> Iterator:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    class StepBar(tqdm):
        """A bar whose ``step`` text follows it (tqdm's postfix would come with a leading ", ")."""

        step = ""

        @property
        def format_dict(self):
            return {**super().format_dict, "step": self.step}

    with logging_redirect_tqdm([logging.getLogger(LOGGER_NAME)]), StepBar(**options) as bar:
        yield bar


@contextmanager
def step_progress(description: str, enabled: bool = True) -> Iterator[Callable[[float, str], None]]:
    """A ``progress(fraction, message)`` callback: a bar on a terminal, else one log line per step."""
    if not enabled:
        yield lambda fraction, message: None
        return
    if not on_terminal():
        last = [None]

        def report(fraction: float, message: str) -> None:
            if step_of(message) != last[0]:
                last[0] = step_of(message)
                logger.info("%s %3.0f%% %s", description, 100 * fraction, message)

        yield report
        return
    with _bar(total=100, desc=description, leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {step}") as bar:
        def report(fraction: float, message: str) -> None:
            bar.step = message
            bar.update(max(0, round(100 * fraction) - bar.n))  # tqdm throttles the redraws itself

        yield report


@contextmanager
def count_progress(total: int, description: str, unit: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """An ``advance(note)`` callback for one of ``total`` items done: a bar on a terminal, else a log line each."""
    if not enabled or total == 0:
        yield lambda note="": None
        return
    if not on_terminal():
        done = [0]

        def advance(note: str = "") -> None:
            done[0] += 1
            logger.info("%s %d/%d%s", description, done[0], total, f": {note}" if note else "")

        yield advance
        return
    with _bar(total=total, desc=description, unit=unit,
              bar_format="{desc}: {n_fmt}/{total_fmt} {unit}|{bar}| {elapsed}<{remaining} {step}") as bar:
        def advance(note: str = "") -> None:
            bar.step = note
            bar.update(1)

        yield advance
