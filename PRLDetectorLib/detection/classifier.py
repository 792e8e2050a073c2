"""Stage 2: a calibrated PRL probability and an uncertainty for each candidate lesion.

An ensemble of gradient-boosted tree models (LightGBM), one per patient fold of its training set, as ALPaCA
averages its cross-validation models: the probability is the mean of the members' probabilities after
isotonic calibration on out-of-fold predictions, the uncertainty their spread (standard deviation).

A classifier folder holds ``classifier.json`` (the card: feature names, calibration, operating points with
the figures they gave on validation data, training data) and one LightGBM text model per member. Loading
parses text only: no pickle, so a classifier cannot run code. It sits in ``<model folder>/classifier/``, so
it ships, installs and loads with its nnU-Net model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from PRLDetectorLib.detection.candidates import FEATURE_NAMES
from PRLDetectorLib.errors import InputError
from PRLDetectorLib.settings import NO_CLASSIFIER, OPERATING_POINTS

logger = logging.getLogger(__name__)

CLASSIFIER_DIR = "classifier"
"""The classifier's folder inside a model folder."""
CARD_NAME = "classifier.json"
__all__ = ["CLASSIFIER_DIR", "NO_CLASSIFIER", "OPERATING_POINTS", "LesionClassifier", "load_classifier",
           "model_classifier"]


def known_measures(names: tuple[str, ...]) -> bool:
    """Whether ``names`` are distinct measures this version computes: all of :data:`FEATURE_NAMES` or fewer (those
    of an earlier version; measures are only ever added). What a classifier or its examples may be made of."""
    return bool(names) and len(set(names)) == len(names) and set(names) <= set(FEATURE_NAMES)


def columns_by_name(features: np.ndarray, columns: tuple[str, ...], names: tuple[str, ...]) -> np.ndarray:
    """``features``, whose columns are named by ``columns``, in the columns ``names``."""
    if tuple(columns) == tuple(names):
        return features
    where = {name: k for k, name in enumerate(columns)}
    missing = [name for name in names if name not in where]
    if missing:
        raise InputError(f"The candidates lack the measure(s) {', '.join(missing[:3])} the classifier was trained "
                         "on; measure them with this version.")
    return features[:, [where[name] for name in names]]


