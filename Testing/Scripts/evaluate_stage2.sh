#!/usr/bin/env bash
# The README's stage-2 accuracy table: both bundled models, network alone and with each operating point, on
# 40 patients of a QSM reconstruction the classifiers never saw (gradient-regularised L2 inversion), a quarter
# of them PRL-negative, with every other site/protocol variation (grids, B0 tilt, 2D FLAIR, look-alikes).
# Usage: Testing/Scripts/evaluate_stage2.sh [WORK_DIR]   (default /tmp/prl_stage2; shares train_classifiers.sh's)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_stage2}
shift || true
BIN=.venv/bin
mkdir -p "$WORK"
[ -d "$WORK/test" ] || $BIN/prl-detect phantom --out "$WORK/test" --n 40 --seed 7000 --flair \
  --extent-mm 128 150 100 --vary-acquisition --recon l2grad --negative-share 0.25
$BIN/python Testing/Scripts/evaluate_stage2.py "$WORK" "$@"
