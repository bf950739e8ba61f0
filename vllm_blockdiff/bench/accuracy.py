"""Accuracy against speed: the testbed tasks through vLLM, per policy and block length.

    python -m vllm_blockdiff.bench.accuracy --model examples/models/sdar-testbed \
        --ar-model examples/models/qwen3-testbed --policies threshold:0.9,static:2 \
        --block-sizes 4,8,16 --n 50 --out results/accuracy

Runs every task's examples through the offline vLLM API (greedy), scores them with the task's
exact scorer, and prints one row per (task, policy, block length): accuracy, model forwards per
request, tokens per forward and output tokens/s. Writes `<out>.json` and a PNG plot of accuracy
against tokens per forward. The AR twin (optional) is the one-token-per-forward baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import msgspec

from vllm_blockdiff.policies import POLICIES
from vllm_blockdiff.testbed.data import encode_prompt
from vllm_blockdiff.testbed.tasks import TASKS, Example, generate, score

DEFAULT_TASKS = ("arithmetic", "lists", "json", "code")


class Row(msgspec.Struct):
    model: str
    task: str
    policy: str
    block_length: int
    n: int
    accuracy: float
    forwards_per_request: float
    tokens_per_forward: float
    tokens_per_s: float | None  # None where the row is not one timed run (an oracle)


def parse_policy(spec: str) -> dict:
    """`name`, `name:value` (the policy's first parameter) or `name:key=value:key=value`.

    A token parameter (`marker`, `delimiter`) may be given as the token's text, e.g. `marker=|`;
    a flag as `true`/`false`, e.g. `subblock:sub_block_length=8:use_block_cache=false`.
    """
    name, *parts = spec.split(":")
    if name not in POLICIES:
        raise SystemExit(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    fields = POLICIES[name].params_cls.__struct_fields__
    args: dict = {"policy": name}
    for i, part in enumerate(parts):
        key, value = part.split("=", 1) if "=" in part else (fields[i], part)
        if value in ("true", "false"):
            args[key] = value == "true"
            continue
        try:
            args[key] = float(value) if "." in value else int(value)
        except ValueError:
            args[key] = value  # a token's text, resolved with the model's tokenizer
    return args


def resolve_tokens(args: dict, tokenizer) -> dict:
    """Token parameters given as text -> the token's id (it must be a single token)."""
    out = dict(args)
    for key in ("marker", "delimiter"):
        if isinstance(out.get(key), str):
            ids = tokenizer.encode(out[key], add_special_tokens=False)
            if len(ids) != 1:
                raise SystemExit(f"{key}={out[key]!r} is {len(ids)} tokens, not one")
            out[key] = ids[0]
    return out


class Outcome(msgspec.Struct):
    """One request: graded correct or not, output tokens, and model forwards it took."""

    correct: bool
    tokens: int
    forwards: int


def run_tasks(llm, examples: dict[str, list[Example]],
              extra: dict | None) -> tuple[dict[str, list[Outcome]], float]:
    """Every task's examples through the engine in one batch: outcomes per task, and wall time.

    `extra` is the request's policy arguments, or None for an autoregressive model (one forward
    per output token). Prompts are encoded and outputs decoded with the checkpoint's own
    `tokenizer.json`, as in training: transformers 5 swaps in Qwen2's tokenizer for any
    `model_type: qwen2` checkpoint, which would re-split the Qwen2-layout twin's prompts.
    """
    from tokenizers import Tokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = Tokenizer.from_file(str(Path(llm.llm_engine.model_config.tokenizer) / "tokenizer.json"))
    params = SamplingParams(temperature=0.0, max_tokens=96, extra_args=extra)
    flat = [(task, e) for task, exs in examples.items() for e in exs]
    prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tok, e.prompt)) for _, e in flat]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    outcomes: dict[str, list[Outcome]] = {task: [] for task in examples}
    for (task, e), o in zip(flat, outs, strict=True):
        ids = o.outputs[0].token_ids
        forwards = len(ids) if extra is None else o.kv_transfer_params["blockdiff"]["forwards"]
        text = tok.decode(ids, skip_special_tokens=True)
        outcomes[task].append(Outcome(score(task, e, text), len(ids), forwards))
    return outcomes, seconds


