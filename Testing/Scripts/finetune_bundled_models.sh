#!/usr/bin/env bash
# Rebuilds a bundled network (stage 1) as shipped since 2026-12-02: the earlier bundled network fine-tuned on
# phantoms of varied sites and protocols (see README, "Bundled models").
# Usage: Testing/Scripts/finetune_bundled_models.sh [WORK_DIR] [qsm|qsm_flair] [START_MODEL]
#   START_MODEL: the model to start from (default: the bundled one of that name; to rebuild exactly, the
#   network of git revision 96803fe, Resources/Models/<name>, which the fine-tuned one replaced).
#   12 epochs of 100 iterations, ~1-2 min each on 2 CPU cores. Then: Testing/Scripts/train_classifiers.sh.
# Training patients: 40 new phantoms (seed 8000) with TKD and Tikhonov reconstructions, every other site and
# protocol variation and the look-alikes (--vary-acquisition), a fifth PRL-negative; the gradient-regularised
# reconstruction stays held out for evaluate_stage2.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_finetune}
MODEL=${2:-qsm}
START=${3:-$MODEL}
BIN=.venv/bin
mkdir -p "$WORK"
[ -d "$WORK/cases" ] || $BIN/prl-detect phantom --out "$WORK/cases" --n 40 --seed 8000 --flair \
  --extent-mm 128 150 100 --vary-acquisition --recon tkd tikhonov --negative-share 0.2
export nnUNet_n_proc_DA=2
ARGS=(--cases "$WORK/cases" --epochs "${EPOCHS:-12}" --iterations 100 --val-iterations 10 --fold 0 --seed 0
      --device cpu --name "$MODEL" --work "$WORK/work_$MODEL" --model-out "$WORK/models/$MODEL" --init-from "$START")
case "$MODEL" in
  qsm) $BIN/prl-detect train "${ARGS[@]}" --dataset-id 511 ;;
  qsm_flair) $BIN/prl-detect train "${ARGS[@]}" --dataset-id 512 --flair ;;
  *) echo "unknown model $MODEL" >&2; exit 2 ;;
esac
echo "Network in $WORK/models/$MODEL; train its classifier (train_classifiers.sh), then copy it to Resources/Models/"
