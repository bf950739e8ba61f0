"""From examples to tokens: the training mixture, the tokenizer corpus and padded id tensors.

Every sequence is `prompt ids + target ids + EOS`, right-padded with EOS to a fixed length, with
the prompt encoded on its own exactly as a server would encode it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import msgspec
import numpy as np
import torch
from tokenizers import Tokenizer

from vllm_blockdiff.testbed import latin, waiting_line
from vllm_blockdiff.testbed.tasks import TASKS, Example, generate
from vllm_blockdiff.tools.checkpoint import EOS, MASK, train_tokenizer

# Training mixture: arithmetic needs the most steps; code continuation is there for perplexity.
DEFAULT_MIX = {"arithmetic": 0.3, "lists": 0.3, "json": 0.25, "code": 0.15}
# The default families (60%, in their default proportions) plus the ParallelBench-style ones of
# issue 13: 3.5% per waiting-line operation and 12% Latin squares (joint constraints learn slowest).
PARALLEL_MIX = {
    **{task: 0.6 * weight for task, weight in DEFAULT_MIX.items()},
    **dict.fromkeys(waiting_line.FAMILIES, 0.035),
    latin.NAME: 0.12,
}
MIXES = {"default": DEFAULT_MIX, "parallel": PARALLEL_MIX}  # named mixtures for --mix
_DIGIT_PAIR = re.compile(r"(?<=\d)(?=\d)")


class SpecialIds(msgspec.Struct, frozen=True):
    eos: int
    mask: int


class Encoded(NamedTuple):
    """Right-padded token ids [N, L] and each row's prompt length and total length (with EOS)."""

    ids: torch.Tensor
    prompt_len: torch.Tensor
    length: torch.Tensor


def train_mixture(n: int, seed: int, mix: dict[str, float] | None = None) -> list[Example]:
    """`n` training examples split across tasks by `mix`, task-major (the trainer samples rows)."""
    mix = mix or DEFAULT_MIX
    unknown = set(mix) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in mix: {sorted(unknown)}")
    total = sum(mix.values())
    out: list[Example] = []
    for task, weight in mix.items():
        out.extend(generate(task, "train", max(1, round(n * weight / total)), seed))
    return out


def tokenizer_corpus(examples: Iterable[Example]) -> Iterator[str]:
    """Example texts with a space between adjacent digits, so BPE learns no multi-digit tokens.

    The trained tokenizer then splits every number into single digits (as Qwen's does), which is
    what makes column-wise arithmetic learnable for a tiny model.
    """
    for ex in examples:
        yield _DIGIT_PAIR.sub(" ", ex.prompt + ex.target)


def build_tokenizer(examples: Sequence[Example], vocab_size: int) -> tuple[Tokenizer, SpecialIds]:
    tok = train_tokenizer(tokenizer_corpus(examples), vocab_size)
    return tok, special_ids(tok)


def special_ids(tok: Tokenizer) -> SpecialIds:
    return SpecialIds(eos=tok.token_to_id(EOS), mask=tok.token_to_id(MASK))


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    return tok.encode(prompt, add_special_tokens=False).ids


def encode(
    tok: Tokenizer, examples: Sequence[Example], seq_len: int, eos: int
) -> tuple[Encoded, list[int]]:
    """Pad every example that fits into `seq_len`; returns the tensors and the kept indices."""
    prompts = tok.encode_batch([e.prompt for e in examples], add_special_tokens=False)
    targets = tok.encode_batch([e.target for e in examples], add_special_tokens=False)
    rows = [(i, p.ids, t.ids) for i, (p, t) in enumerate(zip(prompts, targets, strict=True))
            if len(p.ids) + len(t.ids) + 1 <= seq_len]
    ids = np.full((len(rows), seq_len), eos, dtype=np.int64)
    plens = np.empty(len(rows), dtype=np.int64)
    lens = np.empty(len(rows), dtype=np.int64)
    for r, (_, p, t) in enumerate(rows):
        ids[r, : len(p)] = p
        ids[r, len(p) : len(p) + len(t)] = t
        plens[r], lens[r] = len(p), len(p) + len(t) + 1
    enc = Encoded(torch.from_numpy(ids), torch.from_numpy(plens), torch.from_numpy(lens))
    kept = [i for i, _, _ in rows]
    return enc, kept
