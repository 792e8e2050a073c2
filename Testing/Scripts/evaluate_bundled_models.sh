#!/usr/bin/env bash
# The accuracy table of the README: both bundled models on a held-out phantom test set.
# Usage: Testing/Scripts/evaluate_bundled_models.sh [WORK_DIR]   (default /tmp/prl_test)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_test}
BIN=.venv/bin
mkdir -p "$WORK"
# 24 patients never seen in training (seed 5000; training used seed 1000), a 128×150×100 mm field of view
# around the brain centre (all white matter and deep grey nuclei; cortex at the edges) to keep CPU time down.
[ -d "$WORK/cases" ] || $BIN/prl-detect phantom --out "$WORK/cases" --n 24 --seed 5000 --flair --extent-mm 128 150 100
# The network alone (--operating-point off), as this table was made before the lesion classifier existed; its
# figures with stage 2 are evaluate_stage2.sh's table.
$BIN/prl-detect batch --cases "$WORK/cases" --out "$WORK/pred_qsm" --model qsm --device cpu --operating-point off
$BIN/prl-detect batch --cases "$WORK/cases" --out "$WORK/pred_qsm_flair" --model qsm_flair --device cpu \
  --operating-point off
# The network alone (the paper's method), then with the rim check (--min-rim-coverage 0.67, replayed on the
# same results from lesions.csv: exactly the lesions `detect --min-rim-coverage 0.67` keeps).
$BIN/prl-detect evaluate --gt "$WORK/cases" --pred "$WORK/pred_qsm" --compare "$WORK/pred_qsm_flair" \
  --json "$WORK/evaluation.json"
$BIN/prl-detect evaluate --gt "$WORK/cases" --pred "$WORK/pred_qsm" --compare "$WORK/pred_qsm_flair" \
  --min-rim-coverage 0.67 --json "$WORK/evaluation_rim_check.json"
