#!/usr/bin/env bash
# One device call on the GPU machine, after `.gpu-b/install.sh` (../shared/gpu/README.md):
# installs the plugin (and pytest from carried wheels) into /tmp/site, then runs the named steps,
# logs and JSON under $OUT.
#
#   bash scripts/gpu_run.sh [SRC_TGZ] STEP...
#     kernels   the attention kernel tests, compiled
#     tests     GPU engine tests with torch.compile and FULL CUDA graphs (BLOCKDIFF_TEST_COMPILE=1;
#               TESTS names other test files, TESTS_S their time limit)
#     invariant the determinism tests again under VLLM_BATCH_INVARIANT=1
#     profile   benchmarks/step_profile.py: per-step breakdown, PIECEWISE (before) vs FULL graphs
#               (MODES, CONFIGS select the runs, SCHED=sync,async adds windows, NO_AR=1 skips
#               the AR twin; PYPROFILE=1 adds host time by Python function, SYNCDEBUG=1 the
#               calls that make the host wait for the GPU)
#     throughput benchmarks/throughput.py: AR twin vs diffusion, batch 1-256 (TP_ARGS, TP_TAG)
#     subblock  benchmarks/subblock_attention.py: the sub-block attention kernel vs SDPA and vLLM
#               (stopped after $SB_S seconds, rows written as they come)
#     fastdllm  benchmarks/throughput.py --family fast_dllm: Qwen2.5-1.5B-shaped Fast-dLLM v2 vs AR
#     cache     benchmarks/subblock_cache.py: the sub-block cache on and off, same shape, batch 1-64
#     structured benchmarks/structured.py --full with the default grammar backend: every compiled
#               JSONSchemaBench schema of $JSB (the carried archive, unpacked), one engine per
#               group of splits in $SPLITS ("a,b;c;d"), side by side, each writing its own JSON
#               (after each temperature) and stopped after $SO_S seconds
#     train_ar  the AR twins: Qwen3 on old + ParallelBench-style families, Qwen2 layout (AR_S)
#     train_dllm SDAR and Fast-dLLM v2 adapted from the twins in $TWINS (DLLM_S)
#
# SRC_TGZ (optional, `git archive HEAD | gzip`): run that commit instead of the working tree.
# Every call reinstalls the plugin (--upgrade): without it pip keeps an earlier call's copy on a
# warm machine, and a before/after pair measured the same code twice (found 2026-12-06).
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
python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . $wheels \
  > "$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; exit 1; }
