#!/usr/bin/env bash
# Sampling settings of the shipped models on the validation split (data/suites/shapes-val.yaml, 200 edits,
# never the test split): guidance 3 / 4.5 / 7.5, DDIM vs DPM-Solver++ vs UniPC, 20 vs 10 steps, for
# LazyDiffusion and RegenerateImage alike; then one comparison table and plot with paired 95% intervals.
# ~2 hours on one core of this project's 2-core CPU (7 runs x 2 methods x 200 edits); rerunning resumes.
# Usage: scripts/sweep_sampling.sh [OUT (default runs/val)]   Environment: PYTHON (default python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-runs/val}
SUITE=data/suites/shapes-val.yaml
RUNS=("g4.5:" "guidance3.0:--guidance 3.0" "guidance7.5:--guidance 7.5" "dpm-solver++:--scheduler dpm-solver++"
      "unipc:--scheduler unipc" "steps10:--steps 10" "dpm-solver++steps10:--scheduler dpm-solver++ --steps 10")
dirs=()
for r in "${RUNS[@]}"; do
  name=${r%%:*}; args=${r#*:}
  # shellcheck disable=SC2086 # args is a list of options
  $PY -m eval quality --suite "$SUITE" --methods lazy,regenerate-image $args --out "$OUT/$name"
  dirs+=("$OUT/$name")
done
$PY -m eval compare "${dirs[@]}" --out "$OUT/compare"
