"""Model folders: what counts as an nnU-Net v2 model, name resolution, safe installation."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from PRLDetectorLib.detection.models import (
    BUNDLED_MODELS_DIR,
    check_channels,
    install_model,
    resolve_model,
    validate_model_folder,
)
from PRLDetectorLib.errors import InputError


def _model_folder(root: Path, channels=("QSM",), labels=None, checkpoint=True) -> Path:
    """The files an nnU-Net v2 model folder consists of (the checkpoint's content is not read here)."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": labels or {"background": 0, "prl": 1},
        "file_ending": ".nii.gz",
    }), encoding="utf-8")
    (root / "plans.json").write_text(json.dumps({"dataset_name": "Dataset501_x", "configurations": {}}), encoding="utf-8")
    if checkpoint:
        (root / "fold_0").mkdir()
        (root / "fold_0" / "checkpoint_final.pth").write_bytes(b"weights")
    return root


def test_a_folder_with_dataset_plans_and_a_checkpoint_is_a_model_with_its_channels(tmp_path):
    info = validate_model_folder(_model_folder(tmp_path / "m", channels=("QSM", "FLAIR")))
    assert info.channels == ("qsm", "flair")
    assert info.folds == ("0",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoint": False}, "no fold_"),
        ({"channels": ("T1",)}, "no QSM"),
        ({"channels": ("QSM", "T1")}, "cannot supply"),
        ({"labels": {"background": 0, "prl": 1, "rimless": 2}}, "one lesion label"),
    ],
)
def test_folders_that_are_not_prl_models_are_refused_with_the_reason(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        validate_model_folder(_model_folder(tmp_path / "m", **kwargs))


def test_a_folder_without_plans_is_not_an_nnunet_model(tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "plans.json").unlink()
    with pytest.raises(InputError, match="plans.json missing"):
        validate_model_folder(folder)


def test_an_unknown_model_name_lists_the_known_ones():
    with pytest.raises(InputError, match="no model named 'nonexistent'"):
        resolve_model("nonexistent")


def test_the_channel_check_names_what_is_missing(tmp_path):
    info = validate_model_folder(_model_folder(tmp_path / "m", channels=("QSM", "FLAIR")))
    with pytest.raises(InputError, match="takes QSM \\+ FLAIR but QSM was given; add --flair"):
        check_channels(info, {"qsm"})
    check_channels(info, {"qsm", "flair"})
    qsm_only = validate_model_folder(_model_folder(tmp_path / "q"))
    with pytest.raises(InputError, match="drop the FLAIR"):
        check_channels(qsm_only, {"qsm", "flair"})


def test_install_from_a_zip_copies_a_valid_model_and_refuses_a_second_copy(tmp_path):
    source = _model_folder(tmp_path / "src" / "Dataset501_PRL" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in source.rglob("*"):
            zf.write(path, path.relative_to(tmp_path / "src"))
    info = install_model(archive, tmp_path / "models", name="mine")
    assert info.path == tmp_path / "models" / "mine"
    assert (info.path / "fold_0" / "checkpoint_final.pth").read_bytes() == b"weights"
    with pytest.raises(InputError, match="already installed"):
        install_model(archive, tmp_path / "models", name="mine")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["mine"]


def test_install_refuses_an_archive_with_a_path_outside_the_target_and_copies_nothing(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model/dataset.json", "{}")
        zf.writestr("../../outside.txt", "gotcha")
    with pytest.raises(InputError, match="points outside the model folder"):
        install_model(archive, tmp_path / "models")
    assert not (tmp_path / "outside.txt").exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_install_refuses_an_invalid_model_and_copies_nothing(tmp_path):
    source = _model_folder(tmp_path / "src", checkpoint=False)
    with pytest.raises(InputError, match="no fold_"):
        install_model(source, tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []


def test_the_bundled_models_folder_is_next_to_the_library():
    assert BUNDLED_MODELS_DIR == Path(__file__).resolve().parents[2] / "Resources" / "Models"
