"""Fast-dLLM v2's sub-block cache served by vLLM: query tokens and forwards with it on and off.

Serves a Fast-dLLM v2 layout checkpoint (by default a tiny random one built here, the published
config keys) with the family's `subblock` policy and greedy decoding, and reads each request's
statistics (`kv_transfer_params.blockdiff`): query tokens the model computed per output token and
per forward, forwards and tokens per forward, for B / sub-block 32/8 and 16/4, cache on and off.
How much the cache saves depends on the steps each sub-block takes (the reference refreshes the
whole block at each sub-block's start), so the model matters: a random model is unsure and
takes many steps per sub-block. Prints a table and writes JSON.

    python benchmarks/subblock_cache.py --out benchmarks/results/subblock_cache_cpu_tiny.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

CONFIGS = [(32, 8), (16, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a Fast-dLLM v2 checkpoint (default: tiny)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint

    model = args.model or str(make_tiny_checkpoint(Path(tempfile.mkdtemp()), arch="fast_dllm",
                                                   block_size=32, seed=0))
    llm = LLM(model, dtype="float32", max_model_len=512, enforce_eager=True, block_size=32,
              gpu_memory_utilization=0.3)
    prompts = [TokensPrompt(prompt_token_ids=[(13 * i + 7 * j) % 300 + 10 for j in range(9 + i)])
               for i in range(args.requests)]
    rows = []
    print("B/sub | cache | query tok / out tok | query tok / fwd | forwards | tok / fwd")
    for block, sub in CONFIGS:
        for cache in (False, True):
            xargs = {"policy": "subblock", "block_length": block, "sub_block_length": sub,
                     "use_block_cache": cache}
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                    extra_args=xargs)
            outs = llm.generate(prompts, params, use_tqdm=False)
            stats = [o.kv_transfer_params["blockdiff"] for o in outs]
            query = sum(s["query_tokens"] for s in stats)
            forwards = sum(s["forwards"] for s in stats)
            tokens = sum(s["output_tokens"] for s in stats)
            row = {"block_length": block, "sub_block_length": sub, "use_block_cache": cache,
                   "requests": len(outs), "query_tokens": query, "forwards": forwards,
                   "output_tokens": tokens}
            rows.append(row)
            print(f"{block:2d}/{sub} | {'on ' if cache else 'off'} | {query / tokens:19.2f} | "
                  f"{query / forwards:15.2f} | {forwards:8d} | {tokens / forwards:9.2f}",
                  flush=True)
    for block, sub in CONFIGS:
        off, on = (next(r for r in rows if r["block_length"] == block and
                        r["use_block_cache"] == c) for c in (False, True))
        ratio = (off["query_tokens"] / off["forwards"]) / (on["query_tokens"] / on["forwards"])
        print(f"B={block}/sub-block {sub}: {ratio:.2f}x fewer query tokens per forward with the "
              "cache")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model if args.model else "tiny random",
                                              "argv": sys.argv[1:], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