@dataclass
class LesionClassifier:
    feature_names: tuple[str, ...]
    members: list
    """lightgbm.Booster objects, or their text models (as read: turned into boosters at the first
    :meth:`predict`, so LightGBM and the scikit-learn it imports, ~50 MB, are not in memory during the
    network pass)."""
    calibration_x: np.ndarray
    calibration_y: np.ndarray
    operating_points: dict[str, float]
    card: dict = field(default_factory=dict)

    @property
    def candidate_threshold(self) -> float:
        """Stage 1's probability cut-off for candidates, as in training (the classifier knows no others)."""
        return float(self.card.get("candidate_threshold", 0.2))

    @property
    def candidate_min_mm3(self) -> float:
        return float(self.card.get("candidate_min_mm3", 5.0))

    @property
    def flair_candidates(self) -> bool:
        return bool(self.card.get("flair_candidates", False))

    def predict(self, features: np.ndarray, columns: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probability, uncertainty) per row of ``features``, whose columns are named by ``columns``: by default
        :data:`FEATURE_NAMES` (what this version measures, as ``find_case_candidates`` gives them) when there are
        as many, else :attr:`feature_names`. The classifier takes the columns it was trained on, by name: one
        trained by an earlier version, on fewer measures, still predicts."""
        features = np.asarray(features, np.float64)
        width = features.shape[-1] if features.ndim else 0
        if columns is None:
            columns = FEATURE_NAMES if width == len(FEATURE_NAMES) else self.feature_names
        if features.ndim != 2 or width != len(columns):
            raise InputError(
                f"The classifier expects {len(columns)} features per candidate but got {width}; use a classifier "
                "trained by this version.")
        features = columns_by_name(features, columns, self.feature_names)
        if len(features) == 0:
            return np.zeros(0), np.zeros(0)
        raw = np.stack([member.predict(features) for member in self._boosters()])
        calibrated = np.interp(raw, self.calibration_x, self.calibration_y)
        return calibrated.mean(axis=0), calibrated.std(axis=0)

    def _boosters(self) -> list:
        if any(isinstance(member, str) for member in self.members):
            import lightgbm

            try:
                self.members = [lightgbm.Booster(model_str=member) if isinstance(member, str) else member
                                for member in self.members]
            except lightgbm.basic.LightGBMError as error:
                raise InputError(f"A member of the lesion classifier cannot be read ({error}); reinstall the "
                                 "model.") from None
        return self.members

    def cutoff(self, point: str) -> float:
        """The probability at or above which a candidate is called a PRL at operating point ``point``."""
        if point not in self.operating_points:
            raise InputError(f"Operating point '{point}' is unknown; use one of "
                             f"{', '.join((*self.operating_points, NO_CLASSIFIER))}.")
        return float(self.operating_points[point])

    def model_card_block(self) -> dict:
        """What a model's card (``model.json`` → ``classifier``) says about the classifier it ships: its folder,
        stage 1's cut-off, the operating points' cut-offs, their validation figures and what it was trained on,
        as the classifier's own card has them."""
        return {"folder": CLASSIFIER_DIR,
                "candidate_threshold": self.candidate_threshold,
                "operating_points": {k: float(v) for k, v in self.operating_points.items()},
                "validation": self.card.get("validation", {}),
                "trained_on": self.card.get("trained_on", {})}

    def save(self, folder: str | Path) -> Path:
        """Write the card and the members into ``folder`` (created; its parent must exist)."""
        folder = Path(folder)
        folder.mkdir(exist_ok=True)
        names = []
        for k, member in enumerate(self.members):
            name = f"member_{k}.txt"
            (folder / name).write_text(member if isinstance(member, str) else member.model_to_string(),
                                       encoding="utf-8")
            names.append(name)
        card = {**self.card, "feature_names": list(self.feature_names), "members": names,
                "calibration": {"x": [round(float(v), 6) for v in self.calibration_x],
                                "y": [float(v) for v in self.calibration_y]},
                "operating_points": {k: float(v) for k, v in self.operating_points.items()}}
        (folder / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        return folder


def load_classifier(folder: str | Path) -> LesionClassifier:
    """Read a classifier folder; refuse one whose features this version does not compute."""
    folder = Path(folder)
    what = f"The lesion classifier in '{folder}'"
    try:
        card = json.loads((folder / CARD_NAME).read_text(encoding="utf-8"))
        # Text models, checked for LightGBM's header and end here (a missing or cut file fails before any work)
        # and parsed by LightGBM at the first prediction.
        members = [(folder / Path(name).name).read_text(encoding="utf-8") for name in card["members"]]
        for name, text in zip(card["members"], members, strict=True):
            if not text.startswith("tree\n") or "end of trees" not in text:
                raise ValueError(f"{Path(name).name} is not a whole LightGBM text model")
        calibration = card["calibration"]
        x, y = np.asarray(calibration["x"], float), np.asarray(calibration["y"], float)
        points = {str(k): float(v) for k, v in card["operating_points"].items()}
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise InputError(f"{what} cannot be read ({type(error).__name__}: {error}); reinstall the model.") from None
    names = tuple(card.get("feature_names", ()))
    if not known_measures(names):
        raise InputError(f"{what} was trained on other candidate features than this version computes; "
                         "retrain it with prl-detect train-classifier.")
    if not members or len(x) < 1 or len(x) != len(y):
        raise InputError(f"{what} has no members or a broken calibration; reinstall the model.")
    return LesionClassifier(names, members, x, y, points, card)


def classifier_sha256(model_path: str | Path) -> str | None:
    """What identifies a model's classifier (every file of its folder), None when it has none: a retrained
    classifier beside the same checkpoint makes another model (``burden.json`` records it; a batch resumes
    only results made with the same one)."""
    from PRLDetectorLib.detection.images import file_sha256

    folder = Path(model_path) / CLASSIFIER_DIR
    return file_sha256(folder) if folder.is_dir() else None


def model_classifier(model_path: str | Path) -> LesionClassifier | None:
    """The classifier shipped in a model folder, or None when it has none."""
    folder = Path(model_path) / CLASSIFIER_DIR
    if not (folder / CARD_NAME).is_file():
        return None
    return load_classifier(folder)
