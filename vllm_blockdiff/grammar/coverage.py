"""JSONSchemaBench coverage of a grammar backend, and schema validation of outputs.

Declared coverage (JSONSchemaBench's term) is the fraction of a split's schemas the backend
compiles. Compilation fails, if at all, while converting the schema to a grammar
(`backend.resolve`); the vocabulary pass of a full `backend.compile` is what takes time, so
coverage resolves by default and compiles completely with `full=True` (on JSONSchemaBench both
give the same counts: 4.7 s against 45 s for the whole benchmark on 2 cores, tiny vocabulary).

Each compiled schema is counted by how the backend resolved it: which compiler (the default
"auto" backend picks per schema), whether the schema was rewritten (`schema_rewrite`), and
whether the grammar approximates it (`xgrammar_gaps`, or a warning xgrammar logged, e.g.
"multipleOf is not supported; ignoring multipleOf"): approximated grammars can admit outputs
the schema rejects, so they are counted apart. Warnings are read from the C++ log on file
descriptor 2, which makes this module a benchmark helper: not thread-safe, not for the serving
path. With `check`, candidate values (`instances`) are fed to a fresh matcher: every value the
grammar accepts must be valid against the schema (`violations`). With `walks`, the grammar itself
generates: random walks through its masks (`walk`) stand in for a model's outputs under it, and
every walk that ends in a complete sentence must be schema-valid too.
`python -m vllm_blockdiff.grammar.coverage TOKENIZER_DIR [ROOT] [--backend auto] [--check N]
[--walks N]` prints the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import numpy as np

from vllm_blockdiff.grammar import bitmask
from vllm_blockdiff.grammar.backend import GrammarBackend, load_tokenizer
from vllm_blockdiff.grammar.instances import candidates
from vllm_blockdiff.grammar.spec import GrammarError, GrammarSpec

_WARNING = re.compile(r"Warning:\s*(.*)")
UNUSABLE = "schema not usable for validation"


class SchemaResult(msgspec.Struct, frozen=True):
    path: str
    compiled: bool
    error: str | None = None  # the compiler's (or the JSON parser's) message
    warnings: tuple[str, ...] = ()  # approximations the compiler reported
    backend: str = ""  # the compiler the backend resolved the schema for
    rewritten: bool = False
    approximated: bool = False  # by the backend's own account (`GrammarSpec.approximated`)
    checked: int = 0  # candidate values fed to a matcher (`check`)
    accepted: int = 0  # of which the grammar accepted
    violations: tuple[str, ...] = ()  # accepted values the schema rejects (with why)

    @property
    def exact(self) -> bool:
        return self.compiled and not self.approximated


class SplitCoverage(msgspec.Struct):
    split: str
    results: list[SchemaResult]
    warnings_checked: bool = True

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def compiled(self) -> int:
        return sum(r.compiled for r in self.results)

    @property
    def exact(self) -> int:
        """Compiled and resolved exact."""
        return sum(r.exact for r in self.results)

    @property
    def declared_coverage(self) -> float:
        return self.compiled / self.total if self.total else 0.0

    @property
    def compiled_paths(self) -> list[str]:
        return [r.path for r in self.results if r.compiled]

    def kinds(self) -> dict[str, dict[str, int]]:
        """Compiled schemas by "<backend> exact|approximated": count and how many rewritten."""
        out: dict[str, dict[str, int]] = {}
        for r in self.results:
            if r.compiled:
                row = out.setdefault(kind_of(r), {"schemas": 0, "rewritten": 0})
                row["schemas"] += 1
                row["rewritten"] += r.rewritten
        return dict(sorted(out.items()))

    @property
    def warned_exact(self) -> list[SchemaResult]:
        """Schemas the compiler warned about but the backend resolved as exact: where the gap
        analysis shows more than xgrammar does (a `oneOf` strict mode keeps apart), or misses a
        gap."""
        return [r for r in self.results if r.warnings and r.exact]

    def summary(self) -> str:
        exact = f"; {self.exact} exact"
        kinds = ", ".join(f"{k} {v['schemas']} ({v['rewritten']} rewritten)"
                          for k, v in self.kinds().items())
        return (f"{self.split}: declared coverage {self.declared_coverage:.1%} "
                f"({self.compiled}/{self.total}{exact}): {kinds}")


def kind_of(result: SchemaResult) -> str:
    return f"{result.backend} {'exact' if result.exact else 'approximated'}"


def load_schema(path: str | Path) -> Any:
    """A benchmark file's schema: the file itself, or its `json_schema` field if it has one."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "json_schema" in data:
        data = data["json_schema"]
        if isinstance(data, str):
            data = json.loads(data)
    return data


