"""Structured outputs enforced on the canvas, through the offline API, on a random-weight model.

A random model is the worst case: it proposes anything, anywhere. Every output must be a valid
prefix of the constraint's language, and every output that ends by itself must be complete and
valid (a run cut by max_tokens ends with finish_reason "length", as for AR models). Every test
runs with each grammar backend (the serve setting `grammar_backend`: "auto", the default, picks
llguidance or xgrammar per request).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import regex
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from vllm_blockdiff.grammar import BACKEND_NAMES, CanvasConstraint, GrammarSpec, make_backend
from vllm_blockdiff.grammar.coverage import load_schema, output_errors

pytestmark = pytest.mark.engine

SAMPLE = Path(__file__).parent / "data" / "jsonschemabench_sample"
SCHEMAS = sorted(SAMPLE.glob("*/*.json"))


@pytest.fixture(scope="module", params=BACKEND_NAMES)
def backend_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine(request, backend_name, tiny_sdar):
    """The session engine ("auto", the default), or one serving with the backend named."""
    if backend_name == "auto":
        yield request.getfixturevalue("llm")
        return
    from conftest import ENGINE_ARGS
    from vllm import LLM

    served = LLM(tiny_sdar, **ENGINE_ARGS,
                 additional_config={"blockdiff": {"grammar_backend": backend_name}})
    yield served
    del served


@pytest.fixture(scope="module")
def backend(backend_name, tiny_sdar):
    """The engine's grammar backend, to replay its outputs (resolving a spec as the engine's API
    side did, so "auto" replays with the compiler the engine chose)."""
    return make_backend(backend_name, tiny_sdar, vocab_size=384)


def is_valid_prefix(backend, spec: GrammarSpec, tokens) -> bool:
    constraint = CanvasConstraint.create(backend, spec)
    try:
        constraint.accept([t for t in tokens if t not in (0, 2)])  # drop the EOS it ended with
    except ValueError:
        return False
    return True


def sample_for(backend_name: str, temperature: float) -> list[tuple[int, Path]]:
    """The default backend ("auto") runs the whole sample at each temperature; an explicit one
    runs every other schema at T=0 and the rest at T=1, so each schema (three per category at
    each temperature) still meets every compiler once, at half the decoding."""
    indexed = list(enumerate(SCHEMAS))
    return indexed if backend_name == "auto" else indexed[int(temperature > 0)::2]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_jsonschemabench_sample(engine, backend_name, backend, temperature):
    paths = sample_for(backend_name, temperature)
    schemas = [load_schema(p) for _, p in paths]
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=160,
                             structured_outputs=StructuredOutputsParams(
                                 json=schema, disable_any_whitespace=True),
                             extra_args={"block_length": 8})
              for (i, _), schema in zip(paths, schemas, strict=True)]
    outs = engine.generate(["Answer in JSON: "] * len(schemas), params, use_tqdm=False)
    finished = 0
    for (_, path), schema, out in zip(paths, schemas, outs, strict=True):
        o = out.outputs[0]
        spec = backend.resolve(GrammarSpec.from_json(schema, any_whitespace=False))
        assert is_valid_prefix(backend, spec, o.token_ids), path.name
        # The response says which compiler ran and whether it approximated the schema.
        assert out.kv_transfer_params["blockdiff"]["grammar"] == {
            "backend": spec.backend, "approximated": spec.approximated,
            "rewritten": spec.rewritten}, path.name
        if o.finish_reason == "stop":
            finished += 1
            if not spec.approximated:
                assert output_errors(o.text, schema) is None, (path.name, o.text)
        else:
            assert o.finish_reason == "length"
    print(f"T={temperature}: {finished}/{len(schemas)} outputs completed within 160 tokens")
    assert finished > 0


def test_choice_regex_grammar_and_json_object(engine):
    outs = engine.generate(["Pick: "] * 6, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
        for s in range(6)], use_tqdm=False)
    assert all(o.outputs[0].text in ("yes", "no", "maybe") for o in outs)
    outs = engine.generate(["Code: "] * 6, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"),
                       extra_args={"block_length": 16, "policy": "static", "steps": 2})
        for s in range(6)], use_tqdm=False)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", o.outputs[0].text) for o in outs)
    outs = engine.generate(["Sum: "] * 6, [  # GBNF: both backends read it
        SamplingParams(temperature=1.0, seed=s, max_tokens=24, structured_outputs=(
            StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"')))
        for s in range(6)], use_tqdm=False)
    for o in outs:
        finished = o.outputs[0].finish_reason == "stop"
        assert regex.fullmatch(r"\([0-9]+(\+[0-9]+)*\)", o.outputs[0].text, partial=not finished)
    out = engine.generate(["{"], SamplingParams(
        temperature=0.0, max_tokens=200,
        structured_outputs=StructuredOutputsParams(json_object=True,
                                                   disable_any_whitespace=True)),
        use_tqdm=False)[0].outputs[0]
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_constrained_and_free_requests_share_a_batch(engine):
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = engine.generate(["def f(x):"], free, use_tqdm=False)[0].outputs[0].token_ids
    constrained = SamplingParams(temperature=0.0, max_tokens=24,
                                 structured_outputs=StructuredOutputsParams(regex=r"[a-z]+"))
    outs = engine.generate(["def f(x):", "word: "], [free, constrained], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone
    assert outs[1].outputs[0].text.isalpha()


@pytest.mark.parametrize("constraint, messages", [
    # "auto" reports xgrammar's message: it is tried after llguidance refuses.
    (dict(json={"type": "foo"}), dict(xgrammar='Unsupported type "foo"', auto='type "foo"',
                                      llguidance="Invalid type: foo")),
    (dict(regex="(unclosed"), dict(xgrammar="parenthesis is not closed",
                                   auto="parenthesis is not closed",
                                   llguidance="unclosed group")),
    (dict(grammar="root ::= undefined_rule"), dict(xgrammar="undefined_rule",
                                                   auto="undefined_rule",
                                                   llguidance="undefined_rule")),
])
def test_bad_constraints_fail_before_the_engine(engine, backend_name, constraint, messages):
    with pytest.raises(ValueError) as info:
        engine.generate(["x"], SamplingParams(
            structured_outputs=StructuredOutputsParams(**constraint)), use_tqdm=False)
    (field,) = constraint
    assert str(info.value).startswith(f"structured_outputs.{field}: ")
    assert messages[backend_name] in str(info.value)
    assert engine.generate(["x"], SamplingParams(max_tokens=3, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids


def test_auto_falls_back_to_xgrammar_exactly(engine, backend_name):
    """A schema llguidance refuses (propertyNames) runs on xgrammar, rewritten (the required
    names under anyOf merged into the branches) and exact: every finished output is valid, and
    each response says so."""
    if backend_name != "auto":
        pytest.skip("the default backend's choice")
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"url": {"type": "string", "maxLength": 8},
                             "md5": {"type": "string", "pattern": "^[a-f0-9]{4}$"},
                             "sha1": {"type": "string", "pattern": "^[a-f0-9]{5}$"}},
              "propertyNames": {"maxLength": 4}, "required": ["url"],
              "anyOf": [{"required": ["md5"]}, {"required": ["sha1"]}]}
    outs = engine.generate(["JSON: "] * 8, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=64,
                       structured_outputs=StructuredOutputsParams(json=schema))
        for s in range(8)], use_tqdm=False)
    for out in outs:
        assert out.kv_transfer_params["blockdiff"]["grammar"] == {
            "backend": "xgrammar", "approximated": False, "rewritten": True}
        if out.outputs[0].finish_reason == "stop":
            assert output_errors(out.outputs[0].text, schema) is None, out.outputs[0].text