def summarize(outcomes: list[Outcome], seconds: float | None, model: str, task: str,
              policy: str, block_length: int) -> Row:
    """One row from per-request outcomes (`seconds` None: not one timed run)."""
    n, tokens = len(outcomes), sum(o.tokens for o in outcomes)
    forwards = sum(o.forwards for o in outcomes)
    return Row(model=model, task=task, policy=policy, block_length=block_length, n=n,
               accuracy=sum(o.correct for o in outcomes) / n, forwards_per_request=forwards / n,
               tokens_per_forward=tokens / max(forwards, 1),
               tokens_per_s=None if seconds is None else tokens / seconds)


def run_config(llm, examples: dict[str, list[Example]], extra: dict | None, label: str,
               block_length: int, model: str) -> list[Row]:
    """Every task's examples under one configuration: a row per task, each timed on its own."""
    rows = []
    for task, exs in examples.items():
        outcomes, seconds = run_tasks(llm, {task: exs}, extra)
        rows.append(summarize(outcomes[task], seconds, model, task, label, block_length))
    return rows


def engine(path: str, diffusion: bool = False):
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    on_gpu = os.path.exists("/dev/nvidia0")
    # Room for FreeDave's drafts: 4 at B=16, 8 at B=8 (one block each beyond the first).
    extra = {"additional_config": {"blockdiff": {"canvas_length": 64}}} if diffusion else {}
    return LLM(path, dtype="float32" if not on_gpu else "bfloat16", max_model_len=1024,
               gpu_memory_utilization=0.3 if not on_gpu else 0.5, enforce_eager=not on_gpu,
               max_num_seqs=256, seed=0, **extra)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in (r for r in rows if r.task == task):
            marker = "s" if r.policy == "AR" else "o"
            ax.scatter(r.tokens_per_forward, r.accuracy, marker=marker)
            label = r.policy if r.policy == "AR" else f"{r.policy} B{r.block_length}"
            ax.annotate(label, (r.tokens_per_forward, r.accuracy),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(task)
        ax.set_xlabel("tokens per forward")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="block-diffusion checkpoint")
    p.add_argument("--ar-model", help="its autoregressive twin (baseline)")
    p.add_argument("--tasks", default="all", help=f"comma list or 'all' ({','.join(TASKS)})")
    p.add_argument("--policies", default="threshold:0.9")
    p.add_argument("--block-sizes", default="4,8,16")
    p.add_argument("--n", type=int, default=50, help="examples per task")
    p.add_argument("--split", default="test", choices=["test", "hard"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/accuracy")
    a = p.parse_args()

    from tqdm import tqdm

    tasks = DEFAULT_TASKS if a.tasks == "all" else tuple(a.tasks.split(","))
    examples = {t: generate(t, a.split, a.n, a.seed) for t in tasks}
    policies = [(spec, parse_policy(spec)) for spec in a.policies.split(",")]
    blocks = [int(b) for b in a.block_sizes.split(",")]
    rows: list[Row] = []
    configs = [(None, 1)] * bool(a.ar_model) + [(p, b) for p in policies for b in blocks]
    with tqdm(total=len(configs), desc="configurations") as bar:
        if a.ar_model:
            llm = engine(a.ar_model)
            rows += run_config(llm, examples, None, "AR", 1, a.ar_model)
            bar.update()
            del llm
        llm = engine(a.model, diffusion=True)
        for (spec, pol), b in configs[bool(a.ar_model):]:
            extra = {**resolve_tokens(pol, llm.get_tokenizer()), "block_length": b}
            rows += run_config(llm, examples, extra, spec, b, a.model)
            bar.update()
    header = f"{'task':10} {'policy':18} {'B':>3} {'acc':>6} {'fwd/req':>8} {'TPF':>6} {'tok/s':>8}"
    print("\n" + header)
    for r in sorted(rows, key=lambda r: (r.task, r.policy != "AR", r.policy, r.block_length)):
        print(f"{r.task:10} {r.policy:18} {r.block_length:3d} {r.accuracy:6.3f} "
              f"{r.forwards_per_request:8.1f} {r.tokens_per_forward:6.2f} {r.tokens_per_s:8.1f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(a), "rows": msgspec.to_builtins(rows)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
