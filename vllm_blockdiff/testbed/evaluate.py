"""Greedy accuracy of a trained `CausalLM` on the testbed tasks, with no vLLM involved.

SDAR checkpoints decode with `sdar_greedy` (one committed token per forward; Fast-dLLM v2 ones
with its shifted logits), AR twins with `ar_greedy`; completions are scored by the task's exact
scorer. As a command, it scores a checkpoint (e.g. two versions of a bundled model on more
examples than training reports):

    python -m vllm_blockdiff.testbed.evaluate --model examples/models/sdar-testbed --arch sdar \
        --tasks json,arithmetic,lists --n 1000 --seed 1
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from tokenizers import Tokenizer

from vllm_blockdiff.reference.modeling import CausalLM
from vllm_blockdiff.testbed.data import encode_prompt, special_ids
from vllm_blockdiff.testbed.decode import ar_greedy, sdar_greedy
from vllm_blockdiff.testbed.tasks import EXACT_TASKS, Example, generate, score


class Sample(msgspec.Struct):
    prompt: str
    target: str
    output: str
    correct: bool


class TaskScore(msgspec.Struct):
    task: str
    split: str
    n: int
    correct: int
    accuracy: float
    samples: list[Sample]


def complete(
    model: CausalLM,
    tok: Tokenizer,
    arch: str,
    examples: Sequence[Example],
    block_size: int = 4,
    batch_size: int = 256,
    margin: int = 8,
) -> list[str]:
    """Greedy completions (text after the prompt, up to EOS) of `examples`, batch by batch."""
    ids = special_ids(tok)
    outputs: list[str] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        prompts = [encode_prompt(tok, e.prompt) for e in chunk]
        max_new = max(len(tok.encode(e.target, add_special_tokens=False).ids) for e in chunk)
        max_new += 1 + margin
        if arch in ("sdar", "fast_dllm"):
            gen = sdar_greedy(model, prompts, block_size, ids.mask, ids.eos, max_new,
                              shifted=arch == "fast_dllm")
        else:
            gen = ar_greedy(model, prompts, ids.eos, max_new)
        outputs.extend(tok.decode(g, skip_special_tokens=False) for g in gen)
    return outputs


def evaluate(
    model: CausalLM,
    tok: Tokenizer,
    arch: str,
    tasks: Sequence[str] = EXACT_TASKS,
    split: str = "test",
    n: int = 200,
    seed: int = 0,
    block_size: int = 4,
    batch_size: int = 256,
    keep_samples: int = 3,
) -> dict[str, TaskScore]:
    """Accuracy per task on `n` examples of `split` (the same examples for every model)."""
    results = {}
    for task in tasks:
        examples = generate(task, split, n, seed)
        outputs = complete(model, tok, arch, examples, block_size, batch_size)
        marks = [score(task, e, o) for e, o in zip(examples, outputs, strict=True)]
        samples = [Sample(e.prompt, e.target, o, c)
                   for e, o, c in zip(examples[:keep_samples], outputs, marks, strict=False)]
        results[task] = TaskScore(task, split, n, sum(marks), sum(marks) / max(n, 1), samples)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, TaskScore]:
    import argparse
    import json
    import sys
    from pathlib import Path

    import torch

    from vllm_blockdiff.testbed.train import ARCHS

    parser = argparse.ArgumentParser(description="Greedy accuracy of a testbed checkpoint.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--tasks", default=",".join(EXACT_TASKS))
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--out", default=None, help="also write the scores as JSON here")
    a = parser.parse_args(argv)
    tok = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    model = CausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        scores = evaluate(model, tok, a.arch, a.tasks.split(","), a.split, a.n, a.seed,
                          a.block_size)
    for s in scores.values():
        print(f"{s.task} {s.split}: {s.correct}/{s.n} = {s.accuracy:.3f}")
    if a.out:
        argv = sys.argv[1:] if argv is None else list(argv)
        Path(a.out).write_text(json.dumps({"argv": argv, "scores": msgspec.to_builtins(scores)},
                                          indent=1))
    return scores


if __name__ == "__main__":
    main()
