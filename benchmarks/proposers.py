"""Training-free speculative proposers on an AR model through vLLM, against no speculation and
vLLM's own `ngram` and `suffix` proposers.

Per method, task (the testbed tasks; prompts from their test split) and batch size: mean
acceptance length (vLLM's: 1 + accepted / drafts), tokens per target forward (output tokens over
forwards, each forward of a request yielding one sampled token plus its accepted drafts), wall
time and its speedup over no speculation (vLLM's default runner, Model Runner V2, and the V1
runner that speculation runs on), and the share of the worker's step time spent in `propose`.
Every engine first decodes a few train-split prompts of every task (not counted), so tables that
learn across requests (Token Recycling, ADED, suffix) start warm, as in serving. Greedy decoding,
`num_speculative_tokens` 4. Prints a table and writes JSON.

    python benchmarks/proposers.py                      # CPU, the bundled testbed AR model
    bash scripts/build_suffix_decoding.sh               # once, for vLLM's `suffix` rows
    python benchmarks/proposers.py --shape qwen3-1.7b   # random weights of a realistic shape
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from throughput import SHAPES, write_shape

# Callables sent to the workers (timing `propose`) are pickled.
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ROOT = Path(__file__).resolve().parents[1]
# vLLM's `suffix` proposer imports arctic_inference.suffix_decoding, which
# scripts/build_suffix_decoding.sh builds alone into .suffix/ (engine processes inherit the path).
SUFFIX = ROOT / ".suffix"
if SUFFIX.is_dir():
    sys.path.insert(0, str(SUFFIX))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUFFIX),
                                                             os.environ.get("PYTHONPATH")]))
TESTBED = ROOT / "examples" / "models" / "qwen3-testbed"
TASKS = ("arithmetic", "lists", "json", "code")
PROPOSERS = "vllm_blockdiff.proposers"
# Method -> speculative_config (None: no speculation) and whether it forces the V1 runner.
METHODS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "none_v1": None,
    "token_recycling": {"method": "custom_class",
                        "model": f"{PROPOSERS}.token_recycling.TokenRecyclingProposer"},
    "aded": {"method": "custom_class", "model": f"{PROPOSERS}.aded.ADEDProposer"},
    "input_copy": {"method": "custom_class",
                   "model": f"{PROPOSERS}.input_copy.InputCopyProposer"},
    "ngram": {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 4},
    "suffix": {"method": "suffix"},
}
SEED_METHODS = ("token_recycling", "aded", "input_copy")


class Row(msgspec.Struct):
    method: str
    task: str
    batch: int
    requests: int
    output_tokens: int
    drafts: int
    draft_tokens: int
    accepted: int
    acceptance_length: float
    tokens_per_forward: float
    seconds: float
    propose_share: float | None  # time in `propose` / worker step time (None: no proposer)


def _timed(worker: Any) -> None:
    """Wraps the worker's step and its drafter's `propose` with timers (RPC to each worker)."""
    runner = worker.model_runner
    clock = runner.proposer_clock = {"step": 0.0, "propose": 0.0}

    def timing(fn: Callable, key: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - t
        return timed

    runner.execute_model = timing(runner.execute_model, "step")
    runner.sample_tokens = timing(runner.sample_tokens, "step")
    drafter = getattr(runner, "drafter", None)
    if drafter is not None:
        drafter.propose = timing(drafter.propose, "propose")


def _clock(worker: Any) -> dict[str, float]:
    return dict(worker.model_runner.proposer_clock)


def _counters(llm: Any) -> dict[str, float]:
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    found = {m.name.removeprefix("vllm:spec_decode_"): m.value for m in llm.get_metrics()
             if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value")}
    return {n: found.get(n, 0) for n in names}


def run_method(name: str, model: str, dummy: bool, k: int,
               prompts: dict[tuple[str, int], list[str]],
               warmup: list[str], batches: list[int], max_tokens: int,
               on_row: Callable[[Row], None]) -> None:
    """Rows for every task and batch size of one method, on one engine."""
    from vllm import LLM, SamplingParams

    spec = METHODS[name]
    if name == "none_v1":
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    try:
        llm = LLM(model, dtype="float32" if not dummy else "bfloat16", seed=0,
                  load_format="dummy" if dummy else "auto", enforce_eager=not dummy,
                  max_model_len=1024, max_num_seqs=max(batches), gpu_memory_utilization=0.5,
                  disable_log_stats=False,
                  speculative_config={**spec, "num_speculative_tokens": k} if spec else None)
    finally:
        os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate(warmup, params, use_tqdm=False)
    llm.collective_rpc(_timed)
    for (task, batch), task_prompts in prompts.items():
        before, clock0 = _counters(llm), llm.collective_rpc(_clock)[0]
        t = time.perf_counter()
        outs = []
        for i in range(0, len(task_prompts), batch):  # `batch` requests at a time
            outs += llm.generate(task_prompts[i:i + batch], params, use_tqdm=False)
        seconds = time.perf_counter() - t
        after, clock1 = _counters(llm), llm.collective_rpc(_clock)[0]
        d = {key: int(after[key] - before[key]) for key in after}
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        step = clock1["step"] - clock0["step"]
        on_row(Row(
            method=name, task=task, batch=batch, requests=len(outs), output_tokens=tokens,
            drafts=d["num_drafts"], draft_tokens=d["num_draft_tokens"],
            accepted=d["num_accepted_tokens"],
            acceptance_length=round(1 + d["num_accepted_tokens"] / max(d["num_drafts"], 1),
                                    3),
            tokens_per_forward=round(tokens / (tokens - d["num_accepted_tokens"]), 3),
            seconds=round(seconds, 3),
            propose_share=round((clock1["propose"] - clock0["propose"]) / step, 4)
            if spec else None))
    del llm


def report(rows: list[Row]) -> list[str]:
    base = {(r.task, r.batch): r for r in rows if r.method == "none"}
    base_v1 = {(r.task, r.batch): r for r in rows if r.method == "none_v1"}
    lines = [f"{'method':16} {'task':10} {'batch':>5} {'acc.len':>7} {'TPF':>6} {'TPF x':>6} "
             f"{'s':>7} {'vs none':>7} {'vs V1':>6} {'propose%':>8}"]
    for r in rows:
        key = (r.task, r.batch)
        ref, ref_v1 = base.get(key), base_v1.get(key)
        tpf_gain = r.tokens_per_forward / ref.tokens_per_forward if ref else float("nan")
        speed = ref.seconds / r.seconds if ref else float("nan")
        speed_v1 = ref_v1.seconds / r.seconds if ref_v1 else float("nan")
        share = f"{100 * r.propose_share:8.2f}" if r.propose_share is not None else f"{'-':>8}"
        lines.append(f"{r.method:16} {r.task:10} {r.batch:5d} {r.acceptance_length:7.2f} "
                     f"{r.tokens_per_forward:6.2f} {tpf_gain:6.2f} {r.seconds:7.2f} "
                     f"{speed:7.2f} {speed_v1:6.2f} {share}")
    return lines


def main() -> None:
    from vllm_blockdiff.testbed.tasks import generate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(TESTBED), help="an AR checkpoint (default: testbed)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="random weights of this shape instead of --model (cost, not acceptance)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts", type=int, default=8,
                   help="test prompts per task and batch size (at least the batch size)")
    p.add_argument("--warmup", type=int, default=8, help="train prompts per task, not counted")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/proposers_cpu_testbed.json"))
    a = p.parse_args()
    # Each batch size decodes its own prompts: tables that learn across requests never see a
    # test prompt twice.
    sizes = [max(b, a.prompts) for b in a.batch]
    tests = {t: [e.prompt for e in generate(t, "test", sum(sizes))] for t in TASKS}
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    prompts = {(t, b): tests[t][s:s + n] for t in TASKS
               for b, s, n in zip(a.batch, starts, sizes, strict=True)}
    warmup = [e.prompt for t in TASKS for e in generate(t, "train", a.warmup)]
    rows: list[Row] = []
    skipped: dict[str, str] = {}

    def save(row: Row | None = None) -> None:
        if row is not None:
            rows.append(row)
            print(msgspec.json.encode(row).decode(), flush=True)
        Path(a.out).write_text(json.dumps({
            "model": a.shape or a.model, "random_weights": a.shape is not None, "k": a.k,
            "max_tokens": a.max_tokens, "batches": a.batch, "warmup_prompts_per_task": a.warmup,
            "test_prompts": {b: max(b, a.prompts) for b in a.batch},
            "ngram": METHODS["ngram"], "skipped": skipped,
            "rows": msgspec.to_builtins(rows)}, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        model = write_shape(Path(tmp), a.shape, "qwen3") if a.shape else a.model
        for name in a.methods:
            if name == "suffix" and importlib.util.find_spec("arctic_inference") is None:
                skipped[name] = ("vLLM's suffix proposer needs arctic-inference: "
                                 "bash scripts/build_suffix_decoding.sh")
                save()
                continue
            run_method(name, model, a.shape is not None, a.k, prompts, warmup, a.batch,
                       a.max_tokens, save)
    print("\n".join(report(rows)))
    for name, why in skipped.items():
        print(f"{name}: not run ({why})")


if __name__ == "__main__":
    main()
