"""4x4 Latin square completion, after ParallelBench's latin_square_n4 puzzle.

"Latin: 12.4,.4..,2...,.... Fill:" -> " 1234,3412,2143,4321": rows of the digits 1-4, "." a blank
cell, the answer the whole square. Any completion in which every row and column holds each digit
once and every given cell is kept is correct, so the scorer checks validity, not the reference
(the square the blanks were cut from). With several blanks open at once a cell's value depends on
the others in its row and column: joint constraints that tokens committed in parallel, each from
its own marginal, break. Train and test blank 5-11 of the 16 cells; the hard split 12-16 (more
completions, more cells that depend on each other).
"""

from __future__ import annotations

import functools
import itertools
import random

from vllm_blockdiff.testbed.example import Example

NAME = "latin"
SIZE = 4
SYMBOLS = "1234"
BLANK = "."
ROW_SEP = ","
BLANKS = {"train": (5, 11), "test": (5, 11), "hard": (12, 16)}  # blank cells (inclusive)
Square = tuple[str, ...]  # SIZE rows of SIZE symbols


@functools.cache
def all_squares() -> tuple[Square, ...]:
    """Every 4x4 Latin square over SYMBOLS (576), so a draw is uniform over them."""
    rows = ["".join(p) for p in itertools.permutations(SYMBOLS)]
    squares: list[Square] = [()]
    for _ in range(SIZE):
        squares = [sq + (row,) for sq in squares for row in rows
                   if all(row[c] not in {r[c] for r in sq} for c in range(SIZE))]
    return tuple(squares)


def is_latin(rows: list[str]) -> bool:
    """Every row and every column holds each symbol exactly once."""
    if len(rows) != SIZE or any(len(row) != SIZE for row in rows):
        return False
    columns = ("".join(col) for col in zip(*rows, strict=True))
    return all(sorted(line) == sorted(SYMBOLS) for line in (*rows, *columns))


def draw(rng: random.Random, split: str) -> Example:
    square = rng.choice(all_squares())
    lo, hi = BLANKS[split]
    blanks = set(rng.sample(range(SIZE * SIZE), rng.randint(lo, hi)))
    puzzle = ["".join(BLANK if r * SIZE + c in blanks else ch for c, ch in enumerate(row))
              for r, row in enumerate(square)]
    return Example(
        prompt=f"Latin: {ROW_SEP.join(puzzle)} Fill:",
        target=" " + ROW_SEP.join(square),
        task=NAME,
        meta={"puzzle": puzzle, "blanks": len(blanks), "split": split},
    )


def score(example: Example, output: str) -> bool:
    """A Latin square that keeps every given cell (any valid completion, not only the reference)."""
    rows = [row.strip() for row in output.strip().split(ROW_SEP)]
    if not is_latin(rows):
        return False
    return all(given in (BLANK, got)
               for puzzle_row, row in zip(example.meta["puzzle"], rows, strict=True)
               for given, got in zip(puzzle_row, row, strict=True))
