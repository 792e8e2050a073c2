"""The phantom as Slicer's sample data: what SampleData does with the source, done here without Slicer."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRLDetectorLib.phantom.phantom import generate_case
from PRLDetectorLib.phantom.sample import (
    SAMPLE_NAME,
    SAMPLE_SEED,
    GeneratedCaseUris,
    generated_case,
    sample_source_arguments,
)

SMALL = {"extent_mm": 48.0}


def _download_like_sampledata(source: dict, cache: Path) -> list[tuple[str, sitk.Image]]:
    """SampleDataLogic.downloadFromSource, as SampleData.downloadSample runs it: iterate the URIs with the file
    and node names, fetch each URI into the cache under its file name (urlretrieve), load it as that node."""
    loaded = []
    for uri, name, node in zip(source["uris"], source["fileNames"], source["nodeNames"], strict=False):
        path = cache / name
        if not path.exists():
            urllib.request.urlretrieve(uri, path)
        loaded.append((node, sitk.ReadImage(str(path))))
    return loaded


def test_downloading_the_sample_as_sampledata_does_loads_the_generated_phantom(tmp_path):
    source = sample_source_arguments(tmp_path / "generated")
    source["uris"].case.update(SMALL)
    assert len(source["uris"]) == len(source["fileNames"]) == len(source["nodeNames"]) == 2
    assert not (tmp_path / "generated").exists(), "registering the sample generates nothing"
    repr(source["uris"])
    assert not (tmp_path / "generated").exists()

    cache = tmp_path / "slicer-cache"
    cache.mkdir()
    loaded = _download_like_sampledata(source, cache)

    assert [node for node, _ in loaded] == [f"{SAMPLE_NAME} QSM", f"{SAMPLE_NAME} FLAIR"]  # downloadSample → QSM
    expected = generate_case(SAMPLE_NAME, 0, with_flair=True, **SMALL)
    assert np.array_equal(sitk.GetArrayFromImage(loaded[0][1]), sitk.GetArrayFromImage(expected.qsm))
    assert loaded[1][1].GetSize() == expected.flair.GetSize()
    assert (tmp_path / "generated" / SAMPLE_NAME / "gt_prl.nii.gz").is_file()


def test_the_case_is_generated_once_and_a_half_written_one_is_replaced(tmp_path):
    half = tmp_path / SAMPLE_NAME
    half.mkdir()
    (half / "qsm.nii.gz").write_bytes(b"interrupted")
    case_dir = generated_case(tmp_path, **SMALL)
    assert case_dir == half and (case_dir / "truth.json").is_file()
    assert sitk.ReadImage(str(case_dir / "qsm.nii.gz")).GetSize()[0] > 1
    stamp = (case_dir / "qsm.nii.gz").stat().st_mtime_ns
    uris = GeneratedCaseUris(tmp_path, ("qsm.nii.gz",), **SMALL)
    assert list(uris) == [(case_dir / "qsm.nii.gz").resolve().as_uri()]
    assert (case_dir / "qsm.nii.gz").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [SAMPLE_NAME], "no partial folder is left behind"


def test_the_hook_before_generation_can_refuse_and_then_nothing_is_written(tmp_path):
    def declined():
        raise RuntimeError("the user declined to install the dependencies")

    uris = GeneratedCaseUris(tmp_path / "generated", before=declined, **SMALL)
    try:
        list(uris)
    except RuntimeError as error:
        assert "declined" in str(error)
    else:
        raise AssertionError("the refusal was swallowed")
    assert not (tmp_path / "generated").exists()


def test_the_sample_as_slicer_loads_it_has_known_prls_and_lesions_that_are_not():
    # "a synthetic patient with known PRLs" (README): the full-size case, not the small crops of the tests above.
    case = generate_case(SAMPLE_NAME, SAMPLE_SEED, with_flair=True)
    prl = sitk.GetArrayFromImage(case.gt_prl) > 0
    instances = sitk.GetArrayFromImage(case.gt_instances)
    assert case.truth["prl_count"] == len(np.unique(instances[prl])) >= 1
    assert len(np.unique(instances[(instances > 0) & ~prl])) >= 1
