"""The bundled models: what ships, and that each one finds the PRLs of a phantom it never saw."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import torch
from conftest import require_model

from PRLDetectorLib.models import resolve_model
from PRLDetectorLib.pipeline import Detector
from PRLDetectorLib.settings import DetectionSettings
from PRLDetectorLib.training import sha256_of

# Every model in Resources/Models and its input channels.
MODELS = {"qsm": ("qsm",), "qsm_flair": ("qsm", "flair")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_shipped_model_is_small_inference_only_and_described_by_its_card(name):
    path = require_model(name)
    info = resolve_model(name)
    assert info.channels == MODELS[name]
    checkpoint = path / "fold_0" / "checkpoint_final.pth"
    assert checkpoint.stat().st_size <= 10 * 1024 * 1024
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    # nnU-Net must find the trainer class in its first module, without importing timm/torchvision.
    assert state["trainer_name"] == "nnUNetTrainer"
    assert "optimizer_state" not in state
    card = json.loads((path / "model.json").read_text(encoding="utf-8"))
    assert card["checkpoint_sha256"] == sha256_of(checkpoint)
    assert card["channels"] == [c.upper() for c in MODELS[name]]
    assert card["training"]["epochs"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_shipped_model_finds_the_prls_of_an_unseen_phantom(name, small_case):
    require_model(name)
    detector = Detector(DetectionSettings(model=name, device="cpu"))
    flair = small_case / "flair.nii.gz" if "flair" in MODELS[name] else None
    result = detector.detect_files(small_case / "qsm.nii.gz", flair)
    truth = json.loads((small_case / "truth.json").read_text(encoding="utf-8"))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case / "gt_instances.nii.gz")))
    labels = sitk.GetArrayFromImage(result.labels)
    prls = [lesion["id"] for lesion in truth["lesions"] if lesion["class"] == "prl"]
    found = [bool((labels[gt == i] > 0).any()) for i in prls]
    assert sum(found) >= len(prls) - 1, f"{name}: PRLs found {found}"
    # Lesion precision is not asserted yet: the shipped checkpoint (12 of 30 planned epochs) still calls some
    # rimless lesions PRLs; the held-out precision figure belongs to issue #3's accuracy table.
    assert result.burden.prl_count == len(result.lesions) == int(labels.max())


def test_every_bundled_model_folder_is_covered_by_these_tests(bundled_model_dir):
    shipped = sorted(p.name for p in bundled_model_dir.iterdir() if p.is_dir())
    assert shipped == sorted(MODELS)
