#!/usr/bin/env bash
# On the GPU machine (device tool), after the vLLM payload calls (../shared/gpu/README.md):
# install test wheels and this plugin into /tmp/site, then run the given command from /tmp so
# that the installed package (with its entry points) is the one imported.
#   source .gpu-b/install.sh env && bash scripts/gpu_session.sh python3 -m pytest -q "$PWD/tests/..."
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ ! -f /tmp/site/.blockdiff-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$REPO"/.whl/*.whl
  touch /tmp/site/.blockdiff-wheels
fi
rm -rf /tmp/site/vllm_blockdiff /tmp/site/vllm_blockdiff-*.dist-info
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site "$REPO"
cd /tmp
"$@"
