"""Model folders: what counts as an nnU-Net v2 model, name resolution, safe installation."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from PRLDetectorLib.detection.models import (
    BUNDLED_MODELS_DIR,
    MODEL_PATH_ENV,
    check_channels,
    install_model,
    load_checkpoints,
    resolve_model,
    validate_model_folder,
)
from PRLDetectorLib.errors import InputError


def _checkpoint_bytes(**extra) -> bytes:
    """A real (tiny) nnU-Net checkpoint as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save({"network_weights": {"w": torch.zeros(2)}, "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres", "fold": 0}, **extra}, buffer)
    return buffer.getvalue()


def _model_folder(root: Path, channels=("QSM",), labels=None, checkpoint=True, name=None) -> Path:
    """The files an nnU-Net v2 model folder consists of, with a real but tiny checkpoint."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": labels or {"background": 0, "prl": 1},
        "file_ending": ".nii.gz",
    }), encoding="utf-8")
    (root / "plans.json").write_text(json.dumps({"dataset_name": "Dataset501_x", "configurations": {}}), encoding="utf-8")
    if checkpoint:
        (root / "fold_0").mkdir()
        (root / "fold_0" / "checkpoint_final.pth").write_bytes(_checkpoint_bytes())
    if name is not None:
        (root / "model.json").write_text(json.dumps({"name": name}), encoding="utf-8")
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
    assert (info.path / "fold_0" / "checkpoint_final.pth").read_bytes() == (source / "fold_0" / "checkpoint_final.pth").read_bytes()
    with pytest.raises(InputError, match="already installed"):
        install_model(archive, tmp_path / "models", name="mine")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["mine"]
    assert sorted(p.name for p in info.path.iterdir()) == [".prldetector-installed", "dataset.json", "fold_0", "plans.json"]


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


# --- installing: nothing written or deleted outside the models folder (real malicious archives) -----------


def _zip_of(folder: Path, archive: Path, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path("model") / path.relative_to(folder))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive


def _nothing_installed(models: Path) -> bool:
    return not models.exists() or not list(models.iterdir())


@pytest.mark.parametrize("name", ["../../escaped", "../escaped", "a/b", "sub\\dir", ".hidden", "..", " x", "x" * 65])
def test_a_model_name_that_is_not_a_plain_folder_name_is_refused_and_nothing_lands_outside(tmp_path, name):
    models = tmp_path / "deep" / "er" / "models"
    archive = _zip_of(_model_folder(tmp_path / "src", name=name), tmp_path / "m.zip")
    with pytest.raises(InputError, match="cannot be a folder name"):
        install_model(archive, models)
    assert not list(tmp_path.rglob("escaped")) and not (tmp_path / "deep" / "er" / "a").exists()
    assert _nothing_installed(models)


def test_an_absolute_model_name_with_overwrite_deletes_nothing(tmp_path):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work", encoding="utf-8")
    archive = _zip_of(_model_folder(tmp_path / "src", name=str(victim)), tmp_path / "m.zip")
    with pytest.raises(InputError, match="cannot be a folder name"):
        install_model(archive, tmp_path / "models", overwrite=True)
    assert (victim / "thesis.tex").read_text(encoding="utf-8") == "years of work"


def test_overwrite_replaces_only_a_model_the_installer_made(tmp_path):
    models = tmp_path / "models"
    mine = models / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine", encoding="utf-8")
    source = _model_folder(tmp_path / "src")
    with pytest.raises(InputError, match="not installed by PRL Detector"):
        install_model(source, models, name="mine", overwrite=True)
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "mine"
    first = install_model(source, models, name="theirs")
    again = install_model(source, models, name="theirs", overwrite=True)
    assert again.path == first.path and (again.path / "dataset.json").is_file()
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["mine", "theirs"]


def _symlink_zip_entry(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (0o120777 << 16)
    return info


def test_a_zip_with_a_symbolic_link_is_refused_and_no_link_is_made(tmp_path):
    source = _model_folder(tmp_path / "src")
    archive = _zip_of(source, tmp_path / "m.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(_symlink_zip_entry("model/fold_0/link", "/etc"), "/etc")
    with pytest.raises(InputError, match="'model/fold_0/link' that is a symbolic link"):
        install_model(archive, tmp_path / "models")
    assert _nothing_installed(tmp_path / "models")
    assert not [p for p in tmp_path.rglob("*") if p.is_symlink()]


def _tar_with(source: Path, archive: Path, entry: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname="model")
        tf.addfile(entry, io.BytesIO(data) if data else None)
    return archive


def _tar_entry(name: str, kind: bytes, link: str = "", size: int = 0) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type, entry.linkname, entry.size = kind, link, size
    if kind == tarfile.CHRTYPE:
        entry.devmajor, entry.devminor = 1, 3  # /dev/null's numbers
    return entry


@pytest.mark.parametrize("entry, phrase", [
    (_tar_entry("model/fold_0/etc", tarfile.SYMTYPE, "/etc"), "a symbolic link"),
    (_tar_entry("model/fold_0/passwd", tarfile.LNKTYPE, "/etc/passwd"), "a hard link"),
    (_tar_entry("model/fold_0/null", tarfile.CHRTYPE), "a device file"),
    (_tar_entry("model/fold_0/pipe", tarfile.FIFOTYPE), "a named pipe"),
    (_tar_entry("../../outside.txt", tarfile.REGTYPE, size=6), "points outside the model folder"),
    (_tar_entry("/tmp/absolute.txt", tarfile.REGTYPE, size=6), "points outside the model folder"),
], ids=["symlink", "hardlink", "device", "fifo", "dotdot", "absolute"])
def test_a_tar_with_a_link_a_device_or_a_path_outside_is_refused_whole(tmp_path, entry, phrase):
    archive = _tar_with(_model_folder(tmp_path / "src"), tmp_path / "m.tar.gz", entry, b"gotcha" if entry.size else b"")
    with pytest.raises(InputError, match=phrase):
        install_model(archive, tmp_path / "a" / "models")
    assert _nothing_installed(tmp_path / "a" / "models")
    assert not (tmp_path / "outside.txt").exists() and not Path("/tmp/absolute.txt").exists()


def test_a_good_tar_installs(tmp_path):
    source = _model_folder(tmp_path / "src")
    archive = tmp_path / "m.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname="model")
    assert install_model(archive, tmp_path / "models", name="fromtar").path == tmp_path / "models" / "fromtar"


def test_a_model_larger_than_the_cap_is_refused_while_unpacking(tmp_path):
    source = _model_folder(tmp_path / "src")
    (source / "fold_0" / "padding.bin").write_bytes(bytes(200_000))  # compresses to almost nothing
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in source.rglob("*"):
            if path.is_file():
                zf.write(path, path.relative_to(source))
    assert archive.stat().st_size < 20_000
    with pytest.raises(InputError, match="holds more than"):
        install_model(archive, tmp_path / "models", max_bytes=100_000)
    assert _nothing_installed(tmp_path / "models")
    with pytest.raises(InputError, match="holds more than"):
        install_model(source, tmp_path / "models", max_bytes=100_000)
    assert _nothing_installed(tmp_path / "models")


def test_a_model_folder_with_a_symbolic_link_is_refused_and_its_target_not_copied(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private", encoding="utf-8")
    source = _model_folder(tmp_path / "src")
    os.symlink(secret, source / "fold_0" / "notes.txt")
    with pytest.raises(InputError, match="'fold_0/notes.txt', which is a symbolic link"):
        install_model(source, tmp_path / "models")
    assert _nothing_installed(tmp_path / "models")
    assert not [p for p in (tmp_path / "models").rglob("*") if "private" in (p.read_text() if p.is_file() else "")]


def test_a_model_cannot_be_installed_under_a_bundled_models_name(tmp_path):
    with pytest.raises(InputError, match="'qsm' is the name of a bundled model"):
        install_model(_model_folder(tmp_path / "src"), tmp_path / "models", name="qsm")
    assert _nothing_installed(tmp_path / "models")


# --- checkpoints: loaded as weights only, before nnU-Net opens them ---------------------------------------


class _RunsCode:
    """Pickles into a call of os.system: unpickling it with weights_only=False runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _model_with_code(folder: Path, marker: Path) -> Path:
    """A copy of the bundled QSM model whose checkpoint, if unpickled in full, creates ``marker``."""
    shutil.copytree(BUNDLED_MODELS_DIR / "qsm", folder)
    state = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    state["trainer_name"] = _RunsCode(f"touch '{marker}'")
    torch.save(state, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def test_a_checkpoint_that_would_run_code_is_refused_by_install_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    model = _model_with_code(tmp_path / "evil", marker)
    with pytest.raises(InputError, match="holds more than weights \\(posix.system\\)"):
        install_model(model, tmp_path / "models", name="evil")
    assert not marker.exists()
    assert _nothing_installed(tmp_path / "models")


def test_a_checkpoint_that_would_run_code_is_refused_by_detect_and_the_code_never_runs(tmp_path):
    from conftest import assert_refused, run_cli

    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    case = write_case(generate_case("c", seed=3, with_flair=False, extent_mm=(64.0, 72.0, 56.0)), tmp_path)
    marker = tmp_path / "code_ran"
    model = _model_with_code(tmp_path / "evil", marker)
    done = run_cli("detect", "--qsm", case / "qsm.nii.gz", "--model", model, "--out", tmp_path / "out")
    assert_refused(done, "holds more than weights")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_checkpoint_is_bad_input_not_a_bug(tmp_path, damage):
    from conftest import assert_refused, run_cli

    model = tmp_path / "broken"
    shutil.copytree(BUNDLED_MODELS_DIR / "qsm", model)
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80\x02garbage" * 100, "empty": b""}[damage])
    qsm = tmp_path / "qsm.nii.gz"
    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    qsm = write_case(generate_case("c", seed=3, with_flair=False, extent_mm=(64.0, 72.0, 56.0)), tmp_path) / "qsm.nii.gz"
    done = run_cli("detect", "--qsm", qsm, "--model", model, "--out", tmp_path / "out")
    assert_refused(done, "is not a readable PyTorch checkpoint (corrupt or truncated)")


def test_the_checkpoint_hash_is_the_hash_of_the_file_that_was_loaded():
    info, checkpoints = load_checkpoints(resolve_model("qsm"))
    assert info.checkpoint_sha256 == info.card["checkpoint_sha256"]
    assert set(checkpoints["0"]) >= {"network_weights", "trainer_name", "init_args"}


# --- names: explicit resolution --------------------------------------------------------------------------


def test_a_name_never_means_a_folder_of_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "qsm").mkdir()  # the documented DICOM layout: a case folder holding qsm/
    (tmp_path / "qsm" / "IM0001.dcm").write_bytes(b"\0" * 10)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("qsm").path == BUNDLED_MODELS_DIR / "qsm"


