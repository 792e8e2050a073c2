"""Stage 2 by measurement: the shipped feature classifier (LightGBM on 101 patch measures) against a small 3D
CNN on a patch around each candidate (RimNet / ALPaCA style), on the same candidates.

Both learn from the training patients' candidates (stage 1 of the given model, cached by
``train_classifiers.sh``) and are scored on the held-out reconstruction's candidates (cached by
``evaluate_stage2.sh``): candidate-level PR-AUC, and sensitivity / precision at a calibrated 0.5. The CNN sees
the patch stage 2's measures start from (±12 mm at 0.75 mm isotropic, patient axes, centred on the candidate's
centroid): QSM in ppm, stage 1's probability, and FLAIR when the model reads it; flips and in-plane quarter
turns (B0 stays along S–I) as augmentation; an ensemble of ``--seeds`` seeds. With ``--stack`` it also asks
whether the CNN adds to the measures: CNNs trained on 5 patient folds give every training candidate an
out-of-fold score, which becomes a 102nd measure of a classifier trained as the shipped one is
(``fit_classifier``), compared with one on the 101 measures alone, trained on the same candidates: out-of-fold
PR-AUC on the training reconstructions, and PR-AUC on the held-out one (test CNN score = mean of the fold
CNNs). Nothing here ships; it prints figures.

Usage: .venv/bin/python Testing/Scripts/compare_patch_cnn.py WORK MODEL_FOLDER [--epochs 20] [--seeds 2]
           [--train WORK/round_2 ...] [--stack]
  WORK holds train_s1/, test/ and test_s1/ and the training rounds round_*/ (the stage-2 scripts' work
  folder); --train picks the folders of training cases (default: every WORK/round_*).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from tqdm import tqdm

from PRLDetectorLib.detection.candidates import PatchSampler, find_case_candidates
from PRLDetectorLib.detection.classifier import model_classifier
from PRLDetectorLib.detection.models import resolve_model
from PRLDetectorLib.training.classifier import label_candidates, true_prl_mask

logger = logging.getLogger("compare_patch_cnn")


def case_patches(case: Path, cache: Path, model, classifier) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patches (candidates, channels, 33, 33, 33), feature rows and labels of one case's candidates."""
    qsm = sitk.ReadImage(str(case / "qsm.nii.gz"), sitk.sitkFloat32)
    prob_image = sitk.ReadImage(str(cache / case.name / f"prob_{model.name}.nii.gz"), sitk.sitkFloat32)
    flair = None
    if "flair" in model.channels:
        flair = sitk.ReadImage(str(cache / case.name / "flair_on_qsm.nii.gz"), sitk.sitkFloat32)
    probability = sitk.GetArrayFromImage(prob_image)
    candidates = find_case_candidates(qsm, probability, flair if classifier.flair_candidates else None,
                                      classifier.candidate_threshold, classifier.candidate_min_mm3)
    labels = label_candidates(candidates.labels, true_prl_mask(case, qsm))
    prob_image.CopyInformation(qsm)
    samplers = [PatchSampler(qsm), PatchSampler(prob_image)]
    if flair is not None:
        flair.CopyInformation(qsm)
        values = sitk.GetArrayViewFromImage(flair)
        scale = float(np.median(values[values > 0])) if (values > 0).any() else 1.0
        samplers.append(PatchSampler(sitk.ShiftScale(flair, 0.0, 1.0 / scale)))
    patches = []
    for i in range(1, candidates.count + 1):
        index = np.argwhere(candidates.labels == i).mean(axis=0)
        centre = np.array(qsm.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in index[::-1])))
        channels = [sampler(centre) for sampler in samplers]
        channels[0] = channels[0] / 0.05  # ppm → units of a typical rim contrast
        patches.append(np.stack(channels))
    return np.asarray(patches, np.float32).reshape(-1, len(samplers), 33, 33, 33), candidates.features, labels[:candidates.count]


