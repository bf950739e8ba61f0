"""Fast-dLLM v2's sub-block cache served by vLLM: query tokens, forwards and tok/s, on and off.

Serves a Fast-dLLM v2 layout checkpoint (by default a tiny random one built here, the published
config keys; `--shape qwen2.5-1.5b` on the GPU: that shape with random weights) with the family's
`subblock` policy and greedy decoding, and reads each request's statistics
(`kv_transfer_params.blockdiff`): query tokens the model computed per output token and per
forward, forwards, tokens per forward and output tok/s, for B / sub-block 32/8 and 16/4, cache on
and off, at each `--batch`.
How much the cache saves depends on the steps each sub-block takes (the reference refreshes the
whole block at each sub-block's start), so the model and the threshold matter: a random model
is unsure and takes many steps per sub-block, a trained one few; `--thresholds` sweeps the
policy's threshold to show the saving against steps per sub-block. Prints a table and writes
JSON.

    python benchmarks/subblock_cache.py --out benchmarks/results/subblock_cache_cpu_tiny.json
    python benchmarks/subblock_cache.py --shape qwen2.5-1.5b --batch 1 16 64   # GPU
    python benchmarks/subblock_cache.py --model examples/models/fast-dllm-testbed \
        --tasks arithmetic,lists,json --batch 1 16          # the trained testbed model
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [(32, 8), (16, 4)]


def synthetic_prompts(n: int) -> list:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[(13 * i + 7 * j) % 300 + 10 for j in range(9 + i % 23)])
            for i in range(n)]


def testbed_prompts(model: str, tasks: list[str], n: int) -> list:
    """n test prompts, round robin over the tasks, encoded with the checkpoint's tokenizer."""
    from tokenizers import Tokenizer
    from vllm.inputs import TokensPrompt

    from vllm_blockdiff.testbed.data import encode_prompt
    from vllm_blockdiff.testbed.tasks import generate

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    per_task = [generate(task, "test", n) for task in tasks]
    return [TokensPrompt(prompt_token_ids=encode_prompt(tok, per_task[i % len(tasks)][i].prompt))
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a Fast-dLLM v2 checkpoint (default: tiny)")
    parser.add_argument("--shape", default=None, help="a throughput.py shape, random weights")
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--tasks", default=None,
                        help="prompts from these testbed tasks (a trained testbed --model), "
                             "decoded until EOS; default: synthetic prompts, EOS ignored")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9],
                        help="the subblock policy's confidence thresholds to run")
    parser.add_argument("--max-graph-tokens", type=int, default=None,
                        help="largest FULL CUDA graph (vLLM's max_cudagraph_capture_size); "
                             "default: the plugin's choice, at most 2,048 tokens")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint

    if args.shape:  # a config-only checkpoint; the weights are random (load_format=dummy)
        from throughput import write_shape

        model = write_shape(Path(tempfile.mkdtemp()), args.shape, "fast_dllm")
        graphs = {"max_cudagraph_capture_size": args.max_graph_tokens} \
            if args.max_graph_tokens else {}
        llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=1024,
                  block_size=32, max_num_seqs=max(args.batch), gpu_memory_utilization=0.5,
                  compilation_config=graphs)
    else:
        model = args.model or str(make_tiny_checkpoint(Path(tempfile.mkdtemp()),
                                                       arch="fast_dllm", block_size=32, seed=0))
        llm = LLM(model, dtype="float32", max_model_len=512, enforce_eager=True, block_size=32,
                  max_num_seqs=max(args.batch), gpu_memory_utilization=0.3)
    prompts = synthetic_prompts(max(args.batch)) if args.tasks is None else \
        testbed_prompts(model, args.tasks.split(","), max(args.batch))
    rows = []
    print("threshold | B/sub | cache | batch | query tok / out tok | query tok / fwd | forwards "
          "| fwd / sub-block | tok / fwd | tok/s")
    runs = ((t, c, b, k) for t in args.thresholds for c in CONFIGS for b in args.batch
            for k in (False, True))
    for threshold, (block, sub), batch, cache in runs:
        xargs = {"policy": "subblock", "block_length": block, "sub_block_length": sub,
                 "use_block_cache": cache, "threshold": threshold}
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                ignore_eos=args.tasks is None, extra_args=xargs)
        # Warm-up at the measured batch size (tail graphs are captured per padded request count
        # on first use; a one-request warm-up left that in the first timed row).
        llm.generate(prompts[:batch], params, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts[:batch], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        stats = [o.kv_transfer_params["blockdiff"] for o in outs]
        query = sum(s["query_tokens"] for s in stats)
        forwards = sum(s["forwards"] for s in stats)
        tokens = sum(s["output_tokens"] for s in stats)
        row = {"threshold": threshold, "block_length": block, "sub_block_length": sub,
               "use_block_cache": cache, "batch": batch, "query_tokens": query,
               "forwards": forwards, "output_tokens": tokens,
               "tokens_per_s": round(tokens / seconds, 1)}
        rows.append(row)
        per_sub = forwards / (-(-tokens // sub))  # forwards per sub-block of output, about
        print(f"{threshold:9.3f} | {block:2d}/{sub} | {'on ' if cache else 'off'} | {batch:5d} | "
              f"{query / tokens:19.2f} | {query / forwards:15.2f} | {forwards:8d} | "
              f"{per_sub:15.2f} | {tokens / forwards:9.2f} | {row['tokens_per_s']:.1f}",
              flush=True)
    for threshold, (block, sub), batch in ((t, c, b) for t in args.thresholds for c in CONFIGS
                                           for b in args.batch):
        off, on = (next(r for r in rows if (r["threshold"], r["block_length"], r["batch"])
                        == (threshold, block, batch) and r["use_block_cache"] == c)
                   for c in (False, True))
        ratio = (off["query_tokens"] / off["forwards"]) / (on["query_tokens"] / on["forwards"])
        print(f"threshold {threshold}, B={block}/sub-block {sub}, batch {batch}: {ratio:.2f}x "
              f"fewer query tokens per forward, {on['tokens_per_s'] / off['tokens_per_s']:.2f}x "
              f"tok/s with the cache")
    if args.out:
        name = args.model or args.shape or "tiny random"
        Path(args.out).write_text(json.dumps({"model": name, "tasks": args.tasks,
                                              "argv": sys.argv[1:], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
