#!/usr/bin/env bash
# The detect benchmark on a CUDA GPU: prl-detect against nnUNetv2_predict_from_modelfolder, both on the GPU,
# same ratios and targets as `make bench` (bench_detect.py --device cuda). Prints figures, asserts nothing.
# On a machine without a CUDA GPU visible to PyTorch it says so and exits 0.
#
#   bash Testing/Benchmarks/bench_gpu.sh [bench_detect.py options, e.g. --cases 5 --spacings 1 0.5]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench_gpu: skipped: no CUDA GPU is visible to PyTorch on this machine ($("$PYTHON" -c 'import torch; print("torch", torch.__version__)'))."
    exit 0
fi
"$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'
exec "$PYTHON" "$HERE/bench_detect.py" --device cuda "$@"
