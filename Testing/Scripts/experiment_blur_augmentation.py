"""Experiment (README, "Stage 2"): train the lesion classifier on blur-augmented candidates.

The held-out reconstruction (gradient-regularised L2) blurs a rim more than the TKD and Tikhonov inversions the
classifiers are trained on. Here every training candidate is measured again on its patient's QSM smoothed by a
Gaussian (``--sigmas``, mm; normalised inside the brain mask, so the mask and the brain edge stay as they were),
each copy in its patient's group (so in its fold). Two classifiers are fitted with the library's own
``fit_classifier`` on the same candidates: ``ctl`` (as reconstructed only: the shipped recipe) and ``aug``
(with the copies). Each is written as a model folder ``OUT/<ctl|aug>/<model>`` for
``evaluate_stage2.py WORK --models LABEL=FOLDER``.

Usage: .venv/bin/python Testing/Scripts/experiment_blur_augmentation.py WORK --model qsm --out OUT
  WORK is train_classifiers.sh's: its round_* folders are the training patients and WORK/train_s1 their cached
  stage 1 (this script runs no network: a case without a cached stage 1 is an error).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from PRLDetectorLib.detection.candidates import find_case_candidates
from PRLDetectorLib.detection.classifier import CLASSIFIER_DIR
from PRLDetectorLib.detection.images import read_image, validate_qsm
from PRLDetectorLib.detection.models import resolve_model
from PRLDetectorLib.training.classifier import (
    Examples,
    cached_stage1,
    examples_from_candidates,
    fit_classifier,
    save_classifier,
    true_prl_mask,
)

logger = logging.getLogger("blur_augmentation")


def smoothed_in_brain(qsm: sitk.Image, sigma_mm: float) -> sitk.Image:
    """The QSM smoothed by a Gaussian of ``sigma_mm`` inside its brain mask (normalised convolution), 0 outside."""
    values = sitk.GetArrayFromImage(qsm).astype(np.float32)
    brain = ((values != 0) & np.isfinite(values)).astype(np.float32)

    def smooth(array: np.ndarray) -> np.ndarray:
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(qsm)
        return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, sigma_mm))

    weight = smooth(brain)
    out = np.where(brain > 0, smooth(np.nan_to_num(values) * brain) / np.maximum(weight, 1e-6), 0).astype(np.float32)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(qsm)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    model = resolve_model(args.model)
    flair_wanted = "flair" in model.channels
    cases = sorted(p for r in range(1, args.rounds + 1) for p in (args.work / f"round_{r}").iterdir())

    def no_network():
        raise SystemExit("A training case has no cached stage 1; run train_classifiers.sh first.")

    plain, augmented = Examples.empty(), Examples.empty()
    for case in tqdm(cases, desc=f"{model.name} candidates", unit="case"):
        qsm, _ = validate_qsm(read_image(case / "qsm.nii.gz", "QSM"))
        probability, flair = cached_stage1(args.work / "train_s1", case, model, no_network)
        truth = true_prl_mask(case, qsm)
        for sigma in (0.0, *args.sigmas):
            image = qsm if sigma == 0 else smoothed_in_brain(qsm, sigma)
            found = find_case_candidates(image, probability, flair if flair_wanted else None, 0.2, 5.0)
            examples = examples_from_candidates(found.labels, found.features, truth, case.name)
            augmented = augmented + examples
            if sigma == 0:
                plain = plain + examples
    logger.info("%d patients: %d candidates (%d on a PRL); with the copies %d", len(cases), len(plain),
                int(plain.labels.sum()), len(augmented))
    summary = {}
    for label, examples in (("ctl", plain), ("aug", augmented)):
        card = {"name": f"{model.name} lesion classifier ({label})", "version": model.version,
                "candidate_threshold": 0.2, "candidate_min_mm3": 5.0, "flair_candidates": flair_wanted,
                "trained_on": {"experiment": "blur augmentation", "sigmas_mm": [0.0, *args.sigmas] if label == "aug"
                               else [0.0], "patients": len(cases)}}
        classifier, _ = fit_classifier(examples, card=card)
        folder = args.out / label / model.name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(model.path, folder, ignore=shutil.ignore_patterns(CLASSIFIER_DIR))
        save_classifier(classifier, examples, folder)
        summary[label] = classifier.card["validation"]
        logger.info("%s: %s", label, json.dumps(classifier.card["validation"]["balanced"]))
    (args.out / f"summary_{model.name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
