"""Decode throughput of block diffusion against the autoregressive twin, side by side in one run.

Both engines load the same architecture shape (SDAR = Qwen3 + block-causal attention, or with
`--family fast_dllm` Fast-dLLM v2 = Qwen2.5 + block-causal attention and shifted logits), with
`load_format=dummy` random weights for model shapes whose checkpoints are not available here, so
the comparison is of the serving path at a controlled tokens-per-forward: the `static` policy with
`steps` S commits B / S tokens per forward whatever the weights. Per engine it also times the
first token of a `--ttft-prompt-len` prompt (TTFT). With `--scheduling sync,async` the diffusion
engine is served twice, the second time with `--async-scheduling` (windows of two blocks planned
while the previous step runs: `engine/scheduler.py`), in the same run. Prints a table and writes
JSON; each row names the card.

    python benchmarks/throughput.py --shape qwen3-1.7b --out benchmarks/results/throughput_h100.json
    python benchmarks/throughput.py --family fast_dllm --shape qwen2.5-1.5b --configs 32:8
    python benchmarks/throughput.py --shape qwen3-1.7b --scheduling sync,async --batch 1 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import msgspec

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, head dim, vocab
    "tiny": (128, 384, 2, 4, 2, 32, 384),
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 151936),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, 151936),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 128, 151936),  # Fast-dLLM v2 1.5B
}
# The diffusion family and its AR twin: SDAR on Qwen3, Fast-dLLM v2 on Qwen2.5.
FAMILIES = {"sdar": "qwen3", "fast_dllm": "qwen2"}
DIFFUSION = set(FAMILIES)


class Row(msgspec.Struct):
    engine: str  # "ar", "diffusion", or "diffusion-async" (asynchronous scheduling)
    block_length: int
    steps: int
    batch: int
    output_tokens: int
    seconds: float  # the median of the timed runs
    tokens_per_s: float
    forwards_per_request: float
    tokens_per_forward: float
    ms_per_forward: float  # wall time per engine step (all requests advance together)
    card: str
    cudagraph_mode: str  # the compilation setting the engine ran with ("default": vLLM's/plugin's)
    seconds_per_run: list[float] = []  # every timed run, in order


def write_shape(root: Path, shape: str, arch: str) -> str:
    """A config-only checkpoint (weights come from load_format=dummy) plus a small tokenizer."""
    from vllm_blockdiff.reference.modeling import ModelArgs
    from vllm_blockdiff.tools.checkpoint import model_config, train_tokenizer, write_tokenizer
    from vllm_blockdiff.tools.make_tiny_checkpoint import stdlib_corpus

    hidden, inter, layers, heads, kv, hd, vocab = SHAPES[shape]
    out = root / f"{shape}-{arch}"
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out, train_tokenizer(stdlib_corpus(), 384))
    qwen2 = arch in ("fast_dllm", "qwen2")  # q/k/v biases, no q/k norms, tied embeddings
    args = ModelArgs(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=hd, attention_bias=qwen2,
                     qk_norm=not qwen2, tie_word_embeddings=qwen2)
    block = {"sdar": 4, "fast_dllm": 32}.get(arch)
    config = model_config(arch, args, ids, block, 4096, "bfloat16")
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def _prompts(batch: int, prompt_len: int) -> list:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[(7 * i + j) % 300 + 10 for j in range(prompt_len)])
            for i in range(batch)]


def run_engine(path: str, arch: str, configs, batches, prompt_len, max_tokens, eager,
               cudagraph_mode: str | None, ttft_prompt_len: int, on_row,
               async_scheduling: bool = False, repeats: int = 3) -> tuple[list[Row], float]:
    """Rows per (config, batch), each also passed to `on_row` as it is measured, and the seconds
    to the first token of one long prompt. A row's time is the median of `repeats` timed runs:
    one run of 17 forwards varied by 20% between calls on one H100, and a kernel compiled inside
    one run (below) no longer decides the row."""
    import torch
    from vllm import LLM, SamplingParams

    max_block = max(b for b, _ in configs)
    llm = LLM(path, load_format="dummy", dtype="bfloat16", enforce_eager=eager,
              max_model_len=max(prompt_len, ttft_prompt_len) + max_tokens + 64,
              gpu_memory_utilization=0.5, max_num_seqs=max(batches), seed=0,
              # with prefix caching, block lengths must divide the KV page (B=32 included)
              block_size=max(16, max_block) if arch in DIFFUSION else None,
              compilation_config={"cudagraph_mode": cudagraph_mode} if cudagraph_mode else {},
              # the AR twin keeps vLLM's default (asynchronous); diffusion is asked explicitly
              async_scheduling=True if async_scheduling else None,
              additional_config={"blockdiff": {"max_block_length": max(max_block, 16),
                                               "block_length": max_block}}
              if arch in DIFFUSION else {})
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    engine = "ar" if arch not in DIFFUSION else "diffusion-async" if async_scheduling \
        else "diffusion"
    rows = []
    for block_length, steps in configs:
        extra = {"policy": "static", "block_length": block_length, "steps": steps}
        for batch in batches:
            prompts = _prompts(batch, prompt_len)
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                    detokenize=False,
                                    extra_args=extra if arch in DIFFUSION else None)
            # Warm-up at the measured batch size: the sampler captures its tail graph per
            # (policy, padded request count) on first use, and Triton compiles per shape; with a
            # one-request warm-up the first configuration paid that inside its timed run. Twice:
            # the second run, like the timed one, finds the prompts' KV cached (other query
            # shapes): run right after batch 1, batch 64 compiled an attention kernel inside its
            # timed run (H100, 2026-12-07: 47.6 ms per forward, JIT warning in the log).
            for _ in range(2):
                llm.generate(prompts, params, use_tqdm=False)
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                runs.append(time.perf_counter() - t)
            dt = statistics.median(runs)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            if arch in DIFFUSION:
                fwd = sum(o.kv_transfer_params["blockdiff"]["forwards"] for o in outs) / batch
                slowest = max(o.kv_transfer_params["blockdiff"]["forwards"] for o in outs)
            else:
                fwd = slowest = max_tokens  # one forward per token (the prompt's emits the first)
            rows.append(Row(engine=engine,
                            block_length=block_length, steps=steps, batch=batch,
                            output_tokens=tokens, seconds=round(dt, 3),
                            tokens_per_s=round(tokens / dt, 1),
                            forwards_per_request=round(fwd, 2),
                            tokens_per_forward=round(tokens / batch / fwd, 3),
                            ms_per_forward=round(dt * 1e3 / slowest, 3), card=card,
                            cudagraph_mode=cudagraph_mode or "default",
                            seconds_per_run=[round(x, 4) for x in runs]))
            print(msgspec.json.encode(rows[-1]).decode(), flush=True)
            on_row(rows[-1])
    block_length, steps = configs[0]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False,
                            extra_args={"policy": "static", "block_length": block_length,
                                        "steps": steps} if arch in DIFFUSION else None)
    ttft = []
    for i in range(4):  # the first is a warm-up; distinct prompts (no prefix-cache hits)
        t = time.perf_counter()
        llm.generate([_prompts(i + 1, ttft_prompt_len)[i]], params, use_tqdm=False)
        ttft.append(time.perf_counter() - t)
    del llm
    return rows, round(min(ttft[1:]), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--family", choices=sorted(FAMILIES), default="sdar",
                   help="the diffusion family; its AR twin is served beside it")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--configs", default="4:1,8:2,16:4,32:8,4:4",
                   help="block_length:steps pairs for the diffusion engine")
    p.add_argument("--ttft-prompt-len", type=int, default=1024)
    p.add_argument("--eager", action="store_true", help="disable torch.compile / CUDA graphs")
    p.add_argument("--cudagraph-mode", default=None,
                   help="the diffusion engine's -cc.cudagraph_mode (e.g. PIECEWISE, the layout "
                        "before FULL graphs); default: the plugin's choice")
    p.add_argument("--scheduling", default="sync",
                   help="the diffusion engine's scheduling, comma-separated: sync, async "
                        "(--async-scheduling), or both, served one after the other")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per row (after two warm-ups); the row keeps their median")
    p.add_argument("--out", default="throughput.json")
    a = p.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",")]
    common = (a.batch, a.prompt_len, a.max_tokens, a.eager)
    rows: list[Row] = []
    ttft: dict = {"prompt_len": a.ttft_prompt_len}

    def save(row: Row | None = None) -> None:
        """The JSON so far: a run cut short by a time limit keeps what it measured."""
        if row is not None:
            rows.append(row)
        Path(a.out).write_text(json.dumps({
            "shape": a.shape, "family": a.family, "prompt_len": a.prompt_len,
            "max_tokens": a.max_tokens,
            "eager": a.eager, "card": rows[0].card if rows else None, "ttft": ttft,
            "rows": msgspec.to_builtins(rows)}, indent=2))

    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            twin = FAMILIES[a.family]
            _, ttft["ar_s"] = run_engine(write_shape(root, a.shape, twin), twin, [(1, 1)],
                                         *common, None, a.ttft_prompt_len, save,
                                         repeats=a.repeats)
            save()
            path = write_shape(root, a.shape, a.family)
            for mode in a.scheduling.split(","):
                key = "diffusion_s" if mode == "sync" else "diffusion_async_s"
                _, ttft[key] = run_engine(path, a.family, configs, *common, a.cudagraph_mode,
                                          a.ttft_prompt_len, save, mode == "async", a.repeats)
                save()
    except BaseException:
        # vLLM's engine process can keep a failed run alive until the device call's limit.
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    ar = {r.batch: r.tokens_per_s for r in rows if r.engine == "ar"}
    ar_ms = {r.batch: r.ms_per_forward for r in rows if r.engine == "ar"}
    header = ("engine", "B", "steps", "batch", "TPF", "ms/fwd", "vs AR", "tok/s", "vs AR")
    print(f"\n{rows[0].card}\n" + "{:15} {:>3} {:>5} {:>5} {:>6} {:>7} {:>6} {:>10} {:>6}"
          .format(*header))
    for r in rows:
        print(f"{r.engine:15} {r.block_length:3d} {r.steps:5d} {r.batch:5d} "
              f"{r.tokens_per_forward:6.2f} {r.ms_per_forward:7.2f} "
              f"{r.ms_per_forward / ar_ms[r.batch]:6.2f} {r.tokens_per_s:10.1f} "
              f"{r.tokens_per_s / ar[r.batch]:6.2f}")
    for key in ("diffusion_s", "diffusion_async_s"):
        if key in ttft:
            print(f"TTFT ({a.ttft_prompt_len}-token prompt): AR {ttft['ar_s'] * 1e3:.1f} ms, "
                  f"{key[:-2]} {ttft[key] * 1e3:.1f} ms ({ttft[key] / ttft['ar_s']:.2f}x)")


if __name__ == "__main__":
    main()
