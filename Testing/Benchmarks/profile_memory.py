"""Where `prl-detect detect`'s memory goes: resident memory sampled every 20 ms, by stage.

Runs ``prl-detect detect --progress-lines`` on one whole-brain phantom in a child process, reads /proc for
its resident set size while the progress lines mark the stages, and prints each stage's peak and the memory
it started from. A script, not a test: it prints figures (the README's memory profile comes from it).

    .venv/bin/python Testing/Benchmarks/profile_memory.py [--spacing 1] [--model qsm] [--work DIR] [-- extra detect args]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def rss_mb(pid: int) -> tuple[float, float] | None:
    """Resident memory now and its high-water mark so far (VmHWM: the true peak, spikes between samples too)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith(("VmRSS:", "VmHWM:")))
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def stage_of(message: str) -> str:
    """A progress message without its counters ("Network tile 3/12" → "Network tile")."""
    words = [w for w in message.split() if not any(ch.isdigit() for ch in w)]
    return " ".join(words) or message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--model", default="qsm")
    parser.add_argument("--seed", type=int, default=9000)
    parser.add_argument("--work", type=Path)
    parser.add_argument("extra", nargs="*", help="further detect arguments (after --)")
    args = parser.parse_args()
    if not Path("/proc/self/status").is_file():
        raise SystemExit("This profile reads /proc: Linux only.")
    work = args.work or Path(tempfile.mkdtemp(prefix="prl-memory-"))
    case = work / f"phantom_{args.spacing:g}mm"
    if not case.exists():
        subprocess.run([str(BIN / "prl-detect"), "-q", "phantom", "--out", str(case), "--n", "1", "--seed",
                        str(args.seed), "--spacing", str(args.spacing)], check=True)
    qsm = next(case.glob("*/qsm.nii.gz"))
    out = work / "result"
    command = [str(BIN / "prl-detect"), "-q", "detect", "--qsm", str(qsm), "--out", str(out), "--overwrite",
               "--progress-lines", "--model", args.model, "--device", "cpu", "--no-tta", *args.extra]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    marks: list[tuple[float, str]] = [(0.0, "start-up and imports")]

    def read() -> None:
        for line in child.stdout:
            if line.startswith("PRLDETECTOR_PROGRESS"):
                message = line.split(maxsplit=2)[2].strip() if len(line.split()) > 2 else ""
                stage = stage_of(message)
                if stage != marks[-1][1]:
                    marks.append((time.perf_counter() - started, stage))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: list[tuple[float, float, float]] = []
    while child.poll() is None:
        value = rss_mb(child.pid)
        if value is not None:
            samples.append((time.perf_counter() - started, *value))
        time.sleep(0.02)
    reader.join(timeout=5)
    if child.returncode:
        raise SystemExit(f"detect failed (exit {child.returncode}): {' '.join(command)}")
    peak = max(v for _, _, v in samples)  # the last VmHWM read, a few ms before the end
    print(f"prl-detect detect, {args.model}, {args.spacing:g} mm phantom, {time.perf_counter() - started:.1f} s, "
          f"peak {peak:.0f} MB (VmHWM; sampled VmRSS peak {max(v for _, v, _ in samples):.0f} MB)")
    print(f"{'stage':44s} {'from s':>7s} {'at start':>9s} {'peak':>7s} {'VmHWM at end':>13s}")
    bounds = [*marks, (float("inf"), "")]
    for (begin, name), (end, _) in zip(bounds[:-1], bounds[1:], strict=True):
        inside = [(v, hwm) for t, v, hwm in samples if begin <= t < end]
        if not inside:
            continue
        print(f"{name[:44]:44s} {begin:7.1f} {inside[0][0]:7.0f} MB {max(v for v, _ in inside):5.0f} MB "
              f"{inside[-1][1]:10.0f} MB")


if __name__ == "__main__":
    main()
