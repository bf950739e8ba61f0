"""JSON records: turn a key=value description into the object a small schema asks for.

The prompt shows the schema compactly ({"age":"int","addr":{"city":"str"}}: one type word per
leaf, nested objects inline) because a full JSON Schema would not fit a tiny model's context; the
scorer validates against the equivalent full JSON Schema (`to_json_schema`). The description lists
the fields in a shuffled order with dotted paths for nested keys; the answer follows schema order.
"""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema

from vllm_blockdiff.testbed.example import Example
from vllm_blockdiff.testbed.lists import NAMES

NAME = "json"
CITIES = ("Oslo", "Rome", "Lima", "Pune", "Kyiv", "Baku", "Doha", "Riga", "Bern", "Nice", "Cork")
COLORS = ("red", "blue", "green", "gray", "pink", "teal", "gold", "black")
LEAVES: dict[str, str] = {
    "name": "str", "city": "str", "color": "str", "age": "int", "id": "int", "score": "int",
    "rank": "int", "active": "bool", "admin": "bool",
}
OBJECTS = ("addr", "owner", "info", "meta", "stats")
JSON_TYPES = {"str": "string", "int": "integer", "bool": "boolean"}
Shape = tuple[int, tuple["Shape", ...]]  # (leaf count, nested object shapes)
Compact = dict[str, Any]  # leaf key -> type word, object key -> nested Compact


def shape_for(rng: random.Random, split: str) -> Shape:
    """In distribution: 2-4 fields, one record in three holding a 2-leaf object (depth 1).

    Hard: 4 fields, one of them an object that nests another (depth 2, 6 leaves).
    """
    if split == "hard":
        return (3, ((1, ((2, ()),)),))
    n_top = rng.randint(2, 4)
    if rng.random() < 1 / 3:
        return (n_top - 1, ((2, ()),))
    return (n_top, ())


def leaf_value(key: str, rng: random.Random) -> Any:
    kind = LEAVES[key]
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        lo, hi = {"age": (1, 99), "id": (1, 999), "score": (0, 100), "rank": (1, 20)}[key]
        return rng.randint(lo, hi)
    pool = {"name": NAMES, "city": CITIES, "color": COLORS}[key]
    return rng.choice(pool)


def draw_object(rng: random.Random, shape: Shape) -> tuple[Compact, dict]:
    """A schema (compact form) and a conforming value, keys in a random order."""
    n_leaves, children = shape
    keys: list[tuple[str, Shape | None]] = [(k, None) for k in rng.sample(list(LEAVES), n_leaves)]
    keys += zip(rng.sample(OBJECTS, len(children)), children, strict=True)
    rng.shuffle(keys)
    compact: Compact = {}
    value: dict[str, Any] = {}
    for key, child in keys:
        if child is None:
            compact[key], value[key] = LEAVES[key], leaf_value(key, rng)
        else:
            compact[key], value[key] = draw_object(rng, child)
    return compact, value


def flatten(value: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, v in value.items():
        if isinstance(v, dict):
            out.extend(flatten(v, f"{prefix}{key}."))
        else:
            out.append((prefix + key, v))
    return out


def to_json_schema(compact: Compact) -> dict:
    """The full JSON Schema the compact form stands for: every key required, no extra keys."""
    return {
        "type": "object",
        "properties": {
            k: to_json_schema(v) if isinstance(v, dict) else {"type": JSON_TYPES[v]}
            for k, v in compact.items()
        },
        "required": list(compact),
        "additionalProperties": False,
    }


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def draw(rng: random.Random, split: str) -> Example:
    compact, value = draw_object(rng, shape_for(rng, split))
    pairs = flatten(value)
    rng.shuffle(pairs)
    desc = "; ".join(f"{k}={dumps(v) if isinstance(v, bool) else v}" for k, v in pairs)
    return Example(
        prompt=f"Schema: {dumps(compact)}\nData: {desc}\nJSON:",
        target=" " + dumps(value),
        task=NAME,
        meta={"schema": to_json_schema(compact), "expected": value, "split": split},
    )


def score(example: Example, output: str) -> bool:
    """Parses as JSON, validates against the schema, and every field equals the description."""
    try:
        got = json.loads(output)
    except ValueError:
        return False
    if not jsonschema.Draft202012Validator(example.meta["schema"]).is_valid(got):
        return False
    return got == example.meta["expected"]
