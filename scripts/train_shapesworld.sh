#!/usr/bin/env bash
# Train every shipped ShapesWorld model, in the order their dependencies need:
#   stage 1: the autoencoder and ShapesCLIP (independent, run side by side)
#   stage 2: LazyDiffusion and RegenerateImage (both need the autoencoder; same data and steps)
# Each run resumes from its latest checkpoint if interrupted; run this script again to continue.
# Usage: scripts/train_shapesworld.sh [stage1|stage2|all]   (env EXTRA="--set key=value ..." applies to every run)
# On several GPUs, replace `python -m lazydiff.train` by `accelerate launch -m lazydiff.train`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STAGE=${1:-all}
EXTRA=${EXTRA:-}
W1=${WORKERS_SMALL:-2}; W2=${WORKERS_LARGE:-2}
RUNS=${RUNS:-runs/train}; MODELS=${MODELS:-data/models}

publish() {  # copy a finished export into data/models
  rm -rf "$MODELS/$2"; mkdir -p "$MODELS/$2/training"; cp -r "$1/export/." "$MODELS/$2/"
  cp "$1/train_info.json" "$1/loss.csv" "$1/loss.png" "$1/config.json" "$MODELS/$2/training/"
}

if [[ $STAGE == stage1 || $STAGE == all ]]; then
  $PY -m lazydiff.train configs/train/autoencoder.yaml --set output_dir=$RUNS/autoencoder --set num_workers=$W1 $EXTRA &
  A=$!
  $PY -m lazydiff.train configs/train/shapes_clip.yaml --set output_dir=$RUNS/shapes_clip --set num_workers=$W2 $EXTRA &
  C=$!
  wait $A; publish $RUNS/autoencoder autoencoder
  wait $C; publish $RUNS/shapes_clip shapes-clip
fi
if [[ $STAGE == stage2 || $STAGE == all ]]; then
  $PY -m lazydiff.train configs/train/lazy.yaml --set output_dir=$RUNS/lazy --set autoencoder=$MODELS/autoencoder --set num_workers=$W2 $EXTRA &
  L=$!
  $PY -m lazydiff.train configs/train/regenerate_image.yaml --set output_dir=$RUNS/regenerate_image --set autoencoder=$MODELS/autoencoder --set num_workers=$W2 $EXTRA &
  R=$!
  wait $L; publish $RUNS/lazy lazy
  wait $R; publish $RUNS/regenerate_image regenerate-image
fi
