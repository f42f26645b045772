# Sourced by the scripts that run on a lent GPU machine (scripts/gpu_stage5.sh, scripts/bench_gpu.sh):
# where the machine's image lacks diffusers, use the modules that scripts/gpu_kit.py zipped into the kit.
# Needs PY (the python to run) set; reads KIT (default .gpu).
KIT=${KIT:-.gpu}
if ! $PY -c "import diffusers" 2>/dev/null; then
  [[ -f $KIT/diffusers-min.zip ]] || { echo "diffusers is missing here and $KIT/diffusers-min.zip too: run 'python scripts/gpu_kit.py' on the workstation and carry $KIT" >&2; exit 2; }
  rm -rf /tmp/gpu-site && $PY -m zipfile -e "$KIT/diffusers-min.zip" /tmp/gpu-site
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
