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
Every call is timed as replayed from a CUDA graph, as the plugin serves attention. The results
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


def _time(fn, graph: bool, iters: int = 20) -> float:
    """Median milliseconds of one `fn` call over CUDA events. With `graph`, as the plugin serves
    attention (inside FULL CUDA graphs): REPLAYS calls captured in one graph and replayed, so
    the host's launch cost is not counted; without, each call is launched from Python, whose
    launch cost (tens of microseconds per Triton launch) small calls then measure."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    call, per_call = fn, 1
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(REPLAYS):
                fn()
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


def run(batch: int, context: int, dtype: torch.dtype, peak: float | None, graph: bool) -> dict:
    c = _case(batch, context, dtype)
    scale = HEAD_DIM ** -0.5
    out = torch.empty_like(c["q"])

    def ours(num_splits: int | None = None):
        paged_block_causal_attention_triton(
            c["q"], c["kc"], c["vc"], out, c["qsl"], c["seq_lens"], c["table"], c["kv_limit"],
            c["skip"], c["skip"], scale, SUB, num_splits=num_splits)

    # SDPA on the same keys, gathered once (untimed) into [batch, kv_heads, keys, dim].
    k = c["kc"][c["table"].long()].flatten(1, 2)[:, :c["keys"]].transpose(1, 2).contiguous()
    v = c["vc"][c["table"].long()].flatten(1, 2)[:, :c["keys"]].transpose(1, 2).contiguous()
    q = c["q"].view(batch, SUB, HEADS, HEAD_DIM).transpose(1, 2)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    row = {"batch": batch, "context": context, "dtype": str(dtype).removeprefix("torch."),
           "timing": "graph" if graph else "launch",
           "ours_ms": _time(ours, graph), "sdpa_ms": _time(sdpa, graph),
           "ours_split_ms": {n: _time(lambda n=n: ours(n), graph) for n in SPLITS}}
    row["best_splits"] = min(row["ours_split_ms"], key=row["ours_split_ms"].get)
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        def vllm_unified():
            unified_attention(c["q"], c["kc"], c["vc"], out, c["qsl"], SUB, c["seq_lens"],
                              c["sub_end"], scale, True, (-1, -1), c["table"], 0, None, None,
                              None)

        row["vllm_unified_ms"] = _time(vllm_unified, graph)
    except Exception as error:  # reported, not hidden: the row says why it is missing
        row["vllm_unified_error"] = f"{type(error).__name__}: {error}"[:200]
    bytes_read = 2 * batch * c["keys"] * KV_HEADS * HEAD_DIM * c["kc"].element_size()
    bytes_read += 2 * c["q"].numel() * c["q"].element_size()
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
