#!/usr/bin/env bash
# The README's stage-2 accuracy table: both bundled models, network alone and with each operating point, on
# 40 patients of a QSM reconstruction the classifiers never saw (gradient-regularised L2 inversion), a quarter
# of them PRL-negative, with every other site/protocol variation (grids, B0 tilt, 2D FLAIR, look-alikes).
# Usage: [TEST_SEED=7100] Testing/Scripts/evaluate_stage2.sh [WORK_DIR] [evaluate_stage2.py options]
#   (default /tmp/prl_stage2; shares train_classifiers.sh's). TEST_SEED makes another test set of the same
#   recipe (the README's second held-out set: 7100) in its own WORK_DIR; the seed is kept in WORK/test_seed.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_stage2}
shift || true
TEST_SEED=${TEST_SEED:-7000}
BIN=.venv/bin
mkdir -p "$WORK"
if [ -d "$WORK/test" ]; then
  made=$(cat "$WORK/test_seed.txt" 2>/dev/null || echo 7000)  # a set made before the seed was kept is the first
  if [ "$made" != "$TEST_SEED" ]; then
    echo "$WORK/test was made with seed $made, not $TEST_SEED; give another WORK_DIR." >&2
    exit 2
  fi
else
  $BIN/prl-detect phantom --out "$WORK/test" --n 40 --seed "$TEST_SEED" --flair \
    --extent-mm 128 150 100 --vary-acquisition --recon l2grad --negative-share 0.25
  echo "$TEST_SEED" > "$WORK/test_seed.txt"
fi
$BIN/python Testing/Scripts/evaluate_stage2.py "$WORK" "$@"
