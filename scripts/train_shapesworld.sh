#!/usr/bin/env bash
# Train every shipped ShapesWorld model, in the order their dependencies need:
#   stage 1: the autoencoder (ShapesCLIP, which needs nothing, starts beside it and runs on)
#   stage 2: LazyDiffusion and RegenerateImage (both need the autoencoder; same data and steps)
#   continue: LazyDiffusion, RegenerateImage and ShapesCLIP go on from their exports in $INIT_DIR
#             (configs/train/*_continue.yaml: fresh data, constant LR), side by side; the autoencoder
#             stays as it is, since the diffusion models are trained on its latent space
#   diffusion: stage 3 of LazyDiffusion and RegenerateImage only (configs/train/*_stage3.yaml: batch 256,
#             data_echo 4, Min-SNR-5), from the stage-2 exports ($INIT_DIR, or $RUNS/*_continue/export); the
#             classifier that scores them stays fixed, so accuracies of successive stages compare
#   stage4:   LazyDiffusion and RegenerateImage anneal (configs/train/*_stage4.yaml: the stage-3 recipe with a
#             cosine LR to 10% over 1450 steps, fresh data) from the stage-3 exports ($INIT_DIR, or
#             $RUNS/*_stage3/export)
#   stage5:   LazyDiffusion and RegenerateImage, one more cosine cycle (configs/train/*_stage5.yaml, fresh data)
#             from the stage-4 exports ($INIT_DIR, or $RUNS/*_stage4/export); LazyDiffusion runs the 1578 steps
#             the baseline got more in the time-boxed stages 2 and 3 on top, so both end with the same steps
#   clip:     ShapesCLIP stage 3 from its stage-2 export (configs/train/shapes_clip_holes.yaml: half
#             the samples are hole crops of edit tasks, the inputs of the prompt-accuracy metric)
# Each run resumes from its latest checkpoint if interrupted; run this script again to continue.
# Usage: scripts/train_shapesworld.sh [stage1|stage2|all|continue|diffusion|stage4|stage5|clip]
# Environment:
#   EXTRA="--set key=value ..."          applies to every run (e.g. mixed_precision=bf16 on a GPU)
#   PYTHON                                the interpreter (default .venv/bin/python if there, else python3)
#   RUNS, MODELS                          run folders (runs/train) and where exports are published (data/models)
#   CONFIGS                               config folder (configs/train; configs/train/cpu: the ~2 h-per-model CPU recipe)
#   WORKERS_AE, WORKERS_CLIP, WORKERS_DIFFUSION   data-generation processes per run (default 2)
#   MINUTES_AE, MINUTES_CLIP, MINUTES_DIFFUSION   time boxes: stop there, checkpoint and export anyway
#                                                 (train_info.json records the step reached)
#   STEPS_DIFFUSION                       stop each diffusion run after this many steps (this call; a resumed
#                                         run counts from where it was), then export: the same number of steps
#                                         for both models, where a time box gives the cheaper baseline more
#   INIT_DIR                              continue: where the exports to go on from are (default $RUNS/<run>/export;
#                                         INIT_DIR=data/models continues the shipped models)
#   TEXT_FEATURES                         precomputed text features for the diffusion runs (python -m
#                                         lazydiff.train.text_features FILE): no text encoder on the training machine
# On several GPUs, replace `python -m lazydiff.train` by `accelerate launch -m lazydiff.train`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}  # default: the repository's .venv (README's install), else python3
[[ -n $PY ]] || { [[ -x .venv/bin/python ]] && PY=.venv/bin/python; } || PY=python3
STAGE=${1:-all}
if [[ $STAGE == -h || $STAGE == --help ]]; then awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0; fi
case $STAGE in
  stage1|stage2|all|continue|diffusion|stage4|stage5|clip) ;;
  *) echo "unknown stage '$STAGE'; usage: $0 [stage1|stage2|all|continue|diffusion|stage4|stage5|clip]" >&2; exit 2 ;;
esac
EXTRA=${EXTRA:-}
RUNS=${RUNS:-runs/train}; MODELS=${MODELS:-data/models}

