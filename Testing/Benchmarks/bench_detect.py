"""Benchmark: `prl-detect detect` end to end against nnU-Net's own `nnUNetv2_predict_from_modelfolder`.

Same machine, same run, same model, same settings (fold 0, no test-time mirroring, CPU, tile step 0.5).
Prints wall-clock times and the peak memory of the largest process for one whole-brain phantom at each of
``--spacings`` (the scaling table) and for a batch of ``--cases`` 1 mm phantoms, then each ratio with its
target. The very first `detect` (which exports the network for OpenVINO into an empty cache, once per model
and machine) is a row of its own; the ratios are of the runs after it (one 1 mm case ≤ 0.6× the CLI's time and ≤ its peak memory; a batch of five ≤ 0.5×). Figures, not
assertions: machines differ, and a machine shared with other work changes absolute seconds more than ratios.

    .venv/bin/python Testing/Benchmarks/bench_detect.py [--model qsm] [--cases 5] [--spacings 1 0.75 0.5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
BIN = Path(sys.executable).parent

# Run a command and report its wall time and the peak RSS of its largest descendant (ru_maxrss of children).
_MEASURE = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if code.returncode:
    sys.stderr.write(code.stderr[-3000:])
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "returncode": code.returncode}))
"""

# Our batch path: one process, one loaded model, cases streamed through it.
_BATCH = """
import sys
from pathlib import Path
from PRLDetectorLib.detection.pipeline import Detector, write_result
from PRLDetectorLib.settings import DetectionSettings
model, device, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
detector = Detector(DetectionSettings(model=model, device=device, tta=False))
for qsm in sys.argv[4:]:
    case = Path(qsm).parent.name
    write_result(detector.detect_files(qsm), out / case, {"qsm": qsm})
"""


