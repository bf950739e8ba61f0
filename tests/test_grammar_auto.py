"""The default grammar backend ("auto", `grammar/auto.py`): per request, the exact compiler.

llguidance where it compiles the constraint (as given, else rewritten), xgrammar on the
rewritten schema otherwise, resolved as approximated where xgrammar's grammar may admit what the
schema rejects. The decision travels in the spec and the workers follow it.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from vllm_blockdiff.grammar import GrammarError, GrammarSpec, make_backend
from vllm_blockdiff.grammar.coverage import check_schema_file, coverage

SAMPLE = Path(__file__).parent / "data" / "jsonschemabench_sample"


@pytest.fixture(scope="module")
def auto(tiny_sdar):
    return make_backend("auto", tiny_sdar)


def resolved(backend, schema) -> GrammarSpec:
    return backend.resolve(GrammarSpec.from_json(schema, any_whitespace=False))


OBJECT = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
          "additionalProperties": False}
# llguidance refuses minProperties over optional properties of an open object
AT_LEAST_ONE = {"type": "object", "properties": OBJECT["properties"], "minProperties": 1}


@pytest.mark.parametrize("schema, backend, rewritten, approximated", [
    (OBJECT, "llguidance", False, False),
    # llguidance knows no "semver" format; no validator checks it: dropped, then compiled
    ({"type": "string", "format": "semver"}, "llguidance", True, False),
    # oneOf of branches behind $refs, disjoint by type: anyOf, which llguidance compiles
    ({"type": "array", "items": {"oneOf": [{"$ref": "#/$defs/s"}, {"$ref": "#/$defs/o"}]},
      "$defs": {"s": {"type": "string"}, "o": {"type": "object"}}}, "llguidance", True, False),
    # decimal multipleOf: jsonschema's floating point disagrees with llguidance
    ({"type": "number", "multipleOf": 0.01}, "llguidance", False, True),
    # llguidance's dates admit February 29 of every year, jsonschema's only of leap years
    ({"type": "string", "format": "date"}, "llguidance", False, True),
    # xgrammar enforces it exactly
    (AT_LEAST_ONE, "xgrammar", False, False),
    # ... and propertyNames (llguidance: unimplemented) with required names under anyOf, once
    # merged into the branches
    ({**AT_LEAST_ONE, "propertyNames": {"maxLength": 3},
      "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, "xgrammar", True, False),
    # neither enforces uniqueItems: xgrammar compiles it, approximated
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "xgrammar", False,
     True),
])
def test_choice(auto, schema, backend, rewritten, approximated):
    spec = resolved(auto, schema)
    assert (spec.backend, spec.rewritten, spec.approximated) == (backend, rewritten, approximated)
    assert json.loads(spec.source) == schema if not rewritten else json.loads(spec.source) != schema


def test_other_kinds_prefer_llguidance(auto):
    for spec in (GrammarSpec.from_regex("[a-c]+"), GrammarSpec.from_choice(["yes", "no"]),
                 GrammarSpec.from_grammar('root ::= "a" | "b"'), GrammarSpec.json_object()):
        out = auto.resolve(spec)
        assert out.backend == "llguidance" and not out.approximated and not out.rewritten


def test_refused_by_both_raises_xgrammar_message(auto):
    with pytest.raises(GrammarError, match=r'^structured_outputs\.json: .*type "foo"'):
        auto.resolve(GrammarSpec.from_json({"type": "foo"}))


def test_workers_compile_what_the_spec_names(auto, tiny_sdar):
    """A resolved spec survives the trip to the engine (msgpack map) and compiles with the
    backend it names; a backend serving another compiler refuses it."""
    spec = resolved(auto, AT_LEAST_ONE)
    travelled = msgspec.convert(msgspec.to_builtins(spec), GrammarSpec)
    assert travelled == spec and auto.resolve(travelled) is travelled
    worker = make_backend("auto", tiny_sdar)
    matcher = worker.matcher(worker.compile(travelled))
    assert not all(matcher.accept(t) for t in worker.encode("{}")) or not matcher.is_completed()
    with pytest.raises(GrammarError, match="resolved for xgrammar, not llguidance"):
        make_backend("llguidance", tiny_sdar).compile(travelled)


def test_explicit_backends_resolve_for_themselves(tiny_sdar):
    xgr = make_backend("xgrammar", tiny_sdar)
    spec = resolved(xgr, {"type": "object", "required": ["a"], "anyOf": [{"required": ["b"]}]})
    assert (spec.backend, spec.rewritten, spec.approximated) == ("xgrammar", True, False)
    llg = make_backend("llguidance", tiny_sdar)
    assert resolved(llg, {"type": "string", "format": "semver"}).rewritten
    with pytest.raises(GrammarError, match="Unimplemented keys"):
        resolved(llg, {"type": "array", "uniqueItems": True})


@pytest.mark.parametrize("schema", [
    {**AT_LEAST_ONE, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
    {"oneOf": [{"type": "object", "properties": {"k": {"const": "x"}, "v": {"type": "integer"}},
                "required": ["k", "v"]},
               {"type": "object", "properties": {"k": {"const": "y"}}, "required": ["k"]}]},
])
def test_exact_grammars_accept_only_valid_values(auto, tmp_path, schema):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    result = check_schema_file(auto, path, check=200)
    assert result.exact and result.accepted > 5 and result.violations == ()


def test_coverage_counts_the_choice(auto):
    result = coverage(auto, SAMPLE)
    for split in result.values():
        kinds = split.kinds()
        assert sum(k["schemas"] for k in kinds.values()) == split.compiled
        assert split.exact == split.compiled - sum(
            v["schemas"] for k, v in kinds.items() if k.endswith("approximated"))
        assert "llguidance exact" in split.summary()
