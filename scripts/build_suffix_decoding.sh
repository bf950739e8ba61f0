#!/usr/bin/env bash
# vLLM's `suffix` proposer imports `arctic_inference.suffix_decoding` (Snowflake's
# ArcticInference, Apache-2.0). Its PyPI release is a source distribution whose full build also
# registers a vLLM plugin that patches vLLM, so this builds only the suffix-tree extension (C++,
# nanobind) into .suffix/ (git-ignored), which the proposer benchmark puts on its path:
#
#   bash scripts/build_suffix_decoding.sh
#   python benchmarks/proposers.py
set -euo pipefail
py=$(realpath "${PYTHON:-.venv/bin/python}")
version=0.3.0
out=$PWD/.suffix/arctic_inference
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps "arctic-inference==$version" -d "$tmp"
tar xzf "$tmp/arctic_inference-$version.tar.gz" -C "$tmp"
"$py" -m pip install -q --target "$tmp/nanobind" nanobind==2.9.2
src=$tmp/arctic_inference-$version
PYTHONPATH=$tmp/nanobind cmake -S "$src/csrc/suffix_decoding" -B "$tmp/build" \
  -DPython_EXECUTABLE="$py" > "$tmp/cmake.log"
PYTHONPATH=$tmp/nanobind cmake --build "$tmp/build" -j "$(nproc)" > "$tmp/build.log"
rm -rf "$out" && mkdir -p "$out/suffix_decoding"
touch "$out/__init__.py"
cp "$src"/arctic_inference/suffix_decoding/*.py "$tmp"/build/_C*.so "$out/suffix_decoding/"
PYTHONPATH=$PWD/.suffix "$py" -c "from arctic_inference.suffix_decoding import SuffixDecodingCache"
echo "suffix decoding built into ${out%/arctic_inference}"
