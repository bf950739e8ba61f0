"""JSONSchemaBench declared coverage of the xgrammar backend, and output validation helpers."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from vllm_blockdiff.grammar import GrammarSpec, XGrammarBackend
from vllm_blockdiff.grammar.backend import load_tokenizer
from vllm_blockdiff.grammar.coverage import (
    UNUSABLE,
    check_schema_file,
    closing_ids,
    coverage,
    load_schema,
    output_errors,
    walk,
)

JSONSCHEMABENCH = Path("/work/shared/data/jsonschemabench")
DATA = Path(__file__).parent / "data"
# Without the shared copy: the bundled sample (exact schemas) and edge cases (approximated and
# refused ones, the latter listed here).
BUNDLED = (DATA / "jsonschemabench_sample", DATA / "jsonschemabench_edge")
BUNDLED_REFUSED = {"o71309.json", "o71310.json", "o25192.json"}


@pytest.fixture(scope="module")
def backend(tiny_sdar) -> XGrammarBackend:
    return XGrammarBackend(tiny_sdar)


def test_load_schema_plain_or_wrapped(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    (tmp_path / "plain.json").write_text(json.dumps(schema))
    (tmp_path / "wrapped.json").write_text(json.dumps({"json_schema": schema, "tests": []}))
    (tmp_path / "text.json").write_text(json.dumps({"json_schema": json.dumps(schema)}))
    for name in ("plain", "wrapped", "text"):
        assert load_schema(tmp_path / f"{name}.json") == schema


def test_output_errors():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}},
              "required": ["n"]}
    assert output_errors('{"n": 3}', schema) is None
    assert "required" in output_errors("{}", schema)
    assert "less than the minimum" in output_errors('{"n": 0}', schema)
    assert output_errors('{"n": ', schema).startswith("not JSON")
    assert output_errors('"2024-13-45"', {"type": "string", "format": "date"}) is not None
    unusable = output_errors('"x"', {"$ref": "https://example.invalid/schema.json"})
    assert unusable.startswith(UNUSABLE)


def test_check_schema_file(backend, tmp_path):
    cases = {
        "ok": {"type": "object", "properties": {"a": {"type": "string"}}},
        "approx": {"type": "number", "multipleOf": 0.5},
        "bad": {"type": "foo"},
    }
    for name, schema in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(schema))
    (tmp_path / "broken.json").write_text('{"type": ')
    ok, approx, bad, broken = (check_schema_file(backend, tmp_path / f"{n}.json")
                               for n in ("ok", "approx", "bad", "broken"))
    assert ok.compiled and not ok.warnings and ok.error is None
    assert approx.compiled and any("multipleOf" in w for w in approx.warnings)
    assert not bad.compiled and bad.error == 'Unsupported type "foo"'
    assert not broken.compiled and "Expecting value" in broken.error


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    """The whole benchmark where the shared copy exists, else the bundled schemas in one tree."""
    if JSONSCHEMABENCH.exists():
        return JSONSCHEMABENCH
    root = tmp_path_factory.mktemp("jsonschemabench")
    for path in (p for d in BUNDLED for p in d.glob("*/*.json")):
        (root / path.parent.name).mkdir(exist_ok=True)
        (root / path.parent.name / path.name).symlink_to(path.resolve())
    return root


@pytest.fixture(scope="module")
def bench(backend, bench_root):
    t0 = time.perf_counter()
    result = coverage(backend, bench_root)
    return result, time.perf_counter() - t0


def test_declared_coverage_per_split(bench, bench_root):
    result, seconds = bench
    print(f"\nJSONSchemaBench declared coverage, xgrammar, {bench_root} ({seconds:.1f}s):")
    for split in result.values():
        print("  " + split.summary())
    assert sorted(result) == sorted(p.name for p in bench_root.iterdir() if p.is_dir())
    for split in result.values():
        assert split.total == len(list((bench_root / split.split).glob("*.json")))
        assert len(split.compiled_paths) == split.compiled
        if bench_root == JSONSCHEMABENCH:
            assert split.declared_coverage >= 0.98, split.summary()
        else:
            refused = {Path(r.path).name for r in split.results if not r.compiled}
            assert refused == BUNDLED_REFUSED & {p.name for p in (bench_root / split.split)
                                                 .iterdir()}, split.summary()
        assert split.exact < split.compiled  # some schemas compile only approximately
        failures = [r for r in split.results if not r.compiled]
        assert all(r.error and not r.error.startswith("[") for r in failures)


def test_full_compile_agrees_with_validation(backend, bench):
    """Every schema validation refuses, and 25 per split it accepts, compiled completely."""
    result, _ = bench
    rng = random.Random(0)
    sample = [r for split in result.values() for r in split.results if not r.compiled]
    for split in result.values():
        compiled = [r for r in split.results if r.compiled]
        sample += rng.sample(compiled, min(25, len(compiled)))
    for r in sample:
        full = check_schema_file(backend, r.path, warnings=False, full=True)
        assert (full.compiled, full.error) == (r.compiled, r.error), r.path


def test_walks_through_a_grammar(backend, tiny_sdar):
    """Random walks through an exact grammar end complete and schema-valid; through one that
    ignores a keyword (xgrammar drops `minLength` beside a `pattern`) they find outputs the
    schema rejects."""
    decode = load_tokenizer(tiny_sdar).decode
    closing = closing_ids(decode, backend.vocab_size)
    exact = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
             "required": ["a"], "additionalProperties": False}
    done, bad = walk(backend, backend.resolve(GrammarSpec.from_json(exact)), exact, 16, decode,
                     closing)
    assert done > 0 and bad == []
    loose = {"type": "string", "pattern": "^[a-z]+$", "minLength": 6}
    done, bad = walk(backend, backend.resolve(GrammarSpec.from_json(loose)), loose, 16, decode,
                     closing)
    assert done > 0 and any("is too short" in v for v in bad), bad
