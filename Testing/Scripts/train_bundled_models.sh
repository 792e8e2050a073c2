#!/usr/bin/env bash
# Rebuilds a bundled model exactly as shipped (see README, "Bundled models").
# Usage: Testing/Scripts/train_bundled_models.sh [WORK_DIR] [qsm|qsm_flair]
#   (default /tmp/prl_train and qsm; ~2.5 min per epoch of 100 iterations on 2 CPU cores)
#   EPOCHS overrides the schedule (qsm_flair shipped with 15 epochs, qsm with 30).
#   An interrupted run: add --resume to the train call below (it keeps the run's own epochs/iterations).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_train}
MODEL=${2:-qsm}
BIN=.venv/bin
mkdir -p "$WORK"
# 40 training patients (32 train + 8 nnU-Net validation, fold 0), several grids, with FLAIR.
[ -d "$WORK/cases" ] || $BIN/prl-detect phantom --out "$WORK/cases" --n 40 --seed 1000 --flair --vary-grid
export nnUNet_n_proc_DA=2
case "$MODEL" in qsm_flair) DEFAULT_EPOCHS=15 ;; *) DEFAULT_EPOCHS=30 ;; esac
EPOCHS=${EPOCHS:-$DEFAULT_EPOCHS}
ARGS=(--cases "$WORK/cases" --plan small --epochs "$EPOCHS" --iterations 100 --val-iterations 10 --fold 0 --seed 0
      --device cpu --name "$MODEL" --work "$WORK/work_$MODEL" --model-out "$WORK/models/$MODEL")
case "$MODEL" in
  qsm) $BIN/prl-detect train "${ARGS[@]}" --dataset-id 501 ;;
  qsm_flair) $BIN/prl-detect train "${ARGS[@]}" --dataset-id 502 --flair ;;
  *) echo "unknown model $MODEL" >&2; exit 2 ;;
esac
echo "Model in $WORK/models/$MODEL; copy it to Resources/Models/"
