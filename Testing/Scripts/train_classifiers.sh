#!/usr/bin/env bash
# Rebuilds the bundled lesion classifiers (stage 2) as shipped (see README, "Stage 2").
# Usage: Testing/Scripts/train_classifiers.sh [WORK_DIR]   (default /tmp/prl_stage2)
# Training patients: varied sites and protocols, TKD and Tikhonov reconstructions only (the gradient-
# regularised one is held out for testing), new seeds (the networks were trained on seed 1000).
# Rounds of 60 new patients each (seeds 6000, 6100, ...): round 1 trains from its cases alone, every later
# round retrains on all examples so far (--keep-shipped on the previous round's model) plus its new cases.
# Shipped: both models 4 rounds (240 patients; QSM + FLAIR on its fine-tuned network, README).
# Stage 1 costs ~12 s (QSM) / ~20 s (QSM + FLAIR) per patient on 2 cores; it is cached in WORK/train_s1.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_stage2}
QSM_ROUNDS=${QSM_ROUNDS:-4}
FLAIR_ROUNDS=${FLAIR_ROUNDS:-4}
BIN=.venv/bin
mkdir -p "$WORK"
rounds_of() { if [ "$1" = qsm ]; then echo "$QSM_ROUNDS"; else echo "$FLAIR_ROUNDS"; fi; }
most=$(( QSM_ROUNDS > FLAIR_ROUNDS ? QSM_ROUNDS : FLAIR_ROUNDS ))
for r in $(seq 1 "$most"); do
  seed=$(( 5900 + 100 * r ))
  [ -d "$WORK/train_$seed" ] || $BIN/prl-detect phantom --out "$WORK/train_$seed" --n 60 --seed "$seed" --flair \
    --extent-mm 128 150 100 --vary-acquisition --recon tkd tikhonov --negative-share 0.2
  # Case names must be unique across rounds (they key the stage-1 cache and the patient folds): round 1
  # keeps the generator's names, later rounds are prefixed with their seed.
  mkdir -p "$WORK/round_$r"
  for case in $(ls "$WORK/train_$seed"); do
    name=$case; [ "$r" = 1 ] || name="s${seed}_$case"
    ln -sfn "$(realpath "$WORK/train_$seed/$case")" "$WORK/round_$r/$name"
  done
done
for MODEL in qsm qsm_flair; do
  previous=$MODEL
  for r in $(seq 1 "$(rounds_of "$MODEL")"); do
    # The output folder keeps the model's name: it keys the stage-1 cache.
    out="$WORK/models_r$r/$MODEL"
    if [ ! -f "$out/classifier/classifier.json" ]; then
      rm -rf "$out"
      keep=(); [ "$r" = 1 ] || keep=(--keep-shipped)
      $BIN/prl-detect train-classifier --model "$previous" "${keep[@]}" --cases "$WORK/round_$r" \
        --stage1-cache "$WORK/train_s1" --device cpu --out "$out"
    fi
    previous=$out
  done
  mkdir -p "$WORK/models"
  ln -sfn "$(realpath "$previous")" "$WORK/models/$MODEL"
done
echo "Classifiers in $WORK/models/*/classifier; copy each into Resources/Models/<name>/classifier/"
