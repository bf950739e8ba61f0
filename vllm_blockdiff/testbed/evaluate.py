"""Greedy accuracy of a trained `CausalLM` on the testbed tasks, with no vLLM involved.

SDAR checkpoints decode with `sdar_greedy` (one committed token per forward; Fast-dLLM v2 ones
with its shifted logits), AR twins with `ar_greedy`; completions are scored by the task's exact
scorer.
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
