"""The sliding window of :mod:`PRLDetectorLib.detection.inference` with the bundled model on real phantoms:
tiles without brain are skipped without changing the result; device memory decides the tile batch; a GPU
that runs out of memory hands the case to the CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import require_model

from PRLDetectorLib.detection.inference import Segmenter, tile_batch_for_memory
from PRLDetectorLib.detection.lesions import find_lesions
from PRLDetectorLib.detection.models import resolve_model


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    require_model("qsm")
    return Segmenter(resolve_model("qsm"), device="cpu")


def _labels(probability: sitk.Image) -> np.ndarray:
    return find_lesions(sitk.GetArrayFromImage(probability) >= 0.5, probability.GetSpacing(), 0.0, 26)


@pytest.fixture(scope="module")
def sparse_skipped(segmenter, sparse_case):
    """The sparse case's probability with tiles skipped (the default), and the tile counts."""
    qsm = sitk.ReadImage(str(sparse_case))
    return qsm, segmenter.predict([qsm]), segmenter.last_tiles


@pytest.mark.slow
def test_tiles_without_brain_are_not_run_and_the_result_inside_the_brain_is_the_same(segmenter, sparse_skipped):
    qsm, skipped, tiles = sparse_skipped
    segmenter.skip_empty_tiles = False
    try:
        every = segmenter.predict([qsm])
    finally:
        segmenter.skip_empty_tiles = True
    every_tiles = segmenter.last_tiles

    assert every_tiles.run == every_tiles.total == tiles.total
    assert tiles.run < tiles.total / 2, f"{tiles.run} of {tiles.total} tiles run"
    brain = sitk.GetArrayFromImage(qsm) != 0
    difference = np.abs(sitk.GetArrayFromImage(skipped) - sitk.GetArrayFromImage(every))
    assert difference[brain].max() <= 1e-3
    labels = _labels(every)
    assert labels.max() >= 1, "the phantom's PRLs should be found"
    np.testing.assert_array_equal(_labels(skipped), labels)


@pytest.mark.slow
def test_openvino_on_the_cpu_finds_the_lesions_pytorch_finds(segmenter, sparse_skipped):
    qsm, openvino, _ = sparse_skipped
    assert segmenter.predictor.cpu_runtime == "openvino"
    segmenter.predictor.cpu_runtime = "pytorch"
    try:
        pytorch = segmenter.predict([qsm])
    finally:
        segmenter.predictor.cpu_runtime = "openvino"
    difference = np.abs(sitk.GetArrayFromImage(openvino) - sitk.GetArrayFromImage(pytorch))
    assert difference.max() <= 1e-3
    labels = _labels(pytorch)
    assert labels.max() >= 1
    np.testing.assert_array_equal(_labels(openvino), labels)


@pytest.mark.parametrize(
    ("free_mb", "per_tile_mb", "expected"),
    [(8000, 300, 16), (4000, 300, 10), (1000, 300, 2), (300, 300, 1), (50, 300, 1)],
)
def test_the_tile_batch_fills_three_quarters_of_the_free_device_memory(free_mb, per_tile_mb, expected):
    assert tile_batch_for_memory(free_mb * 2**20, per_tile_mb * 2**20) == expected


