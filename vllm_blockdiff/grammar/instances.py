"""Candidate JSON values for a schema, valid and invalid, to check rewrites and grammars without a
model.

Values are built from the schema's own keywords — properties in schema order (the order grammars
generate them in), required names dropped now and then, enum values, bounds and their
neighbours, strings sampled from patterns — with random values mixed in at every level, so both
sides of each keyword are exercised. `jsonschema` then says which are valid: a rewrite must agree
with the original schema on every candidate, and a grammar must reject every invalid one.
"""

from __future__ import annotations

import random
import re
import re._constants as sre_constants  # the parser behind `re` (Python 3.11+)
import re._parser as sre_parse
from typing import Any

from vllm_blockdiff.grammar.schema_draft import TYPES, Draft, types_of

_WORDS = ("", "a", "ab", "x y", "0", "1.2.3", "2024-02-30", "2024-01-05", "a@b.co", "null",
          "http://e.co/p", "ÿé", "-", "3value")
_MAX_DEPTH = 6


def candidates(schema: Any, count: int = 64, seed: int = 0) -> list[Any]:
    """`count` values (duplicates removed) shaped by `schema`; deterministic for a seed."""
    gen = _Generator(Draft(schema), random.Random(seed))
    out: dict[str, Any] = {}
    for _ in range(count * 2):
        value = gen.value(schema, 0)
        out.setdefault(repr(value), value)
        if len(out) >= count:
            break
    return list(out.values())


