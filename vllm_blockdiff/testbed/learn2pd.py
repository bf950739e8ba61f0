"""Train the Learn2PD filters (`policies/learn2pd.py`) of a block-diffusion checkpoint, on CPU.

    python -m vllm_blockdiff.testbed.learn2pd --model examples/models/sdar-testbed \
        --block-sizes 4,8,16 --out examples/models/sdar-testbed/learn2pd/filters.safetensors

Per block length B, the reference decoder (`vllm_blockdiff.reference`) decodes TRAIN-split prompts
of the exact tasks with the static policy, one token per forward, and every step is logged as the
filter will see it at serve time: the block's confidences, 0 where not masked. The label of a
masked position is whether its current proposal equals the token it finally gets; positions whose
final token stays unknown (the block a request stopped in) carry no label. Prompts, not steps, are
held out (steps of one block are correlated). An MLP B -> hidden -> B is fit with BCE on the
labelled positions (full batch, AdamW lr 3e-3, as the paper's notebook), and the precision of the
positions it accepts (sigmoid > accept) is reported next to a plain confidence threshold's. With
`--eval-n`, test prompts are then decoded with learn2pd and threshold 0.9 (accuracy, tokens per
forward). Writes the filters (float32, a few KB) and LEARN2PD.md beside them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from vllm_blockdiff.options import ServeConfig, resolve_options
from vllm_blockdiff.policies import PolicyInput
from vllm_blockdiff.policies.learn2pd import MLP
from vllm_blockdiff.reference.decode import generate
from vllm_blockdiff.reference.modeling import CausalLM
from vllm_blockdiff.testbed.data import encode_prompt, special_ids
from vllm_blockdiff.testbed.tasks import EXACT_TASKS, Example, score
from vllm_blockdiff.testbed.tasks import generate as task_examples


class Steps(NamedTuple):
    """Logged denoising steps of one block length: what the filter sees and what it should say."""

    confidence: torch.Tensor  # [N, B] float32, 0 where not masked
    labelled: torch.Tensor  # [N, B] bool: masked, and the position's final token is known
    correct: torch.Tensor  # [N, B] bool: the proposal equals the final token


class _Recorder:
    """`generate`'s on_step: keeps each block's steps and fills in its final tokens."""

    def __init__(self, block_length: int):
        self.block_length = block_length
        self.blocks: list[tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]] = []

    def __call__(self, inp: PolicyInput, commit: torch.Tensor) -> None:
        if int(inp.step[0]) == 0:
            self.blocks.append(([], torch.full((self.block_length,), -1)))
        steps, final = self.blocks[-1]
        steps.append((inp.confidence[0] * inp.masked[0], inp.masked[0], inp.tokens[0]))
        final[commit[0]] = inp.tokens[0, commit[0]]

    def rows(self) -> list[tuple[torch.Tensor, ...]]:
        return [(conf, masked & (final >= 0), tokens == final)
                for steps, final in self.blocks for conf, masked, tokens in steps]


class Setup(NamedTuple):
    model: CausalLM
    tok: Tokenizer
    serve: ServeConfig
    eos: int


def _max_tokens(setup: Setup, example: Example) -> int:
    return len(setup.tok.encode(example.target, add_special_tokens=False).ids) + 9


def log_steps(setup: Setup, examples: Sequence[Example], block_length: int) -> Steps:
    """Static one-token-per-forward decoding of `examples`, every step logged."""
    options = resolve_options({"policy": "static", "block_length": block_length}, setup.serve)
    rows = []
    for ex in examples:
        recorder = _Recorder(block_length)
        generate(setup.model, encode_prompt(setup.tok, ex.prompt), options,
                 setup.serve.mask_token_id, _max_tokens(setup, ex), {setup.eos}, on_step=recorder)
        rows += recorder.rows()
    return Steps(*(torch.stack(column) for column in zip(*rows, strict=True)))


def train_filter(steps: Steps, hidden: int, iters: int, lr: float, seed: int) -> tuple[MLP, float]:
    """Fit f: B -> hidden -> B with BCE on the labelled positions; returns it and the final loss."""
    torch.manual_seed(seed)
    b = steps.confidence.shape[1]
    net = nn.Sequential(nn.Linear(b, hidden), nn.ReLU(), nn.Linear(hidden, b))
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    weight = steps.labelled.float()
    target = steps.correct.float()
    for _ in range(iters):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(net(steps.confidence), target, weight,
                                                  reduction="sum") / weight.sum()
        loss.backward()
        opt.step()
    first, second = net[0], net[2]
    mlp = MLP(first.weight, first.bias, second.weight, second.bias)
    return MLP(*(t.detach().clone() for t in mlp)), loss.item()


def precision(accepted: torch.Tensor, steps: Steps) -> dict[str, float]:
    """How many labelled positions `accepted` [N, B] commits, per step, and how many rightly."""
    hits = accepted & steps.labelled
    n = int(hits.sum())
    return {"accepted": n, "per_step": n / len(hits),
            "precision": int((hits & steps.correct).sum()) / max(n, 1)}


def decode_eval(setup: Setup, examples: dict[str, list[Example]], extra: dict,
                serve_defaults: dict | None = None) -> dict[str, float]:
    """Greedy accuracy and tokens per forward (the prompt's forward included) over all tasks;
    `serve_defaults` are what a server would set (the filter file)."""
    serve = msgspec.structs.replace(setup.serve, policy_defaults=serve_defaults or {})
    options = resolve_options(extra, serve)
    correct = tokens = forwards = 0
    for task, exs in examples.items():
        for ex in exs:
            gen = generate(setup.model, encode_prompt(setup.tok, ex.prompt), options,
                           setup.serve.mask_token_id, _max_tokens(setup, ex), {setup.eos})
            ids = gen.token_ids[:-1] if gen.finish_reason == "stop" else gen.token_ids
            correct += score(task, ex, setup.tok.decode(ids, skip_special_tokens=False))
            tokens += len(gen.token_ids)
            forwards += gen.forwards
    n = sum(len(exs) for exs in examples.values())
    return {"accuracy": correct / n, "tokens_per_forward": tokens / forwards}


def _table(header: Sequence[str], rows: list[Sequence]) -> list[str]:
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(cell(v) for v in row)} |" for row in rows)]


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="block-diffusion checkpoint directory")
    p.add_argument("--out", required=True, help="filter file to write (.safetensors)")
    p.add_argument("--block-sizes", default="4,8,16")
    p.add_argument("--tasks", default=",".join(EXACT_TASKS))
    p.add_argument("--n", type=int, default=80, help="training prompts per task")
    p.add_argument("--held-out", type=int, default=20, help="held-out prompts per task")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--iters", type=int, default=2000, help="full-batch AdamW steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--accept", type=float, default=0.96, help="sigmoid cut for the metrics")
    p.add_argument("--eval-n", type=int, default=20,
                   help="test prompts per task decoded with learn2pd vs threshold 0.9 (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    command = "python -m vllm_blockdiff.testbed.learn2pd " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    tasks = args.tasks.split(",")

    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    ids = special_ids(tok)
    serve = ServeConfig(block_length=block_sizes[0], max_block_length=max(block_sizes),
                        mask_token_id=ids.mask)
    setup = Setup(CausalLM.from_pretrained(args.model, dtype=torch.float32).eval(), tok, serve,
                  ids.eos)
    split = {"train": [], "held_out": []}
    for task in tasks:
        exs = task_examples(task, "train", args.n + args.held_out, args.seed)
        split["train"] += exs[:args.n]
        split["held_out"] += exs[args.n:]

    started = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    filter_rows, threshold_rows = [], []
    for b in block_sizes:
        logged = {name: log_steps(setup, exs, b) for name, exs in split.items()}
        mlp, loss = train_filter(logged["train"], args.hidden, args.iters, args.lr, args.seed)
        tensors |= {f"B{b}.{name}": t.contiguous() for name, t in mlp._asdict().items()}
        for name, steps in logged.items():
            with torch.no_grad():
                accepted = torch.sigmoid(mlp(steps.confidence)) > args.accept
            m = precision(accepted, steps)
            t = precision(steps.confidence >= 0.9, steps)
            filter_rows.append([b, name, len(steps.confidence), int(steps.labelled.sum()),
                                m["accepted"], m["per_step"], m["precision"], loss])
            threshold_rows.append([b, name, t["accepted"], t["per_step"], t["precision"]])
            print(f"B={b} {name}: {len(steps.confidence)} steps, filter accepts {m['accepted']} "
                  f"({m['per_step']:.2f}/step) at precision {m['precision']:.4f}; conf>=0.9 "
                  f"accepts {t['accepted']} at {t['precision']:.4f} (train loss {loss:.4f})",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    train_seconds = time.perf_counter() - started

    eval_rows = []
    if args.eval_n:
        tests = {task: task_examples(task, "test", args.eval_n, args.seed) for task in tasks}
        for b in block_sizes:
            for label, extra in (("learn2pd", {"policy": "learn2pd", "accept": args.accept}),
                                 ("threshold:0.9", {"policy": "threshold", "threshold": 0.9})):
                r = decode_eval(setup, tests, extra | {"block_length": b}, {"filter": str(out)})
                eval_rows.append([b, label, r["accuracy"], r["tokens_per_forward"]])
                print(f"B={b} {label}: accuracy {r['accuracy']:.3f}, tokens per forward "
                      f"{r['tokens_per_forward']:.2f}", flush=True)

    lines = [
        f"# Learn2PD filters: `{out.name}`", "",
        "Trained by `vllm_blockdiff.testbed.learn2pd` (see `vllm_blockdiff/policies/learn2pd.py`)"
        " on CPU:", "", "```", command, "```", "",
        f"- seed {args.seed}; tasks {', '.join(tasks)}; {args.n} train + {args.held_out} held-out "
        f"TRAIN-split prompts per task; MLP B -> {args.hidden} -> B, {args.iters} full-batch AdamW "
        f"steps, lr {args.lr}; logging + training {train_seconds:.0f} s; "
        f"{out.stat().st_size} bytes",
        "- steps: static decoding, one token per forward; labelled = masked positions whose final "
        f"token is known; accepted = sigmoid > {args.accept}", "",
        *_table(["B", "prompts", "steps", "labelled", "filter accepted", "per step", "precision",
                 "train loss"], filter_rows), "",
        "Confidence >= 0.9 on the same steps:", "",
        *_table(["B", "prompts", "accepted", "per step", "precision"], threshold_rows),
    ]
    if eval_rows:
        lines += ["", f"Reference decoder, {args.eval_n} TEST-split prompts per task, greedy "
                  "(tokens per forward include the prompt's forward):", "",
                  *_table(["B", "policy", "accuracy", "tokens per forward"], eval_rows)]
    out.with_name("LEARN2PD.md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