class _RunsOutOfMemoryOnce(torch.nn.Module):
    """The real network, but its first forward pass raises the error PyTorch raises when memory runs out."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(x)


def test_out_of_memory_finishes_the_case_one_tile_at_a_time_with_one_warning(segmenter, caplog):
    predictor = segmenter.predictor
    tiles = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 48, 48, 72)).astype(np.float32))
    predictor.brain, predictor.tile_batch = None, 1
    predictor.cpu_runtime = "pytorch"  # the wrapper below is a PyTorch module
    expected = predictor.predict_sliding_window_return_logits(tiles)
    network = predictor.network
    predictor.network, predictor.tile_batch = _RunsOutOfMemoryOnce(network), 2
    try:
        with caplog.at_level(logging.WARNING, logger="PRLDetectorLib.detection.inference"):
            logits = predictor.predict_sliding_window_return_logits(tiles)
        calls = predictor.network.calls
    finally:
        predictor.network, predictor.tile_batch, predictor.cpu_runtime = network, None, "openvino"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "ran out of memory" in warnings[0] and "one tile at a time" in warnings[0]
    assert calls == 1 + predictor.stats.run  # the failed pass of two tiles, then one pass per tile
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_the_probability_from_one_resampled_difference_is_nnunets_softmax_export(segmenter, small_case):
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    from PRLDetectorLib.detection.inference import foreground_probability

    predictor = segmenter.predictor
    qsm = sitk.ReadImage(str(small_case / "qsm.nii.gz"))
    qsm = sitk.Resample(qsm, [s - 7 for s in qsm.GetSize()], sitk.Transform(), sitk.sitkLinear, qsm.GetOrigin(),
                        (0.9, 0.8, 1.3), qsm.GetDirection())  # a grid nnU-Net must resample, and a crop to put back
    data = sitk.GetArrayFromImage(qsm)[None]
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    pre, _, properties = preprocessor.run_case_npy(data, None, {"spacing": list(qsm.GetSpacing())[::-1]},
                                                   predictor.plans_manager, predictor.configuration_manager,
                                                   predictor.dataset_json)
    assert pre.shape[1:] != data.shape[1:]
    logits = torch.from_numpy(np.random.default_rng(1).normal(0, 4, size=(2, *pre.shape[1:])).astype(np.float32))
    _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
        return_probabilities=True)
    ours = foreground_probability(logits, predictor, properties)
    assert ours.shape == data.shape[1:] and ours.dtype == np.float32
    np.testing.assert_allclose(ours, probabilities[1], atol=1e-5, rtol=0)


def test_loading_a_plain_nnunet_trainer_model_does_not_import_nnunets_training_stack():
    """The network of an ``nnUNetTrainer`` checkpoint is built from its plan: the trainer module (and the
    training stack it imports, ~50 MB of a detect's memory) stays out of the process (nnU-Net's predictor
    itself imports a few light dataloading modules of ``nnunetv2.training``)."""
    import subprocess
    import sys

    require_model("qsm")
    code = ("import sys; from PRLDetectorLib.detection.inference import Segmenter; "
            "from PRLDetectorLib.detection.models import resolve_model; "
            "Segmenter(resolve_model('qsm'), device='cpu'); "
            "print(sorted(m for m in sys.modules if m.startswith('nnunetv2.training.nnUNetTrainer') "
            "or m in ('matplotlib', 'seaborn')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_network_compiled_for_openvino_is_kept_per_weights_and_a_damaged_entry_is_rebuilt(
        segmenter, tmp_path, monkeypatch):
    from PRLDetectorLib.detection.inference import openvino_ir, openvino_network

    monkeypatch.setenv("PRLDETECTOR_CACHE_DIR", str(tmp_path / "cache"))
    predictor = segmenter.predictor
    network, patch = predictor.network, tuple(predictor.configuration_manager.patch_size)
    key = segmenter.model.checkpoint_hashes[segmenter.model.folds[0]]
    path, cached = openvino_ir(network, 1, patch, key, tmp_path)
    assert not cached and path.parent.parent == tmp_path / "cache" / "openvino"
    entry = path.parent
    again, cached = openvino_ir(network, 1, patch, key, tmp_path)
    assert cached and again == path
    # Another model's weights get another entry; no key (unknown weights) nothing in the cache.
    assert openvino_ir(network, 1, patch, "f" * 64, tmp_path)[0].parent != entry
    assert openvino_ir(network, 1, patch, None, tmp_path / "scratch_is_used")[0].parent == tmp_path / "scratch_is_used"
    assert len(list((tmp_path / "cache" / "openvino").iterdir())) == 2

    tiles = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 1, *patch)).astype(np.float32))
    with torch.inference_mode():
        expected = network.to("cpu").eval()(tiles)
    tolerance = 1e-5 * float(expected.abs().max())  # float32 with other convolution algorithms
    from_cache = openvino_network(network, 1, patch, key)(tiles)
    torch.testing.assert_close(from_cache, expected, rtol=0, atol=tolerance)

    # A truncated weights file is not used: the entry is exported again and gives the same outputs.
    weights = entry / "network.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    path, cached = openvino_ir(network, 1, patch, key, tmp_path)
    assert not cached and path == entry / "network.xml"
    torch.testing.assert_close(openvino_network(network, 1, patch, key)(tiles), expected, rtol=0, atol=tolerance)


@pytest.mark.slow
def test_with_the_compiled_network_cached_a_case_never_loads_the_onnx_exporter(sparse_case, tmp_path):
    # PyTorch's ONNX exporter costs ~100 MB of the process's peak (README, memory profile): a second process
    # finds the network in the cache and leaves it unloaded.
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    script = (
        "import json, sys, SimpleITK as sitk\n"
        "from PRLDetectorLib.detection.inference import Segmenter\n"
        "from PRLDetectorLib.detection.models import resolve_model\n"
        "s = Segmenter(resolve_model('qsm'), device='cpu', cpu_runtime='openvino')\n"
        "p = s.predict([sitk.ReadImage(sys.argv[1])])\n"
        "exporter = ('onnx', 'torch.onnx._internal.torchscript_exporter.symbolic_opset17')\n"
        "print(json.dumps({'exporter': any(m in sys.modules for m in exporter),"
        " 'max': float(sitk.GetArrayViewFromImage(p).max())}))\n"
    )
    env = {**os.environ, "PRLDETECTOR_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script, str(sparse_case)], env=env, check=True,
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    assert runs[0]["exporter"] and not runs[1]["exporter"]
    assert runs[0]["max"] == runs[1]["max"] > 0.5


def test_the_cache_folder_is_the_users_moves_with_its_variable_and_set_empty_is_off(tmp_path, monkeypatch):
    import sys

    from PRLDetectorLib.detection.inference import cache_dir, openvino_ir

    monkeypatch.delenv("PRLDETECTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "xdg" / "prldetector"
    monkeypatch.setenv("PRLDETECTOR_CACHE_DIR", str(tmp_path / "moved"))
    assert cache_dir() == tmp_path / "moved"
    monkeypatch.setenv("PRLDETECTOR_CACHE_DIR", "")
    assert cache_dir() is None
    # Off: a key is given, yet the network is exported for this run only and nothing is kept.
    network = torch.nn.Conv3d(1, 2, 3, padding=1)
    path, cached = openvino_ir(network, 1, (8, 8, 8), "a" * 64, tmp_path / "scratch")
    assert path == tmp_path / "scratch" / "network.xml" and not cached
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "moved").exists()