@contextlib.contextmanager
def captured_stderr_fd() -> Iterator[list[str]]:
    """Collect what native code writes to fd 2 inside the block (lines, after the block)."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += tmp.read().decode(errors="replace").splitlines()


def check_schema_file(backend: GrammarBackend, path: str | Path, warnings: bool = True,
                      full: bool = False, check: int = 0) -> SchemaResult:
    """How one benchmark schema compiles: `backend.resolve` (schema to grammar, where
    compilation fails), or with `full` also the whole `backend.compile` (adds the vocabulary
    pass, ~10x slower). With `warnings`, also collect the compiler's warnings; with `check`
    (implies `full`), feed that many candidate values to a matcher."""
    try:
        schema = load_schema(path)
        spec = GrammarSpec.from_json(schema)
    except (json.JSONDecodeError, GrammarError) as e:
        return SchemaResult(str(path), False, error=str(e))
    log: list[str] = []
    with captured_stderr_fd() if warnings else contextlib.nullcontext(log) as log:
        try:
            spec = backend.resolve(spec)
            if full or check:
                backend.compile(spec)
            error = None
        except GrammarError as e:
            error = e.detail
    found = (_WARNING.search(line) for line in log)
    messages = tuple(dict.fromkeys(m.group(1).strip() for m in found if m))
    result = SchemaResult(str(path), error is None, error=error, warnings=messages,
                          backend=spec.backend, rewritten=spec.rewritten,
                          approximated=spec.approximated)
    return soundness(backend, spec, schema, result, check) if check and not error else result


def soundness(backend: GrammarBackend, spec: GrammarSpec, schema: Any, result: SchemaResult,
              count: int) -> SchemaResult:
    """`result` with `count` candidate values of the schema (shaped by the original and by the
    compiled one, whose property order the grammar follows) fed to one matcher of `spec`: each
    value the grammar accepts must be valid against the original schema."""
    compiled = json.loads(spec.source) if spec.kind == "json" else schema
    values = candidates(schema, count // 2, seed=0) + candidates(compiled, count - count // 2,
                                                                 seed=1)
    matcher = backend.matcher(backend.compile(spec))
    accepted, violations = 0, []
    for value in values:
        text = json.dumps(value, ensure_ascii=False)
        matcher.reset()
        if not (all(matcher.accept(t) for t in backend.encode(text)) and
                matcher.is_completed()):
            continue
        accepted += 1
        error = output_errors(text, schema)
        if error is not None and not error.startswith(UNUSABLE):
            violations.append(f"{text[:120]}: {error[:120]}")
    return msgspec.structs.replace(result, checked=len(values), accepted=accepted,
                                   violations=tuple(violations))


def closing_ids(decode: Callable[[list[int]], str], vocab_size: int) -> np.ndarray:
    """[vocab_size] bool: the tokens whose text ends a string, array or object, or a value."""
    return np.array([any(c in decode([i]) for c in '"}],') for i in range(vocab_size)])


def walk(backend: GrammarBackend, spec: GrammarSpec, schema: Any, count: int,
         decode: Callable[[list[int]], str], closing: np.ndarray, max_tokens: int = 256,
         seed: int = 0) -> tuple[int, list[str]]:
    """`count` random walks through the grammar of `spec`: each step takes a token its mask
    allows (half of the time one of the `closing` ids, so that strings, arrays and objects end),
    and once the text is a complete sentence the walk stops with probability 1/4 per step.
    Returns the walks that ended complete and the texts among them `schema` rejects."""
    rng = random.Random(seed)
    matcher = backend.matcher(backend.compile(spec))
    mask = bitmask.allocate(1, backend.vocab_size)
    stops = np.asarray(matcher.stop_token_ids)
    completed, violations = 0, []
    for _ in range(count):
        matcher.reset()
        ids: list[int] = []
        for _ in range(max_tokens):
            if matcher.is_completed() and rng.random() < 0.25:
                break
            matcher.fill_bitmask(mask, 0)
            allowed = np.flatnonzero(bitmask.to_bool(mask, backend.vocab_size)[0].numpy())
            allowed = allowed[~np.isin(allowed, stops)]
            if allowed.size == 0:
                break
            ending = allowed[closing[allowed]]
            token = int(rng.choice(ending if ending.size and rng.random() < 0.5 else allowed))
            if not matcher.accept(token):
                violations.append(f"mask allowed {token} after {decode(ids)[:80]!r}, "
                                  "accept refused")
                break
            ids.append(token)
        if not matcher.is_completed():
            continue
        completed += 1
        text = decode(ids)
        error = output_errors(text, schema)
        if error is not None and not error.startswith(UNUSABLE):
            violations.append(f"{text[:120]}: {error[:120]}")
    return completed, violations


def split_coverage(backend: GrammarBackend, split_dir: str | Path, limit: int | None = None,
                   workers: int = 1, full: bool = False, check: int = 0) -> SplitCoverage:
    """Check every schema of one split (sorted; the first `limit` if given); `full` compiles,
    `check` feeds candidate values to matchers (`check_schema_file`).

    With `workers` > 1 schemas are checked on that many threads (xgrammar releases the GIL), and
    warnings are not collected (fd 2 is process-wide).
    """
    paths = sorted(Path(split_dir).glob("*.json"))[:limit]
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(
                lambda p: check_schema_file(backend, p, False, full, check), paths))
    else:
        results = [check_schema_file(backend, p, True, full, check) for p in paths]
    return SplitCoverage(Path(split_dir).name, results, warnings_checked=workers <= 1)


def coverage(backend: GrammarBackend, root: str | Path, limit: int | None = None,
             workers: int = 1, full: bool = False, check: int = 0) -> dict[str, SplitCoverage]:
    """Coverage of every split under `root` (a directory of split directories)."""
    splits = sorted(p for p in Path(root).iterdir() if p.is_dir())
    return {p.name: split_coverage(backend, p, limit, workers, full, check) for p in splits}


def output_errors(text: str, schema: Any) -> str | None:
    """None if `text` is JSON valid against `schema`, else why not (formats are checked too)."""
    try:
        instance = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    except Exception as e:  # foreign schemas: unresolvable $ref, patterns Python's re rejects, ...
        return f"{UNUSABLE}: {type(e).__name__}: {e}"
    return None if error is None else error.message


def main() -> None:
    import argparse

    from vllm_blockdiff.grammar.backend import BACKEND_NAMES, make_backend

    parser = argparse.ArgumentParser(description="JSONSchemaBench declared coverage")
    parser.add_argument("tokenizer", help="checkpoint or tokenizer directory")
    parser.add_argument("root", nargs="?", default="/work/shared/data/jsonschemabench")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="auto")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N schemas per split")
    parser.add_argument("--workers", type=int, default=1,
                        help=">1 checks in parallel but does not collect warnings")
    parser.add_argument("--full", action="store_true",
                        help="compile completely (vocabulary pass included), not only resolve")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="feed N candidate values per schema to a matcher; report accepted "
                             "values the schema rejects")
    parser.add_argument("--walks", type=int, default=0, metavar="N",
                        help="N random walks through each compiled schema's grammar; report "
                             "complete ones the schema rejects")
    a = parser.parse_args()
    backend = make_backend(a.backend, a.tokenizer, a.vocab_size)
    result = coverage(backend, a.root, a.limit, a.workers, a.full, a.check)
    walked = _walk_splits(backend, a.tokenizer, result, a.walks) if a.walks else {}
    columns = [f"{b} {e}" for e in ("exact", "approximated") for b in ("llguidance", "xgrammar")]
    print(f"{'split':16} {'schemas':>7} {'compiled':>8}  " + "  ".join(
        f"{k:>24}" for k in columns) + "   (of which rewritten)")
    for split in result.values():
        kinds = split.kinds()
        cells = [kinds.get(k, {"schemas": 0, "rewritten": 0}) for k in columns]
        print(f"{split.split:16} {split.total:7d} {split.compiled:8d}  " + "  ".join(
            f"{c['schemas']:>17d} ({c['rewritten']:4d})" for c in cells))
        for r in split.warned_exact:
            print(f"    resolved exact despite a compiler warning: {Path(r.path).name}: "
                  f"{'; '.join(r.warnings)[:100]}")
        if a.check:
            checked = sum(r.checked for r in split.results)
            accepted = sum(r.accepted for r in split.results)
            print(f"    {checked} candidate values, {accepted} accepted by the grammar")
            for kind in ("exact", "approximated"):
                bad = [r for r in split.results if r.violations and
                       kind_of(r).endswith(kind)]
                print(f"    {kind}: {len(bad)} schemas with accepted invalid values" +
                      "".join(f"\n      {Path(r.path).name}: {r.violations[0]}"
                              for r in bad[:5]))
        for kind, (schemas, completed, bad) in walked.get(split.split, {}).items():
            print(f"    walks, {kind}: {completed} complete over {schemas} schemas, "
                  f"{len(bad)} schemas with an invalid one" +
                  "".join(f"\n      {name}: {v}" for name, v in bad[:5]))


def _walk_splits(backend: GrammarBackend, tokenizer: str, result: dict[str, SplitCoverage],
                 count: int) -> dict[str, dict[str, tuple[int, int, list]]]:
    """`walk` over every compiled schema: per split and kind (exact or approximated), the
    schemas walked, the complete walks and the schemas with an invalid one (name, first)."""
    decode = load_tokenizer(tokenizer).decode
    closing = closing_ids(decode, backend.vocab_size)
    out: dict[str, dict[str, tuple[int, int, list]]] = {}
    for name, split in result.items():
        kinds: dict[str, tuple[int, int, list]] = {}
        for r in split.results:
            if not r.compiled:
                continue
            schema = load_schema(r.path)
            spec = backend.resolve(GrammarSpec.from_json(schema))
            completed, violations = walk(backend, spec, schema, count, decode, closing)
            kind = "exact" if r.exact else "approximated"
            schemas, total, bad = kinds.get(kind, (0, 0, []))
            bad += [(Path(r.path).name, violations[0])] if violations else []
            kinds[kind] = (schemas + 1, total + completed, bad)
        out[name] = kinds
    return out


if __name__ == "__main__":
    main()
