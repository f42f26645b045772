#!/usr/bin/env bash
# Stage 5 of the two ShapesWorld diffusion models (configs/train/*_stage5.yaml) on a lent GPU, in ONE call of
# the device tool (6.5 minutes on an H200 on 2026-11-28, when it made the shipped models; the session's
# device time is 15 minutes, start included).
# Prepare on the workstation first:   python scripts/gpu_kit.py      (writes .gpu/: prompt features, diffusers)
# Then one call:   device run, carry [".gpu"], timeout_s 590, command "scripts/gpu_stage5.sh"
# It trains LazyDiffusion and RegenerateImage side by side from the shipped stage-4 models (data/models),
# each stopped by a time box of MINUTES (default 7.3) if its steps are not done by then, and writes to
# $OUT (default runs/gpu-stage5): lazy.tar and regenerate-image.tar (data/models' layout, training/ with
# loss.csv, loss.png, train_info.json), lazy-raw.tar and regenerate-image-raw.tar (the last step's weights
# without the EMA, `export_raw`), train.log. Back on the workstation:
#   tar -xf lazy.tar -C data/models && tar -xf regenerate-image.tar -C data/models
#   mkdir -p runs/stage5-raw && tar -xf lazy-raw.tar -C runs/stage5-raw && tar -xf regenerate-image-raw.tar -C runs/stage5-raw
#   python -m eval quality --suite data/suites/shapes-val.yaml --out runs/val-stage5-ema-vs-raw \
#     --methods lazy,regenerate-image,runs/stage5-raw/lazy,runs/stage5-raw/regenerate-image   # EMA or raw? (~15 min)
#   python -m eval loss --suite data/suites/shapes-val.yaml --out runs/loss-val-stage5      # 2 minutes
#   python -m eval quality --suite data/suites/shapes.yaml --out runs/quality-stage5 && python -m eval gate runs/quality-stage5
# Environment: OUT, KIT (default .gpu), MINUTES, WORKERS (data processes per run, default 7), PYTHON (default python3), EXTRA
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-stage5}
PY=${PYTHON:-python3}
KIT=${KIT:-.gpu}  # the folder scripts/gpu_kit.py wrote
mkdir -p "$OUT"
[[ -f $KIT/text_features.safetensors.xz ]] || { echo "no $KIT/text_features.safetensors.xz: run 'python scripts/gpu_kit.py' on the workstation and carry .gpu" >&2; exit 2; }
F=/tmp/gpu-text-features.safetensors
$PY scripts/gpu_kit.py --unpack-features $KIT/text_features.safetensors.xz $F
source scripts/gpu_env.sh  # diffusers from the kit where the GPU image has none
$PY -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (no GPU found)')"
RUNS=${RUNS:-/tmp/gpu-runs}; MODELS=${MODELS:-/tmp/gpu-models}
rm -rf "$MODELS" && mkdir -p "$MODELS" && cp -r data/models/autoencoder "$MODELS/"  # the latent space the runs train in
INIT_DIR=data/models TEXT_FEATURES=$F RUNS=$RUNS MODELS=$MODELS \
  MINUTES_DIFFUSION=${MINUTES:-7.3} WORKERS_DIFFUSION=${WORKERS:-7} PYTHON=$PY \
  EXTRA="${EXTRA:-} --set export_raw=true" scripts/train_shapesworld.sh stage5 2>&1 | tr '\r' '\n' | grep --line-buffered -v '%|' | tee "$OUT/train.log"
for m in lazy regenerate-image; do  # the shipped layout: each stage's logs in training/stageN/
  mkdir -p "$MODELS/$m/training/stage5" && mv "$MODELS/$m"/training/*.* "$MODELS/$m/training/stage5/"
  # components.json names the autoencoder the run used: here a copy of the shipped one, so name that
  sed -i "s#\"$MODELS/autoencoder\"#\"data/models/autoencoder\"#" "$MODELS/$m/components.json"
  tar -C "$MODELS" -cf "$OUT/$m.tar" "$m"
  run=$RUNS/${m//-/_}_stage5
  [[ -d $run/export-raw ]] && tar -C "$run" -cf "$OUT/$m-raw.tar" --transform "s,^export-raw,$m," export-raw
  $PY -c "import json,sys; i=json.load(open(sys.argv[1])); print(sys.argv[2], 'steps', i['steps'], 'of', i['schedule_steps'], 'in', round(i['wall_s']), 's:', round(i['steps'] / i['wall_s'], 2), 'steps/s')" \
    "$MODELS/$m/training/stage5/train_info.json" "$m" | tee -a "$OUT/train.log"
done
ls -la "$OUT"
