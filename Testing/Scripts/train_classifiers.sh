#!/usr/bin/env bash
# Rebuilds the bundled lesion classifiers (stage 2) exactly as shipped (see README, "Stage 2").
# Usage: Testing/Scripts/train_classifiers.sh [WORK_DIR]   (default /tmp/prl_stage2)
# Training patients: varied sites and protocols, TKD and Tikhonov reconstructions only (the gradient-
# regularised one is held out for testing), new seeds (the networks were trained on seed 1000).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_stage2}
N_TRAIN=${N_TRAIN:-40}
BIN=.venv/bin
mkdir -p "$WORK"
[ -d "$WORK/train" ] || $BIN/prl-detect phantom --out "$WORK/train" --n 60 --seed 6000 --flair \
  --extent-mm 128 150 100 --vary-acquisition --recon tkd tikhonov --negative-share 0.2
# The first N_TRAIN patients (stage 1 costs ~35 s per patient and model on 2 cores).
mkdir -p "$WORK/train_used"
for case in $(ls "$WORK/train" | head -n "$N_TRAIN"); do ln -sfn "$(realpath "$WORK/train/$case")" "$WORK/train_used/$case"; done
for MODEL in qsm qsm_flair; do
  rm -rf "$WORK/models/$MODEL"
  $BIN/prl-detect train-classifier --model "$MODEL" --cases "$WORK/train_used" --stage1-cache "$WORK/train_s1" \
    --device cpu --out "$WORK/models/$MODEL"
done
echo "Classifiers in $WORK/models/*/classifier; copy each into Resources/Models/<name>/classifier/"