src=$PWD
# pytest runs from / so that the installed plugin (with its plugins/ subpackage) is imported.
t() { local lim=$1; shift; (cd / && timeout "$lim" python3 -m pytest -q -p no:cacheprovider -c "$src/pyproject.toml" "${@/#/$src/}"); }
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
for step in "$@"; do
  case $step in
    kernels)
      t 120 tests/test_attention_kernel.py tests/test_vocab_pass.py tests/test_transfer.py > "$OUT/kernels_gpu.log" 2>&1
      echo "kernels rc=$?"; tail -2 "$OUT/kernels_gpu.log" ;;
    tests)
      # TESTS: other test files instead (e.g. tests/test_engine_async.py), TESTS_S its limit
      BLOCKDIFF_TEST_COMPILE=1 t ${TESTS_S:-330} ${TESTS:-tests/test_engine_parity.py \
        tests/test_engine_fast_dllm.py tests/test_engine_determinism.py} \
        > "$OUT/tests_gpu.log" 2>&1
      echo "tests rc=$?"; tail -3 "$OUT/tests_gpu.log" ;;
    invariant)
      # Greedy identity beside other requests with vLLM's batch-invariant GEMMs.
      VLLM_BATCH_INVARIANT=1 BLOCKDIFF_TEST_COMPILE=1 t 200 tests/test_engine_determinism.py \
        > "$OUT/invariant_gpu.log" 2>&1
      echo "invariant rc=$?"; tail -2 "$OUT/invariant_gpu.log" ;;
    profile)
      (cd benchmarks && timeout ${PROFILE_S:-330} python3 step_profile.py --shape qwen3-1.7b --batch 1 16 64 \
        --configs ${CONFIGS:-4:4,4:1} --cudagraph-modes ${MODES:-PIECEWISE,default} \
        --scheduling ${SCHED:-sync} --out "$OUT/step_profile_$card.json" \
        ${PYPROFILE:+--pyprofile "$OUT"} ${NO_AR:+--no-ar} ${SYNCDEBUG:+--sync-debug}) \
        > "$OUT/step_profile.log" 2>&1
      echo "profile rc=$?"; tail -60 "$OUT/step_profile.log" ;;
    throughput)
      # TP_ARGS: further throughput.py options (the last of a repeated option wins); TP_TAG
      # names the result files (several runs in one call).
      (cd benchmarks && timeout ${TP_S:-560} python3 throughput.py --shape qwen3-1.7b \
        --max-tokens 64 --out "$OUT/throughput_$card${TP_TAG:-}.json" ${TP_ARGS:-}) \
        > "$OUT/throughput${TP_TAG:-}.log" 2>&1
      echo "throughput rc=$?"; tail -${TP_TAIL:-32} "$OUT/throughput${TP_TAG:-}.log" ;;
    subblock)
      (cd benchmarks && timeout ${SB_S:-240} python3 subblock_attention.py \
        --out "$OUT/subblock_attention_$card.json") > "$OUT/subblock_attention.log" 2>&1
      echo "subblock rc=$?"; tail -14 "$OUT/subblock_attention.log" ;;
    fastdllm)
      (cd benchmarks && timeout ${TP_S:-400} python3 throughput.py --family fast_dllm \
        --shape qwen2.5-1.5b --configs 16:4,32:8 --batch 1 16 64 --max-tokens 64 \
        --out "$OUT/throughput_fast_dllm_$card.json") > "$OUT/throughput_fast_dllm.log" 2>&1
      echo "fastdllm rc=$?"; tail -12 "$OUT/throughput_fast_dllm.log" ;;
    cache)
      # CACHE_ARGS: further subblock_cache.py options (e.g. --max-graph-tokens 4096 --batch 64),
      # CACHE_TAG names the result files
      (cd benchmarks && timeout ${CACHE_S:-300} python3 subblock_cache.py --shape qwen2.5-1.5b \
        --batch 1 16 64 --out "$OUT/subblock_cache_$card${CACHE_TAG:-}.json" ${CACHE_ARGS:-}) \
        > "$OUT/subblock_cache${CACHE_TAG:-}.log" 2>&1
      echo "cache rc=$?"; tail -12 "$OUT/subblock_cache${CACHE_TAG:-}.log" ;;
    structured)
      # The groups run side by side, each its own engine on a share of the card: the testbed
      # model leaves the GPU mostly idle, so three engines take about the time of one.
      jsb=${JSB:-.jsb/jsb.tgz}; mkdir -p /tmp/jsb && tar xzf "$src/$jsb" -C /tmp/jsb
      IFS=';' read -ra groups <<< "${SPLITS:-}"; n=${#groups[@]}; (( n )) || { groups=(""); n=1; }
      share=$(python3 -c "print(round(0.8 / $n, 2))")  # of the card's memory, per engine
      for g in "${groups[@]}"; do
        name=${g//,/_}; name=${name:-all}
        (cd "$src" && timeout ${SO_S:-540} python3 benchmarks/structured.py \
          --model examples/models/sdar-testbed --full --splits "$g" --speed-skip \
          --gpu-share "$share" \
          --schemas /tmp/jsb/jsonschemabench --out "$OUT/structured_${card}_$name") \
          > "$OUT/structured_$name.log" 2>&1 &
      done
      wait
      for g in "${groups[@]}"; do
        name=${g//,/_}; name=${name:-all}
        echo "structured $g:"; grep -A14 "^split " "$OUT/structured_$name.log" | grep -v "^ "
        grep "validity in\|coverage in\|Error" "$OUT/structured_$name.log" | tail -3
      done ;;
    train_ar|train_dllm)
      # The testbed models in two stages of two concurrent runs. train_ar: the Qwen3 AR twin on
      # the old and the ParallelBench-style families (issue 13) and the smaller Qwen2-layout twin
      # (issue 11); side by side on an H100 each ran as fast as alone (31.8 ms/step). train_dllm:
      # SDAR adapted from the first, Fast-dLLM v2 (shifted, B 8/16/32, bd_size 32) from the
      # second, twins from $TWINS (train_ar's archive, unpacked and carried); these runs are
      # GPU-bound (133 ms/step side by side, 60 alone), so MODELS="name ..." trains only those.
      m=$OUT/models; mkdir -p "$m"; tw=$src/${TWINS:-.gpu-models}
      tr() { local name=$1; shift; (cd / && python3 -m vllm_blockdiff.testbed.train --out "$m/$name" \
        --log-every 500 "$@") > "$OUT/train_$name.log" 2>&1; echo "$name rc=$?"; }
      want() { [[ -z ${MODELS:-} || " $MODELS " == *" $1 "* ]]; }
      if [[ $step == train_ar ]]; then
        tok=$src/examples/models/qwen3-testbed/tokenizer.json
        want qwen3-testbed && tr qwen3-testbed --arch qwen3 --mix parallel --tokenizer "$tok" --budget-s ${AR_S:-240} &
        want qwen2-testbed && tr qwen2-testbed --arch qwen2 --tokenizer "$tok" --hidden-size 192 --num-heads 3 \
          --num-kv-heads 1 --intermediate-size 384 --budget-s ${AR_S:-240} &
      else
        want sdar-testbed && tr sdar-testbed --arch sdar --mix parallel --init-from "$tw/qwen3-testbed" \
          --budget-s ${DLLM_S:-330} &
        want fast-dllm-testbed && tr fast-dllm-testbed --arch fast_dllm --init-from "$tw/qwen2-testbed" \
          --block-sizes 8,16,32 --eval-block-size 32 --budget-s ${DLLM_S:-330} &
      fi
      wait; grep -h "steps:\|training time" "$m"/*/TRAINING.md
      # One archive: the device call returns only a few files.
      tar czf "$OUT/${step}_models.tgz" -C "$m" . && rm -rf "$m" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
