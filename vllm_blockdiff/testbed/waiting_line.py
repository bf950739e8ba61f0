"""Waiting-line operations after ParallelBench, one task family per operation.

A line of 3-6 people (7-9 in the hard split) named "First Last", both parts one-token names from
`lists.NAMES`, so a person is a pair of tokens that parallel commits can mismatch. The phrasing
is the `lists` family's: "Line: Ann Bo, Cy Max. Do: insert Eve Oz at 1. Result:".

Copy, reverse, sort, insert, remove and replace-index have one right answer (exact list match).
Shuffle and replace-random have many and are scored for validity, as ParallelBench scores them: a
shuffle is the same people in any order but the original; a random replacement puts the named
newcomer in place of exactly one person, anywhere. One family per operation gives each its own
accuracy-against-speed table: ParallelBench finds copy and replace-index degrade mildly as more
tokens are committed per forward, while shuffle and replace-random (many valid answers whose
tokens depend on each other) collapse.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vllm_blockdiff.testbed import lists
from vllm_blockdiff.testbed.example import Example

OPS = ("copy", "reverse", "sort", "insert", "remove", "replace_index", "replace_random",
       "shuffle")
VALIDITY_OPS = ("shuffle", "replace_random")  # many right answers: scored structurally
LENGTHS = {"train": (3, 6), "test": (3, 6), "hard": (7, 9)}  # people in the line (inclusive)
PEOPLE = tuple(f"{first} {last}" for first in lists.NAMES for last in lists.NAMES
               if first != last)


def family(op: str) -> str:
    """The registry name of one operation's family."""
    return f"line_{op}"


FAMILIES = tuple(family(op) for op in OPS)


def instruction(op: str, index: int, newcomer: str) -> str:
    if op == "replace_random":
        return f"replace any with {newcomer}"
    return lists.describe(op.removesuffix("_index"), index, newcomer)


def drawer(op: str) -> Callable[[random.Random, str], Example]:
    """`draw(rng, split)` for one operation; the reference answer comes from `lists.apply`."""
    if op not in OPS:
        raise ValueError(f"unknown waiting-line op {op!r}; expected one of {OPS}")
    base = op.removesuffix("_index").removesuffix("_random")  # lists.apply's name for it

    def draw(rng: random.Random, split: str) -> Example:
        lo, hi = LENGTHS[split]
        n = rng.randint(lo, hi)
        *line, newcomer = rng.sample(PEOPLE, n + 1)  # distinct people: sort and shuffle exact
        index = rng.randint(0, n if op == "insert" else n - 1)  # replace_random: hidden
        result = lists.apply(base, line, index, newcomer, rng)
        return Example(
            prompt=f"Line: {', '.join(line)}. Do: {instruction(op, index, newcomer)}. Result:",
            target=" " + ", ".join(result),
            task=family(op),
            meta={"items": line, "index": index, "name": newcomer, "expected": result,
                  "split": split},
        )

    return draw


def is_shuffle(line: list[str], got: list[str]) -> bool:
    """ParallelBench's shuffle: the same people, and not in the original order."""
    return sorted(got) == sorted(line) and got != line


def is_single_replacement(line: list[str], got: list[str], newcomer: str) -> bool:
    """Exactly one person, any one, replaced by the newcomer (who is not in the line)."""
    if len(got) != len(line):
        return False
    changed = [(old, new) for old, new in zip(line, got, strict=True) if old != new]
    return len(changed) == 1 and changed[0][1] == newcomer


def scorer(op: str) -> Callable[[Example, str], bool]:
    def score(example: Example, output: str) -> bool:
        got, line = lists.parse(output), example.meta["items"]
        if op == "shuffle":
            return is_shuffle(line, got)
        if op == "replace_random":
            return is_single_replacement(line, got, example.meta["name"])
        return got == example.meta["expected"]

    return score
