"""Schema rewrites (`grammar/schema_rewrite.py`) and xgrammar's gaps (`grammar/xgrammar_gaps.py`).

Every rewrite must be an equivalence under `jsonschema`: the original and the rewritten schema
agree on every candidate value (`grammar/instances.py`: shaped by both schemas, valid and
invalid, plus hand-picked ones). The JSONSchemaBench cases xgrammar got wrong before the rewrite
(o6376, o68414, o82284) must now be rejected by a matcher, token by token.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from vllm_blockdiff.grammar import GrammarSpec, make_backend
from vllm_blockdiff.grammar.coverage import load_schema
from vllm_blockdiff.grammar.instances import candidates, sample_pattern
from vllm_blockdiff.grammar.schema_rewrite import bounded_optional_groups, rewrite_schema
from vllm_blockdiff.grammar.xgrammar_gaps import xgrammar_gaps

SHARED_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"
JSONSCHEMABENCH = (SHARED_BENCH if SHARED_BENCH.exists()
                   else Path(__file__).parent / "data" / "jsonschemabench_sample")
DRAFT4 = "http://json-schema.org/draft-04/schema#"
DRAFT7 = "http://json-schema.org/draft-07/schema#"

# JSONSchemaBench o68414 (Github_easy), abridged: xgrammar read the items as the bare anyOf.
O68414 = {
    "$schema": DRAFT4, "type": ["array", "null"],
    "items": {
        "type": "object",
        "properties": {"url": {"type": "string"},
                       "md5": {"type": "string", "pattern": "^[a-f0-9]{32}$"},
                       "sha1": {"type": "string", "pattern": "^[a-f0-9]{40}$"}},
        "additionalProperties": False, "required": ["url"],
        "anyOf": [{"required": ["md5"]}, {"required": ["sha1"]}]}}
# o6376 (Github_trivial), abridged: a required property beside an anyOf behind a $ref.
O6376 = {
    "anyOf": [{"$ref": "#/definitions/TestStruct"}],
    "definitions": {"TestStruct": {
        "anyOf": [
            {"additionalProperties": False,
             "properties": {"reqField": {"type": "string"}}},
            {"additionalProperties": False,
             "properties": {"field1": {"type": "string"}, "reqField": {"type": "string"}}}],
        "required": ["reqField"]}},
    "type": "object"}
# o82284 (Github_trivial): an optional group around a repetition in a pattern.
O82284 = {
    "additionalProperties": False,
    "properties": {"version": {"pattern": r"^[0-9]\.[0-9]\.[0-9](-[0-9A-Za-z]+)?$",
                               "type": "string"}},
    "required": ["version"], "type": "object"}
JSONSCHEMABENCH_GAPS = [  # (schema, an invalid value plain xgrammar accepted, a valid one)
    (O68414, [0], [{"url": "u", "md5": "0" * 32}]),
    (O6376, {}, {"reqField": "x"}),
    (O82284, {"version": "2.3.33value2C"}, {"version": "2.3.3-rc1"}),
]


def validator(schema: Any) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def assert_equivalent(schema: Any, rewritten: Any, extra: list[Any] = (), count: int = 150
                      ) -> tuple[int, int]:
    """Both schemas agree on every candidate; returns (valid, invalid) counts."""
    values = candidates(schema, count, 0) + candidates(rewritten, count, 1) + list(extra)
    original, new = validator(schema), validator(rewritten)
    valid = 0
    for value in values:
        verdict = original.is_valid(value)
        assert new.is_valid(value) == verdict, (value, verdict)
        valid += verdict
    return valid, len(values) - valid


OBJ = {"type": "object"}
CASES = {
    "anyOf beside type, properties, required": (
        O68414["items"],
        [{"url": "u"}, {"url": "u", "md5": "a" * 32}, {"md5": "a" * 32}, 0, False,
         {"url": "u", "sha1": "b" * 40, "x": 1}]),
    "oneOf beside keywords": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
         "oneOf": [{"properties": {"b": {"type": "string"}}, "required": ["b"]},
                   {"properties": {"c": {"type": "string"}}, "required": ["c"]}]},
        [{"a": 1, "b": "x"}, {"a": 1, "b": "x", "c": "y"}, {"a": 1}, {"b": "x"}]),
    "allOf bounds": (
        {"allOf": [{"type": "integer", "minimum": 1, "maximum": 9},
                   {"minimum": 3, "maximum": 20}, {"exclusiveMaximum": 8}]},
        [0, 1, 2, 3, 7, 8, 9, 10, 3.0, "3"]),
    "allOf of objects with additionalProperties": (
        {"allOf": [{"type": "object", "properties": {"x": {"type": "integer"}},
                    "additionalProperties": False},
                   {"properties": {"y": {"type": "string"}, "x": {"minimum": 2}}}]},
        [{}, {"x": 1}, {"x": 3}, {"y": "s"}, {"x": 3, "y": "s"}, {"z": 1}]),
    "a property both sides cannot agree on": (
        {"type": "object", "properties": {"x": {"type": "integer"}},
         "allOf": [{"properties": {"x": {"type": "string"}, "y": {}}}]},
        [{}, {"x": 1}, {"x": "s"}, {"y": 1}]),
    "uniqueItems merged": (
        {"type": "array", "uniqueItems": False, "allOf": [{"uniqueItems": True}]},
        [[1, 1], [1, 2], []]),
    "falsy values on both sides": (
        {"type": "array", "uniqueItems": False, "items": {"not": {"const": None}},
         "allOf": [{"uniqueItems": False, "maxItems": 2, "items": {"not": {"const": None}}}]},
        [[], [1, 1], [1, 2, 3], [None]]),
    "$ref siblings (2020-12)": (
        {"$defs": {"n": {"type": "integer", "maximum": 10}}, "$ref": "#/$defs/n",
         "minimum": 5},
        [4, 5, 10, 11, "x"]),
    "$ref siblings ignored (draft 7)": (
        {"$schema": DRAFT7, "definitions": {"n": {"type": "integer"}},
         "$ref": "#/definitions/n", "minimum": 5},
        [4, 5, "x"]),
    "enum beside type": ({"type": "string", "enum": ["a", 1, "b", None]}, ["a", 1, None, "c"]),
    "const beside keywords": ({"const": 3, "minimum": 1, "type": "integer"}, [3, 4, 3.0]),
    "formats no validator checks": (
        {"type": "string", "format": "semver", "anyOf": [{"format": "email"}, {"maxLength": 2}]},
        ["1.0.0", "a@b.co", "ab", "abc"]),
    "pattern with an optional group": (
        {"type": "string", "pattern": r"^v(-[a-c]+)?(x)??$"}, ["v", "v-ab", "vab", "v-x", "vx"]),
    "required names outside properties": (
        {"type": "object", "required": ["a", "p1"], "properties": {"b": {}},
         "patternProperties": {"^p[0-9]$": {"type": "integer"}},
         "additionalProperties": {"type": "string"}},
        [{"a": "s", "p1": 1}, {"a": 1, "p1": 1}, {"a": "s", "p1": "s"}, {"a": "s"}]),
    "patternProperties beside listed properties": (
        {"type": "object", "properties": {"xa": {"type": "integer"}, "b": {}},
         "patternProperties": {"^x": {"minimum": 3}}},
        [{"xa": 1}, {"xa": 4}, {"xb": 1}, {"xb": 4}, {"b": 1}]),
    "keywords without type": ({"minimum": 3, "pattern": "^a"}, [2, 3, "a", "b", None, {}]),
    "types intersected, an unsatisfiable branch dropped": (
        {"type": "integer", "anyOf": [{"type": "number", "maximum": 3}, {"type": "string"}]},
        [1, 3, 4, 2.5, "s"]),
    "draft 4 exclusive bounds": (
        {"$schema": DRAFT4, "type": "number", "minimum": 1, "exclusiveMinimum": True,
         "allOf": [{"minimum": 2}]},
        [1, 1.5, 2, 3]),
    "items merged": (
        {"type": "array", "items": {"type": "integer"},
         "anyOf": [{"items": {"minimum": 1}}, {"maxItems": 1}]},
        [[], [0], [0, 1], [1, 2], ["a"]]),
    "disjoint oneOf": (
        {"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                   {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]},
                   {"type": "string"}]},
        [{"k": "a"}, {"k": "b"}, {"k": "c"}, "s", 1]),
    "required property forbidden by the other oneOf branch": (
        {"oneOf": [{"type": "object", "properties": {"a": {}}, "required": ["a"],
                    "additionalProperties": False},
                   {"type": "object", "properties": {"b": {}}, "required": ["b"],
                    "additionalProperties": False}]},
        [{"a": 1}, {"b": 1}, {"a": 1, "b": 1}, {}]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rewrite_is_equivalent(name):
    schema, extra = CASES[name]
    rewritten = rewrite_schema(schema)
    assert rewritten is not schema and rewritten != schema, "no rewrite applied"
    valid, invalid = assert_equivalent(schema, rewritten, extra)
    assert valid >= 3 and invalid >= 3  # both sides of the schema exercised


def test_rewrites_remove_the_gaps_they_target():
    """Each case whose original schema has an xgrammar gap loses it in the rewrite, except the
    schema-level ones the rewrite cannot express (none here)."""
    for name, (schema, _) in CASES.items():
        if name in ("$ref siblings ignored (draft 7)", "uniqueItems merged",
                    "falsy values on both sides"):
            continue  # no gap before (the draft ignores them), or one xgrammar always has
        assert xgrammar_gaps(rewrite_schema(schema)) == (), name


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "^a", "anyOf": [{"pattern": "b$"}]},  # two patterns
    {"$ref": "#/definitions/a/properties/b", "definitions": {"a": {"properties": {"b": {}}}},
     "type": "object"},  # a $ref into a subschema a rewrite could move
    {"type": "object", "unevaluatedProperties": False, "anyOf": [{"properties": {"a": {}}}]},
    {"type": "integer"},
    True,
])
def test_no_rewrite_where_not_shown_exact(schema):
    rewritten = rewrite_schema(schema)
    if rewritten is not schema:  # a rewrite may still apply elsewhere in the schema
        assert_equivalent(schema, rewritten)
    if isinstance(schema, dict) and "unevaluatedProperties" in schema:
        assert rewritten is schema


def test_recursive_definitions_stay_finite():
    schema = {"$ref": "#/definitions/node", "type": "object",
              "definitions": {"node": {"properties": {"next": {"$ref": "#/definitions/node"},
                                                      "v": {"type": "integer"}},
                                       "anyOf": [{"required": ["v"]}, {"required": ["next"]}]}}}
    rewritten = rewrite_schema(schema)
    assert_equivalent(schema, rewritten, [{"v": 1}, {"next": {"v": 1}}, {"next": {}}, {}, 1])


def test_rewrites_are_equivalent_on_jsonschemabench():
    """Every benchmark schema the rewrite changes agrees with its original on candidates."""
    changed = 0
    for path in sorted(JSONSCHEMABENCH.glob("*/*.json")):
        schema = load_schema(path)
        rewritten = rewrite_schema(schema)
        if rewritten is schema:
            continue
        changed += 1
        try:
            assert_equivalent(schema, rewritten, count=8)
        except (jsonschema.exceptions.SchemaError, jsonschema.exceptions.RefResolutionError):
            continue
        except AssertionError as e:
            raise AssertionError(f"{path.name}: {e}") from None
    assert changed > (100 if JSONSCHEMABENCH == SHARED_BENCH else 0)


@pytest.mark.parametrize("backend_name", ["xgrammar", "auto"])
@pytest.mark.parametrize("case", range(len(JSONSCHEMABENCH_GAPS)))
def test_jsonschemabench_gaps_are_closed(tiny_sdar, backend_name, case):
    """The values plain xgrammar accepted for o68414, o6376 and o82284 are rejected token by
    token by a matcher of the spec the backend resolves; a valid value still passes."""
    schema, invalid, valid = JSONSCHEMABENCH_GAPS[case]
    backend = make_backend(backend_name, tiny_sdar)
    spec = backend.resolve(GrammarSpec.from_json(schema, any_whitespace=False))
    assert not spec.approximated
    plain = make_backend("xgrammar", tiny_sdar)
    original = GrammarSpec.from_json(schema, any_whitespace=False)
    unrewritten = GrammarSpec(kind="json", source=original.source, any_whitespace=False,
                              backend="xgrammar")
    assert accepts(plain, unrewritten, invalid)  # the gap, without the rewrite
    assert not accepts(backend, spec, invalid)
    assert accepts(backend, spec, valid)
    assert validator(schema).is_valid(valid) and not validator(schema).is_valid(invalid)


def accepts(backend, spec: GrammarSpec, value: Any) -> bool:
    matcher = backend.matcher(backend.compile(spec))
    tokens = backend.encode(json.dumps(value))
    return all(matcher.accept(t) for t in tokens) and matcher.is_completed()


# -- patterns -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, expected", [
    (r"^a(-b+)?$", r"^a(-b+){0,1}$"),
    (r"(a)??", r"(a){0,1}?"),
    (r"\(a\)?", r"\(a\)?"),  # escaped parentheses: a literal ")" made optional
    (r"[)]?(x)?", r"[)]?(x){0,1}"),
    (r"[]?)](y)?", r"[]?)](y){0,1}"),
    (r"(?:a|b)?c", r"(?:a|b){0,1}c"),
])
def test_bounded_optional_groups(pattern, expected):
    assert bounded_optional_groups(pattern) == expected
    strings = ["", "a", "a-b", "ab", "(a)", "(a", ")x", "y", "c", "ac", "]y"]
    assert [bool(re.fullmatch(pattern, s)) for s in strings] == \
        [bool(re.fullmatch(expected, s)) for s in strings]


def test_xgrammar_patterns_match_python_after_the_rewrite():
    """Random patterns with optional groups: xgrammar's JSON-string regex on the rewritten
    pattern accepts exactly what Python's `re.fullmatch` accepts (it did not before)."""
    rng = random.Random(0)
    atoms = ["a", "b", "-", "[ab]", r"\d", "."]

    def gen(depth: int = 0) -> str:
        if depth > 2 or rng.random() < 0.4:
            out = rng.choice(atoms)
        else:
            out = "(" + "".join(gen(depth + 1) for _ in range(rng.randint(1, 3))) + ")"
        return out + rng.choice(["", "", "?", "*", "+", "{1,2}"])

    strings = [""] + [sample_pattern(p, rng) for p in ("[ab1-]{1,4}",) * 40]
    mismatches = []
    for _ in range(30):
        pattern = "".join(gen() for _ in range(rng.randint(1, 3)))
        schema = {"type": "string", "pattern": "^" + bounded_optional_groups(pattern) + "$"}
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema))
        for s in strings:
            if _is_grammar_accept_string(grammar, json.dumps(s)) != bool(re.fullmatch(pattern, s)):
                mismatches.append((pattern, s))
    assert not mismatches


