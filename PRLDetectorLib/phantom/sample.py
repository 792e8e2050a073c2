"""The phantom patient as 3D Slicer's sample data "PRLPhantom": generated on this computer, nothing downloaded.

Slicer's SampleData downloads a source by iterating its URIs and fetching each into its cache (the panel's
button and ``SampleData.downloadSample("PRLPhantom")`` alike; a custom downloader is only ever called by
the button). So the sample's URIs are :class:`GeneratedCaseUris`: ``file://`` URIs of a phantom case that
is generated, once, the first time they are iterated. SampleData then copies and loads the files as any
other sample. The module's Logic loads the same case without SampleData (``loadSampleCase``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from PRLDetectorLib import __version__

logger = logging.getLogger(__name__)

SAMPLE_NAME = "PRLPhantom"
SAMPLE_SEED = 0
SAMPLE_FILES = ("qsm.nii.gz", "flair.nii.gz")
"""The case files SampleData loads, in order (the first is the node ``downloadSample`` returns)."""
SAMPLE_NODE_NAMES = (f"{SAMPLE_NAME} QSM", f"{SAMPLE_NAME} FLAIR")


def generated_case(
    folder: str | Path, case_id: str = SAMPLE_NAME, seed: int = SAMPLE_SEED, with_flair: bool = True,
    extent_mm: float | tuple | None = None,
) -> Path:
    """``folder/case_id``, a phantom case generated the first time (complete when its truth.json is there).

    The case is written beside its place and renamed into it, so an interrupted generation leaves no case
    that looks complete, and a half-written one from before is replaced.
    """
    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    folder = Path(folder)
    case_dir = folder / case_id
    if (case_dir / "truth.json").is_file():
        return case_dir
    logger.info("Generating the phantom case '%s' (seed %d) in %s", case_id, seed, case_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{case_id}-") as partial:
        written = write_case(generate_case(case_id, seed, with_flair=with_flair, extent_mm=extent_mm), Path(partial))
        if not (case_dir / "truth.json").is_file():  # another process may have finished first
            if case_dir.exists():
                shutil.rmtree(case_dir)
            written.rename(case_dir)
    return case_dir


class GeneratedCaseUris(list):
    """The ``file://`` URIs of a generated case's files, as SampleData wants a source's URIs: a list of the
    right length, whose iteration (SampleData's download) generates the case first.

    ``before`` runs before generating (in Slicer: offer to install the dependencies). Printing the list does
    not generate anything.
    """

    def __init__(self, folder: str | Path, files: tuple[str, ...] = SAMPLE_FILES,
                 before: Callable[[], None] | None = None, **case):
        super().__init__(files)
        self.folder = Path(folder)
        self.files = tuple(files)
        self.before = before
        self.case = case

    def _uris(self) -> list[str]:
        if self.before is not None:
            self.before()
        case_dir = generated_case(self.folder, **self.case)
        return [(case_dir / name).resolve().as_uri() for name in self.files]

    def __iter__(self):
        return iter(self._uris())

    def __getitem__(self, index):
        return self._uris()[index]

    def __repr__(self) -> str:
        return f"<{len(self.files)} files of a phantom case generated on first use in {self.folder}>"


def sample_source_arguments(folder: str | Path, before: Callable[[], None] | None = None) -> dict:
    """Keyword arguments of the SampleData source "PRLPhantom" (cached under this library's version, so a
    newer generator is not hidden by an older copy in Slicer's cache)."""
    return {
        "sampleName": SAMPLE_NAME,
        "uris": GeneratedCaseUris(folder, SAMPLE_FILES, before),
        "fileNames": [f"{SAMPLE_NAME}-{__version__}-{name}" for name in SAMPLE_FILES],
        "nodeNames": list(SAMPLE_NODE_NAMES),
        "loadFileType": ["VolumeFile"] * len(SAMPLE_FILES),
    }
