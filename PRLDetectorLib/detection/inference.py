"""nnU-Net v2 inference in this process, with the model kept loaded between cases.

:class:`Segmenter` wraps one ``nnUNetPredictor``: nnU-Net's own preprocessing (crop to the non-zero
region, resampling, normalisation from the plans), its tiling, Gaussian weighting and mirroring, and its
resampling of the probabilities back to the input grid. What is ours:

* the sliding window itself: only tiles that hold brain run (outside nnU-Net's non-zero mask the input is
  zero and the result is set to background, so a tile without brain could change nothing), several tiles
  per forward pass, sums in float32 (nnU-Net sums in float16), everything on the GPU when there is one,
  and the CPU taking over a case when the GPU runs out of memory;
* the input is reoriented to the orientation the model was trained in (a permutation/flip, no
  interpolation) and the result reoriented back, so a scan stored in another axis order still looks to the
  network like its training data.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from PRLDetectorLib.dependencies import check_nnunet_version
from PRLDetectorLib.detection.images import file_sha256
from PRLDetectorLib.detection.models import ModelInfo, load_checkpoints
from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

CPU_TILE_BATCH = {"openvino": 1, "pytorch": 4}
"""Tiles per forward pass on the CPU, by runtime (see the README's table of CPU runtimes)."""


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU. An explicit device that is absent is an input error."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if requested == "cuda" and not cuda:
        raise InputError("CUDA was requested but no CUDA GPU is available to PyTorch; use --device auto or cpu.")
    if requested == "mps" and not mps:
        raise InputError("MPS was requested but Apple's Metal backend is not available; use --device auto or cpu.")
    if requested not in ("cuda", "mps", "cpu"):
        raise InputError(f"Device '{requested}' is unknown; use auto, cuda, mps or cpu.")
    return torch.device(requested)


class _LogStream(io.TextIOBase):
    """File-like sink that turns nnU-Net's print() output into debug log records."""

    def write(self, text: str) -> int:
        if text.strip():
            logger.debug("nnU-Net: %s", text.strip())
        return len(text)


def _quiet():
    return contextlib.redirect_stdout(_LogStream())


@dataclass
class TileStats:
    total: int = 0
    run: int = 0


def select_brain_tiles(slicers: list[tuple], brain: np.ndarray) -> list[tuple]:
    """The sliding-window tiles that hold at least one brain voxel, in nnU-Net's order.

    A tile without brain adds nothing to any brain voxel (each voxel's result is the Gaussian-weighted mean
    of the tiles that cover it), so leaving it out changes no value inside the brain; outside the brain the
    result is background by construction (QSM is zero there and nnU-Net's normalisation zeroes it).
    ``slicers`` are nnU-Net's ``(slice(None), z, y, x)`` tuples on the grid of ``brain``.
    """
    return [tile for tile in slicers if brain[tile[1:]].any()]


def tile_batch_for_memory(free_bytes: int, bytes_per_tile: int, limit: int = 16, keep_free: float = 0.25) -> int:
    """Tiles per forward pass that fit in ``free_bytes`` of device memory, leaving ``keep_free`` of it unused
    (other processes, allocator fragmentation); at least one, at most ``limit``."""
    usable = free_bytes * (1.0 - keep_free)
    return max(1, min(limit, int(usable // max(bytes_per_tile, 1))))


def _free_device_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device, counting memory PyTorch holds cached but no tensor uses."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def return_freed_memory() -> None:
    """Hand memory that freed arrays left in the C heap back to the system (glibc keeps it otherwise), so
    the next stage's peak does not stand on the last one's."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


CACHE_ENV = "PRLDETECTOR_CACHE_DIR"
"""Folder for files PRL Detector can rebuild (the networks compiled for OpenVINO); empty string: no cache."""
OPENVINO_FORMAT = 2
"""Bumped when the exported network changes for the same weights (it is part of each cache entry's key)."""


def cache_dir() -> Path | None:
    """``$PRLDETECTOR_CACHE_DIR``, else the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``,
    ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows) + ``prldetector``; None when set empty."""
    import os
    import sys

    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "prldetector"


def _export_openvino_ir(network: torch.nn.Module, channels: int, patch: tuple[int, ...], folder: Path) -> None:
    """The network as OpenVINO IR (``network.xml`` + ``network.bin``, float32 weights) in ``folder``, through
    an ONNX export, with ``record.json`` holding the weights file's sha256."""
    import json
    import tempfile

    import openvino

    network = network.to("cpu").eval()
    with tempfile.TemporaryDirectory(prefix="prl-onnx-") as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on InstanceNorm (it always uses the tile's statistics)
        onnx_path = Path(scratch) / "network.onnx"
        torch.onnx.export(network, torch.zeros(1, channels, *patch), str(onnx_path), input_names=["tiles"],
                          output_names=["logits"], dynamic_axes={"tiles": {0: "n"}, "logits": {0: "n"}},
                          opset_version=17, dynamo=False)
        openvino.save_model(openvino.Core().read_model(str(onnx_path)), str(folder / "network.xml"),
                            compress_to_fp16=False)
    (folder / "record.json").write_text(json.dumps({"bin_sha256": file_sha256(folder / "network.bin")}), encoding="utf-8")


def _cached_ir_is_whole(folder: Path) -> bool:
    import json

    try:
        record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        return (folder / "network.xml").is_file() and record.get("bin_sha256") == file_sha256(folder / "network.bin")
    except (OSError, ValueError, AttributeError):
        return False


def openvino_ir(network: torch.nn.Module, channels: int, patch: tuple[int, ...], key: str | None,
                scratch: Path) -> tuple[Path, bool]:
    """Where the network's OpenVINO IR is, and whether it came from the cache.

    With a ``key`` (what identifies the weights) and a writable :func:`cache_dir`, the IR is exported once
    and kept there: later runs read it and never load PyTorch's ONNX exporter (~100 MB of the process's
    peak, and ~3 s). An entry whose weights file does not match its record is exported again. Without
    either, the IR is exported into ``scratch``.
    """
    import hashlib
    import os
    import shutil
    import tempfile

    import openvino

    root = cache_dir() if key else None
    if root is not None:
        name = hashlib.sha256(
            f"{OPENVINO_FORMAT} {key} {channels} {patch} {torch.__version__} {openvino.__version__}".encode()
        ).hexdigest()[:32]
        folder = root / "openvino" / name
        if _cached_ir_is_whole(folder):
            return folder / "network.xml", True
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
        except OSError as error:
            logger.debug("No cache for the compiled network (%s); exporting it for this run only.", error)
        else:
            try:
                _export_openvino_ir(network, channels, patch, staging)
                if folder.exists():  # a broken entry (a whole one returned above), or another process's
                    shutil.rmtree(folder, ignore_errors=True)
                os.replace(staging, folder)
            except OSError:
                if not _cached_ir_is_whole(folder):
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            logger.info("Compiled the network for OpenVINO once; kept in %s", folder)
            return folder / "network.xml", False
    _export_openvino_ir(network, channels, patch, scratch)
    return scratch / "network.xml", False


def openvino_network(network: torch.nn.Module, channels: int, patch: tuple[int, ...], key: str | None = None
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network compiled by OpenVINO for the CPU in float32 (its default on CPUs with AMX would be
    bfloat16, which changes lesions) for one tile per request (a fixed shape: faster than a dynamic batch,
    see the README's table of CPU runtimes); tiles in, float32 logits out. ``key`` identifies the weights
    for the cache of exported networks (:func:`openvino_ir`)."""
    import tempfile

    import openvino

    with tempfile.TemporaryDirectory(prefix="prl-openvino-") as scratch:
        path, cached = openvino_ir(network, channels, patch, key, Path(scratch))
        core = openvino.Core()
        model = core.read_model(str(path))
        model.reshape([1, channels, *patch])
        compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        })
    logger.debug("OpenVINO network %s", "read from the cache" if cached else "exported")
    request = compiled.create_infer_request()

    def run(tiles: torch.Tensor) -> torch.Tensor:
        outputs = [request.infer({0: tile[None].contiguous().numpy()})[0].copy() for tile in tiles]
        return torch.from_numpy(np.concatenate(outputs))

    return run


def _trainer_network(trainer_name: str, plans_manager, configuration_manager, channels: int, heads: int):
    """The network a custom nnU-Net trainer class builds (its module is imported to find the class)."""
    import inspect

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    if trainer_class is None:
        raise ValueError(f"nnU-Net has no trainer '{trainer_name}'")
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(
            plans_manager, configuration_manager, channels, heads, enable_deep_supervision=False)
    return trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, channels, heads, enable_deep_supervision=False)


def _make_predictor_class():
    # The methods below override private ones of nnU-Net's predictor: only the release they were written for.
    check_nnunet_version()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class BrainTilePredictor(nnUNetPredictor):
        """nnUNetPredictor with our own sliding window (nnU-Net's tiling, Gaussian and mirroring): it runs
        only the tiles :func:`select_brain_tiles` keeps, several tiles per forward pass, keeps everything on
        a CUDA device, and finishes a case on the CPU when the GPU runs out of memory."""

        brain: np.ndarray | None = None
        """Brain mask on the preprocessed grid (nnU-Net's non-zero mask): background outside it."""
        skip_tiles: bool = True
        """Run only the tiles that hold brain (the result is the same: see :func:`select_brain_tiles`)."""
        on_tile: Callable[[int, int], None] | None = None
        tile_batch: int | None = None
        """Tiles per forward pass; None: :data:`CPU_TILE_BATCH` on the CPU, by free memory on CUDA."""
        cpu_runtime: str = "pytorch"
        """What runs the network on the CPU: ``openvino`` (float32, same lesions, several times faster) or
        ``pytorch``; a GPU always runs PyTorch."""
        _fold: int = 0
        _openvino: dict
        weight_keys: tuple[str, ...] = ()
        """Per fold, the sha256 of its checkpoint: the key of its compiled network in the cache."""

        def release_runtime(self) -> None:
            """Drop the networks compiled for OpenVINO (they are compiled again, from the cache, when needed)."""
            self._openvino = {}

        def initialize_from_checkpoints(self, model: ModelInfo, checkpoints: dict[str, dict]) -> None:
            """nnU-Net's ``initialize_from_trained_model_folder`` on checkpoints already loaded as weights
            only (:func:`load_checkpoints`): nnU-Net's own loader unpickles with ``weights_only=False``."""
            from batchgenerators.utilities.file_and_folder_operations import load_json
            from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            dataset_json = load_json(str(model.path / "dataset.json"))
            plans_manager = PlansManager(load_json(str(model.path / "plans.json")))
            first = checkpoints[model.folds[0]]
            configuration_manager = plans_manager.get_configuration(first["init_args"]["configuration"])
            channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
            heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
            if first["trainer_name"] == "nnUNetTrainer":
                # What nnUNetTrainer.build_network_architecture does, without importing the trainer module: it
                # brings nnU-Net's training stack (matplotlib, seaborn ...) for one static method (measured: the
                # process after loading the model, 610 → 557 MB).
                from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

                network = get_network_from_plans(
                    configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                    configuration_manager.network_arch_init_kwargs_req_import, channels, heads, allow_init=True,
                    deep_supervision=False)
            else:
                network = _trainer_network(first["trainer_name"], plans_manager, configuration_manager, channels, heads)
            parameters = [checkpoints[fold]["network_weights"] for fold in model.folds]
            network.load_state_dict(parameters[0])
            self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                       first["trainer_name"], first.get("inference_allowed_mirroring_axes"))

        @torch.inference_mode()
        def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
            """nnU-Net's mean over the folds, with the fold known to :meth:`_network_on` (one compiled
            OpenVINO model per fold)."""
            prediction = None
            for fold, parameters in enumerate(self.list_of_parameters):
                self.network.load_state_dict(parameters)
                self._fold = fold
                logits = self.predict_sliding_window_return_logits(data).to("cpu")
                prediction = logits if prediction is None else prediction + logits
            if len(self.list_of_parameters) > 1:
                prediction /= len(self.list_of_parameters)
            return prediction

        def _network_on(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
            if device.type != "cpu" or self.cpu_runtime != "openvino":
                return self.network
            if not hasattr(self, "_openvino"):
                self._openvino = {}
            if self._fold not in self._openvino:
                try:
                    self._openvino[self._fold] = openvino_network(
                        self.network, len(self.dataset_json["channel_names"]), tuple(self.configuration_manager.patch_size),
                        self.weight_keys[self._fold] if self._fold < len(self.weight_keys) else None,
                    )
                except Exception as error:  # an OpenVINO that cannot compile here must not stop the case
                    logger.warning("OpenVINO could not compile the network (%s: %s); PyTorch runs it instead.",
                                   type(error).__name__, str(error)[:160])
                    self.cpu_runtime = "pytorch"
                    return self.network
            return self._openvino[self._fold]
        stats: TileStats = TileStats()
        fell_back_to_cpu: bool = False

        @torch.inference_mode()
        def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
            from acvl_utils.cropping_and_padding.padding import pad_nd_image

            patch = tuple(self.configuration_manager.patch_size)
            data, revert_padding = pad_nd_image(input_image, patch, "constant", {"value": 0}, True, None)
            slicers = self._internal_get_sliding_window_slicers(data.shape[1:])
            total = len(slicers)
            brain = None
            if self.brain is not None:
                if tuple(self.brain.shape) != tuple(input_image.shape[1:]):
                    raise RuntimeError(f"brain mask {self.brain.shape} is not on the network grid {tuple(input_image.shape[1:])}")
                brain = torch.from_numpy(pad_nd_image(self.brain, patch, "constant", {"constant_values": False}))
                if self.skip_tiles:
                    slicers = select_brain_tiles(slicers, brain.numpy())
            self.stats = TileStats(total=total, run=len(slicers))
            logits = self._sliding_window_with_cpu_fallback(data, slicers)
            if brain is not None:
                # Outside the brain the input is zero (QSM is zero there; nnU-Net's normalisation zeroes it),
                # so background by construction: a tile of zeros would otherwise give the network's bias.
                outside = ~brain.to(logits.device)
                logits[0][outside] = 10.0
                logits[1:, outside] = -10.0
            return logits[(slice(None), *revert_padding[1:])]

        def _sliding_window_with_cpu_fallback(self, data: torch.Tensor, slicers: list[tuple]) -> torch.Tensor:
            """The sliding window on the predictor's device; on out-of-memory, once more on the CPU with one
            tile per forward pass (unless that is what ran out), with one warning that says so."""
            batch = self.tile_batch or (CPU_TILE_BATCH[self.cpu_runtime] if self.device.type == "cpu" else None)
            try:
                return self._sliding_window(data, slicers, self.device, batch)
            except torch.OutOfMemoryError as error:
                cpu = torch.device("cpu")
                if self.device == cpu and batch == 1:
                    raise
                logger.warning(
                    "The %s ran out of memory in the network pass (%s); this case is finished on the CPU, one "
                    "tile at a time: slower, same result.", self.device.type.upper(), str(error).split("\n")[0][:100],
                )
                self.fell_back_to_cpu = True
                from nnunetv2.utilities.helpers import empty_cache

                empty_cache(self.device)
                try:
                    return self._sliding_window(data, slicers, cpu, 1)
                finally:
                    self.network.to(self.device)

        def _sliding_window(self, data: torch.Tensor, slicers: list[tuple], device: torch.device, batch: int | None) -> torch.Tensor:
            """Gaussian-weighted mean of the tiles' logits (float32) on ``device``; ``batch`` tiles per pass,
            None: as many as the free memory of a CUDA device allows after a first tile has been measured."""
            from nnunetv2.inference.sliding_window_prediction import compute_gaussian

            self.network.to(device)
            self.network.eval()
            patch = tuple(self.configuration_manager.patch_size)
            data = data.to(device)
            logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.float32, device=device)
            weights = torch.zeros(data.shape[1:], dtype=torch.float32, device=device)
            # nnU-Net's own weights, float16 (its tails clamped to the smallest float16 value), used in float32.
            gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device).float()
            measure = batch is None and device.type == "cuda"
            if measure:
                baseline = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            done = 0
            while done < len(slicers):
                group = slicers[done : done + (batch or 1)]
                tiles = torch.stack([data[tile] for tile in group])
                predictions = self._predict_tiles(tiles, device)
                for tile, prediction in zip(group, predictions, strict=True):
                    logits[tile] += prediction * gaussian
                    weights[tile[1:]] += gaussian
                if measure and batch is None:
                    per_tile = torch.cuda.max_memory_allocated(device) - baseline
                    batch = tile_batch_for_memory(_free_device_memory(device), per_tile)
                    logger.info("%s: %d tile(s) per forward pass (%.0f MB per tile)", device, batch, per_tile / 2**20)
                done += len(group)
                if self.on_tile is not None:
                    self.on_tile(done, len(slicers))
            # Voxels no tile covered lie outside the brain (every brain voxel is in a kept tile): the caller
            # sets them to background.
            weights[weights == 0] = 1.0
            logits /= weights
            return logits

        def _predict_tiles(self, tiles: torch.Tensor, device: torch.device) -> torch.Tensor:
            """Network output (float32) for a batch of tiles, averaged over the mirrorings when TTA is on."""
            network = self._network_on(device)
            autocast = torch.autocast("cuda", enabled=True) if device.type == "cuda" else contextlib.nullcontext()
            with autocast:
                prediction = network(tiles).float()
                if self.use_mirroring and self.allowed_mirroring_axes:
                    axes = [axis + 2 for axis in self.allowed_mirroring_axes]
                    flips = [c for n in range(len(axes)) for c in itertools.combinations(axes, n + 1)]
                    for flip in flips:
                        prediction += torch.flip(network(torch.flip(tiles, flip).contiguous()), flip).float()
                    prediction /= len(flips) + 1
            return prediction

    return BrainTilePredictor


class Segmenter:
    """One loaded nnU-Net model; :meth:`predict` runs it on one case at a time."""

    def __init__(self, model: ModelInfo, device: str = "auto", tta: bool = False, skip_empty_tiles: bool = True,
                 cpu_runtime: str = "auto"):
        """``cpu_runtime``: ``openvino``, ``pytorch``, or ``auto`` (OpenVINO when it is installed)."""
        if cpu_runtime not in ("auto", "openvino", "pytorch"):
            raise InputError(f"CPU runtime '{cpu_runtime}' is unknown; use auto, openvino or pytorch.")
        if cpu_runtime == "openvino" and not openvino_available():
            raise InputError("OpenVINO was requested but is not installed; pip install openvino, or use pytorch.")
        # Weights only, before nnU-Net sees the model; ``model`` gets the sha256 of the checkpoints it runs.
        model, checkpoints = load_checkpoints(model)
        self.model = model
        self.device = pick_device(device)
        self.tta = tta
        self.skip_empty_tiles = skip_empty_tiles
        self.last_tiles = TileStats()
        self.keep_runtime = True
        """Keep the network compiled for OpenVINO between cases; False frees it after each network pass
        (one case: its memory is then free for the lesion stage and the writing)."""
        predictor_class = _make_predictor_class()
        with _quiet():
            self.predictor = predictor_class(
                tile_step_size=0.5,
                use_gaussian=True,
                use_mirroring=tta,
                perform_everything_on_device=self.device.type == "cuda",
                device=self.device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            try:
                self.predictor.initialize_from_checkpoints(model, checkpoints)
            except (KeyError, RuntimeError, ValueError) as error:
                raise InputError(
                    f"The model folder '{model.path}' could not be loaded by nnU-Net ({type(error).__name__}: "
                    f"{str(error)[:120]}); export the model again."
                ) from None
        self.predictor.weight_keys = tuple(model.checkpoint_hashes.get(fold, "") or "" for fold in model.folds)
        self.predictor.cpu_runtime = cpu_runtime if cpu_runtime != "auto" else (
            "openvino" if openvino_available() else "pytorch")
        self.orientation = model.card.get("orientation")
        logger.info(
            "Loaded model '%s' (%s, folds %s) on %s%s, test-time mirroring %s",
            model.name, model.version, ",".join(model.folds), self.device,
            f" ({self.predictor.cpu_runtime})" if self.device.type == "cpu" else "", "on" if tta else "off",
        )

    def predict(self, channels: list[sitk.Image], progress: Progress | None = None) -> sitk.Image:
        """PRL probability (float32) on the grid of ``channels[0]``; channels in the model's order."""
        original_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            channels[0].GetDirection()
        )
        if self.orientation and self.orientation != original_orientation:
            channels = [sitk.DICOMOrient(c, self.orientation) for c in channels]
        reference = channels[0]
        # nnU-Net's run_case_npy copies its input first thing, so one channel goes in as a view of its image: a
        # stacked copy would only hold another volume through preprocessing (29 MB at 1 mm, 68 MB at 0.75 mm).
        views = [sitk.GetArrayViewFromImage(c) for c in channels]
        data = views[0][None] if len(views) == 1 else np.stack(views, dtype=np.float32)
        properties = {"spacing": list(reference.GetSpacing())[::-1]}

        predictor = self.predictor
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        if progress:
            progress(0.0, "Preprocessing (nnU-Net)")
        return_freed_memory()  # what checking and reading the inputs freed
        with _quiet():
            pre, seg, properties = preprocessor.run_case_npy(
                data, None, properties, predictor.plans_manager, predictor.configuration_manager,
                predictor.dataset_json,
            )
        predictor.brain = seg[0] >= 0  # nnU-Net's non-zero mask (-1 outside it), on the network grid
        del data, seg  # the network pass needs neither (one volume each, held through it otherwise)
        return_freed_memory()  # preprocessing's float64 copies, before the network pass adds its own
        predictor.skip_tiles = self.skip_empty_tiles
        predictor.on_tile = (lambda done, total: progress(done / total, f"Network tile {done}/{total}")) if progress else None
        with _quiet():
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(pre)).cpu()
        del pre
        predictor.brain = None
        if not self.keep_runtime:
            predictor.release_runtime()
        return_freed_memory()
        self.last_tiles = predictor.stats
        logger.info("Sliding window: %d of %d tiles hold brain and were run", predictor.stats.run, predictor.stats.total)
        if progress:
            progress(1.0, "Resampling probabilities to the input grid")
        with _quiet():
            foreground = foreground_probability(logits, predictor, properties)
        del logits
        return_freed_memory()
        out = sitk.GetImageFromArray(foreground)
        out.CopyInformation(reference)
        if self.orientation and self.orientation != original_orientation:
            out = sitk.DICOMOrient(out, original_orientation)
        return out


def foreground_probability(logits: torch.Tensor, predictor, properties: dict) -> np.ndarray:
    """PRL probability (float32, all foreground classes) on the input grid from the network-grid logits.

    nnU-Net's export resamples every class's logits to the input grid, takes the softmax and puts the crop
    back. With two classes the softmax's foreground is ``sigmoid(l1 - l0)`` and the linear resampling of a
    difference is the difference of the resamplings, so one channel is resampled instead of two (half the
    time and memory, same values to float precision). Other models go through nnU-Net's own export.
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice

    label_manager = predictor.label_manager
    configuration, plans = predictor.configuration_manager, predictor.plans_manager
    order = configuration.configuration.get("resampling_fn_probabilities_kwargs", {}).get("order")
    if label_manager.has_regions or logits.shape[0] != 2 or order not in (0, 1):
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, plans, configuration, label_manager, properties, return_probabilities=True,
        )
        return np.ascontiguousarray(probabilities[1:].sum(0), dtype=np.float32)
    spacing = [properties["spacing"][i] for i in plans.transpose_forward]
    cropped_shape = properties["shape_after_cropping_and_before_resampling"]
    network_spacing = configuration.spacing if len(configuration.spacing) == len(cropped_shape) else [spacing[0], *configuration.spacing]
    difference = (logits[1] - logits[0]).numpy()[None]
    difference = configuration.resampling_fn_probabilities(difference, cropped_shape, network_spacing, spacing)
    out = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
    out[bounding_box_to_slice(properties["bbox_used_for_cropping"])] = torch.sigmoid(torch.from_numpy(np.asarray(difference[0], dtype=np.float32))).numpy()
    return np.ascontiguousarray(out.transpose(plans.transpose_backward))
