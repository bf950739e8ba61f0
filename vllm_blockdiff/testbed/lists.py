"""List operations on a waiting line of names, after ParallelBench's "waiting line" tasks.

"Line: Ann, Bob, Cy. Do: insert Eve at 1. Result:" -> " Ann, Eve, Bob, Cy". Copy, reverse and sort
have one right answer; insert / remove / replace use a 0-based index; shuffle asks for any order
but the original, so it is scored structurally (same names, different order). Shuffle is where
committing several tokens at once tends to duplicate or drop names.
"""

from __future__ import annotations

import random

from vllm_blockdiff.testbed.example import Example

NAME = "lists"
NAMES = (
    "Al", "Amy", "Ann", "Ben", "Bo", "Cal", "Cy", "Dan", "Dee", "Eli", "Eve", "Fay", "Gus", "Hal",
    "Ida", "Ivy", "Jo", "Jon", "Kai", "Kim", "Lea", "Liv", "Lu", "Max", "Mia", "Ned", "Noa", "Oz",
    "Pam", "Quin", "Ray", "Rex", "Sam", "Sue", "Tom", "Uma", "Val", "Wes", "Yan", "Zed",
)
OPS = ("copy", "reverse", "sort", "insert", "remove", "replace", "shuffle")
LENGTHS = {"train": (3, 7), "test": (3, 7), "hard": (9, 12)}  # list lengths (inclusive)


def apply(op: str, items: list[str], index: int, name: str, rng: random.Random) -> list[str]:
    """The reference result; only shuffle uses `rng` (to pick some order other than the input)."""
    if op == "copy":
        return list(items)
    if op == "reverse":
        return items[::-1]
    if op == "sort":
        return sorted(items)
    if op == "insert":
        return items[:index] + [name] + items[index:]
    if op == "remove":
        return items[:index] + items[index + 1 :]
    if op == "replace":
        return items[:index] + [name] + items[index + 1 :]
    if op == "shuffle":
        out = list(items)
        while out == items:
            rng.shuffle(out)
        return out
    raise ValueError(f"unknown list op {op!r}")


def describe(op: str, index: int, name: str) -> str:
    return {
        "insert": f"insert {name} at {index}",
        "remove": f"remove at {index}",
        "replace": f"replace {index} with {name}",
    }.get(op, op)


def draw(rng: random.Random, split: str) -> Example:
    lo, hi = LENGTHS[split]
    n = rng.randint(lo, hi)
    op = rng.choice(OPS)
    chosen = rng.sample(NAMES, n + 1)  # names are unique within a line, so sort/shuffle are exact
    items, name = chosen[:n], chosen[n]
    index = rng.randint(0, n) if op == "insert" else rng.randint(0, n - 1)
    result = apply(op, items, index, name, rng)
    return Example(
        prompt=f"Line: {', '.join(items)}. Do: {describe(op, index, name)}. Result:",
        target=" " + ", ".join(result),
        task=NAME,
        meta={"op": op, "items": items, "index": index, "name": name, "expected": result,
              "split": split},
    )


def parse(output: str) -> list[str]:
    return [part.strip() for part in output.strip().split(",")]


def score(example: Example, output: str) -> bool:
    got = parse(output)
    if example.meta["op"] == "shuffle":
        items = example.meta["items"]
        return sorted(got) == sorted(items) and got != items
    return got == example.meta["expected"]