def measure(command: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["returncode"]:
        raise SystemExit(f"Command failed: {' '.join(command)}\n{done.stderr}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qsm")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--spacings", type=float, nargs="*", default=[1.0, 0.75, 0.5],
                        help="isotropic grids of the one-case scaling rows (mm); the first is the ratio's case")
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="both tools on this device")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()

    sys.path.insert(0, str(HERE.parents[2]))
    from PRLDetectorLib.detection.models import resolve_model

    model = resolve_model(args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="prl-bench-"))
    # A cache of compiled networks of the benchmark's own, empty at the start: the first `detect` exports the
    # network for OpenVINO (once per model on a machine) and is reported apart from the runs after it.
    cache = work / "compiled-network-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["PRLDETECTOR_CACHE_DIR"] = str(cache)

    def phantoms(name: str, n: int, spacing: float) -> list[Path]:
        folder = work / name
        if not folder.exists():
            subprocess.run([str(BIN / "prl-detect"), "-q", "phantom", "--out", str(folder), "--n", str(n),
                            "--seed", str(args.seed), "--spacing", str(spacing)], check=True)
        return sorted(folder.glob("*/qsm.nii.gz"))

    def nnunet_input(name: str, qsms: list[Path]) -> Path:
        # nnU-Net wants <case>_0000.nii.gz in one folder.
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for qsm in qsms:
            shutil.copy(qsm, folder / f"{qsm.parent.name}_0000.nii.gz")
        return folder

    def nnunet(inp: Path, out: Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return measure([str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(inp), "-o", str(out),
                        "-m", str(model.path), "-f", *model.folds, "-device", args.device, "--disable_tta",
                        "-chk", "checkpoint_final.pth"])

    def ours_one(qsm: Path, out: Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return measure([str(BIN / "prl-detect"), "-q", "detect", "--qsm", str(qsm), "--out", str(out),
                        "--model", args.model, "--device", args.device, "--no-tta"])

    def ours_batch(qsms: list[Path], out: Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return measure([sys.executable, "-c", _BATCH, args.model, args.device, str(out), *map(str, qsms)])

    import SimpleITK as sitk

    print(f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"Model: {model.path} ({model.name} {model.version}) on {args.device}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("Wall seconds and peak RSS (MB) of the largest process; each pair runs back to back.\n")
    print(f"{'case':28s} {'nnUNetv2_predict':>20s} {'prl-detect':>20s} {'time':>6s} {'memory':>7s} {'Dice':>6s}")
    rows, stage2 = {}, {}

    def one_case(spacing: float) -> None:
        qsm = phantoms(f"one_{spacing:g}mm", 1, spacing)[0]
        ref = nnunet(nnunet_input(f"nnunet_in_{spacing:g}", [qsm]), work / f"ref_{spacing:g}")
        if not any(cache.glob("openvino/*/network.xml")):
            cold = ours_one(qsm, work / f"our_{spacing:g}")
            print(f"{'  first run: exports the network':28s} {'':>20s} {_cell(cold):>20s} "
                  f"{cold['wall_s'] / ref['wall_s']:6.2f} {cold['peak_rss_mb'] / ref['peak_rss_mb']:7.2f}", flush=True)
        ours = ours_one(qsm, work / f"our_{spacing:g}")
        agreement = _dice(work / f"ref_{spacing:g}" / f"{qsm.parent.name}.nii.gz", work / f"our_{spacing:g}" / "prl_labels.nii.gz")
        size = "×".join(map(str, sitk.ReadImage(str(qsm)).GetSize()))
        rows[spacing] = (ref, ours)
        timings = json.loads((work / f"our_{spacing:g}" / "burden.json").read_text(encoding="utf-8")).get("timings_s", {})
        stage2[spacing] = (timings.get("stage2_s"), timings.get("total_s"))
        print(f"{f'1 case, {spacing:g} mm ({size})':28s} {_cell(ref):>20s} {_cell(ours):>20s} "
              f"{ours['wall_s'] / ref['wall_s']:6.2f} {ours['peak_rss_mb'] / ref['peak_rss_mb']:7.2f} {agreement:6.3f}",
              flush=True)

    # The ratio's case first, then the batch, then the rest of the scaling rows.
    if args.spacings:
        one_case(args.spacings[0])
    if args.cases:
        qsms = phantoms(f"batch_{args.cases}", args.cases, args.spacings[0] if args.spacings else 1.0)
        ref_batch = nnunet(nnunet_input("nnunet_in_batch", qsms), work / "ref_batch")
        our_batch = ours_batch(qsms, work / "our_batch")
        print(f"{f'{len(qsms)} cases, one process':28s} {_cell(ref_batch):>20s} {_cell(our_batch):>20s} "
              f"{our_batch['wall_s'] / ref_batch['wall_s']:6.2f} {our_batch['peak_rss_mb'] / ref_batch['peak_rss_mb']:7.2f}",
              flush=True)
    for spacing in args.spacings[1:]:
        one_case(spacing)
    print("\nRatios against their targets (prl-detect / nnUNetv2_predict_from_modelfolder, same run):")
    if args.spacings:
        ref, ours = rows[args.spacings[0]]
        print(f"  one {args.spacings[0]:g} mm whole brain, time    {ours['wall_s'] / ref['wall_s']:5.2f}  (target <= 0.60)")
        print(f"  one {args.spacings[0]:g} mm whole brain, memory  {ours['peak_rss_mb'] / ref['peak_rss_mb']:5.2f}  (target <= 1.00)")
        seconds, total = stage2[args.spacings[0]]
        if seconds is not None and total:
            print(f"  one {args.spacings[0]:g} mm whole brain, stage 2 (lesion classifier) {seconds:.1f} s of detect's "
                  f"{total:.1f} s = {100 * seconds / total:.1f} %  (target <= 10 %)")
        else:
            print(f"  stage 2: model {args.model} ran without a lesion classifier")
    if args.cases:
        print(f"  batch of {len(qsms)}, time              {our_batch['wall_s'] / ref_batch['wall_s']:5.2f}  (target <= 0.50)")
    print("  the lesion stage: see bench_features.py (target <= 3x one label pass)")


def _cell(result: dict) -> str:
    return f"{result['wall_s']:7.1f} s ({result['peak_rss_mb']:5.0f})"


def _dice(reference: Path, ours: Path) -> float:
    """Dice of the lesion masks of nnU-Net's CLI and prl-detect (they differ by nnU-Net's float16 sums and by
    what lies outside the brain)."""
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(reference))) > 0
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(ours))) > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


if __name__ == "__main__":
    main()
