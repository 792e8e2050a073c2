"""Model folders: the bundled models, any nnU-Net v2 trained-model folder, installing a model safely.

A model folder is what nnU-Net writes after training (``dataset.json``, ``plans.json``,
``fold_*/checkpoint_final.pth``), optionally with our model card ``model.json``. Inference uses the folder
as it is; nothing is rebuilt from dataset or trainer names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from PRLDetectorLib.errors import InputError
from PRLDetectorLib.results import atomic_path

logger = logging.getLogger(__name__)

BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
MODEL_PATH_ENV = "PRLDETECTOR_MODEL_PATH"
"""Extra folders (os.pathsep-separated) searched for model names, e.g. the Slicer user model folder."""

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What a model name may be: it becomes a folder name, so no separator, no leading dot, nothing to escape."""
CHECKPOINT_NAME = "checkpoint_final.pth"
INSTALLED_MARKER = ".prldetector-installed"
"""Written into every model folder :func:`install_model` creates; only such a folder may be replaced."""
MAX_MODEL_BYTES = 4 * 1024**3
"""The most an installed model may hold (nnU-Net's 5 folds of a default 3d_fullres plan are ~1 GB)."""
MAX_MODEL_FILES = 10_000

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
    checkpoint_hashes: dict = field(default_factory=dict)
    """sha256 of each fold's checkpoint as read (:func:`fingerprint`, :func:`load_checkpoints`); empty until then."""

    @property
    def checkpoint_sha256(self) -> str | None:
        """What identifies the weights: the sha256 of the one checkpoint (of all, for several folds); before
        the files were read, what the model card says."""
        hashes = self.checkpoint_hashes
        if not hashes:
            return self.card.get("checkpoint_sha256")
        if len(hashes) == 1:
            return next(iter(hashes.values()))
        lines = "".join(f"fold_{fold} {digest}\n" for fold, digest in sorted(hashes.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

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
        sorted(p.parent.name.removeprefix("fold_") for p in path.glob(f"fold_*/{CHECKPOINT_NAME}"))
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
    """Every valid model in the bundled folder and the extra model folders, by name (a name found twice is
    listed once and refused by :func:`resolve_model` as ambiguous)."""
    found: dict[str, ModelInfo] = {}
    for directory in model_search_dirs(extra_dirs):
        if not directory.is_dir():
            continue
        for candidate in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                info = validate_model_folder(candidate)
            except InputError as error:
                logger.debug("Skipping %s: %s", candidate, error)
                continue
            if candidate.name in found and found[candidate.name].path.resolve() != candidate.resolve():
                logger.warning("Two models are named '%s' (%s and %s); name one by its folder path.",
                               candidate.name, found[candidate.name].path, candidate)
            found.setdefault(candidate.name, info)
    return list(found.values())


def looks_like_path(text: str) -> bool:
    """A model given as a path: it holds a separator or starts with ``.`` or ``~``; anything else is a name."""
    return "/" in text or os.sep in text or text.startswith((".", "~"))


def named_model_folders(name: str, extra_dirs: list[Path] | None = None) -> list[Path]:
    """The folders called ``name`` in the bundled and installed model folders (one each, however reached)."""
    hits: dict[Path, Path] = {}
    for directory in model_search_dirs(extra_dirs):
        candidate = directory / name
        if candidate.is_dir():
            hits.setdefault(candidate.resolve(), candidate)
    return list(hits.values())


def resolve_model(name_or_path: str | Path, extra_dirs: list[Path] | None = None) -> ModelInfo:
    """A model by name among the bundled and installed ones, or any nnU-Net v2 model folder by path.

    Explicit both ways: a name never means a folder of the working directory (write ``./qsm`` for that),
    and a name that two model folders answer to, or that is also a model folder here, is refused.
    """
    text = str(name_or_path).strip()
    if isinstance(name_or_path, Path) or looks_like_path(text):
        return validate_model_folder(Path(text).expanduser())
    hits = named_model_folders(text, extra_dirs)
    if len(hits) > 1:
        raise InputError(
            f"The model name '{text}' is ambiguous: {' and '.join(repr(str(h)) for h in hits)} are both called so; "
            "give the folder path of the one to use, or reinstall the installed one under another name."
        )
    if hits and (Path(text) / "dataset.json").is_file():
        raise InputError(
            f"'{text}' is both the model '{hits[0]}' and a model folder in the working directory; give the "
            f"path of the one to use ('./{text}' for the folder here)."
        )
    if hits:
        return validate_model_folder(hits[0])
    names = [m.path.name for m in bundled_models(extra_dirs)]
    here = f"; for the folder '{text}' here, write './{text}'" if Path(text).exists() else ""
    raise InputError(
        f"There is no model named '{text}'; use one of {', '.join(names) or '(none installed)'} "
        f"or give the path of an nnU-Net v2 model folder{here}."
    )


def check_model_name(name: str, bundled_ok: bool = False) -> str:
    """A model name that can be a folder name and, unless ``bundled_ok``, is not a bundled model's; raise
    InputError otherwise."""
    if not MODEL_NAME.fullmatch(name):
        raise InputError(
            f"The model name {name!r} cannot be a folder name (letters, digits, '.', '_' and '-' only, not "
            "starting with a dot, at most 64); give the model another name."
        )
    if not bundled_ok and (BUNDLED_MODELS_DIR / name).exists():
        raise InputError(f"'{name}' is the name of a bundled model; give your model another name.")
    return name


# --- checkpoints -----------------------------------------------------------------------------------------


def checkpoint_files(model: ModelInfo) -> dict[str, Path]:
    return {fold: model.path / f"fold_{fold}" / CHECKPOINT_NAME for fold in model.folds}


def fingerprint(model: ModelInfo) -> ModelInfo:
    """The model with the sha256 of each checkpoint, read without unpickling anything."""
    hashes = {}
    for fold, path in checkpoint_files(model).items():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hashes[fold] = digest.hexdigest()
    return replace(model, checkpoint_hashes=hashes)


def load_checkpoints(model: ModelInfo) -> tuple[ModelInfo, dict[str, dict]]:
    """Every checkpoint of ``model`` loaded with ``torch.load(weights_only=True)``, and the model with their sha256.

    A checkpoint is a pickle, and a pickle can carry code that runs when it is opened: only tensors and plain
    values are let through, so a checkpoint that needs more is refused before anything opens it otherwise.
    """
    import pickle

    import torch

    hashes, checkpoints = {}, {}
    for fold, path in checkpoint_files(model).items():
        where = f"The checkpoint '{path.relative_to(model.path)}' of the model '{model.name}' ({model.path})"
        data = path.read_bytes()
        try:
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "GLOBAL" in str(error):  # torch names the object it would have had to import
                blocked = re.search(r"GLOBAL (\S+)", str(error))
                raise InputError(
                    f"{where} holds more than weights ({blocked.group(1) if blocked else 'a Python object'}): "
                    "opening it would run code it carries, so it is refused; use a checkpoint that loads with "
                    "torch.load(weights_only=True), such as `prl-detect export-model` writes."
                ) from None
            raise _corrupt(where) from None
        except Exception:  # torch raises RuntimeError, EOFError, ValueError … for a broken file
            raise _corrupt(where) from None
        if not isinstance(checkpoint, dict) or not {"network_weights", "trainer_name", "init_args"} <= checkpoint.keys():
            raise InputError(f"{where} is not an nnU-Net v2 checkpoint (no network_weights, trainer_name, "
                             "init_args); export the model again.")
        hashes[fold] = hashlib.sha256(data).hexdigest()
        checkpoints[fold] = checkpoint
    return replace(model, checkpoint_hashes=hashes), checkpoints


def _corrupt(where: str) -> InputError:
    return InputError(f"{where} is not a readable PyTorch checkpoint (corrupt or truncated); download or export "
                      "the model again.")


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


def install_model(
    source: str | Path, models_dir: str | Path, name: str | None = None, overwrite: bool = False,
    max_bytes: int = MAX_MODEL_BYTES,
) -> ModelInfo:
    """Validate a model (a .zip, a .tar[.gz] or a folder) and install it as ``models_dir/<name>``.

    Only regular files and folders are taken, all inside the model (an archive entry with an absolute path,
    ``..``, a link or a device file rejects the whole model), at most ``max_bytes`` of them. The name (given,
    or the card's, or the source's) must be a plain folder name and no bundled model's. The checkpoints must
    load as weights only. Everything is staged inside ``models_dir`` and appears at once; an existing model
    is replaced only with ``overwrite`` and only if this installer made it.
    """
    source = Path(source)
    models_dir = Path(models_dir)
    if not source.exists():
        raise InputError(f"The model '{source}' does not exist; check the path.")
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".installing-") as staging:
        staging = Path(staging)
        if source.is_file():
            _unpack(source, staging / "unpacked", max_bytes)
            root = _find_model_root(staging / "unpacked")
        else:
            root = staging / "copy"
            _copy_model_tree(source, root, max_bytes)
        info = validate_model_folder(root)
        target_name = check_model_name(str(name or info.card.get("name") or source.name.split(".")[0]))
        target = models_dir / target_name
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise InputError(f"A model named '{target_name}' is already installed; remove it or choose another name.")
            if target.is_symlink() or not (target / INSTALLED_MARKER).is_file():
                raise InputError(f"'{target}' was not installed by PRL Detector, so it is not replaced; choose "
                                 "another name.")
        if importlib.util.find_spec("torch") is not None:
            load_checkpoints(info)
        else:
            logger.info("PyTorch is not installed yet: the checkpoints are checked when the model is first used.")
        with atomic_path(target, folder=True, replace=overwrite) as final:
            for child in root.iterdir():
                child.rename(final / child.name)
            (final / INSTALLED_MARKER).write_text(json.dumps({
                "source": str(source.resolve()), "installed_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }), encoding="utf-8")
    logger.info("Installed model '%s' into %s", target_name, target)
    return validate_model_folder(target)


class _Budget:
    """What an install may still write: bytes and files, checked against what is really written."""

    def __init__(self, source: Path, max_bytes: int):
        self.source, self.max_bytes, self.bytes, self.files = source, max_bytes, 0, 0

    def add(self, size: int = 0, files: int = 0) -> None:
        self.bytes += size
        self.files += files
        if self.bytes > self.max_bytes or self.files > MAX_MODEL_FILES:
            raise InputError(
                f"The model '{self.source.name}' holds more than {self.max_bytes / 1e9:.1f} GB or "
                f"{MAX_MODEL_FILES} files, more than a model needs; it was not installed."
            )


def _member_path(archive: Path, name: str, destination: Path) -> Path:
    """Where an archive entry goes, refusing any entry that would land outside ``destination``."""
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or ":" in name or not parts.parts:
        raise InputError(
            f"The archive '{archive.name}' has an entry '{name}' that points outside the model folder; it was not "
            "installed."
        )
    return destination.joinpath(*parts.parts)


def _refuse_entry(archive: Path, name: str, kind: str) -> InputError:
    return InputError(f"The archive '{archive.name}' has an entry '{name}' that is {kind}, which a model never "
                      "needs; it was not installed.")


def _write_member(stream, target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:  # "x": an entry given twice is not written over
        budget.add(files=1)
        while block := stream.read(1 << 20):
            budget.add(len(block))
            out.write(block)


_ENTRY_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a device file", stat.S_IFBLK: "a device file",
                stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket"}


def _unpack(archive: Path, destination: Path, max_bytes: int) -> None:
    """Unpack a zip or tar archive entry by entry, regular files and folders only (nothing is extracted by
    the archive libraries themselves, so no link, device or path outside ``destination`` can be made)."""
    destination.mkdir(parents=True)
    budget = _Budget(archive, max_bytes)
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, destination, budget)
        elif tarfile.is_tarfile(archive):
            _unpack_tar(archive, destination, budget)
        else:
            raise InputError(f"'{archive.name}' is neither a folder nor a zip or tar archive; give an nnU-Net model "
                             "zip or folder.")
    except FileExistsError:
        raise InputError(f"The archive '{archive.name}' holds an entry twice; it was not installed.") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise InputError(f"The archive '{archive.name}' is damaged ({error}); download it again.") from None


def _unpack_zip(archive: Path, destination: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:  # every entry is checked before anything is written
            _member_path(archive, member.filename, destination)
            kind = _ENTRY_KINDS.get(stat.S_IFMT(member.external_attr >> 16))
            if kind and member.create_system == 3:  # Unix mode bits in the upper half
                raise _refuse_entry(archive, member.filename, kind)
            budget.add(member.file_size)
        budget.bytes = 0
        for member in members:
            target = _member_path(archive, member.filename, destination)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(member) as stream:
                _write_member(stream, target, budget)


def _unpack_tar(archive: Path, destination: Path, budget: _Budget) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:
            _member_path(archive, member.name, destination)
            if not (member.isfile() or member.isdir()):
                kind = ("a hard link" if member.islnk() else "a symbolic link" if member.issym()
                        else "a named pipe" if member.isfifo() else "a device file" if member.ischr() or member.isblk()
                        else "not a regular file")
                raise _refuse_entry(archive, member.name, kind)
            budget.add(member.size)
        budget.bytes = 0
        for member in members:
            target = _member_path(archive, member.name, destination)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            _write_member(tf.extractfile(member), target, budget)


def _copy_model_tree(source: Path, destination: Path, max_bytes: int) -> None:
    """Copy a model folder's regular files and folders; a link or special file in it refuses the model."""
    budget = _Budget(source, max_bytes)
    for folder, dirs, files in os.walk(source):
        folder = Path(folder)
        (destination / folder.relative_to(source)).mkdir(parents=True, exist_ok=True)
        for entry in [*dirs, *files]:
            mode = os.lstat(folder / entry).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = _ENTRY_KINDS.get(stat.S_IFMT(mode), "not a regular file")
                raise InputError(f"The model folder '{source}' holds '{(folder / entry).relative_to(source)}', which "
                                 f"is {kind}; copy the model without it.")
        for entry in files:
            with open(folder / entry, "rb") as stream:
                _write_member(stream, destination / folder.relative_to(source) / entry, budget)
