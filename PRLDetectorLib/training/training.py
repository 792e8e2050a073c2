"""Training a PRL model with nnU-Net v2 itself: raw dataset → nnU-Net planning and preprocessing → nnU-Net's
trainer → an exported model folder with a model card.

Two plans: nnU-Net's default plan (for a GPU) and a small CPU plan derived from it (patch 48³, features
16-32-64-128, batch 2; ~0.65 s per iteration on 2 CPU cores against ~17 s for the default plan). Both
share nnU-Net's preprocessed data, so the small plan costs no extra preprocessing.

nnU-Net reads its folders from ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results``. Training runs in
the ``prl-detect train`` process (never inside Slicer), which sets them for itself before nnU-Net uses them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import LABELS_NAME, atomic_path

logger = logging.getLogger(__name__)

SMALL_PLANS = "nnUNetSmallPlans"
DEFAULT_PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"


@dataclass(frozen=True)
class TrainingFolders:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    def activate(self) -> None:
        """Point nnU-Net at these folders (this process only: the training CLI, not a host application)."""
        for name, path in (("nnUNet_raw", self.raw), ("nnUNet_preprocessed", self.preprocessed),
                           ("nnUNet_results", self.results)):
            path.mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(path)


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def build_raw_dataset(cases_dir: Path, raw_dataset_dir: Path, with_flair: bool) -> int:
    """Turn case folders (``qsm.nii.gz`` [+ ``flair.nii.gz``] + ``gt_prl.nii.gz`` or ``prl_labels.nii.gz``
    or ``*.seg.nrrd``) into an nnU-Net raw dataset. Returns the number of cases."""
    from PRLDetectorLib.training.dataset import add_case_files

    cases = sorted(p for p in Path(cases_dir).iterdir() if p.is_dir() and (p / "qsm.nii.gz").is_file())
    if not cases:
        raise InputError(f"'{cases_dir}' holds no case folders with a qsm.nii.gz; give a folder of cases.")
    if raw_dataset_dir.exists():
        raise InputError(f"The raw dataset '{raw_dataset_dir}' exists already; remove it or use another dataset id.")
    for case in cases:
        mask = next((case / n for n in ("gt_prl.nii.gz", LABELS_NAME) if (case / n).is_file()), None)
        mask = mask or next(iter(sorted(case.glob("*.seg.nrrd"))), None)
        if mask is None:
            raise InputError(f"The case '{case.name}' has no PRL mask (gt_prl.nii.gz, prl_labels.nii.gz or .seg.nrrd).")
        flair = case / "flair.nii.gz"
        if with_flair and not flair.is_file():
            raise InputError(f"The case '{case.name}' has no flair.nii.gz but a QSM + FLAIR model was asked for.")
        add_case_files(raw_dataset_dir, case / "qsm.nii.gz", mask, flair if with_flair else None, case.name)
    return len(cases)


def small_cpu_plans(plans: dict) -> dict:
    """The small CPU plan: nnU-Net's 3d_fullres with a 48³ patch and a 4-stage 16-32-64-128 U-Net."""
    small = copy.deepcopy(plans)
    small["plans_name"] = SMALL_PLANS
    config = small["configurations"][CONFIGURATION]
    config["patch_size"] = [48, 48, 48]
    config["batch_size"] = 2
    arch = config["architecture"]["arch_kwargs"]
    arch["n_stages"] = 4
    arch["features_per_stage"] = [16, 32, 64, 128]
    arch["kernel_sizes"] = [[3, 3, 3]] * 4
    arch["strides"] = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    arch["n_conv_per_stage"] = [2] * 4
    arch["n_conv_per_stage_decoder"] = [2] * 3
    # Dice over the whole batch, not per patch: most 48³ patches hold no PRL, and a per-patch Dice rewards
    # predicting nothing on them so much that training can settle on an empty prediction (measured: the
    # QSM + FLAIR model sat at pseudo-Dice 0 for 7 epochs with per-patch Dice).
    config["batch_dice"] = True
    # The preprocessed data stays nnU-Net's 3d_fullres data (same spacing and normalisation).
    config["data_identifier"] = plans["configurations"][CONFIGURATION]["data_identifier"]
    small["configurations"] = {CONFIGURATION: config}
    return small


