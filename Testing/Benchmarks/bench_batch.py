"""Benchmark: patients per hour of ``prl-detect batch``, in this process or on a local Dask cluster.

Generates a phantom cohort (not timed), runs the batch on it and prints the throughput two ways: over the
whole run's wall time (model loading and cluster start included) and in steady state (3600 s over the
median time of one patient, times the number of workers). Figures, not assertions: machines differ.

    .venv/bin/python Testing/Benchmarks/bench_batch.py [--model qsm] [--cases 3] [--size whole|small]
                                                       [--workers N] [--work DIR] [--threads N]

``--size whole`` is a realistic 1 mm whole-brain phantom (182 x 218 x 182 mm); ``small`` is the 64 x 72 x
56 mm field of view of the tests. ``--workers 0`` runs the patients in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

SIZES = {"whole": None, "small": (64.0, 72.0, 56.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qsm", help="bundled model name or model folder (default: qsm)")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--size", choices=tuple(SIZES), default="whole")
    parser.add_argument("--workers", type=int, default=0, help="0: in this process; N: a local Dask cluster")
    parser.add_argument("--threads", type=int, help="torch threads in this process (--workers 0)")
    parser.add_argument("--work", help="folder for the cohort and the output (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from PRLDetectorLib.cohort.batch import run_batch
    from PRLDetectorLib.phantom.phantom import generate_cohort
    from PRLDetectorLib.settings import DetectionSettings

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_batch_"))
    cases = work / f"cases_{args.size}_{args.cases}_{args.seed}"
    if not cases.is_dir():
        generate_cohort(cases, n=args.cases, seed=args.seed, extent_mm=SIZES[args.size], progress=False)
    out = work / f"out_{args.size}_w{args.workers}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    report = run_batch(
        cases, out, DetectionSettings(model=args.model, device="cpu"), progress=True,
        workers=args.workers or None,
    )
    per_case = sorted(report.seconds.values())
    workers = max(args.workers, 1)
    steady = 3600.0 * workers / statistics.median(per_case) if per_case else float("nan")
    figures = {
        "size": args.size,
        "cases": args.cases,
        "workers": args.workers,
        "done": len(report.done),
        "failed": report.failed,
        "wall_s": round(report.wall_s, 1),
        "seconds_per_case": [round(s, 1) for s in per_case],
        "cases_per_hour_wall": round(report.cases_per_hour, 1),
        "cases_per_hour_steady": round(steady, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.exit(main())
