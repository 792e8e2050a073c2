#!/usr/bin/env bash
# Rebuilds the two bundled models exactly as shipped (see README, "Bundled models").
# Usage: Testing/Scripts/train_bundled_models.sh [WORK_DIR]   (default /tmp/prl_train; ~75 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_train}
BIN=.venv/bin
mkdir -p "$WORK"
# 40 training patients (32 train + 8 nnU-Net validation, fold 0), several grids, with FLAIR.
[ -d "$WORK/cases" ] || $BIN/prl-detect phantom --out "$WORK/cases" --n 40 --seed 1000 --flair --vary-grid
# Both models train side by side, one CPU core each; nnU-Net data augmentation in one worker each.
export nnUNet_n_proc_DA=1 OMP_NUM_THREADS=1
COMMON=(--cases "$WORK/cases" --plan small --epochs 25 --iterations 100 --val-iterations 10 --fold 0 --seed 0 --device cpu)
$BIN/prl-detect train "${COMMON[@]}" --name qsm --dataset-id 501 --work "$WORK/work_qsm" \
  --model-out "$WORK/models/qsm" > "$WORK/train_qsm.log" 2>&1 &
$BIN/prl-detect train "${COMMON[@]}" --name qsm_flair --flair --dataset-id 502 --work "$WORK/work_qsm_flair" \
  --model-out "$WORK/models/qsm_flair" > "$WORK/train_qsm_flair.log" 2>&1 &
wait
echo "Models in $WORK/models; copy them to Resources/Models/"