def collect(cases_dir: Path, cache: Path, model, classifier) -> dict | None:
    cases = sorted(p for p in cases_dir.iterdir() if (cache / p.name).is_dir())
    if not cases:
        logger.warning("%s: no case has a stage-1 map in %s; skipped", cases_dir, cache)
        return None
    out = {"patches": [], "features": [], "labels": [], "groups": []}
    for case in tqdm(cases, desc=cases_dir.name, unit="case"):
        patches, features, labels = case_patches(case, cache, model, classifier)
        out["patches"].append(patches)
        out["features"].append(features)
        out["labels"].append(labels)
        out["groups"] += [case.name] * len(labels)
    return {k: np.concatenate(v) if k != "groups" else np.array(v) for k, v in out.items()}


class PatchNet(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()

        def block(a, b, stride=1):
            return torch.nn.Sequential(torch.nn.Conv3d(a, b, 3, stride=stride, padding=1),
                                       torch.nn.InstanceNorm3d(b, affine=True), torch.nn.LeakyReLU(0.01),
                                       torch.nn.Conv3d(b, b, 3, padding=1), torch.nn.InstanceNorm3d(b, affine=True),
                                       torch.nn.LeakyReLU(0.01))
        # The first convolution reads the patch at full resolution and strides by 2 (17³): a CPU-sized net.
        self.features = torch.nn.Sequential(block(channels, 16, stride=2), block(16, 32, stride=2),
                                            block(32, 64, stride=2), torch.nn.AdaptiveAvgPool3d(1))
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(64, 1))

    def forward(self, x):
        return self.head(self.features(x)).squeeze(1)


def augment(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    # Axes (z, y, x) along patient S/I, P/A, L/R: flips on all three, quarter turns in the axial plane only.
    for axis in (2, 3, 4):
        if rng.random() < 0.5:
            batch = batch.flip(axis)
    return torch.rot90(batch, int(rng.integers(4)), dims=(3, 4))


def train_cnn(patches: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> PatchNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = PatchNet(patches.shape[1])
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=epochs * int(np.ceil(len(labels) / 32)))
    positive = max(float(labels.sum()), 1.0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(labels) - positive) / positive))
    x, y = torch.from_numpy(patches), torch.from_numpy(labels.astype(np.float32))
    for _ in range(epochs):
        net.train()
        for batch in np.array_split(rng.permutation(len(labels)), int(np.ceil(len(labels) / 32))):
            optimiser.zero_grad()
            loss = loss_fn(net(augment(x[batch], rng)), y[batch])
            loss.backward()
            optimiser.step()
            schedule.step()
    return net.eval()


