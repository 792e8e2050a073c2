"""Model folders: the bundled models, any nnU-Net v2 trained-model folder, installing a model safely.

A model folder is what nnU-Net writes after training (``dataset.json``, ``plans.json``,
``fold_*/checkpoint_final.pth``), optionally with our model card ``model.json``. Inference uses the folder
as it is; nothing is rebuilt from dataset or trainer names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import atomic_path

logger = logging.getLogger(__name__)

BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
MODEL_PATH_ENV = "PRLDETECTOR_MODEL_PATH"
"""Extra folders (os.pathsep-separated) searched for model names, e.g. the Slicer user model folder."""

CHANNEL_NAMES = {"qsm": "QSM", "flair": "FLAIR"}
"""The name of each input role in the ``channel_names`` of a dataset.json this tool writes."""
# Channel names in dataset.json that mean the same input.
CHANNEL_ALIASES = {
    "qsm": ("qsm", "chi", "susceptibility", "chimap"),
    "flair": ("flair", "t2flair", "t2-flair", "t2_flair"),
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    channels: tuple[str, ...]
    """Input roles in nnU-Net channel order, e.g. ("qsm",) or ("qsm", "flair")."""
    folds: tuple[str, ...]
    card: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.card.get("version", "unversioned"))

    @property
    def title(self) -> str:
        return str(self.card.get("title", self.name))


def channel_role(name: str) -> str:
    """The input role (``qsm``, ``flair``) a dataset.json channel name stands for; an unknown name as it is."""
    key = name.strip().lower().replace(" ", "")
    for role, aliases in CHANNEL_ALIASES.items():
        if key in aliases:
            return role
    return key


def validate_model_folder(path: str | Path) -> ModelInfo:
    """Check that ``path`` is an nnU-Net v2 trained-model folder this tool can run; return its description."""
    path = Path(path)
    what = f"The model folder '{path}'"
    if not path.is_dir():
        raise InputError(f"{what} does not exist; give a bundled model name (qsm, qsm_flair) or a model folder.")
    missing = [name for name in ("dataset.json", "plans.json") if not (path / name).is_file()]
    if missing:
        raise InputError(
            f"{what} is not an nnU-Net v2 model: {' and '.join(missing)} missing; give the folder nnU-Net "
            "wrote after training (with dataset.json, plans.json and fold_*/checkpoint_final.pth)."
        )
    try:
        dataset = json.loads((path / "dataset.json").read_text(encoding="utf-8"))
        json.loads((path / "plans.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{what} has a dataset.json or plans.json that is not valid JSON; re-export the model.") from None
    folds = tuple(
        sorted(p.parent.name.removeprefix("fold_") for p in path.glob("fold_*/checkpoint_final.pth"))
    )
    if not folds:
        raise InputError(f"{what} has no fold_*/checkpoint_final.pth; train to the end or export the model again.")
    channel_names = dataset.get("channel_names") or dataset.get("modality")
    if not isinstance(channel_names, dict) or not channel_names:
        raise InputError(f"{what} has a dataset.json without channel_names; it is not an nnU-Net v2 model.")
    channels = tuple(channel_role(channel_names[k]) for k in sorted(channel_names, key=int))
    if "qsm" not in channels:
        raise InputError(
            f"{what} takes channels {list(channel_names.values())} but no QSM; choose a PRL model trained on QSM."
        )
    unknown = [c for c in channels if c not in CHANNEL_ALIASES]
    if unknown:
        raise InputError(f"{what} needs input channels {unknown} that this tool cannot supply (QSM and FLAIR only).")
    labels = dataset.get("labels", {})
    if len([v for v in labels.values() if v not in (0, [0])]) != 1:
        raise InputError(
            f"{what} predicts labels {list(labels)}; a PRL model has background and one lesion label."
        )
    card = {}
    if (path / "model.json").is_file():
        try:
            card = json.loads((path / "model.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise InputError(f"{what} has a model.json that is not valid JSON; fix or remove it.") from None
    return ModelInfo(name=card.get("name", path.name), path=path, channels=channels, folds=folds, card=card)


def model_search_dirs(extra: list[Path] | None = None) -> list[Path]:
    dirs = [BUNDLED_MODELS_DIR]
    dirs += [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]
    dirs += list(extra or [])
    return dirs


def bundled_models(extra_dirs: list[Path] | None = None) -> list[ModelInfo]:
    """Every valid model in the bundled folder and the extra model folders, by name."""
    found: dict[str, ModelInfo] = {}
    for directory in model_search_dirs(extra_dirs):
        if not directory.is_dir():
            continue
        for candidate in sorted(p for p in directory.iterdir() if p.is_dir()):
            try:
                info = validate_model_folder(candidate)
            except InputError as error:
                logger.debug("Skipping %s: %s", candidate, error)
                continue
            found.setdefault(candidate.name, info)
    return list(found.values())


def resolve_model(name_or_path: str | Path, extra_dirs: list[Path] | None = None) -> ModelInfo:
    """A bundled model by name, or any nnU-Net v2 model folder by path."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    looks_like_path = os.sep in text or "/" in text or candidate.exists()
    if looks_like_path:
        return validate_model_folder(candidate)
    for directory in model_search_dirs(extra_dirs):
        if (directory / text).is_dir():
            return validate_model_folder(directory / text)
    names = [m.path.name for m in bundled_models(extra_dirs)]
    raise InputError(
        f"There is no model named '{text}'; use one of {', '.join(names) or '(none installed)'} "
        "or give the path of an nnU-Net v2 model folder."
    )


