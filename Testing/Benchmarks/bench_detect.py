"""Benchmark: `prl-detect detect` end to end against nnU-Net's own `nnUNetv2_predict_from_modelfolder`.

Same machine, same run, same model, same settings (fold 0, no test-time mirroring, CPU, tile step 0.5).
Prints wall-clock times, the ratios (targets: ≤ 0.8 for one case, ≤ 0.6 for a batch of five) and the peak
memory of the largest process. Figures, not assertions: machines differ.

    .venv/bin/python Testing/Benchmarks/bench_detect.py [--model qsm] [--cases 5] [--work DIR]
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
model, out = sys.argv[1], Path(sys.argv[2])
detector = Detector(DetectionSettings(model=model, device="cpu", tta=False))
for qsm in sys.argv[3:]:
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
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()

    sys.path.insert(0, str(HERE.parents[2]))
    from PRLDetectorLib.detection.models import resolve_model

    model = resolve_model(args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="prl-bench-"))
    cases = work / "cases"
    if not cases.exists():
        subprocess.run([str(BIN / "prl-detect"), "-q", "phantom", "--out", str(cases), "--n", str(args.cases),
                        "--seed", str(args.seed)], check=True)
    qsms = sorted(cases.glob("*/qsm.nii.gz"))
    # nnU-Net wants <case>_0000.nii.gz in one folder.
    nn_in = work / "nnunet_in"
    shutil.rmtree(nn_in, ignore_errors=True)
    nn_in.mkdir()
    for qsm in qsms:
        shutil.copy(qsm, nn_in / f"{qsm.parent.name}_0000.nii.gz")
    one_in = work / "nnunet_in_one"
    shutil.rmtree(one_in, ignore_errors=True)
    one_in.mkdir()
    shutil.copy(qsms[0], one_in / f"{qsms[0].parent.name}_0000.nii.gz")

    def nnunet(inp: Path, out: Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return measure([str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(inp), "-o", str(out),
                        "-m", str(model.path), "-f", *model.folds, "-device", "cpu", "--disable_tta",
                        "-chk", "checkpoint_final.pth"])

    def ours_one(out: Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return measure([str(BIN / "prl-detect"), "-q", "detect", "--qsm", str(qsms[0]), "--out", str(out),
                        "--model", args.model, "--device", "cpu", "--no-tta"])

    def ours_batch(out: Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return measure([sys.executable, "-c", _BATCH, args.model, str(out), *map(str, qsms)])

    import SimpleITK as sitk

    size = sitk.ReadImage(str(qsms[0])).GetSize()
    print(f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"Model: {model.path} ({model.name} {model.version}); case grid {size[0]}×{size[1]}×{size[2]}")
    rows = []
    t = time.strftime("%Y-%m-%d %H:%M")
    ref_one = nnunet(one_in, work / "ref_one")
    our_one = ours_one(work / "our_one")
    ref_batch = nnunet(nn_in, work / "ref_batch")
    our_batch = ours_batch(work / "our_batch")
    rows.append(("1 case", ref_one, our_one, 0.8))
    rows.append((f"{len(qsms)} cases", ref_batch, our_batch, 0.6))
    print(f"\n{t}  wall seconds (peak RSS MB of the largest process)")
    print(f"{'':10s} {'nnUNetv2_predict':>22s} {'prl-detect':>22s} {'ratio':>7s} {'target':>7s}")
    for name, ref, ours, target in rows:
        ratio = ours["wall_s"] / ref["wall_s"]
        print(f"{name:10s} {ref['wall_s']:10.1f} s ({ref['peak_rss_mb']:6.0f} MB) "
              f"{ours['wall_s']:10.1f} s ({ours['peak_rss_mb']:6.0f} MB) {ratio:7.2f} {'≤ ' + str(target):>7s}")


if __name__ == "__main__":
    main()