def test_a_path_must_look_like_one_and_the_error_says_how(tmp_path, monkeypatch):
    _model_folder(tmp_path / "mymodel")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="write './mymodel'"):
        resolve_model("mymodel")
    assert resolve_model("./mymodel").path == Path("./mymodel")


def test_a_name_that_is_also_a_model_folder_here_is_ambiguous(tmp_path, monkeypatch):
    _model_folder(tmp_path / "qsm")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="'qsm' is both the model .* and a model folder in the working directory"):
        resolve_model("qsm")


def test_an_installed_model_named_like_a_bundled_one_is_an_ambiguity_not_shadowed(tmp_path, monkeypatch):
    _model_folder(tmp_path / "installed" / "qsm")
    monkeypatch.setenv(MODEL_PATH_ENV, str(tmp_path / "installed"))
    with pytest.raises(InputError, match="The model name 'qsm' is ambiguous"):
        resolve_model("qsm")
    assert resolve_model(tmp_path / "installed" / "qsm").path == tmp_path / "installed" / "qsm"


def test_train_does_not_name_a_model_after_a_bundled_one_by_default(tmp_path):
    from conftest import assert_refused, run_cli

    (tmp_path / "cases").mkdir()
    done = run_cli("train", "--cases", tmp_path / "cases", "--work", tmp_path / "work",
                   "--model-out", tmp_path / "models" / "qsm")
    assert_refused(done, "give it another with --name")
    assert not (tmp_path / "work").exists()
