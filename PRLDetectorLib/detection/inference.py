"""nnU-Net v2 inference in this process, with the model kept loaded between cases.

:class:`Segmenter` wraps one ``nnUNetPredictor``: nnU-Net's own preprocessing (crop to the non-zero
region, resampling, normalisation from the plans), its sliding-window network pass and its resampling of
the probabilities back to the input grid. Two things are ours:

* sliding-window tiles whose central half holds no brain are not run through the network, as long as
  every brain voxel stays covered by some tile (QSM is zero outside the brain; those voxels are background
  by construction); on a whole-brain scan this saves about a third of the tiles;
* the input is reoriented to the orientation the model was trained in (a permutation/flip, no
  interpolation) and the result reoriented back, so a scan stored in another axis order still looks to the
  network like its training data.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from PRLDetectorLib.dependencies import check_nnunet_version
from PRLDetectorLib.detection.models import ModelInfo, load_checkpoints
from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


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
    """The sliding-window tiles worth running: those whose central half holds brain, plus any tile needed
    so that every brain voxel is still covered by at least one tile.

    nnU-Net weights each tile's prediction by a Gaussian centred on the tile, so a voxel's result comes
    mostly from the tiles it sits in the middle of; tiles that only graze the brain with their low-weight
    border add little and cost as much as any other. Voxels outside the brain are background anyway.
    """
    def central(tile: tuple) -> tuple:
        return tuple(slice(s.start + (s.stop - s.start) // 4, s.stop - (s.stop - s.start) // 4) for s in tile[1:])

    kept = [tile for tile in slicers if brain[central(tile)].any()]
    covered = np.zeros(brain.shape, dtype=bool)
    for tile in kept:
        covered[tile[1:]] = True
    missing = brain & ~covered
    if missing.any():
        chosen = {id(t) for t in kept}
        for tile in slicers:
            if id(tile) not in chosen and missing[tile[1:]].any():
                kept.append(tile)
                missing[tile[1:]] = False
        kept.sort(key=slicers.index)
    return kept


def _make_predictor_class():
    # The methods below override private ones of nnU-Net's predictor: only the release they were written for.
    check_nnunet_version()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class BrainTilePredictor(nnUNetPredictor):
        """nnUNetPredictor that runs only the tiles :func:`select_brain_tiles` keeps and reports tile progress."""

        brain: np.ndarray | None = None
        on_tile: Callable[[int, int], None] | None = None
        stats: TileStats

        def initialize_from_checkpoints(self, model: ModelInfo, checkpoints: dict[str, dict]) -> None:
            """nnU-Net's ``initialize_from_trained_model_folder`` on checkpoints already loaded as weights
            only (:func:`load_checkpoints`): nnU-Net's own loader unpickles with ``weights_only=False``."""
            import inspect

            from batchgenerators.utilities.file_and_folder_operations import load_json
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
            from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            dataset_json = load_json(str(model.path / "dataset.json"))
            plans_manager = PlansManager(load_json(str(model.path / "plans.json")))
            first = checkpoints[model.folds[0]]
            configuration_manager = plans_manager.get_configuration(first["init_args"]["configuration"])
            trainer_class = recursive_find_trainer_class_by_name(first["trainer_name"])
            if trainer_class is None:
                raise ValueError(f"nnU-Net has no trainer '{first['trainer_name']}'")
            channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
            heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
            if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
                network = trainer_class.build_network_architecture(
                    plans_manager, configuration_manager, channels, heads, enable_deep_supervision=False)
            else:
                network = trainer_class.build_network_architecture(
                    configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                    configuration_manager.network_arch_init_kwargs_req_import, channels, heads,
                    enable_deep_supervision=False)
            parameters = [checkpoints[fold]["network_weights"] for fold in model.folds]
            network.load_state_dict(parameters[0])
            self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                       first["trainer_name"], first.get("inference_allowed_mirroring_axes"))

        def _internal_get_sliding_window_slicers(self, image_size):
            slicers = super()._internal_get_sliding_window_slicers(image_size)
            self.stats = TileStats(total=len(slicers), run=len(slicers))
            self._done = 0
            if self.brain is not None and tuple(self.brain.shape) == tuple(image_size[1:]):
                slicers = select_brain_tiles(slicers, self.brain)
                self.stats.run = len(slicers)
            return slicers

        def _internal_maybe_mirror_and_predict(self, x):
            out = super()._internal_maybe_mirror_and_predict(x)
            self._done += 1
            if self.on_tile is not None:
                self.on_tile(self._done, self.stats.run)
            return out

        def predict_sliding_window_return_logits(self, input_image):
            logits = super().predict_sliding_window_return_logits(input_image)
            # Voxels no kept tile covered were divided 0/0: they lie outside the brain, so background.
            uncovered = torch.isnan(logits[0])
            if uncovered.any():
                logits[0][uncovered] = 10.0
                for channel in range(1, logits.shape[0]):
                    logits[channel][uncovered] = -10.0
            return logits

    return BrainTilePredictor


class Segmenter:
    """One loaded nnU-Net model; :meth:`predict` runs it on one case at a time."""

    def __init__(self, model: ModelInfo, device: str = "auto", tta: bool = False, skip_empty_tiles: bool = True):
        # Weights only, before nnU-Net sees the model; ``model`` gets the sha256 of the checkpoints it runs.
        model, checkpoints = load_checkpoints(model)
        self.model = model
        self.device = pick_device(device)
        self.tta = tta
        self.skip_empty_tiles = skip_empty_tiles
        self.last_tiles = TileStats()
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
        self.orientation = model.card.get("orientation")
        logger.info(
            "Loaded model '%s' (%s, folds %s) on %s, test-time mirroring %s",
            model.name, model.version, ",".join(model.folds), self.device, "on" if tta else "off",
        )

    def predict(self, channels: list[sitk.Image], progress: Progress | None = None) -> sitk.Image:
        """PRL probability (float32) on the grid of ``channels[0]``; channels in the model's order."""
        original_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            channels[0].GetDirection()
        )
        if self.orientation and self.orientation != original_orientation:
            channels = [sitk.DICOMOrient(c, self.orientation) for c in channels]
        reference = channels[0]
        data = np.stack([sitk.GetArrayViewFromImage(c) for c in channels]).astype(np.float32, copy=False)
        properties = {"spacing": list(reference.GetSpacing())[::-1]}

        predictor = self.predictor
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        if progress:
            progress(0.0, "Preprocessing (nnU-Net)")
        with _quiet():
            pre, seg, properties = preprocessor.run_case_npy(
                data, None, properties, predictor.plans_manager, predictor.configuration_manager,
                predictor.dataset_json,
            )
        predictor.brain = (seg[0] >= 0) if self.skip_empty_tiles and seg is not None else None
        predictor.on_tile = (lambda done, total: progress(done / total, f"Network tile {done}/{total}")) if progress else None
        with _quiet():
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(pre)).cpu()
        self.last_tiles = predictor.stats
        logger.info("Sliding window: %d of %d tiles hold brain and were run", predictor.stats.run, predictor.stats.total)
        if progress:
            progress(1.0, "Resampling probabilities to the input grid")
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        with _quiet():
            _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
                properties, return_probabilities=True,
            )
        foreground = np.ascontiguousarray(probabilities[1:].sum(0), dtype=np.float32)
        out = sitk.GetImageFromArray(foreground)
        out.CopyInformation(reference)
        if self.orientation and self.orientation != original_orientation:
            out = sitk.DICOMOrient(out, original_orientation)
        return out
