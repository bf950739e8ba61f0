"""Train a tiny SDAR block-diffusion model or its autoregressive Qwen3 twin on the testbed tasks
(or, in Qwen2's layout, a Fast-dLLM v2 model and its AR twin).

    python -m vllm_blockdiff.testbed.train --arch qwen3 --out out/qwen3-testbed --budget-s 240
    python -m vllm_blockdiff.testbed.train --arch sdar --out out/sdar-testbed --budget-s 270
    python -m vllm_blockdiff.testbed.train --arch sdar --out /tmp/smoke --smoke   # CPU, seconds
    python -m vllm_blockdiff.testbed.train --arch qwen3 --out out/qwen3 --mix parallel  # + issue 13
    python -m vllm_blockdiff.testbed.train --arch qwen2 --out out/qwen2-testbed \
        --tokenizer examples/models/qwen3-testbed/tokenizer.json --budget-s 170
    python -m vllm_blockdiff.testbed.train --arch fast_dllm --out out/fast-dllm-testbed \
        --init-from out/qwen2-testbed --block-sizes 8,16,32 --eval-block-size 32 --budget-s 170

Both archs share the network, tokenizer (trained here, byte-level BPE; identical for equal --seed,
--vocab-size and --tokenizer-examples) and data; only the loss differs: SDAR block diffusion with
a block size drawn per batch from --block-sizes (so the block size can vary at inference), or the
plain causal LM loss; Fast-dLLM v2's is SDAR's with logits shifted by one and complementary
masks (`testbed/objectives.py`). `--init-from DIR` starts from a trained checkpoint instead (the
recipe of both: adapt the AR twin). `--budget-s` sizes the run to a time budget and records
the step count that reproduces it. The checkpoint is written in the HF layout the plugin serves,
in bfloat16, with TRAINING.md and training.json recording the command, seed, configuration and
final metrics (greedy accuracy from `testbed.evaluate`).

Runs are bitwise deterministic given --seed on CPU. On CUDA the data, initialisation, masks and
block sizes are seeded identically, but kernels are not forced into deterministic modes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import torch
from tokenizers import Tokenizer
from torch import nn

from vllm_blockdiff.reference.modeling import CausalLM, ModelArgs
from vllm_blockdiff.testbed.data import (
    DEFAULT_MIX,
    MIXES,
    Encoded,
    SpecialIds,
    build_tokenizer,
    encode,
    special_ids,
    train_mixture,
)
from vllm_blockdiff.testbed.evaluate import TaskScore, evaluate
from vllm_blockdiff.testbed.objectives import ar_loss, sdar_loss
from vllm_blockdiff.testbed.tasks import EXACT_TASKS, PARALLEL_TASKS
from vllm_blockdiff.tools.checkpoint import write_checkpoint


class TrainConfig(msgspec.Struct, kw_only=True):
    """Everything that determines the trained weights (with the Python/torch versions)."""

    arch: str
    out: str
    seed: int = 0
    steps: int = 4000
    batch_size: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    vocab_size: int = 768
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    seq_len: int = 128
    block_sizes: list[int] = msgspec.field(default_factory=lambda: [4, 8, 16])
    mask_eps: float = 1e-3
    loss_weighting: str = "inv_t"
    train_examples: int = 400_000
    mix: dict[str, float] = msgspec.field(default_factory=lambda: dict(DEFAULT_MIX))
    tokenizer_examples: int = 50_000
    tokenizer: str | None = None
    init_from: str | None = None
    eval_n: int = 200
    eval_splits: list[str] = msgspec.field(default_factory=lambda: ["test", "hard"])
    eval_block_size: int = 4
    eval_batch_size: int = 256
    device: str = "auto"
    compile: bool = False
    budget_s: float = 0.0
    log_every: int = 100


# --smoke: a network small enough to train a few steps on CPU in seconds (flags still override).
SMOKE = {
    "steps": 4, "batch_size": 8, "warmup": 1, "vocab_size": 320, "hidden_size": 32,
    "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
    "train_examples": 400, "tokenizer_examples": 400, "eval_n": 4, "log_every": 1,
}


HELP = {
    "steps": "optimizer steps (the cosine schedule's length); see --budget-s",
    "budget_s": "seconds for the training loop: the step count is set after the warmup from the "
                "measured step time (data preparation and evaluation come on top)",
    "block_sizes": "SDAR block sizes, one drawn per batch; repeat one to weight it (4,4,8,16)",
    "loss_weighting": "inv_t: CE/t over loss-eligible tokens (ELBO); mean: plain mean over masked",
    "mask_eps": "mask ratios are drawn from U(eps, 1) per block",
    "seq_len": "pad length of training sequences; longer examples are dropped",
    "train_examples": "size of the fixed training pool, split across tasks by --mix",
    "tokenizer": "use this tokenizer.json instead of training one",
    "init_from": "start from this checkpoint's weights and tokenizer (e.g. the AR twin)",
    "eval_n": "examples per task and split for the greedy accuracy in TRAINING.md",
    "eval_splits": "comma separated splits to evaluate (test = in distribution, hard = held out)",
    "eval_block_size": "SDAR block size of the evaluator and of config.json",
    "compile": "torch.compile the model for training",
    "smoke": "tiny CPU-sized run for tests",
}


class TrainStats(msgspec.Struct):
    losses: list[float]  # one per step
    steps: int  # the schedule's length: cfg.steps, or what --budget-s chose
    seconds: float
    ms_per_step: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Archs with Qwen2's layers (Fast-dLLM v2 is Qwen2.5): q/k/v biases, no q/k norms, tied embeddings.
QWEN2_ARCHS = ("qwen2", "fast_dllm")
DIFFUSION_ARCHS = ("sdar", "fast_dllm")
ARCHS = ("qwen3", "sdar", "qwen2", "fast_dllm")


def model_args(cfg: TrainConfig, vocab_size: int) -> ModelArgs:
    qwen2 = cfg.arch in QWEN2_ARCHS
    return ModelArgs(
        attention_bias=qwen2,
        qk_norm=not qwen2,
        tie_word_embeddings=qwen2,
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
    )


def build_model(args: ModelArgs, seed: int) -> CausalLM:
    """GPT-2-style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
    torch.manual_seed(seed)
    model = CausalLM(args)
    residual_std = 0.02 / math.sqrt(2 * args.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            out_proj = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(p, std=residual_std if out_proj else 0.02)
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, total: list[int]):
    """AdamW (no decay on norm gains) with linear warmup then cosine decay to min_lr_ratio * lr.

    `total` is a one-element list holding the schedule length, so --budget-s can set it once the
    warmup (which does not depend on it) has been timed.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay,
                                                               "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, total[0] - cfg.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(
    model: CausalLM,
    data: Encoded,
    cfg: TrainConfig,
    special: SpecialIds,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> TrainStats:
    """Train in place; returns per-step losses.

    With cfg.budget_s the step count is chosen at the end of the warmup from the measured step
    time, so the run fits the budget; the schedule before that point does not depend on the step
    count, so `--steps <chosen>` reproduces the run exactly.
    """
    model.to(device).train()
    forward = torch.compile(model) if cfg.compile else model
    total = [max(cfg.steps, cfg.warmup) if cfg.budget_s else cfg.steps]
    opt, sched = make_optimizer(model, cfg, device, total)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    pick_block = random.Random(cfg.seed)
    ids, plen, length = (t.to(device) for t in data)
    losses: list[torch.Tensor] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    pad_align = max(cfg.block_sizes)
    probe_from = cfg.warmup // 4  # skip the first steps (allocator, autotuning, compilation)
    t0 = t_probe = time.monotonic()
    step = 0
    while step < total[0]:
        if cfg.budget_s and step == probe_from:
            _sync(device)
            t_probe = time.monotonic()
        rows = torch.randint(ids.shape[0], (cfg.batch_size,), device=device, generator=gen)
        with autocast:
            if cfg.arch in DIFFUSION_ARCHS:
                block = pick_block.choice(cfg.block_sizes)
                loss = sdar_loss(forward, ids[rows], plen[rows], length[rows], block, special.mask,
                                 pad_align, cfg.mask_eps, cfg.loss_weighting, gen,
                                 shifted=cfg.arch == "fast_dllm")
            else:
                loss = ar_loss(forward, ids[rows], plen[rows], length[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        step += 1
        if cfg.budget_s and step == max(cfg.warmup, probe_from + 1):
            _sync(device)
            now = time.monotonic()
            per_step = (now - t_probe) / (step - probe_from)
            total[0] = max(step, step + int((cfg.budget_s - (now - t0)) / per_step))
            log(f"--budget-s {cfg.budget_s:.0f}: {1000 * per_step:.1f} ms/step, "
                f"training {total[0]} steps (reproduce with --steps {total[0]})")
        if step % cfg.log_every == 0 or step == total[0]:
            window = torch.stack(losses[-cfg.log_every :]).mean().item()
            per_step = (time.monotonic() - t0) / step
            log(f"step {step}/{total[0]} loss {window:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{1000 * per_step:.1f} ms/step eta {per_step * (total[0] - step):.0f}s")
    _sync(device)
    seconds = time.monotonic() - t0
    return TrainStats(torch.stack(losses).tolist(), total[0], seconds, 1000 * seconds / step)


def load_or_train_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """--tokenizer, else the --init-from checkpoint's, else a new one trained on the tasks."""
    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer)
    if cfg.init_from:
        return Tokenizer.from_file(str(Path(cfg.init_from) / "tokenizer.json"))
    tok, _ = build_tokenizer(train_mixture(cfg.tokenizer_examples, cfg.seed), cfg.vocab_size)
    return tok


