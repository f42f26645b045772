#!/usr/bin/env bash
# The GPU runtime table of docs/BENCHMARKS.md §6, in one command: paper shape at the real PixArt-XL/2 size
# (28 x 1152, random weights), bf16, LazyDiffusion vs RegenerateImage, first and follow-up edits, once with
# CUDA-graph replay of the denoising step (every method alike; graphs are kept across edits, so each
# follow-up replays the graph its fresh edit recorded) and once eagerly, one run after the other
# on the same machine; then an edit in a new place on an encoded canvas (--followup new-mask, with graphs);
# then checks that graphed edits, recorded or replayed in a later edit, equal eager ones (~5 min on an H200).
# Usage: scripts/bench_gpu.sh [OUT (default runs/bench/gpu)]   Environment: PYTHON (default python, else python3), KIT (.gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
source scripts/gpu_env.sh  # on a lent GPU machine without diffusers: the kit of scripts/gpu_kit.py
OUT=${1:-runs/bench/gpu}
mkdir -p "$(dirname "$OUT")"
ARGS=(--preset paper-shape --device cuda --dtype bf16 --width 1152 --depth 28 --methods lazy,regenerate-image
      --mask-ratios 0.01,0.1,0.25,0.4 --steps 20 --repeats 3 --followup same-mask)
$PY -m eval runtime "${ARGS[@]}" --cuda-graphs --out "$OUT/graphs" 2>&1 | tee "$OUT.graphs.log"
$PY -m eval runtime "${ARGS[@]}" --out "$OUT/eager" 2>&1 | tee "$OUT.eager.log"
# An edit somewhere else on an encoded canvas: crops re-encoded, the context encoder again
NEW_MASK=("${ARGS[@]/same-mask/new-mask}")
$PY -m eval runtime "${NEW_MASK[@]}" --mask-ratios 0.1,0.25 --cuda-graphs --out "$OUT/new-mask" 2>&1 | tee "$OUT.new-mask.log"
# Are graphed edits the same as eager ones? (pipe.cuda_graphs stays off by default until this says so)
$PY scripts/check_cuda_graphs.py --out "$OUT/check_cuda_graphs.json" 2>&1 | tee "$OUT.check.log"
echo "wrote $OUT/graphs, $OUT/eager and $OUT/new-mask (report.md, runtime.csv, plots) and $OUT/check_cuda_graphs.json"
