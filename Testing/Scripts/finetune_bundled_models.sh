#!/usr/bin/env bash
# Fine-tunes a network (stage 1) on phantoms of varied sites and protocols, as measured in the README ("Fine-tuning
# on varied phantoms", "Mixed fine-tune"). The shipped QSM + FLAIR network (since 2026-12-03) is
#   finetune_bundled_models.sh WORK qsm_flair prl_train/models/qsm_flair mixed
# started from the network train_bundled_models.sh makes (shipped until then; git revision 5346ce0 holds it).
# Usage: Testing/Scripts/finetune_bundled_models.sh [WORK_DIR] [qsm|qsm_flair] [START_MODEL] [varied|mixed]
#   START_MODEL: the model to start from (default: the bundled one of that name).
#   varied (default): 40 new phantoms (seed 8000) with TKD and Tikhonov reconstructions, every other site and
#     protocol variation and the look-alikes (--vary-acquisition), a fifth PRL-negative; 12 epochs.
#   mixed: the same 40 plus the 40 classic phantoms the bundled networks were first trained on (seed 1000,
#     --vary-grid, as train_bundled_models.sh makes them), so that the network keeps what it knew; 20 epochs.
#   EPOCHS overrides the epochs (of 100 iterations, ~2-2.5 min each on 2 CPU cores). Then: train its classifier
#   (prl-detect train-classifier --model WORK/models/<name>, or train_classifiers.sh's commands).
# The gradient-regularised reconstruction stays held out for evaluate_stage2.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/prl_finetune}
MODEL=${2:-qsm}
START=${3:-$MODEL}
DATA=${4:-varied}
BIN=.venv/bin
mkdir -p "$WORK"
[ -d "$WORK/varied" ] || $BIN/prl-detect phantom --out "$WORK/varied" --n 40 --seed 8000 --flair \
  --extent-mm 128 150 100 --vary-acquisition --recon tkd tikhonov --negative-share 0.2
case "$DATA" in
  varied) CASES=$WORK/varied; DEFAULT_EPOCHS=12; ID_BASE=510 ;;
  mixed)
    [ -d "$WORK/classic" ] || $BIN/prl-detect phantom --out "$WORK/classic" --n 40 --seed 1000 --flair --vary-grid
    CASES=$WORK/mixed; DEFAULT_EPOCHS=20; ID_BASE=520
    mkdir -p "$CASES"
    for c in $(ls "$WORK/classic"); do ln -sfn "$(realpath "$WORK/classic/$c")" "$CASES/c_$c"; done
    for c in $(ls "$WORK/varied"); do ln -sfn "$(realpath "$WORK/varied/$c")" "$CASES/v_$c"; done ;;
  *) echo "unknown training data $DATA (varied or mixed)" >&2; exit 2 ;;
esac
export nnUNet_n_proc_DA=2
ARGS=(--cases "$CASES" --epochs "${EPOCHS:-$DEFAULT_EPOCHS}" --iterations 100 --val-iterations 10 --fold 0 --seed 0
      --device cpu --name "$MODEL" --work "$WORK/work_${MODEL}_$DATA" --model-out "$WORK/models_$DATA/$MODEL"
      --init-from "$START")
case "$MODEL" in
  qsm) $BIN/prl-detect train "${ARGS[@]}" --dataset-id $((ID_BASE + 1)) ;;
  qsm_flair) $BIN/prl-detect train "${ARGS[@]}" --dataset-id $((ID_BASE + 2)) --flair ;;
  *) echo "unknown model $MODEL" >&2; exit 2 ;;
esac
echo "Network in $WORK/models_$DATA/$MODEL; train its classifier, then score it with evaluate_stage2.py"
