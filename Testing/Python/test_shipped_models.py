"""The bundled models: what ships, and that each one finds the PRLs of a phantom it never saw."""

from __future__ import annotations

import json
import re

import pytest
import SimpleITK as sitk
import torch
from conftest import require_model

from PRLDetectorLib.detection.classifier import load_classifier
from PRLDetectorLib.detection.images import file_sha256
from PRLDetectorLib.detection.models import resolve_model
from PRLDetectorLib.detection.pipeline import Detector
from PRLDetectorLib.settings import DetectionSettings

# Every model in Resources/Models and its input channels.
MODELS = {"qsm": ("qsm",), "qsm_flair": ("qsm", "flair")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_shipped_model_is_small_inference_only_and_described_by_its_card(name):
    path = require_model(name)
    info = resolve_model(name)
    assert info.channels == MODELS[name]
    checkpoint = path / "fold_0" / "checkpoint_final.pth"
    assert checkpoint.stat().st_size <= 10 * 1024 * 1024
    size_mb = sum(f.stat().st_size for f in (path / "classifier").iterdir()) / 1e6
    assert size_mb <= 10
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # weights only: no code rides along
    # nnU-Net must find the trainer class in its first module, without importing timm/torchvision.
    assert state["trainer_name"] == "nnUNetTrainer"
    assert "optimizer_state" not in state
    card = json.loads((path / "model.json").read_text(encoding="utf-8"))
    assert card["checkpoint_sha256"] == file_sha256(checkpoint)
    assert card["channels"] == [c.upper() for c in MODELS[name]]
    assert card["training"]["epochs"] >= 1
    # The card repeats what the classifier ships with: the same cut-offs, the same validation figures.
    shipped = json.loads((path / "classifier" / "classifier.json").read_text(encoding="utf-8"))
    for key in ("operating_points", "validation", "trained_on", "candidate_threshold"):
        assert card["classifier"][key] == shipped[key], key
    # ... and says it as `prl-detect train-classifier` writes it into a retrained model's card.
    assert card["classifier"] == load_classifier(path / "classifier").model_card_block()


README_TITLES = {"qsm": "QSM only", "qsm_flair": "QSM + FLAIR"}
README_MODES = {"off": "network alone (today's)", "sensitive": "sensitive", "balanced": "**balanced**",
                "specific": "specific"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_readme_states_the_stage2_figures_the_shipped_cards_and_classifiers_hold(name):
    """The README's held-out stage-2 table and training counts come from the same run as the cards
    (`evaluate_stage2.sh --write-cards`) and from the shipped classifier: a figure edited in one place only, or
    a classifier shipped without rerunning the table, goes red here. (Whether the run's figures are still what
    the models give is checked only by rerunning that script: an hour of stage 1 on 2 cores.)"""
    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    path = require_model(name)
    accuracy = json.loads((path / "model.json").read_text(encoding="utf-8"))["accuracy"]
    held_out = accuracy["held_out_variant_stage2"]
    for mode, title in README_MODES.items():
        row = f"| {README_TITLES[name]} | {title} | {held_out[mode]['lesion_sensitivity']} | " \
              f"{held_out[mode]['lesion_precision']} |"
        assert row in readme, row
    pr_auc = re.search(r"Candidate-level PR-AUC: QSM only (\d\.\d+), QSM \+ FLAIR (\d\.\d+)", readme)
    assert pr_auc and float(pr_auc.group(1 if name == "qsm" else 2)) == pytest.approx(held_out["candidate_pr_auc"],
                                                                                        abs=5e-4)
    trained = load_classifier(path / "classifier").card["members_trained_on"]
    assert f"({trained['examples']:,} candidates, {trained['prl']} on a" in readme
    # The older network-alone table (accuracy_table.py --write-cards writes the same figures into the card).
    for suffix, key in (("", "network_alone"), (" + rim check ≥ 2/3", "with_rim_check_0.67")):
        f = accuracy[key]
        row = (f"| {README_TITLES[name]}{suffix} | {f['lesion_sensitivity']} | {f['lesion_precision']} | "
               f"{f['patient_sensitivity_ge1']} | {f['patient_specificity_ge1']} | {f['false_positives_per_patient']:.2f} |")
        assert row in readme, row


@pytest.fixture(scope="module")
def held_out_like_case(tmp_path_factory):
    """The same patient as ``small_case`` seen through the held-out test set's 128 × 150 × 100 mm field of view."""
    from PRLDetectorLib.phantom.phantom import generate_case, write_case

    case = generate_case("case_fov128", seed=4242, with_flair=True, extent_mm=(128.0, 150.0, 100.0), n_prl=3)
    return write_case(case, tmp_path_factory.mktemp("phantom_fov128"))


def _prls_found(name: str, case) -> tuple[list[bool], object, object]:
    require_model(name)
    detector = Detector(DetectionSettings(model=name, device="cpu"))
    flair = case / "flair.nii.gz" if "flair" in MODELS[name] else None
    result = detector.detect_files(case / "qsm.nii.gz", flair)
    truth = json.loads((case / "truth.json").read_text(encoding="utf-8"))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "gt_instances.nii.gz")))
    labels = sitk.GetArrayFromImage(result.labels)
    prls = [lesion["id"] for lesion in truth["lesions"] if lesion["class"] == "prl"]
    return [bool((labels[gt == i] > 0).any()) for i in prls], result, labels


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_shipped_model_finds_the_prls_of_an_unseen_phantom(name, small_case, request):
    # QSM + FLAIR runs on the held-out test set's field of view: on the 96 × 112 × 72 mm crop it misses PRLs
    # (see the expected failure below).
    case = request.getfixturevalue("held_out_like_case") if "flair" in MODELS[name] else small_case
    found, result, labels = _prls_found(name, case)
    assert len(found) == 3
    assert sum(found) >= len(found) - 1, f"{name}: PRLs found {found}"
    # Lesion precision is not asserted: QSM only marks paramagnetic tissue as PRLs too (46.0 % held-out
    # precision, README accuracy table).
    assert result.burden.prl_count == len(result.lesions) == int(labels.max())


@pytest.mark.slow
# Was a strict expected failure with the network alone (1 of 3 PRLs on this crop); with the lesion classifier's
# candidates (p >= 0.2 + FLAIR-bright lesions) the model finds them: the test holds it to that now.
def test_qsm_flair_finds_the_prls_of_a_small_field_of_view(small_case):
    found, _, _ = _prls_found("qsm_flair", small_case)
    assert sum(found) >= len(found) - 1, f"qsm_flair: PRLs found {found}"


def test_every_bundled_model_folder_is_covered_by_these_tests(bundled_model_dir):
    shipped = sorted(p.name for p in bundled_model_dir.iterdir() if p.is_dir())
    assert shipped == sorted(MODELS)