def _provenance(init_from: str | None) -> dict | None:
    """The command and metrics recorded with the checkpoint a run started from, if any."""
    if not init_from:
        return None
    record = Path(init_from) / "training.json"
    if not record.is_file():
        return {"path": init_from}
    earlier = json.loads(record.read_text())
    return {"path": init_from, "command": earlier["command"], "metrics": earlier["metrics"]}


def report_markdown(record: dict) -> str:
    cfg, metrics = record["config"], record["metrics"]
    lines = [
        f"# Testbed model: {cfg['arch']} ({record['architecture']})",
        "",
        "Trained by `vllm_blockdiff.testbed.train` on the synthetic testbed tasks.",
        "",
        "```",
        record["command"],
        "```",
        "",
        f"- seed: {cfg['seed']}",
        *([f"- initialised from `{record['init_from']['path']}`"
           + (f" (trained by `{record['init_from']['command']}`)"
              if "command" in record["init_from"] else "")] if record["init_from"] else []),
        f"- parameters: {record['parameters']:,}; weights saved as bfloat16",
        f"- steps: {metrics['steps']} of batch {cfg['batch_size']}"
        + (f" (chosen by --budget-s {cfg['budget_s']:.0f})" if cfg["budget_s"] else ""),
        f"- training time: {metrics['train_seconds']:.1f} s on {record['environment']['device']}",
        f"- final train loss (mean of the last {metrics['loss_window']} steps): "
        f"{metrics['final_train_loss']:.4f} (first {metrics['loss_window']}: "
        f"{metrics['first_train_loss']:.4f})",
        f"- loss: {record['loss']}",
        "",
        f"## Greedy accuracy ({record['decoder']})",
        "",
        "| task | split | correct | n | accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in metrics["eval"].values():
        lines.append(f"| {s['task']} | {s['split']} | {s['correct']} | {s['n']} | "
                     f"{s['accuracy']:.3f} |")
    lines += ["", "## Samples", ""]
    for s in metrics["eval"].values():
        for sample in s["samples"]:
            mark = "ok" if sample["correct"] else "wrong"
            lines.append(f"- {s['task']}/{s['split']} [{mark}]: prompt {sample['prompt']!r} -> "
                         f"{sample['output']!r} (target {sample['target']!r})")
    lines += ["", "## Full record", "", "```json", json.dumps(record, indent=2), "```", ""]
    return "\n".join(lines)


def eval_tasks(mix: dict[str, float]) -> tuple[str, ...]:
    """The exact tasks (always, as before), plus the ParallelBench-style ones the mixture trains."""
    return EXACT_TASKS + tuple(task for task in PARALLEL_TASKS if task in mix)


def run(cfg: TrainConfig, command: str, log: Callable[[str], None] = print) -> Path:
    """Tokenizer, data, training, evaluation and checkpoint: the whole pipeline for one model."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, not {cfg.arch!r}")
    device = resolve_device(cfg.device)
    torch.set_float32_matmul_precision("high")
    t_start = time.monotonic()
    tok = load_or_train_tokenizer(cfg)
    special = special_ids(tok)
    examples = train_mixture(cfg.train_examples, cfg.seed, cfg.mix)
    data, kept = encode(tok, examples, cfg.seq_len, special.eos)
    log(f"{len(kept)} of {len(examples)} training examples fit seq_len {cfg.seq_len}; "
        f"vocab {tok.get_vocab_size()}; data ready in {time.monotonic() - t_start:.1f}s")
    if cfg.init_from:
        # SDAR's recipe: adapt a trained AR model to block diffusion (the network is identical).
        model = CausalLM.from_pretrained(cfg.init_from).train()
    else:
        model = build_model(model_args(cfg, tok.get_vocab_size()), cfg.seed)
    n_params = param_count(model)
    log(f"{cfg.arch}: {n_params:,} parameters on {device}"
        + (f", initialised from {cfg.init_from}" if cfg.init_from else ""))
    stats = fit(model, data, cfg, special, device, log)

    saved = copy.deepcopy(model).to(torch.bfloat16).eval()
    judge = saved if device.type == "cuda" else copy.deepcopy(saved).float()
    t_eval = time.monotonic()
    scores: dict[str, TaskScore] = {
        f"{task}/{split}": s
        for split in cfg.eval_splits
        for task, s in evaluate(
            judge, tok, cfg.arch, eval_tasks(cfg.mix), split=split, n=cfg.eval_n, seed=cfg.seed,
            block_size=cfg.eval_block_size, batch_size=cfg.eval_batch_size,
        ).items()
    }
    for s in scores.values():
        log(f"eval {s.task}/{s.split}: {s.correct}/{s.n} = {s.accuracy:.3f}")
    eval_seconds = time.monotonic() - t_eval

    out = write_checkpoint(
        cfg.out, saved.cpu(), tok, cfg.arch,
        block_size=cfg.eval_block_size if cfg.arch in DIFFUSION_ARCHS else None,
        torch_dtype="bfloat16",
    )
    window = min(cfg.log_every, len(stats.losses))
    config = json.loads((out / "config.json").read_text())
    record = {
        "command": command,
        "architecture": config["architectures"][0],
        "parameters": n_params,
        "model_args": msgspec.to_builtins(model.args),
        "init_from": _provenance(cfg.init_from),
        "config": msgspec.to_builtins(cfg),
        "loss": (
            f"block diffusion over [x_t; x_0], block size per batch from {cfg.block_sizes}, "
            f"t ~ U({cfg.mask_eps}, 1) per block, weighting {cfg.loss_weighting}"
            + (", logits shifted by one, complementary masks" if cfg.arch == "fast_dllm" else "")
            if cfg.arch in DIFFUSION_ARCHS else "causal LM cross-entropy on answer tokens"
        ),
        "decoder": (
            f"{'shifted ' * (cfg.arch == 'fast_dllm')}SDAR greedy, block size "
            f"{cfg.eval_block_size}, one token per forward"
            if cfg.arch in DIFFUSION_ARCHS else "AR greedy"
        ),
        "metrics": {
            "final_train_loss": sum(stats.losses[-window:]) / window,
            "first_train_loss": sum(stats.losses[:window]) / window,
            "loss_window": window,
            "steps": stats.steps,
            "ms_per_step": stats.ms_per_step,
            "train_seconds": stats.seconds,
            "eval_seconds": eval_seconds,
            "total_seconds": time.monotonic() - t_start,
            "train_examples_kept": len(kept),
            "eval": {k: msgspec.to_builtins(v) for k, v in scores.items()},
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    (out / "TRAINING.md").write_text(report_markdown(record))
    log(f"wrote {out}")
    return out


def _parse_mix(text: str) -> dict[str, float]:
    """A named mixture (`data.MIXES`) or task=weight pairs."""
    if text in MIXES:
        return dict(MIXES[text])
    pairs = (item.split("=") for item in text.split(",") if item)
    return {task: float(weight) for task, weight in pairs}


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """Flags map 1:1 onto TrainConfig; --smoke swaps in SMOKE for flags not given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help=HELP["smoke"])
    fields = {f.name: f for f in msgspec.structs.fields(TrainConfig)}
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        doc = HELP.get(name)
        if f.type is bool:
            parser.add_argument(flag, action="store_true", default=None, help=doc)
        elif name == "block_sizes":
            parser.add_argument(flag, type=lambda s: [int(x) for x in s.split(",")], default=None,
                                help=doc)
        elif name == "eval_splits":
            parser.add_argument(flag, type=lambda s: s.split(","), default=None, help=doc)
        elif name == "loss_weighting":
            parser.add_argument(flag, choices=["inv_t", "mean"], default=None, help=doc)
        elif name == "mix":
            parser.add_argument(flag, type=_parse_mix, default=None,
                                help="training mixture: task=weight pairs, e.g. arithmetic=0.3,"
                                     "lists=0.3,json=0.25,code=0.15, or a name: default, or "
                                     "parallel (the default families plus the waiting-line and "
                                     "Latin-square ones); the tokenizer always sees the default "
                                     "mixture")
        elif name == "arch":
            parser.add_argument(flag, choices=ARCHS, required=True)
        elif name == "out":
            parser.add_argument(flag, required=True)
        else:
            kind = {int: int, float: float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=None, help=doc)
    ns = vars(parser.parse_args(argv))
    given = {k: v for k, v in ns.items() if k in fields and v is not None}
    return TrainConfig(**{**(SMOKE if ns["smoke"] else {}), **given})


def main(argv: Sequence[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    return run(cfg, "python -m vllm_blockdiff.testbed.train " + shlex.join(argv))


if __name__ == "__main__":
    main()