# -- xgrammar's gaps ------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, gap", [
    ({"type": "object", "required": ["a"], "anyOf": [{"required": ["b"]}]},
     "required, type beside anyOf ignored"),
    ({"enum": ["a", 1], "type": "string"}, "type beside enum ignored"),
    ({"$defs": {"n": {}}, "$ref": "#/$defs/n", "minimum": 1}, "minimum beside $ref ignored"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems ignored"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "outside properties"),
    ({"type": "string", "format": "date"}, "format 'date' looser"),
    ({"type": "string", "format": "email", "pattern": "^a"}, "pattern beside format ignored"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength beside pattern ignored"),
    ({"type": "string", "pattern": "^(ab+)?$"}, "mis-compiled"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf ignored"),
    ({"type": "integer", "multipleOf": 3, "minimum": 0}, "multipleOf ignored"),
    ({"type": "integer", "not": {"const": 3}}, "not ignored"),
    ({"minLength": 2}, "without type ignored"),
    ({"$schema": DRAFT7, "type": "object", "dependencies": {"a": ["b"]}}, "dependencies"),
    ({"oneOf": [{"type": "object"}, {"type": "object", "required": ["a"]}]}, "oneOf not shown"),
    ({"$ref": "https://example.com/s.json"}, "outside the schema"),
])
def test_xgrammar_gaps_found(schema, gap):
    assert any(gap in g for g in xgrammar_gaps(schema)), xgrammar_gaps(schema)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}},
     "required": ["a"], "additionalProperties": False},
    {"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 99},
    {"type": "string", "format": "uuid"},
    {"type": "string", "format": "semver", "pattern": "^[0-9]+$"},  # no validator checks it
    {"$schema": DRAFT7, "definitions": {"n": {}}, "$ref": "#/definitions/n", "minimum": 1},
    {"type": "object", "dependencies": {"a": ["b"]}},  # 2020-12: not a keyword
    # strict mode keeps the branches apart: each generates its own properties only
    {"oneOf": [{"type": "object", "properties": {"a": {}}, "required": ["a"]},
               {"type": "object", "properties": {"b": {}}, "required": ["b"]}]},
    {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
])
def test_xgrammar_exact(schema):
    assert xgrammar_gaps(schema) == ()
