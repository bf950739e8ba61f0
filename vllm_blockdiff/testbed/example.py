"""The record every task family produces, plus the seeding and split rules they all share.

Kept apart from `tasks.py` so the family modules can import it without a cycle through the registry.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

import msgspec

SPLITS = ("train", "test", "hard")
TEST_FRACTION_PER_256 = 32  # 1/8 of the in-distribution space belongs to the test partition


class Example(msgspec.Struct, frozen=True, kw_only=True):
    """A plain-text completion: the model continues `prompt`; `target` is the reference answer.

    `target` excludes the EOS token, which the trainer appends. `meta` holds what the scorer needs
    beyond the target (operands, the input list, the JSON Schema, the source file, ...).
    """

    prompt: str
    target: str
    task: str
    meta: dict[str, Any] = msgspec.field(default_factory=dict)


def split_rng(task: str, split: str, seed: int) -> random.Random:
    """An RNG fixed by (task, split, seed); string seeding is stable across runs and platforms."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return random.Random(f"vllm-blockdiff/{task}/{split}/{seed}")


def in_test_partition(key: str) -> bool:
    """Whether `key` (usually a prompt) belongs to the held-out side of the fixed train/test cut.

    The cut is a salted hash of the key, not of the seed, so every train stream (any seed, any
    length) is disjoint from every test or hard set.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=2, person=b"bdtestbed").digest()
    return digest[0] < TEST_FRACTION_PER_256


def sample_split(
    draw: Callable[[random.Random], Example], split: str, n: int, rng: random.Random
) -> list[Example]:
    """Draw `n` examples, keeping those on `split`'s side of the cut (train vs held-out)."""
    want_test = split != "train"
    out: list[Example] = []
    while len(out) < n:
        ex = draw(rng)
        if in_test_partition(ex.prompt) == want_test:
            out.append(ex)
    return out
