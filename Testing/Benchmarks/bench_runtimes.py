"""Benchmark: ways to run the network pass on the CPU, side by side on the same real tiles.

Each candidate runs the bundled model on the same brain tiles of a phantom (nnU-Net's preprocessing), in
rounds that alternate the candidates, so a busy machine slows them alike; the table gives the median time
per tile (wall and CPU), its ratio to plain PyTorch (one tile per forward pass, float32, as nnU-Net does),
and the largest logit difference. With ``--dice`` each candidate faster than plain PyTorch then segments
three phantoms end to end and the Dice of its label map against plain PyTorch's is printed (kept only at
≥ 0.999). Figures, not assertions: machines differ.

    .venv/bin/python Testing/Benchmarks/bench_runtimes.py [--tiles 8] [--rounds 3] [--dice] [--only "name;name"]

ONNX Runtime and OpenVINO are tried when installed (``pip install onnx onnxruntime openvino``); they are
not dependencies of PRLDetector.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))

Runner = Callable[[torch.Tensor], torch.Tensor]


def brain_tiles(segmenter, count: int, seed: int) -> torch.Tensor:
    """``count`` network tiles that hold brain, from a phantom preprocessed by nnU-Net."""
    import SimpleITK as sitk

    from PRLDetectorLib.detection.inference import select_brain_tiles
    from PRLDetectorLib.phantom.phantom import generate_case

    case = generate_case("bench", seed=seed, extent_mm=(128.0, 144.0, 96.0), n_prl=4)
    predictor = segmenter.predictor
    data = sitk.GetArrayFromImage(case.qsm)[None].astype(np.float32)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    pre, seg, _ = preprocessor.run_case_npy(data, None, {"spacing": list(case.qsm.GetSpacing())[::-1]},
                                            predictor.plans_manager, predictor.configuration_manager,
                                            predictor.dataset_json)
    slicers = select_brain_tiles(predictor._internal_get_sliding_window_slicers(pre.shape[1:]), seg[0] >= 0)
    chosen = np.random.default_rng(seed).choice(len(slicers), size=min(count, len(slicers)), replace=False)
    tensor = torch.from_numpy(pre)
    return torch.stack([tensor[slicers[i]] for i in sorted(chosen)])


def candidates(network: torch.nn.Module, example: torch.Tensor, only: set[str] | None) -> dict[str, tuple[Runner, int, float]]:
    """name → (runner, tiles per call, seconds to prepare it)."""
    out: dict[str, tuple[Runner, int, float]] = {}

    def want(name: str) -> bool:
        return only is None or name in only

    def add(name: str, make: Callable[[], Runner], batch: int = 1) -> None:
        if not want(name):
            return
        started = time.perf_counter()
        try:
            runner = make()
            runner(example[:batch])  # warm-up (and compilation, for the compilers)
        except Exception as error:  # a candidate that cannot run here is reported, not fatal
            print(f"  {name}: not available ({type(error).__name__}: {str(error)[:120]})")
            return
        out[name] = (runner, batch, time.perf_counter() - started)

    network.eval()
    add("PyTorch float32, 1 tile per pass (plain)", lambda: network)
    for batch in (2, 4):
        add(f"PyTorch float32, {batch} tiles per pass", lambda: network, batch)

    def channels_last() -> Runner:
        import copy

        net = copy.deepcopy(network).to(memory_format=torch.channels_last_3d)
        return lambda x: net(x.contiguous(memory_format=torch.channels_last_3d)).contiguous()

    add("PyTorch float32, channels-last (oneDNN)", channels_last)

    def bfloat16() -> Runner:
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return network(x).float()
        return run

    add("PyTorch bfloat16 autocast (AMX)", bfloat16)
    add("PyTorch bfloat16 autocast, 4 tiles per pass", bfloat16, 4)

    def compiled() -> Runner:
        return torch.compile(network, dynamic=False)

    add("torch.compile (inductor) float32", compiled)

    onnx_path = Path(tempfile.mkdtemp(prefix="prl-onnx-")) / "network.onnx"

    def export_onnx() -> Path:
        if not onnx_path.exists():
            torch.onnx.export(network, example[:1], str(onnx_path), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
        return onnx_path

    def onnxruntime() -> Runner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(export_onnx()), options, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

    add("ONNX Runtime float32", onnxruntime)

    def openvino(precision: str) -> Callable[[], Runner]:
        def make() -> Runner:
            import openvino as ov

            core = ov.Core()
            compiled_model = core.compile_model(str(export_onnx()), "CPU", {
                "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "PERFORMANCE_HINT": "LATENCY",
            })
            request = compiled_model.create_infer_request()
            return lambda x: torch.from_numpy(request.infer({0: x.numpy()})[0].copy())
        return make

    add("OpenVINO float32", openvino("f32"))
    add("OpenVINO bfloat16 (its default on AMX)", openvino("bf16"))

    def shipped() -> Runner:
        from PRLDetectorLib.detection.inference import openvino_network

        return openvino_network(network, example.shape[1], tuple(example.shape[2:]))

    add("OpenVINO float32, fixed 1-tile shape (shipped)", shipped)
    return out


def time_candidates(cands, tiles: torch.Tensor, rounds: int) -> dict[str, dict]:
    """Median wall and CPU seconds per tile, in rounds that alternate the candidates."""
    walls: dict[str, list[float]] = {name: [] for name in cands}
    cpus: dict[str, list[float]] = {name: [] for name in cands}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (runner, batch, _) in cands.items():
                wall, cpu = time.perf_counter(), time.process_time()
                pieces = [runner(tiles[i : i + batch]) for i in range(0, len(tiles), batch)]
                walls[name].append((time.perf_counter() - wall) / len(tiles))
                cpus[name].append((time.process_time() - cpu) / len(tiles))
                outputs[name] = torch.cat(pieces).float()
    plain = next(iter(cands))
    return {name: {"wall": statistics.median(walls[name]), "cpu": statistics.median(cpus[name]),
                   "max_diff": float((outputs[name] - outputs[plain]).abs().max()), "prepare": cands[name][2]}
            for name in cands}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def label_dice(segmenter, cands, names: list[str], seeds: list[int]) -> dict[str, list[float]]:
    """Dice of each candidate's PRL mask against plain PyTorch's, on whole phantoms, end to end."""
    from PRLDetectorLib.phantom.phantom import generate_case

    predictor = segmenter.predictor
    out: dict[str, list[float]] = {name: [] for name in names}
    for seed in seeds:
        case = generate_case(f"dice{seed}", seed=seed, extent_mm=(96.0, 112.0, 72.0), n_prl=3)
        predictor.tile_batch = 1
        plain = segmenter.predict([case.qsm])
        import SimpleITK as sitk

        reference = sitk.GetArrayFromImage(plain) >= 0.5
        for name in names:
            runner, batch, _ = cands[name]
            # The candidate in the place of the network for the tiles (the instance attribute shadows the method).
            predictor._network_on, predictor.tile_batch = (lambda device, run=runner: run), batch
            try:
                mask = sitk.GetArrayFromImage(segmenter.predict([case.qsm])) >= 0.5
            finally:
                del predictor._network_on
                predictor.tile_batch = None
            out[name].append(dice(mask, reference))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qsm")
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--dice", action="store_true", help="label-map Dice on three phantoms for the faster candidates")
    parser.add_argument("--only", help="semicolon-separated candidate names (the plain one is always run)")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from PRLDetectorLib.detection.inference import Segmenter
    from PRLDetectorLib.detection.models import resolve_model

    segmenter = Segmenter(resolve_model(args.model), device="cpu", cpu_runtime="pytorch")
    flags = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in Path("/proc/cpuinfo").read_text()] \
        if Path("/proc/cpuinfo").exists() else []
    print(f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU flags: {' '.join(flags) or 'no bf16/AMX'}")
    tiles = brain_tiles(segmenter, args.tiles, args.seed)
    only = None
    if args.only:
        only = {name.strip() for name in args.only.split(";")} | {"PyTorch float32, 1 tile per pass (plain)"}
    with torch.inference_mode(), contextlib.redirect_stderr(sys.stderr):
        cands = candidates(segmenter.predictor.network, tiles, only)
    results = time_candidates(cands, tiles, args.rounds)
    plain = results[next(iter(results))]
    print(f"\n{len(tiles)} brain tiles of 48³, {args.rounds} alternating rounds, median per tile")
    print(f"{'candidate':46s} {'wall s':>7s} {'CPU s':>7s} {'ratio':>6s} {'max |Δlogit|':>13s} {'prepare s':>9s}")
    for name, r in results.items():
        print(f"{name:46s} {r['wall']:7.3f} {r['cpu']:7.3f} {r['wall'] / plain['wall']:6.2f} {r['max_diff']:13.2e} "
              f"{r['prepare']:9.1f}")
    if args.dice:
        faster = [name for name, r in results.items() if name != next(iter(results)) and r["wall"] < plain["wall"]]
        scores = label_dice(segmenter, cands, faster, [11, 12, 13])
        print("\nDice of the PRL mask against plain PyTorch (three phantoms; kept at ≥ 0.999 on all three)")
        for name, values in scores.items():
            print(f"{name:46s} {' '.join(f'{v:.4f}' for v in values)}  {'same lesions' if min(values) >= 0.999 else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