@torch.inference_mode()
def cnn_scores(nets: list[PatchNet], patches: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(patches)
    logits = [torch.cat([net(x[i:i + 64]) for i in range(0, len(x), 64)]) for net in nets]
    return torch.stack(logits).mean(0).numpy()


def at_half(p: np.ndarray, labels: np.ndarray) -> str:
    called = p >= 0.5
    tp = int((called & (labels == 1)).sum())
    return (f"sensitivity {100 * tp / max(labels.sum(), 1):.1f} % ({tp}/{int(labels.sum())}), precision "
            f"{100 * tp / max(called.sum(), 1):.1f} % ({tp}/{int(called.sum())})")


def stacked(train: dict, test: dict, epochs: int, folds: int = 5) -> dict:
    """Does the CNN add to the measures? Out-of-fold CNN scores as one more measure of the shipped classifier's
    training (``fit_classifier``: LightGBM members on the same patient folds, calibrated)."""
    from sklearn.model_selection import GroupKFold

    from PRLDetectorLib.detection.candidates import FEATURE_NAMES
    from PRLDetectorLib.training.classifier import Examples, fit_classifier

    split = list(GroupKFold(folds).split(train["features"], train["labels"], train["groups"]))
    oof = np.zeros(len(train["labels"]), np.float32)
    test_scores = []
    for k, (fit, held) in enumerate(tqdm(split, desc="fold CNNs", unit="fold")):
        net = train_cnn(train["patches"][fit], train["labels"][fit], epochs, seed=k)
        oof[held] = cnn_scores([net], train["patches"][held])
        test_scores.append(cnn_scores([net], test["patches"]))
    test_cnn = np.mean(test_scores, axis=0)

    def pr_aucs(x: np.ndarray, x_test: np.ndarray, names: tuple[str, ...]) -> dict:
        examples = Examples(x, train["labels"], train["groups"], np.ones(len(x)))
        classifier, out_of_fold = fit_classifier(examples, folds, feature_names=names)
        return {"oof_pr_auc": round(float(average_precision_score(train["labels"], out_of_fold)), 3),
                "test_pr_auc": round(float(average_precision_score(test["labels"], classifier.predict(x_test)[0])), 3)}

    return {"cnn_alone": {"oof_pr_auc": round(float(average_precision_score(train["labels"], oof)), 3),
                          "test_pr_auc": round(float(average_precision_score(test["labels"], test_cnn)), 3)},
            "measures": pr_aucs(train["features"], test["features"], FEATURE_NAMES),
            "measures_and_cnn": pr_aucs(np.c_[train["features"], oof], np.c_[test["features"], test_cnn],
                                        (*FEATURE_NAMES, "patch_cnn_logit"))}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("model")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train", type=Path, nargs="+", help="folders of training cases (default: WORK/round_*)")
    parser.add_argument("--stack", action="store_true", help="also: the CNN's out-of-fold score as a 102nd measure")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = resolve_model(args.model)
    classifier = model_classifier(model.path)
    parts = [collect(folder, args.work / "train_s1", model, classifier)
             for folder in (args.train or sorted(args.work.glob("round_*")))]
    parts = [part for part in parts if part is not None]
    test = collect(args.work / "test", args.work / "test_s1", model, classifier)
    if not parts or test is None:
        logger.error("No training or test case has a cached stage-1 map: run train_classifiers.sh and "
                     "evaluate_stage2.sh on WORK first.")
        raise SystemExit(2)
    train = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    print(f"{model.name}: {len(train['labels'])} training candidates ({int(train['labels'].sum())} PRL), "
          f"{len(test['labels'])} test candidates ({int(test['labels'].sum())} PRL)")

    started = time.perf_counter()
    nets = [train_cnn(train["patches"], train["labels"], args.epochs, seed) for seed in range(args.seeds)]
    seconds = time.perf_counter() - started
    # Platt calibration of the CNN on its training scores is optimistic; calibrate on 3-fold OOF instead would
    # cost 3x the training: the PR-AUC does not depend on it, the 0.5 point does (stated as such).
    train_logit = cnn_scores(nets, train["patches"])
    platt = LogisticRegression().fit(train_logit[:, None], train["labels"])
    cnn_test = platt.predict_proba(cnn_scores(nets, test["patches"])[:, None])[:, 1]
    lgb_test, _ = classifier.predict(test["features"])
    figures = {
        "model": model.name, "train_candidates": len(train["labels"]), "test_candidates": len(test["labels"]),
        "cnn_train_seconds": round(seconds, 1),
        "pr_auc": {"features_lightgbm": round(float(average_precision_score(test["labels"], lgb_test)), 3),
                   "patch_cnn": round(float(average_precision_score(test["labels"], cnn_test)), 3),
                   "mean_of_both": round(float(average_precision_score(test["labels"], (lgb_test + cnn_test) / 2)), 3)},
    }
    print(json.dumps(figures, indent=2))
    print(f"features (shipped classifier) at 0.5: {at_half(lgb_test, test['labels'])}")
    print(f"patch CNN at 0.5 (Platt on its training scores): {at_half(cnn_test, test['labels'])}")
    print(f"mean of both at 0.5: {at_half((lgb_test + cnn_test) / 2, test['labels'])}")
    if args.stack:
        figures["stacked"] = stacked(train, test, args.epochs)
        print(json.dumps(figures["stacked"], indent=2))
    (args.work / f"patch_cnn_{model.name}.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
