"""Free text / code continuation from this Python's standard-library sources (read offline).

The prompt is a few whole lines of a stdlib module; the target is the next line (the hard variant:
the next three). Train and held-out examples come from disjoint files, so the held-out score is
not memorisation of the same file. The sources depend on the Python version, so examples are
fixed per installation, not across versions. Scored by exact match and, given per-token
logprobs of the target, by perplexity.
"""

from __future__ import annotations

import functools
import math
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from vllm_blockdiff.testbed.example import Example

NAME = "code"
TRAIN_FILES = (
    "textwrap.py", "string.py", "heapq.py", "bisect.py", "fnmatch.py", "colorsys.py", "shlex.py",
    "glob.py", "fractions.py", "calendar.py", "queue.py", "copy.py", "functools.py", "operator.py",
    "pprint.py", "reprlib.py", "contextlib.py", "numbers.py", "abc.py", "gettext.py",
    "dataclasses.py", "enum.py", "random.py", "statistics.py", "difflib.py", "tokenize.py",
)
HELDOUT_FILES = ("base64.py", "csv.py", "graphlib.py", "cmd.py", "sched.py", "stat.py",
                 "json/encoder.py", "json/decoder.py")
CONTEXT_CHARS = 120  # whole preceding lines, as many as fit
TARGET_LINES = {"train": 1, "test": 1, "hard": 3}
TARGET_CHARS = {1: 60, 3: 120}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def files_for(split: str) -> tuple[str, ...]:
    return TRAIN_FILES if split == "train" else HELDOUT_FILES


@functools.cache
def snippets(relpath: str, n_lines: int) -> tuple[tuple[str, str], ...]:
    """Every (prompt, target) of one file: `n_lines` non-blank ASCII lines after a context."""
    path = stdlib_dir() / relpath
    if not path.is_file():
        return ()
    lines = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    out = []
    for i in range(1, len(lines) - n_lines + 1):
        target_lines = lines[i : i + n_lines]
        target = "\n".join(target_lines)
        if not all(t.strip() for t in target_lines) or not target.isascii():
            continue
        if len(target) > TARGET_CHARS[n_lines] or len(target.strip()) < 4:
            continue
        start, size = i, 0
        while start > 0 and size + len(lines[start - 1]) + 1 <= CONTEXT_CHARS:
            start -= 1
            size += len(lines[start]) + 1
        context = lines[start:i]
        if start == i or not any(c.strip() for c in context) or not "".join(context).isascii():
            continue
        out.append(("\n".join(context) + "\n", target))
    return tuple(out)


def draw(rng: random.Random, split: str) -> Example:
    n_lines = TARGET_LINES[split]
    files = [f for f in files_for(split) if snippets(f, n_lines)]
    if not files:
        raise FileNotFoundError(f"no stdlib sources for the {split} split under {stdlib_dir()}")
    relpath = rng.choice(files)
    prompt, target = rng.choice(snippets(relpath, n_lines))
    return Example(prompt=prompt, target=target, task=NAME,
                   meta={"file": relpath, "split": split})


def generate(split: str, n: int, rng: random.Random) -> list[Example]:
    """Files, not prompts, decide the split here: train files and held-out files never mix."""
    return [draw(rng, split) for _ in range(n)]


def normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().split("\n"))


def score(example: Example, output: str) -> bool:
    """Exact match of the continuation, ignoring trailing whitespace on each line."""
    return normalize(output) == normalize(example.target)


def perplexity(token_logprobs: Sequence[float]) -> float:
    """exp(-mean log p) over the target's tokens (EOS included if the caller scored it)."""
    if not token_logprobs:
        raise ValueError("perplexity needs at least one token logprob")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))