def plan_and_preprocess(folders: TrainingFolders, dataset_id: int, processes: int = 2) -> Path:
    """nnU-Net's fingerprint, default planning and 3d_fullres preprocessing, then the small plan beside it."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=True, verbose=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], DEFAULT_PLANS, configurations=(CONFIGURATION,), num_processes=(processes,), verbose=False)
    preprocessed = next(folders.preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    plans = json.loads((preprocessed / f"{DEFAULT_PLANS}.json").read_text(encoding="utf-8"))
    (preprocessed / f"{SMALL_PLANS}.json").write_text(json.dumps(small_cpu_plans(plans), indent=2), encoding="utf-8")
    return preprocessed


def plan_from_model(folders: TrainingFolders, dataset_id: int, model, processes: int = 2) -> Path:
    """Fine-tuning: preprocess a new dataset with an existing model's own plan (its spacing, normalisation, patch
    and network), so the model's weights fit and its images are read as before. nnU-Net's fingerprint is still
    taken (it checks the dataset); no new plan is made."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess

    plans = json.loads((model.path / "plans.json").read_text(encoding="utf-8"))
    raw = next(folders.raw.glob(f"Dataset{dataset_id:03d}_*"))
    extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=True, verbose=False)
    plans["dataset_name"] = raw.name
    plans["plans_name"] = SMALL_PLANS
    preprocessed = folders.preprocessed / raw.name
    preprocessed.mkdir(parents=True, exist_ok=True)
    (preprocessed / f"{SMALL_PLANS}.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    shutil.copy2(raw / "dataset.json", preprocessed / "dataset.json")  # nnU-Net's planner would copy it
    preprocess([dataset_id], SMALL_PLANS, configurations=(CONFIGURATION,), num_processes=(processes,), verbose=False)
    return preprocessed


def load_start_weights(network, model) -> None:
    """Every weight of ``model``'s fold checkpoint into ``network`` (output layers included: the task is the
    same), loaded with ``weights_only=True``."""
    from PRLDetectorLib.detection.models import load_checkpoints

    _, checkpoints = load_checkpoints(model)
    weights = next(iter(checkpoints.values()))["network_weights"]
    network.load_state_dict(weights, strict=True)
    logger.info("Started from the weights of %s (%d tensors)", model.path, len(weights))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    folders: TrainingFolders, dataset_id: int, plans_name: str, epochs: int, iterations_per_epoch: int,
    val_iterations: int, fold: int | str = 0, seed: int = 0, device: str = "auto",
    resume_from: Path | None = None, save_every: int = 5, start_model=None,
):
    """Train with nnU-Net's own ``nnUNetTrainer`` through its Python API; returns the trainer.

    ``resume_from``: a ``checkpoint_latest.pth`` of this run; nnU-Net restores the weights, optimizer, epoch,
    learning-rate schedule position and log from it and trains on to ``epochs`` (its ``--c``)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from PRLDetectorLib.detection.inference import pick_device

    preprocessed = next(folders.preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    plans = json.loads((preprocessed / f"{plans_name}.json").read_text(encoding="utf-8"))
    plans["continue_training"] = resume_from is not None  # nnU-Net's run_training sets this; the API does not
    dataset = json.loads((preprocessed / "dataset.json").read_text(encoding="utf-8"))
    seed_everything(seed)
    trainer = nnUNetTrainer(plans, CONFIGURATION, fold, dataset, device=pick_device(device))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.save_every = save_every
    if resume_from is not None:
        trainer.load_checkpoint(str(resume_from))
        logger.info("Resuming %s at epoch %d of %d", resume_from, trainer.current_epoch, epochs)
    elif start_model is not None:
        trainer.initialize()
        load_start_weights(trainer.network, start_model)
    trainer.run_training()
    return trainer


def export_model(trainer_dir: Path, fold: int | str, destination: Path, card: dict, checkpoint: str = "checkpoint_final.pth") -> Path:
    """Write an inference-only nnU-Net model folder: no optimizer state, ``trainer_name`` = nnUNetTrainer
    (so nnU-Net finds the class without importing every trainer module), plus ``model.json``."""
    import torch

    from PRLDetectorLib.detection.images import file_sha256

    if destination.exists():
        raise InputError(f"The model folder '{destination}' exists already; remove it or choose another.")
    source = torch.load(trainer_dir / f"fold_{fold}" / checkpoint, map_location="cpu", weights_only=False)
    stripped = {
        "network_weights": {k: v.float() for k, v in source["network_weights"].items()},
        "init_args": {k: v for k, v in source["init_args"].items() if k in ("configuration", "fold")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": source.get("inference_allowed_mirroring_axes"),
        "current_epoch": source.get("current_epoch"),
    }
    with atomic_path(destination, folder=True) as staging:
        (staging / f"fold_{fold}").mkdir(parents=True)
        torch.save(stripped, staging / f"fold_{fold}" / "checkpoint_final.pth")
        for name in ("dataset.json", "plans.json"):
            shutil.copy2(trainer_dir / name, staging / name)
        card = dict(card)
        card["checkpoint_sha256"] = file_sha256(staging / f"fold_{fold}" / "checkpoint_final.pth")
        (staging / "model.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    size_mb = sum(p.stat().st_size for p in destination.rglob("*") if p.is_file()) / 1e6
    logger.info("Exported %s (%.1f MB)", destination, size_mb)
    return destination


def training_curve(log: dict) -> list[dict]:
    """Per-epoch train loss, validation loss and EMA pseudo-Dice from the log nnU-Net keeps in a checkpoint."""
    rows = []
    for epoch in range(len(log.get("train_losses", []))):
        row = {"epoch": epoch}
        for key in ("train_losses", "val_losses", "ema_fg_dice"):
            values = log.get(key, [])
            if epoch < len(values):
                row[key] = float(values[epoch])
        rows.append(row)
    return rows


def run_training_job(
    cases_dir: Path, work_dir: Path, model_out: Path, name: str, with_flair: bool, dataset_id: int,
    small: bool, epochs: int, iterations_per_epoch: int, val_iterations: int, seed: int, device: str,
    fold: int | str = 0, resume: bool = False, save_every: int = 5, init_from: str | Path | None = None,
) -> Path:
    """The whole ``prl-detect train``: dataset, planning, training, export. Returns the model folder.

    ``init_from``: a model (bundled name or folder) to fine-tune: its plan and its weights are the start; the
    epochs then run nnU-Net's usual schedule from its initial learning rate.

    ``resume``: go on with an interrupted run in ``work_dir`` (same dataset id, plan and fold) from its last
    saved checkpoint (every ``save_every`` epochs), with the epochs and iterations that run was started with."""
    if model_out.exists():
        raise InputError(f"The model folder '{model_out}' exists already; remove it or choose another.")
    folders = TrainingFolders(work_dir)
    plans_name = SMALL_PLANS if small else DEFAULT_PLANS
    start_model = None
    if init_from is not None:
        from PRLDetectorLib.detection.models import fingerprint, resolve_model

        start_model = fingerprint(resolve_model(init_from))  # its checkpoint's sha256 goes on the new card
        if ("flair" in start_model.channels) != with_flair:
            raise InputError(f"The model '{start_model.name}' reads {' + '.join(c.upper() for c in start_model.channels)}"
                             f" but {'QSM + FLAIR' if with_flair else 'QSM only'} was asked for; fine-tune a model with "
                             "the same inputs (--flair or not).")
        plans_name = SMALL_PLANS  # the model's own plan, stored under this name
    resume_from = None
    if resume:
        resume_from, epochs, iterations_per_epoch, val_iterations = interrupted_run(folders, dataset_id, plans_name, fold)
        folders.activate()
    else:
        folders.activate()
        raw = folders.raw / dataset_name(dataset_id, name)
        n_cases = build_raw_dataset(cases_dir, raw, with_flair)
        logger.info("Raw dataset %s: %d cases", raw, n_cases)
        if start_model is not None:
            plan_from_model(folders, dataset_id, start_model)
        else:
            plan_and_preprocess(folders, dataset_id)
    train(folders, dataset_id, plans_name, epochs, iterations_per_epoch, val_iterations, fold, seed, device,
          resume_from=resume_from, save_every=save_every, start_model=start_model)
    started_from = ({"model": start_model.path.name, "checkpoint_sha256": start_model.checkpoint_sha256}
                    if start_model is not None else None)
    return export_trained_model(work_dir, dataset_id, model_out, name, "final", fold, cases_dir=cases_dir, seed=seed,
                                started_from=started_from)


def interrupted_run(folders: TrainingFolders, dataset_id: int, plans_name: str,
                    fold: int | str) -> tuple[Path, int, int, int]:
    """The ``checkpoint_latest.pth`` of an unfinished run and the epochs, iterations per epoch and validation
    iterations it was started with (the learning-rate schedule depends on the epochs)."""
    runs = sorted(folders.results.glob(f"Dataset{dataset_id:03d}_*/nnUNetTrainer__{plans_name}__{CONFIGURATION}/fold_{fold}"))
    fold_dir = runs[0] if runs else folders.results
    latest, debug = fold_dir / "checkpoint_latest.pth", fold_dir / "debug.json"
    if runs and (fold_dir / "checkpoint_final.pth").is_file():
        raise InputError(f"The run in '{fold_dir}' finished already; export it with `prl-detect export-model`.")
    if not latest.is_file() or not debug.is_file():
        raise InputError(f"'{folders.root}' holds no interrupted run of dataset {dataset_id} (plan {plans_name}, "
                         f"fold {fold}) with a saved checkpoint; train without --resume.")
    started = json.loads(debug.read_text(encoding="utf-8"))
    return (latest, int(started["num_epochs"]), int(started["num_iterations_per_epoch"]),
            int(started["num_val_iterations_per_epoch"]))


def export_trained_model(
    work_dir: Path, dataset_id: int, model_out: Path, name: str, checkpoint: str = "final", fold: int | str = 0,
    cases_dir: Path | None = None, seed: int | None = None, started_from: dict | None = None,
) -> Path:
    """Export a trained (or still training: ``checkpoint="latest"``) nnU-Net run as a model folder with its
    card and training curve. ``started_from``: the model a fine-tuning started from (name, checkpoint sha256)."""
    import torch

    from PRLDetectorLib import __version__

    folders = TrainingFolders(Path(work_dir))
    results = next(iter(sorted(folders.results.glob(f"Dataset{dataset_id:03d}_*"))), None)
    if results is None:
        raise InputError(f"'{folders.results}' holds no trained dataset {dataset_id}; train it first.")
    trainer_dir = next(iter(sorted(results.glob(f"nnUNetTrainer__*__{CONFIGURATION}"))), None)
    if trainer_dir is None:
        raise InputError(f"'{results}' holds no {CONFIGURATION} training; train it first (prl-detect train).")
    fold_dir = trainer_dir / f"fold_{fold}"
    if not (fold_dir / f"checkpoint_{checkpoint}.pth").is_file():
        written = sorted(p.stem.removeprefix("checkpoint_") for p in fold_dir.glob("checkpoint_*.pth"))
        raise InputError(f"Fold {fold} of '{trainer_dir}' has no {checkpoint} checkpoint (it has: "
                         f"{', '.join(written) or 'none'}); choose one of those with --checkpoint, or train on.")
    state = torch.load(fold_dir / f"checkpoint_{checkpoint}.pth", map_location="cpu", weights_only=False)
    log = state.get("logging", {})
    curve = training_curve(log)
    debug = json.loads((fold_dir / "debug.json").read_text(encoding="utf-8")) if (fold_dir / "debug.json").is_file() else {}
    channels = json.loads((trainer_dir / "dataset.json").read_text(encoding="utf-8"))["channel_names"]
    with_flair = len(channels) == 2
    starts, ends = log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])
    wall = (ends[-1] - starts[0]) / 60 if starts and ends else None
    card = {
        "name": name,
        "title": "QSM + FLAIR" if with_flair else "QSM only",
        "version": __version__,
        "channels": [channels[k] for k in sorted(channels, key=int)],
        "description": "PRL (whole lesion = rim + core) segmentation, nnU-Net v2 3d_fullres, small CPU plan"
        if SMALL_PLANS in trainer_dir.name else "PRL (whole lesion) segmentation, nnU-Net v2 3d_fullres",
        "plans": trainer_dir.name.split("__")[1],
        "trained_on": {"cases_dir": str(cases_dir) if cases_dir else None, "fold": fold, "seed": seed,
                       "dataset": results.name},
        "training": {
            "epochs_planned": int(debug["num_epochs"]) if "num_epochs" in debug else None,
            "epochs": int(state.get("current_epoch", len(curve))),
            "iterations_per_epoch": int(debug["num_iterations_per_epoch"]) if "num_iterations_per_epoch" in debug else None,
            "checkpoint": checkpoint,
            "wall_minutes": round(wall, 1) if wall else None,
            "final_ema_pseudo_dice": curve[-1].get("ema_fg_dice") if curve else None,
            "cpu_count": os.cpu_count(),
        },
        "orientation": _training_orientation(folders.raw / results.name),
    }
    if started_from is not None:
        card["training"]["started_from"] = started_from
    model = export_model(trainer_dir, fold, Path(model_out), card, checkpoint=f"checkpoint_{checkpoint}.pth")
    write_training_curve(curve, model / "training_curve.csv")
    return model


def write_training_curve(curve: list[dict], path: Path) -> None:
    """The per-epoch figures of the training log, kept beside the model (a few KB)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_loss", "val_loss", "ema_pseudo_dice"])
        for row in curve:
            writer.writerow([row["epoch"], f"{row.get('train_losses', float('nan')):.4f}",
                             f"{row.get('val_losses', float('nan')):.4f}", f"{row.get('ema_fg_dice', float('nan')):.4f}"])


def _training_orientation(raw_dataset_dir: Path) -> str:
    import SimpleITK as sitk

    first = next(iter(sorted((raw_dataset_dir / "imagesTr").glob("*_0000.nii.gz"))))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(first))
    reader.ReadImageInformation()
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection())