def check_channels(model: ModelInfo, given: set[str]) -> None:
    """Raise InputError when the inputs given do not match the model's channels."""
    needed = set(model.channels)
    if needed == given:
        return
    want = " + ".join(c.upper() for c in model.channels)
    have = " + ".join(c.upper() for c in CHANNEL_ALIASES if c in given)
    hint = "add --flair" if "flair" in needed - given else "drop the FLAIR or choose a QSM + FLAIR model"
    raise InputError(f"The model '{model.name}' takes {want} but {have} was given; {hint}.")


def _find_model_root(root: Path) -> Path:
    """The folder holding dataset.json inside an unpacked archive (it may be nested one or two levels)."""
    hits = sorted(root.rglob("dataset.json"), key=lambda p: len(p.parts))
    if not hits:
        raise InputError("The archive holds no dataset.json; it is not an nnU-Net v2 model.")
    return hits[0].parent


def install_model(source: str | Path, models_dir: str | Path, name: str | None = None, overwrite: bool = False) -> ModelInfo:
    """Validate a model (a .zip or a folder) and copy it into ``models_dir/<name>``.

    Nothing is copied until the model has passed validation; an archive member that would land outside
    the target folder (absolute path, ``..``, a link) rejects the whole archive.
    """
    source = Path(source)
    models_dir = Path(models_dir)
    if not source.exists():
        raise InputError(f"The model '{source}' does not exist; check the path.")
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".installing-") as staging:
        staging = Path(staging)
        if source.is_file():
            if not zipfile.is_zipfile(source):
                raise InputError(f"'{source.name}' is neither a folder nor a zip archive; give an nnU-Net model zip or folder.")
            _safe_extract(source, staging / "unpacked")
            root = _find_model_root(staging / "unpacked")
        else:
            root = source
        info = validate_model_folder(root)
        target_name = name or info.card.get("name") or (source.stem if source.is_file() else source.name)
        target = models_dir / target_name
        if target.exists() and not overwrite:
            raise InputError(f"A model named '{target_name}' is already installed; remove it or choose another name.")
        with atomic_path(target, folder=True) as copy:
            shutil.copytree(root, copy, symlinks=False, dirs_exist_ok=True)
    logger.info("Installed model '%s' into %s", target_name, target)
    return validate_model_folder(target)


def _safe_extract(archive: Path, destination: Path) -> None:
    destination.mkdir(parents=True)
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            parts = PurePosixPath(member.filename.replace("\\", "/"))
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if parts.is_absolute() or ".." in parts.parts or ":" in member.filename or is_link:
                raise InputError(
                    f"The archive '{archive.name}' has an entry '{member.filename}' that points outside the "
                    "model folder; it was not installed."
                )
        zf.extractall(destination)
