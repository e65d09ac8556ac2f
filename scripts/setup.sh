#!/usr/bin/env bash
# Set-up for a fresh machine: the Fashion-MNIST data (Debian), a virtual environment with CPU torch, fgvr.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package dataset-fashion-mnist (the demo's images)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || echo "setup: could not install dataset-fashion-mnist; 'fgvr demo' will say what to do"
  else
    echo "setup: Fashion-MNIST is not installed; for the demo run: sudo apt-get install dataset-fashion-mnist"
  fi
fi

# `fgvr serve`'s browser test drives Debian's chromium (playwright cannot download a browser here).
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package chromium (the browser test of fgvr serve)"
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
      || echo "setup: could not install chromium; the browser test will fail in CI and skip elsewhere"
  else
    echo "setup: chromium is not installed; for the browser test run: sudo apt-get install chromium"
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch lies on this machine's disk; plain `torch` would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q "torch>=2.4"
"$VENV/bin/python" -m pip install -q -e ".[dev,ray,serve]"  # ray: --ray on classify/evaluate; serve: fgvr serve and its browser test
echo "setup: done ($VENV)"