def sample_pattern(pattern: str, rng: random.Random) -> str:
    """A string `re.search(pattern, s)` is likely to accept (anchors and lookarounds ignored)."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return rng.choice(_WORDS)
    return "".join(_sample(parsed, rng, 0))


def _sample(items: Any, rng: random.Random, depth: int) -> list[str]:
    out: list[str] = []
    for op, arg in items:
        if depth > 20:
            break
        if op is sre_constants.LITERAL:
            out.append(chr(arg))
        elif op is sre_constants.NOT_LITERAL:
            out.append("a" if arg != ord("a") else "b")
        elif op is sre_constants.ANY:
            out.append(rng.choice("ax-1"))
        elif op is sre_constants.IN:
            out.append(_sample_class(arg, rng))
        elif op is sre_constants.BRANCH:
            out += _sample(rng.choice(arg[1]), rng, depth + 1)
        elif op is sre_constants.SUBPATTERN:
            out += _sample(arg[-1], rng, depth + 1)
        elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT,
                    getattr(sre_constants, "POSSESSIVE_REPEAT", None)):
            low, high, sub = arg
            times = rng.randint(low, min(high, low + 3))
            for _ in range(times):
                out += _sample(sub, rng, depth + 1)
        elif op is sre_constants.CATEGORY:
            out.append(_sample_category(arg, rng))
    return out


def _sample_class(items: Any, rng: random.Random) -> str:
    if items and items[0][0] is sre_constants.NEGATE:
        excluded = {chr(a) for op, a in items if op is sre_constants.LITERAL}
        return next(c for c in "aZ0_-~" if c not in excluded)
    op, arg = rng.choice(items)
    if op is sre_constants.LITERAL:
        return chr(arg)
    if op is sre_constants.RANGE:
        return chr(rng.randint(*arg))
    if op is sre_constants.CATEGORY:
        return _sample_category(arg, rng)
    return "a"


def _sample_category(category: Any, rng: random.Random) -> str:
    name = str(category)
    if "NOT" in name:
        return "-" if "WORD" in name or "DIGIT" in name else "a"
    if "DIGIT" in name:
        return rng.choice("0123456789")
    if "SPACE" in name:
        return " "
    return rng.choice("aZ_9")


class _Generator:
    def __init__(self, draft: Draft, rng: random.Random):
        self.d = draft
        self.rng = rng

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def noise(self, depth: int) -> Any:
        kind = self.rng.choice(TYPES + ("integer",))
        if depth >= _MAX_DEPTH:
            kind = self.rng.choice(("string", "integer", "boolean", "null"))
        return self.typed(kind, {}, depth + 1)

    def value(self, node: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH or not isinstance(node, dict) or self.chance(0.08):
            return self.noise(depth)
        if isinstance(node.get("$ref"), str) and (self.d.ref_ignores_siblings or self.chance(0.7)):
            try:
                return self.value(self.d.resolve(node["$ref"]), depth + 1)
            except LookupError:
                return self.noise(depth)
        finite = [node["const"]] if "const" in node else node.get("enum")
        if isinstance(finite, list) and finite and self.chance(0.85):
            return self.rng.choice(finite)
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(node.get(key), list) and node[key] and self.chance(0.6):
                branch = self.rng.choice(node[key])
                if isinstance(branch, dict):  # the branch shaped by its parent's keywords too
                    rest = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf", "allOf")}
                    branch = {**rest, **branch}
                return self.value(branch, depth + 1)
        types = types_of(node) or self.implied_types(node)
        return self.typed(self.rng.choice(types), node, depth)

    def implied_types(self, node: dict[str, Any]) -> list[str]:
        if {"properties", "required", "additionalProperties", "patternProperties"} & node.keys():
            return ["object"]
        if {"items", "prefixItems", "minItems"} & node.keys():
            return ["array"]
        if {"pattern", "minLength", "maxLength", "format"} & node.keys():
            return ["string"]
        if {"minimum", "maximum", "multipleOf"} & node.keys():
            return ["number", "integer"]
        return list(TYPES) + ["integer"]

    def typed(self, kind: str, node: dict[str, Any], depth: int) -> Any:
        rng = self.rng
        if kind == "null":
            return None
        if kind == "boolean":
            return rng.random() < 0.5
        if kind in ("integer", "number"):
            return self.number(node, kind == "integer")
        if kind == "string":
            return self.string(node)
        if kind == "array":
            return self.array(node, depth)
        if kind == "object":
            return self.object(node, depth)
        return self.noise(depth)

    def number(self, node: dict[str, Any], integer: bool) -> Any:
        anchors = [v for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                               "multipleOf") if isinstance(v := node.get(k), int | float)
                   and not isinstance(v, bool)] or [0]
        base = self.rng.choice(anchors)
        value = base + self.rng.choice((-1, 0, 0, 1, 2, 0.5, -0.5, 10))
        if integer or self.chance(0.5):
            return int(value)
        return float(value)

    def string(self, node: dict[str, Any]) -> str:
        rng = self.rng
        if isinstance(node.get("pattern"), str) and self.chance(0.8):
            text = sample_pattern(node["pattern"], rng)
        else:
            text = rng.choice(_WORDS)
        low = node.get("minLength") if isinstance(node.get("minLength"), int) else None
        high = node.get("maxLength") if isinstance(node.get("maxLength"), int) else None
        if low is not None and self.chance(0.5):
            text = (text + "abcdefgh" * (low // 8 + 1))[:low + rng.choice((-1, 0, 0, 1))]
        if high is not None and self.chance(0.3):
            text = ("xyz" * (high // 3 + 2))[:high + rng.choice((0, 1))]
        return text

    def array(self, node: dict[str, Any], depth: int) -> list[Any]:
        rng = self.rng
        prefix = node.get("prefixItems") or (node["items"] if isinstance(node.get("items"), list)
                                             else [])
        items = node.get("items") if isinstance(node.get("items"), dict | bool) else {}
        low = node.get("minItems") if isinstance(node.get("minItems"), int) else 0
        size = max(0, low + rng.choice((-1, 0, 0, 1, 2))) if low else rng.choice((0, 1, 1, 2, 3))
        size = min(size, 6)
        return [self.value(prefix[i] if i < len(prefix) else items, depth + 1)
                for i in range(size)]

    def object(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        rng = self.rng
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        required = [r for r in node.get("required", ()) if isinstance(r, str)] \
            if isinstance(node.get("required"), list) else []
        names = [n for n in props if n in required or self.chance(0.5)]
        names = [n for n in names if not (n in required and self.chance(0.1))]
        names += [r for r in required if r not in props and self.chance(0.9)]
        if self.chance(0.15):
            patterns = list((node.get("patternProperties") or {}).keys())
            names.append(sample_pattern(rng.choice(patterns), rng) if patterns else "extra")
        out = {}
        for name in names:
            sub = props.get(name, node.get("additionalProperties", {}))
            out[name] = self.value(sub, depth + 1)
        return out