publish() {  # copy a finished export into $MODELS
  rm -rf "$MODELS/$2"; mkdir -p "$MODELS/$2/training"; cp -r "$1/export/." "$MODELS/$2/"
  cp "$1/train_info.json" "$1/loss.csv" "$1/loss.png" "$1/config.json" "$MODELS/$2/training/"
}
run() {  # run CONFIG NAME WORKERS MINUTES [more args]
  local cfg=$1 name=$2 workers=$3 minutes=$4; shift 4
  local box=""; [[ -n $minutes ]] && box="--max-minutes $minutes --export-at-stop"
  $PY -m lazydiff.train "${CONFIGS:-configs/train}/$cfg.yaml" --set "output_dir=$RUNS/$name" --set "num_workers=$workers" \
    $box "$@" $EXTRA
}
TEXT=""; [[ -n ${TEXT_FEATURES:-} ]] && TEXT="--set text_features=$TEXT_FEATURES"
init() {  # init RUN SHIPPED-NAME: the export a continue run starts from
  if [[ -n ${INIT_DIR:-} ]]; then echo "init_from=$INIT_DIR/$2"; else echo "init_from=$RUNS/$1/export"; fi
}

if [[ $STAGE == stage1 || $STAGE == all ]]; then
  run autoencoder autoencoder "${WORKERS_AE:-2}" "${MINUTES_AE:-}" &
  A=$!
  run shapes_clip shapes_clip "${WORKERS_CLIP:-2}" "${MINUTES_CLIP:-}" &
  C=$!
  wait $A; publish "$RUNS/autoencoder" autoencoder
fi
if [[ $STAGE == stage2 || $STAGE == all ]]; then
  run lazy lazy "${WORKERS_DIFFUSION:-2}" "${MINUTES_DIFFUSION:-}" --set "autoencoder=$MODELS/autoencoder" $TEXT &
  L=$!
  run regenerate_image regenerate_image "${WORKERS_DIFFUSION:-2}" "${MINUTES_DIFFUSION:-}" --set "autoencoder=$MODELS/autoencoder" $TEXT &
  R=$!
  wait $L; publish "$RUNS/lazy" lazy
  wait $R; publish "$RUNS/regenerate_image" regenerate-image
fi
if [[ $STAGE == stage1 || $STAGE == all ]]; then
  wait $C; publish "$RUNS/shapes_clip" shapes-clip
fi
if [[ $STAGE == continue || $STAGE == diffusion || $STAGE == stage4 || $STAGE == stage5 ]]; then
  W=${WORKERS_DIFFUSION:-2}; M=${MINUTES_DIFFUSION:-}
  S=""; [[ -n ${STEPS_DIFFUSION:-} ]] && S="--max-steps-this-run $STEPS_DIFFUSION --export-at-stop"
  if [[ $STAGE == continue ]]; then L_RUN=lazy_continue; R_RUN=regenerate_image_continue; FROM=""
  elif [[ $STAGE == diffusion ]]; then L_RUN=lazy_stage3; R_RUN=regenerate_image_stage3; FROM=_continue
  elif [[ $STAGE == stage4 ]]; then L_RUN=lazy_stage4; R_RUN=regenerate_image_stage4; FROM=_stage3
  else L_RUN=lazy_stage5; R_RUN=regenerate_image_stage5; FROM=_stage4; fi
  run $L_RUN $L_RUN "$W" "$M" --set "$(init lazy$FROM lazy)" --set "autoencoder=$MODELS/autoencoder" $TEXT $S &
  L=$!
  run $R_RUN $R_RUN "$W" "$M" --set "$(init regenerate_image$FROM regenerate-image)" \
    --set "autoencoder=$MODELS/autoencoder" $TEXT $S &
  R=$!
  C=""
  if [[ $STAGE == continue ]]; then
    run shapes_clip_continue shapes_clip_continue "${WORKERS_CLIP:-2}" "${MINUTES_CLIP:-}" --set "$(init shapes_clip shapes-clip)" &
    C=$!
  fi
  wait $L; wait $R; [[ -z $C ]] || wait $C  # publish only when all are done: the runs read the exports they replace
  publish "$RUNS/$L_RUN" lazy
  publish "$RUNS/$R_RUN" regenerate-image
  [[ -z $C ]] || publish "$RUNS/shapes_clip_continue" shapes-clip
fi
if [[ $STAGE == clip ]]; then
  run shapes_clip_holes shapes_clip_holes "${WORKERS_CLIP:-2}" "${MINUTES_CLIP:-}" --set "$(init shapes_clip_continue shapes-clip)"
  publish "$RUNS/shapes_clip_holes" shapes-clip
fi
