"""`prl-detect train` / `export-model` for real: phantom cases → nnU-Net raw dataset → nnU-Net's planning,
preprocessing and trainer (a few iterations) → an inference-only model folder that `detect` loads; an
interrupted run resumes from its checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import assert_refused
from conftest import run_cli as run_prl_detect

pytestmark = pytest.mark.slow

EPOCHS = 2


def run_cli(*args) -> subprocess.CompletedProcess:
    return run_prl_detect(*args, timeout=1200, env=dict(os.environ, nnUNet_n_proc_DA="1", OMP_NUM_THREADS="2"))


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Five small phantom patients (nnU-Net's 5-fold split needs five)."""
    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    out = tmp_path_factory.mktemp("train_cases")
    for i in range(5):
        write_case(generate_case(f"case_{i:03d}", seed=300 + i, extent_mm=(64.0, 72.0, 56.0), n_prl=2), out)
    return out


@pytest.fixture(scope="module")
def trained(cases, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    work, model = root / "work", root / "model"
    done = run_cli("train", "--cases", cases, "--work", work, "--model-out", model, "--name", "tiny",
                   "--dataset-id", 990, "--epochs", EPOCHS, "--iterations", 2, "--val-iterations", 1,
                   "--save-every", 1, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    return work, model


def fold_dir(work: Path) -> Path:
    return work / "nnUNet_results" / "Dataset990_tiny" / "nnUNetTrainer__nnUNetSmallPlans__3d_fullres" / "fold_0"


def test_the_raw_dataset_is_nnunets_layout_with_every_case(trained, cases):
    work, _ = trained
    raw = work / "nnUNet_raw" / "Dataset990_tiny"
    dataset = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["channel_names"] == {"0": "QSM"}
    assert dataset["numTraining"] == 5
    for case in sorted(cases.iterdir()):
        image = sitk.ReadImage(str(raw / "imagesTr" / f"{case.name}_0000.nii.gz"))
        label = sitk.ReadImage(str(raw / "labelsTr" / f"{case.name}.nii.gz"))
        truth = sitk.ReadImage(str(case / "gt_prl.nii.gz"))
        assert image.GetSize() == label.GetSize() == truth.GetSize()
        assert np.array_equal(sitk.GetArrayFromImage(label) > 0, sitk.GetArrayFromImage(truth) > 0)


def test_training_exports_an_inference_only_model_with_card_and_curve(trained):
    work, model = trained
    plans = json.loads((model / "plans.json").read_text(encoding="utf-8"))
    config = plans["configurations"]["3d_fullres"]
    assert config["patch_size"] == [48, 48, 48]
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128]
    assert config["batch_dice"] is True
    state = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert state["trainer_name"] == "nnUNetTrainer"
    assert "optimizer_state" not in state
    assert state["current_epoch"] == EPOCHS
    card = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert card["name"] == "tiny" and card["channels"] == ["QSM"]
    assert card["training"]["epochs"] == card["training"]["epochs_planned"] == EPOCHS
    assert card["training"]["iterations_per_epoch"] == 2
    with open(model / "training_curve.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    # The trained network (not a copy of the bundled one) went into the folder.
    trained_state = torch.load(fold_dir(work) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for key, value in trained_state["network_weights"].items():
        assert torch.equal(state["network_weights"][key], value.float())


def test_export_model_writes_the_checkpoint_asked_for_and_refuses_one_the_run_lacks(trained, tmp_path):
    work, _ = trained
    done = run_cli("export-model", "--work", work, "--dataset-id", 990, "--model-out", tmp_path / "again")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "again" / "model.json").read_text(encoding="utf-8"))["name"] == "again"
    assert (tmp_path / "again" / "fold_0" / "checkpoint_final.pth").is_file()
    # A run without a best checkpoint (a copy of this one's results without it): one sentence, nothing written.
    shutil.copytree(work / "nnUNet_results", tmp_path / "work" / "nnUNet_results")
    copy = fold_dir(tmp_path / "work")
    (copy / "checkpoint_best.pth").unlink(missing_ok=True)
    done = run_cli("export-model", "--work", tmp_path / "work", "--dataset-id", 990, "--model-out", tmp_path / "best",
                   "--checkpoint", "best")
    assert_refused(done, "has no best checkpoint")
    assert not (tmp_path / "best").exists()
    shutil.rmtree(copy.parent)
    done = run_cli("export-model", "--work", tmp_path / "work", "--dataset-id", 990, "--model-out", tmp_path / "none")
    assert_refused(done, "holds no 3d_fullres training")


def test_detect_loads_a_trained_model_folder(trained, cases, tmp_path):
    _, model = trained
    case = sorted(cases.iterdir())[0]
    out = tmp_path / "result"
    done = run_cli("detect", "--qsm", case / "qsm.nii.gz", "--model", model, "--out", out, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    burden = json.loads((out / "burden.json").read_text(encoding="utf-8"))
    assert burden["model"]["name"] == "tiny"
    labels = sitk.ReadImage(str(out / "prl_labels.nii.gz"))
    assert labels.GetSize() == sitk.ReadImage(str(case / "qsm.nii.gz")).GetSize()


def test_an_interrupted_run_resumes_from_its_checkpoint(cases, trained, tmp_path):
    work = tmp_path / "work"
    args = ["train", "--cases", cases, "--work", work, "--name", "tiny", "--dataset-id", 991, "--iterations", 2,
            "--val-iterations", 1, "--device", "cpu"]
    env = dict(os.environ, nnUNet_n_proc_DA="1", OMP_NUM_THREADS="2")
    # A run of 4 epochs saving every 2, killed (the whole process group) once its epoch-2 checkpoint is on disk.
    command = [*args, "--model-out", tmp_path / "never", "--epochs", 4, "--save-every", 2]
    run = subprocess.Popen([sys.executable, "-m", "PRLDetectorLib", "-q", *map(str, command)],
                           env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fold = work / "nnUNet_results" / "Dataset991_tiny" / "nnUNetTrainer__nnUNetSmallPlans__3d_fullres" / "fold_0"
    latest = None
    deadline = time.monotonic() + 900
    while latest is None and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError):  # not there yet, or torch.save is still writing it
            continue
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert latest is not None and latest["current_epoch"] == 2, "the run ended before it could be interrupted"
    assert not (fold / "checkpoint_final.pth").exists() and not (tmp_path / "never").exists()

    resumed = tmp_path / "resumed"
    done = run_cli("-v", *args, "--model-out", resumed, "--epochs", 99, "--iterations", 50, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at epoch 2 of 4" in done.stderr  # the run's own schedule, not --epochs 99 --iterations 50
    state = torch.load(resumed / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert state["current_epoch"] == 4
    card = json.loads((resumed / "model.json").read_text(encoding="utf-8"))
    assert card["training"]["iterations_per_epoch"] == 2
    with open(resumed / "training_curve.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    # Epochs 0-1 come from the checkpoint's log, not from a new start.
    assert float(rows[0]["train_loss"]) == pytest.approx(latest["logging"]["train_losses"][0], abs=1e-4)


def test_resume_refuses_a_finished_run_and_a_folder_without_one(trained, cases, tmp_path):
    work, _ = trained
    done = run_cli("train", "--cases", cases, "--work", work, "--model-out", tmp_path / "m1", "--dataset-id", 990,
                   "--name", "tiny", "--resume")
    assert_refused(done, "finished already")
    done = run_cli("train", "--cases", cases, "--work", tmp_path / "empty", "--model-out", tmp_path / "m2",
                   "--resume")
    assert_refused(done, "no interrupted run")
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_cases_without_masks_are_refused(tmp_path, cases):
    case = tmp_path / "cases" / "case_x"
    case.mkdir(parents=True)
    shutil.copy2(sorted(cases.iterdir())[0] / "qsm.nii.gz", case / "qsm.nii.gz")
    done = run_cli("train", "--cases", tmp_path / "cases", "--work", tmp_path / "work", "--model-out",
                   tmp_path / "model")
    assert_refused(done, "has no PRL mask")
    assert not (tmp_path / "model").exists()


def test_fine_tuning_starts_from_the_given_model_with_its_plan(trained, cases, tmp_path):
    _, start = trained
    tuned = tmp_path / "tuned"
    done = run_cli("-v", "train", "--cases", cases, "--work", tmp_path / "work", "--model-out", tuned, "--name", "tuned",
                   "--dataset-id", 992, "--epochs", 1, "--iterations", 1, "--val-iterations", 1, "--device", "cpu",
                   "--init-from", start)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started from the weights of" in done.stderr
    plan = json.loads((tuned / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]
    assert plan == json.loads((start / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]
    before = torch.load(start / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)["network_weights"]
    after = torch.load(tuned / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)["network_weights"]
    convolutions = [k for k, v in before.items() if v.ndim == 5]
    # One SGD step moves the weights a little; a network that did not start from them would be unrelated (~0).
    similarity = [torch.nn.functional.cosine_similarity(before[k].flatten(), after[k].flatten(), dim=0).item()
                  for k in convolutions]
    assert min(similarity) > 0.9, similarity
    assert any(not torch.equal(before[k], after[k]) for k in convolutions), "the step changed nothing"
    card = json.loads((tuned / "model.json").read_text(encoding="utf-8"))
    assert card["training"]["started_from"]["model"] == start.name


def test_fine_tuning_refuses_a_model_with_other_inputs_and_a_resume(trained, cases, tmp_path):
    _, start = trained
    done = run_cli("train", "--cases", cases, "--work", tmp_path / "work", "--model-out", tmp_path / "m", "--name", "t",
                   "--dataset-id", 993, "--flair", "--init-from", start)
    assert_refused(done, "fine-tune a model with the same inputs")
    done = run_cli("train", "--cases", cases, "--work", tmp_path / "work2", "--model-out", tmp_path / "m2",
                   "--name", "t", "--resume", "--init-from", start)
    assert_refused(done, "drop --init-from")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()
