"""Sub-block attention on the GPU: the plugin's paged kernel against PyTorch SDPA and vLLM's
unified Triton attention, on Fast-dLLM v2 decode shapes (Qwen2.5-7B heads: 28 query heads, 4 KV
heads, head dim 128, bf16, 16-token pages).

Each request runs one active sub-block of 8 queries that sees its context (the cached prefix
plus its 32-token block). The plugin's kernel reads the paged cache directly. SDPA gets the same
keys already gathered into contiguous tensors (gathering is not timed, so it is a lower bound for
a paged SDPA). vLLM's unified attention is causal, so its sub-block sees keys up to each query
only: slightly less work on the same pages, which makes the comparison fair to vLLM.
Achieved bandwidth counts the K/V bytes each request reads once (plus queries and outputs)
against the card's HBM peak. The plugin's kernel runs as served (split-K count chosen by the
launch's size, `auto_splits`) and at fixed counts of 1-16 splits; the best fixed count is reported.
Every call is timed as replayed from a CUDA graph, as the plugin serves attention, the replayed
calls cycling through distinct copies of the case so that none is served from L2. The results
of 2026-12-06 and before timed calls launched from Python (`--launch-timing`): no call took less
than about 0.07 ms there, whatever its work, a floor that looks like the launch, not the kernel.

    python benchmarks/subblock_attention.py --out benchmarks/results/subblock_attention_h100.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from vllm_blockdiff.attention.triton_kernel import paged_block_causal_attention_triton

HEADS, KV_HEADS, HEAD_DIM, PAGE, SUB, BLOCK = 28, 4, 128, 16, 8, 32
SPLITS = (1, 2, 4, 8, 16)
PEAK_TB_S = {"H100": 3.35, "H200": 4.8}


REPLAYS = 10  # calls per captured graph, so that one replay's own cost is spread over them
# Replayed calls read this many bytes of distinct copies of the case, so that a small case is
# not served from L2 (50 MB on an H100, 60 MB on an H200) by the call before it.
COLD_BYTES = 256 << 20


def _time(fns: list, graph: bool, iters: int = 20) -> float:
    """Median milliseconds of one call over CUDA events. With `graph`, as the plugin serves
    attention (inside FULL CUDA graphs): REPLAYS calls, cycling through `fns` (the same call on
    distinct copies of its data), captured in one graph and replayed, so the host's launch cost
    is not counted; without, `fns[0]` is launched from Python each time, whose launch cost (tens
    of microseconds per Triton launch) small calls then measure."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    call, per_call = fns[0], 1
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for i in range(REPLAYS):
                fns[i % len(fns)]()
        call, per_call = captured.replay, REPLAYS
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / per_call)
    return sorted(times)[len(times) // 2]


def _case(batch: int, context: int, dtype: torch.dtype) -> dict:
    dev = "cuda"
    keys = context + BLOCK  # the prefix and the whole current block
    pages = -(-keys // PAGE)
    kc = torch.randn(batch * pages, PAGE, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    table = torch.randperm(batch * pages, device=dev, dtype=torch.int32).view(batch, pages)
    q = torch.randn(batch * SUB, HEADS, HEAD_DIM, device=dev, dtype=dtype)
    qsl = torch.arange(0, batch * SUB + 1, SUB, device=dev, dtype=torch.int32)
    sub_end = context + 16  # the second sub-block of the block, run from the cache
    seq_lens = torch.full((batch,), sub_end, device=dev, dtype=torch.int32)
    kv_limit = torch.full((batch * SUB,), keys, device=dev, dtype=torch.int32)
    skip = torch.zeros_like(kv_limit)
    return dict(kc=kc, vc=vc, table=table, q=q, qsl=qsl, seq_lens=seq_lens, kv_limit=kv_limit,
                skip=skip, keys=keys, sub_end=sub_end)


def _bytes_read(batch: int, context: int, dtype: torch.dtype) -> int:
    """K/V bytes each request reads once, plus queries and outputs."""
    size = torch.empty((), dtype=dtype).element_size()
    return size * (2 * batch * (context + BLOCK) * KV_HEADS * HEAD_DIM + 2 * batch * SUB * HEADS
                   * HEAD_DIM)


def run(batch: int, context: int, dtype: torch.dtype, peak: float | None, graph: bool) -> dict:
    bytes_read = _bytes_read(batch, context, dtype)
    copies = min(REPLAYS, -(-COLD_BYTES // bytes_read)) if graph else 1
    cases = [_case(batch, context, dtype) for _ in range(copies)]
    scale = HEAD_DIM ** -0.5

    def ours(c: dict, num_splits: int | None = None):
        paged_block_causal_attention_triton(
            c["q"], c["kc"], c["vc"], c["out"], c["qsl"], c["seq_lens"], c["table"],
            c["kv_limit"], c["skip"], c["skip"], scale, SUB, num_splits=num_splits)

    def sdpa(c: dict):
        F.scaled_dot_product_attention(c["sq"], c["sk"], c["sv"], scale=scale, enable_gqa=True)

    for c in cases:
        c["out"] = torch.empty_like(c["q"])
        # SDPA on the same keys, gathered once (untimed) into [batch, kv_heads, keys, dim].
        for name, cache in (("sk", c["kc"]), ("sv", c["vc"])):
            gathered = cache[c["table"].long()].flatten(1, 2)[:, :c["keys"]]
            c[name] = gathered.transpose(1, 2).contiguous()
        c["sq"] = c["q"].view(batch, SUB, HEADS, HEAD_DIM).transpose(1, 2)

    def each(fn, *args):
        return [lambda c=c: fn(c, *args) for c in cases]

    row = {"batch": batch, "context": context, "dtype": str(dtype).removeprefix("torch."),
           "timing": "graph" if graph else "launch", "copies": copies,
           "ours_ms": _time(each(ours), graph), "sdpa_ms": _time(each(sdpa), graph),
           "ours_split_ms": {n: _time(each(ours, n), graph) for n in SPLITS}}
    row["best_splits"] = min(row["ours_split_ms"], key=row["ours_split_ms"].get)
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        def vllm_unified(c: dict):
            unified_attention(c["q"], c["kc"], c["vc"], c["out"], c["qsl"], SUB, c["seq_lens"],
                              c["sub_end"], scale, True, (-1, -1), c["table"], 0, None, None,
                              None)

        row["vllm_unified_ms"] = _time(each(vllm_unified), graph)
    except Exception as error:  # reported, not hidden: the row says why it is missing
        row["vllm_unified_error"] = f"{type(error).__name__}: {error}"[:200]
    row["ours_tb_s"] = bytes_read / row["ours_ms"] / 1e9
    if peak:
        row["ours_roofline"] = row["ours_tb_s"] / peak
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--launch-timing", action="store_true",
                        help="time calls launched from Python (as before 2026-12-06) instead of "
                             "replayed from CUDA graphs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TB_S.items() if k in name), None)
    rows = []
    print(f"{name}; HBM peak {peak} TB/s")
    print("batch context | ours ms | 1 split ms | best ms (S) | sdpa ms | vllm ms | ours TB/s | "
          "roofline")
    for batch in args.batch:
        for context in args.context:
            row = run(batch, context, torch.bfloat16, peak, not args.launch_timing)
            rows.append(row)
            split = row["ours_split_ms"][row["best_splits"]]
            print(f"{batch:5d} {context:7d} | {row['ours_ms']:7.3f} | "
                  f"{row['ours_split_ms'][1]:10.3f} | {split:7.3f} "
                  f"({row['best_splits']:2d}) | {row['sdpa_ms']:7.3f} | "
                  f"{row.get('vllm_unified_ms', float('nan')):7.3f} | {row['ours_tb_s']:9.2f} | "
                  f"{row.get('ours_roofline', float('nan')):.2f}", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"card": name, "peak_tb_s": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
