"""Structured outputs enforced on the canvas, through the offline API, on a random-weight model.

A random model is the worst case: it proposes anything, anywhere. Every output must be a valid
prefix of the constraint's language, and every output that ends by itself must be complete and
valid (a run cut by max_tokens ends with finish_reason "length", as for AR models).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from vllm_blockdiff.grammar import CanvasConstraint, GrammarSpec, XGrammarBackend
from vllm_blockdiff.grammar.coverage import load_schema, output_errors

pytestmark = pytest.mark.engine

SAMPLE = Path(__file__).parent / "data" / "jsonschemabench_sample"
SCHEMAS = sorted(SAMPLE.glob("*/*.json"))


@pytest.fixture(scope="module")
def backend(tiny_sdar):
    return XGrammarBackend(tiny_sdar, vocab_size=384)


def is_valid_prefix(backend, spec: GrammarSpec, tokens) -> bool:
    constraint = CanvasConstraint.create(backend, spec)
    try:
        constraint.accept([t for t in tokens if t not in (0, 2)])  # drop the EOS it ended with
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_jsonschemabench_sample(llm, backend, temperature):
    schemas = [load_schema(p) for p in SCHEMAS]
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=160,
                             structured_outputs=StructuredOutputsParams(
                                 json=schema, disable_any_whitespace=True),
                             extra_args={"block_length": 8})
              for i, schema in enumerate(schemas)]
    outs = llm.generate(["Answer in JSON: "] * len(schemas), params, use_tqdm=False)
    finished = 0
    for path, schema, out in zip(SCHEMAS, schemas, outs, strict=True):
        o = out.outputs[0]
        spec = GrammarSpec.from_json(schema, any_whitespace=False)
        assert is_valid_prefix(backend, spec, o.token_ids), path.name
        if o.finish_reason == "stop":
            finished += 1
            assert output_errors(o.text, schema) is None, (path.name, o.text)
        else:
            assert o.finish_reason == "length"
    print(f"T={temperature}: {finished}/{len(schemas)} outputs completed within 160 tokens")
    assert finished > 0


def test_choice_regex_and_json_object(llm):
    outs = llm.generate(["Pick: "] * 6, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
        for s in range(6)], use_tqdm=False)
    assert all(o.outputs[0].text in ("yes", "no", "maybe") for o in outs)
    outs = llm.generate(["Code: "] * 6, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"),
                       extra_args={"block_length": 16, "policy": "static", "steps": 2})
        for s in range(6)], use_tqdm=False)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", o.outputs[0].text) for o in outs)
    out = llm.generate(["{"], SamplingParams(
        temperature=0.0, max_tokens=200,
        structured_outputs=StructuredOutputsParams(json_object=True,
                                                   disable_any_whitespace=True)),
        use_tqdm=False)[0].outputs[0]
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["def f(x):"], free, use_tqdm=False)[0].outputs[0].token_ids
    constrained = SamplingParams(temperature=0.0, max_tokens=24,
                                 structured_outputs=StructuredOutputsParams(regex=r"[a-z]+"))
    outs = llm.generate(["def f(x):", "word: "], [free, constrained], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone
    assert outs[1].outputs[0].text.isalpha()


@pytest.mark.parametrize("constraint, message", [
    (dict(json={"type": "foo"}), 'Unsupported type "foo"'),
    (dict(regex="(unclosed"), "parenthesis is not closed"),
    (dict(grammar="root ::= undefined_rule"), "undefined_rule"),
])
def test_bad_constraints_fail_before_the_engine(llm, constraint, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["x"], SamplingParams(
            structured_outputs=StructuredOutputsParams(**constraint)), use_tqdm=False)
    assert llm.generate(["x"], SamplingParams(max_tokens=3, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
