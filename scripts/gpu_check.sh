#!/usr/bin/env bash
# The prepared GPU session (run on a lent CUDA machine from the repo root, wheels carried in .whl/):
# CUDA correctness of the model layer, then the 7B memory benchmark. Writes logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 200 python3 benchmarks/cuda_check.py 2>&1 | tee "$OUT/cuda_check.txt"
timeout 330 python3 benchmarks/gpu_memory.py --json-out "$OUT/gpu_memory.json" 2>&1 | tee "$OUT/gpu_memory.txt"
