"""The testbed task suite: deterministic generators, exact scorers, disjoint and harder splits."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from vllm_blockdiff.testbed import (
    PARALLEL_TASKS,
    TASKS,
    Example,
    arithmetic,
    code,
    generate,
    lists,
    perplexity,
    records,
    score,
)
from vllm_blockdiff.testbed.example import in_test_partition

N = 300


def test_registry_lists_the_families():
    assert set(TASKS) == {"arithmetic", "lists", "json", "code", *PARALLEL_TASKS}
    with pytest.raises(ValueError):
        generate("lists", "validation", 1)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("split", ["train", "test", "hard"])
def test_generators_are_deterministic_and_seeded(task, split):
    a = generate(task, split, 50, seed=3)
    assert a == generate(task, split, 50, seed=3)
    assert a != generate(task, split, 50, seed=4)
    assert generate(task, split, 20, seed=3) == a[:20]  # a longer draw extends a shorter one
    assert all(isinstance(e, Example) and e.task == task and e.prompt and e.target for e in a)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("split", ["train", "test", "hard"])
def test_scorer_accepts_the_target(task, split):
    for ex in generate(task, split, N, seed=0):
        assert score(task, ex, ex.target), ex
        assert score(task, ex, ex.target + "\n"), ex  # trailing whitespace is not an error


@pytest.mark.parametrize("task", sorted(set(TASKS) - {"code"}))
def test_hash_splits_are_disjoint(task):
    train = {e.prompt for e in generate(task, "train", 3000, seed=0)}
    test = {e.prompt for e in generate(task, "test", 500, seed=0)}
    hard = {e.prompt for e in generate(task, "hard", 500, seed=0)}
    assert not train & test and not train & hard
    assert not any(in_test_partition(p) for p in train)
    assert all(in_test_partition(p) for p in test | hard)


def test_code_splits_use_disjoint_files():
    assert not set(code.TRAIN_FILES) & set(code.HELDOUT_FILES)
    train = {e.meta["file"] for e in generate("code", "train", 400, seed=0)}
    held = {e.meta["file"] for e in generate("code", "test", 400, seed=0)}
    held |= {e.meta["file"] for e in generate("code", "hard", 400, seed=0)}
    assert train <= set(code.TRAIN_FILES) and held <= set(code.HELDOUT_FILES)
    assert len(train) > 10 and len(held) > 3


def test_arithmetic_chain_and_corruptions():
    ex = arithmetic.make(4821, 379)
    assert ex.prompt == "Q: 4821+379="
    assert ex.target == "1+9+0=10,2+7+1=10,8+3+1=12,4+0+1=5|5200"
    assert arithmetic.make(99, 1).target == "9+1+0=10,9+0+1=10|100"  # final carry
    for bad in ["1+9+0=10,2+7+1=10,8+3+1=12,4+0+1=5|5201", "1+9+0=10|", "5200", "|52 00",
                "|5200x", ""]:
        assert not score("arithmetic", ex, bad), bad
    assert score("arithmetic", ex, "a wrong chain|5200")  # only the result is graded


def test_lists_scoring_and_corruptions():
    for ex in generate("lists", "test", N, seed=1):
        expected = ex.meta["expected"]
        swapped = expected[1:2] + expected[:1] + expected[2:]
        assert not score("lists", ex, " " + ", ".join(expected[:-1]))  # dropped an item
        assert not score("lists", ex, " " + ", ".join(expected + [expected[0]]))  # duplicate
        if ex.meta["op"] == "shuffle":
            assert not score("lists", ex, " " + ", ".join(ex.meta["items"]))  # not shuffled
            rotated = ex.meta["items"][1:] + ex.meta["items"][:1]
            assert score("lists", ex, " " + ", ".join(rotated))  # any other order is right
        elif swapped != expected:
            assert not score("lists", ex, " " + ", ".join(swapped))


def test_lists_ops_by_hand():
    import random

    rng = random.Random(0)
    items = ["Bo", "Al", "Cy"]
    assert lists.apply("reverse", items, 0, "", rng) == ["Cy", "Al", "Bo"]
    assert lists.apply("sort", items, 0, "", rng) == ["Al", "Bo", "Cy"]
    assert lists.apply("insert", items, 3, "Zed", rng) == ["Bo", "Al", "Cy", "Zed"]
    assert lists.apply("remove", items, 1, "", rng) == ["Bo", "Cy"]
    assert lists.apply("replace", items, 0, "Eve", rng) == ["Eve", "Al", "Cy"]
    shuffled = lists.apply("shuffle", items, 0, "", rng)
    assert sorted(shuffled) == sorted(items) and shuffled != items


def test_json_scoring_and_corruptions():
    for ex in generate("json", "test", N, seed=2):
        jsonschema.Draft202012Validator.check_schema(ex.meta["schema"])
        value = ex.meta["expected"]
        key = next(iter(value))
        leaf = value[key]
        wrong = dict(value)
        if isinstance(leaf, bool):
            wrong[key] = int(leaf)  # 1 == True in Python: only the schema catches this
        elif isinstance(leaf, int):
            wrong[key] = str(leaf)
        elif isinstance(leaf, str):
            wrong[key] = leaf + "x"
        else:
            wrong[key] = {}
        missing = {k: v for k, v in value.items() if k != key}
        extra = {**value, "extra": 1}
        for bad in [records.dumps(wrong), records.dumps(missing), records.dumps(extra),
                    ex.target[:-1], "", "null"]:
            assert not score("json", ex, bad), (ex.prompt, bad)
        reordered = dict(reversed(list(value.items())))
        assert score("json", ex, json.dumps(reordered, indent=1))  # order and spacing are free


def test_code_scoring():
    ex = generate("code", "test", 1, seed=0)[0]
    assert ex.prompt.endswith("\n")
    assert score("code", ex, ex.target + "   \n")
    assert not score("code", ex, ex.target + " # more")
    assert not score("code", ex, ex.target[:-1])
    assert perplexity([math.log(0.5)] * 3) == pytest.approx(2.0)
    assert perplexity([0.0]) == 1.0
    with pytest.raises(ValueError):
        perplexity([])


def _size(ex: Example) -> int:
    """The difficulty knob of each family: digits, list length, leaves + depth, target lines,
    blank cells."""
    if ex.task == "arithmetic":
        return max(len(str(ex.meta["a"])), len(str(ex.meta["b"])))
    if "items" in ex.meta:  # lists and the waiting lines
        return len(ex.meta["items"])
    if ex.task == "latin":
        return ex.meta["blanks"]
    if ex.task == "json":
        return len(records.flatten(ex.meta["expected"]))
    return ex.target.count("\n") + 1


@pytest.mark.parametrize("task", sorted(TASKS))
def test_hard_variant_is_harder(task):
    test = generate(task, "test", N, seed=0)
    hard = generate(task, "hard", N, seed=0)
    if task == "json":  # deeper objects: every hard record nests two levels
        assert all(e.prompt.count('":{') >= 2 for e in hard)
        assert max(e.prompt.count('":{') for e in test) <= 1
    assert min(map(_size, hard)) > max(map(_size, test))
    if task != "latin":  # a Latin square's answer is the whole square whatever is blank
        assert sum(len(e.target) for e in hard) > sum(len(e.target) for e in test)
