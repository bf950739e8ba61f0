#!/usr/bin/env bash
# One device call on the GPU machine, after `.gpu-b/install.sh` (../shared/gpu/README.md):
# installs the plugin (and pytest from carried wheels) into /tmp/site, then runs the named steps,
# logs and JSON under $OUT.
#
#   bash scripts/gpu_run.sh [SRC_TGZ] STEP...
#     kernels   the attention kernel tests, compiled
#     tests     GPU engine tests with torch.compile and FULL CUDA graphs (BLOCKDIFF_TEST_COMPILE=1)
#     invariant the determinism tests again under VLLM_BATCH_INVARIANT=1
#     profile   benchmarks/step_profile.py: per-step breakdown, PIECEWISE (before) vs FULL graphs
#               (MODES, CONFIGS select the runs, NO_AR=1 skips the AR twin; PYPROFILE=1 adds
#               host time by Python function)
#     throughput benchmarks/throughput.py: AR twin vs diffusion, batch 1-256
#     subblock  benchmarks/subblock_attention.py: the sub-block attention kernel vs SDPA and vLLM
#     fastdllm  benchmarks/throughput.py --family fast_dllm: Qwen2.5-1.5B-shaped Fast-dLLM v2 vs AR
#     cache     benchmarks/subblock_cache.py: the sub-block cache on and off, same shape, batch 1-64
#     train     the testbed pair retrained on old + ParallelBench-style families (TRAIN_S each)
#     train_fast_dllm  a Qwen2-layout AR twin and a Fast-dLLM v2 model adapted from it (TRAIN_S)
#
# SRC_TGZ (optional, `git archive HEAD | gzip`): run that commit instead of the working tree.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source .gpu-b/install.sh env
if [[ ${1:-} == *.tgz ]]; then
  mkdir -p /tmp/src && tar xzf "$1" -C /tmp/src && shift
  wheels=$(ls "$PWD"/.gpu-src/*.whl 2>/dev/null)
  cd /tmp/src
else
  wheels=$(ls .gpu-src/*.whl 2>/dev/null)
fi
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . $wheels \
  > "$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; exit 1; }
src=$PWD
# pytest runs from / so that the installed plugin (with its plugins/ subpackage) is imported.
t() { local lim=$1; shift; (cd / && timeout "$lim" python3 -m pytest -q -p no:cacheprovider -c "$src/pyproject.toml" "${@/#/$src/}"); }
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
for step in "$@"; do
  case $step in
    kernels)
      t 120 tests/test_attention_kernel.py tests/test_vocab_pass.py > "$OUT/kernels_gpu.log" 2>&1
      echo "kernels rc=$?"; tail -2 "$OUT/kernels_gpu.log" ;;
    tests)
      BLOCKDIFF_TEST_COMPILE=1 t 330 tests/test_engine_parity.py tests/test_engine_fast_dllm.py \
        tests/test_engine_determinism.py > "$OUT/tests_gpu.log" 2>&1
      echo "tests rc=$?"; tail -3 "$OUT/tests_gpu.log" ;;
    invariant)
      # Greedy identity beside other requests with vLLM's batch-invariant GEMMs.
      VLLM_BATCH_INVARIANT=1 BLOCKDIFF_TEST_COMPILE=1 t 200 tests/test_engine_determinism.py \
        > "$OUT/invariant_gpu.log" 2>&1
      echo "invariant rc=$?"; tail -2 "$OUT/invariant_gpu.log" ;;
    profile)
      (cd benchmarks && timeout ${PROFILE_S:-330} python3 step_profile.py --shape qwen3-1.7b --batch 1 16 64 \
        --configs ${CONFIGS:-4:4,4:1} --cudagraph-modes ${MODES:-PIECEWISE,default} \
        --out "$OUT/step_profile_$card.json" ${PYPROFILE:+--pyprofile "$OUT"} ${NO_AR:+--no-ar}) \
        > "$OUT/step_profile.log" 2>&1
      echo "profile rc=$?"; tail -60 "$OUT/step_profile.log" ;;
    throughput)
      (cd benchmarks && timeout ${TP_S:-560} python3 throughput.py --shape qwen3-1.7b \
        --max-tokens 64 --out "$OUT/throughput_$card.json") > "$OUT/throughput.log" 2>&1
      echo "throughput rc=$?"; tail -32 "$OUT/throughput.log" ;;
    subblock)
      (cd benchmarks && timeout 240 python3 subblock_attention.py \
        --out "$OUT/subblock_attention_$card.json") > "$OUT/subblock_attention.log" 2>&1
      echo "subblock rc=$?"; tail -14 "$OUT/subblock_attention.log" ;;
    fastdllm)
      (cd benchmarks && timeout ${TP_S:-400} python3 throughput.py --family fast_dllm \
        --shape qwen2.5-1.5b --configs 16:4,32:8 --batch 1 16 64 --max-tokens 64 \
        --out "$OUT/throughput_fast_dllm_$card.json") > "$OUT/throughput_fast_dllm.log" 2>&1
      echo "fastdllm rc=$?"; tail -12 "$OUT/throughput_fast_dllm.log" ;;
    cache)
      (cd benchmarks && timeout 300 python3 subblock_cache.py --shape qwen2.5-1.5b \
        --batch 1 16 64 --out "$OUT/subblock_cache_$card.json") > "$OUT/subblock_cache.log" 2>&1
      echo "cache rc=$?"; tail -12 "$OUT/subblock_cache.log" ;;
    train)
      # The testbed pair retrained on the old and the ParallelBench-style families (issue 13),
      # with the bundled tokenizer; each loop gets TRAIN_S seconds (the step count follows).
      m=$OUT/models; mkdir -p "$m"
      (cd / && python3 -m vllm_blockdiff.testbed.train --arch qwen3 --out "$m/qwen3-testbed" \
        --mix parallel --tokenizer "$src/examples/models/qwen3-testbed/tokenizer.json" \
        --budget-s ${TRAIN_S:-170} --log-every 500 \
        && python3 -m vllm_blockdiff.testbed.train --arch sdar --out "$m/sdar-testbed" \
        --init-from "$m/qwen3-testbed" --mix parallel --budget-s ${TRAIN_S:-170} \
        --log-every 500) > "$OUT/train.log" 2>&1
      echo "train rc=$?"; grep -h "steps:\|training time" "$m"/*/TRAINING.md
      # One archive: the device call returns only a few files.
      tar czf "$OUT/models.tgz" -C "$m" . && rm -rf "$m" ;;
    train_fast_dllm)
      # Fast-dLLM v2 on the testbed (issue 11): the Qwen2-layout AR twin, then the shifted
      # block-diffusion adaptation from it (B 8/16/32; config bd_size 32); TRAIN_S each.
      m=$OUT/models; mkdir -p "$m"
      (cd / && python3 -m vllm_blockdiff.testbed.train --arch qwen2 --out "$m/qwen2-testbed" \
        --tokenizer "$src/examples/models/qwen3-testbed/tokenizer.json" \
        --budget-s ${TRAIN_S:-170} --log-every 500 \
        && python3 -m vllm_blockdiff.testbed.train --arch fast_dllm \
        --out "$m/fast-dllm-testbed" --init-from "$m/qwen2-testbed" --block-sizes 8,16,32 \
        --eval-block-size 32 --budget-s ${TRAIN_S:-170} --log-every 500) \
        > "$OUT/train_fast_dllm.log" 2>&1
      echo "train_fast_dllm rc=$?"; grep -h "steps:\|training time" "$m"/*/TRAINING.md
      tar czf "$OUT/fast_dllm_models.tgz" -C "$m" . && rm -rf "$m" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
