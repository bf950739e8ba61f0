"""The ParallelBench-style families: waiting-line operations and Latin squares (issue 13).

Determinism, disjoint splits and the scorer accepting the reference run for every family in
test_testbed_tasks.py; here, each scorer's wrong answers and other valid answers, the bundled
tokenizer, and the training mixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from vllm_blockdiff.testbed import PARALLEL_TASKS, TASKS, generate, latin, score, waiting_line
from vllm_blockdiff.testbed.data import DEFAULT_MIX, PARALLEL_MIX, train_mixture
from vllm_blockdiff.testbed.train import TrainConfig, eval_tasks, parse_config

N = 200
MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


def line(people: list[str]) -> str:
    return " " + ", ".join(people)


def test_one_family_per_operation():
    assert (*(f"line_{op}" for op in waiting_line.OPS), "latin") == PARALLEL_TASKS
    for op in waiting_line.OPS:
        ex = generate(f"line_{op}", "test", 1)[0]
        assert ex.prompt.startswith("Line: ") and ex.prompt.endswith(". Result:")
    with pytest.raises(ValueError):
        waiting_line.drawer("rotate")


@pytest.mark.parametrize("op", [op for op in waiting_line.OPS
                                if op not in waiting_line.VALIDITY_OPS])
def test_exact_line_scorers_reject_wrong_lines(op):
    task = waiting_line.family(op)
    for ex in generate(task, "test", N, seed=1):
        want = ex.meta["expected"]
        first, last = want[0].split()
        wrong = [
            want[:-1],  # dropped a person
            want + want[:1],  # a duplicate
            want[1:2] + want[:1] + want[2:],  # two people swapped
            [f"{last} {first}", *want[1:]],  # a name's parts swapped
            [f"{first} {want[1].split()[1]}", *want[1:]],  # a last name from the next person
        ]
        for bad in wrong:
            if bad != want:
                assert not score(task, ex, line(bad)), (ex.prompt, bad)
        assert not score(task, ex, "")


def test_shuffle_accepts_any_other_order():
    for ex in generate("line_shuffle", "test", N, seed=2):
        people = ex.meta["items"]
        assert score("line_shuffle", ex, line(people[1:] + people[:1]))  # a rotation
        assert score("line_shuffle", ex, line(people[::-1]))  # n >= 3: never the original
        assert not score("line_shuffle", ex, line(people))  # not shuffled
        assert not score("line_shuffle", ex, line(people[1:] + people[1:2]))  # dup + drop
        # Same tokens, other people: two first names exchanged (the parallel-commit failure).
        (a1, a2), (b1, b2) = people[0].split(), people[1].split()
        if a1 != b1 and a2 != b2:
            mixed = [f"{b1} {a2}", f"{a1} {b2}", *people[2:]]
            assert not score("line_shuffle", ex, line(mixed[::-1]))


def test_replace_random_accepts_any_single_position():
    for ex in generate("line_replace_random", "test", N, seed=3):
        people, newcomer = ex.meta["items"], ex.meta["name"]
        assert newcomer not in people and ex.prompt.count(newcomer) == 1
        for i in range(len(people)):
            assert score("line_replace_random", ex, line([*people[:i], newcomer,
                                                          *people[i + 1:]]))
        assert not score("line_replace_random", ex, line(people))  # nothing replaced
        assert not score("line_replace_random", ex, line([newcomer, newcomer, *people[2:]]))
        assert not score("line_replace_random", ex, line([newcomer, *people]))  # inserted
        other = next(p for p in waiting_line.PEOPLE if p not in people and p != newcomer)
        assert not score("line_replace_random", ex, line([other, *people[1:]]))


def test_latin_squares_are_all_there():
    squares = latin.all_squares()
    assert len(squares) == len(set(squares)) == 576
    assert all(latin.is_latin(list(sq)) for sq in squares)
    assert not latin.is_latin(["1234", "2143", "3412", "4312"])  # last column repeats
    assert not latin.is_latin(["1234", "2143", "3412"])
    assert not latin.is_latin(["1234", "2143", "3412", "43210"])


def completions(puzzle: list[str]) -> list[tuple[str, ...]]:
    return [sq for sq in latin.all_squares()
            if all(p in (latin.BLANK, s) for prow, srow in zip(puzzle, sq, strict=True)
                   for p, s in zip(prow, srow, strict=True))]


@pytest.mark.parametrize("split", ["test", "hard"])
def test_latin_accepts_every_valid_completion_only(split):
    several = 0
    for ex in generate("latin", split, N, seed=4):
        valid = completions(ex.meta["puzzle"])
        assert tuple(ex.target.strip().split(",")) in valid
        several += len(valid) > 1
        for sq in latin.all_squares():
            assert score("latin", ex, " " + ",".join(sq)) == (sq in valid)
        rows = list(valid[0])
        rows[0] = rows[0][1] + rows[0][0] + rows[0][2:]  # still a row of 1-4; columns break
        for bad in [",".join(rows), ",".join(valid[0][:3]), ",".join(valid[0]) + ",1234",
                    " ".join(valid[0]), "", "1234"]:
            assert not score("latin", ex, bad), (ex.prompt, bad)
    assert several > N // 4  # many puzzles have more than one right answer


@pytest.mark.parametrize("model", ["sdar-testbed", "qwen3-testbed"])
def test_bundled_tokenizer_covers_every_character(model):
    """Retraining keeps the vocabulary: every character must be one of its tokens already, and
    every train/test example must fit the trainer's sequence length."""
    tok = Tokenizer.from_file(str(MODELS / model / "tokenizer.json"))
    seq_len = TrainConfig(arch="sdar", out="-").seq_len
    for task in PARALLEL_TASKS:
        for split in ("train", "test", "hard"):
            for ex in generate(task, split, 100, seed=5):
                text = ex.prompt + ex.target
                for ch in set(text):
                    assert len(tok.encode(ch, add_special_tokens=False).ids) == 1, (task, ch)
                ids = tok.encode(text, add_special_tokens=False).ids
                assert tok.decode(ids) == text
                assert split == "hard" or len(ids) + 1 <= seq_len, (task, len(ids))


def test_training_mixtures():
    assert set(DEFAULT_MIX) == {"arithmetic", "lists", "json", "code"}  # unchanged
    assert set(PARALLEL_MIX) == set(TASKS) and sum(PARALLEL_MIX.values()) == pytest.approx(1)
    base = sum(PARALLEL_MIX[t] for t in DEFAULT_MIX)
    for task, weight in DEFAULT_MIX.items():  # old families keep their proportions
        assert PARALLEL_MIX[task] / base == pytest.approx(weight)
    assert {e.task for e in train_mixture(400, 0, PARALLEL_MIX)} == set(TASKS)
    assert parse_config(["--arch", "sdar", "--out", "x"]).mix == DEFAULT_MIX
    assert parse_config(["--arch", "sdar", "--out", "x", "--mix", "parallel"]).mix == PARALLEL_MIX
    assert parse_config(["--arch", "sdar", "--out", "x", "--mix", "latin=1"]).mix == {"latin": 1}
    assert eval_tasks(DEFAULT_MIX) == ("arithmetic", "lists", "json")  # as before
    assert eval_tasks(PARALLEL_MIX) == ("arithmetic", "lists", "json", *PARALLEL_TASKS)
