"""The progress line a detection child process writes and the Slicer side reads.

``PRLDETECTOR_PROGRESS <fraction 0..1> <message>``: written by ``prl-detect detect --progress-lines``
(:mod:`PRLDetectorLib.cli.main`), parsed by :func:`PRLDetectorLib.mrml.process.parse_progress_line`.
"""

from __future__ import annotations

PROGRESS_PREFIX = "PRLDETECTOR_PROGRESS"
"""First word of a progress line."""


def progress_line(fraction: float, message: str) -> str:
    """One progress line, as :func:`PRLDetectorLib.mrml.process.parse_progress_line` reads it."""
    return f"{PROGRESS_PREFIX} {fraction:.3f} {message}"
