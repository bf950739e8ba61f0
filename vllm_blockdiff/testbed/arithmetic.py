"""Multi-digit addition with a worked chain: "Q: 4821+379=" -> "1+9+0=10,2+7+1=10,...|5200".

The chain adds one digit column per step, units first, each step carrying into the next, so every
step depends on the one written before it (left-to-right dependence that parallel unmasking can
break); the result after "|" then reads the chain's digits back in the opposite order.
"""

from __future__ import annotations

import random
import re

from vllm_blockdiff.testbed.example import Example

NAME = "arithmetic"
DIGITS = {"train": (2, 4), "test": (2, 4), "hard": (5, 6)}  # operand lengths (inclusive)
RESULT_SEP = "|"
_INT = re.compile(r"\d+")


def worked_chain(a: int, b: int) -> str:
    """Column-by-column sums "x+y+carry=s", units column first, comma separated."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return ",".join(steps)


def make(a: int, b: int, split: str = "train") -> Example:
    return Example(
        prompt=f"Q: {a}+{b}=",
        target=f"{worked_chain(a, b)}{RESULT_SEP}{a + b}",
        task=NAME,
        meta={"a": a, "b": b, "answer": a + b, "split": split},
    )


def draw(rng: random.Random, split: str) -> Example:
    lo, hi = DIGITS[split]

    def operand() -> int:
        n = rng.randint(lo, hi)
        return rng.randint(10 ** (n - 1), 10**n - 1)

    return make(operand(), operand(), split)


def parse_result(output: str) -> int | None:
    """The integer after the last separator, or None when the output has no well-formed result."""
    if RESULT_SEP not in output:
        return None
    tail = output.rsplit(RESULT_SEP, 1)[1].strip()
    return int(tail) if _INT.fullmatch(tail) else None


def score(example: Example, output: str) -> bool:
    """Correct when the stated result equals the true sum (the chain itself is not graded)."""
    return parse_result(output) == example.meta["answer"]
