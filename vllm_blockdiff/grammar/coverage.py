"""JSONSchemaBench coverage of a grammar backend, and schema validation of outputs.

Declared coverage (JSONSchemaBench's term) is the fraction of a split's schemas the backend
compiles. Compilation fails, if at all, while converting the schema to a grammar
(`backend.validate`); the vocabulary pass of a full `backend.compile` is what takes time, so
coverage validates by default and compiles completely with `full=True` (on JSONSchemaBench both
give the same counts: 4.7 s against 45 s for the whole benchmark on 2 cores, tiny vocabulary).

xgrammar compiles some schemas only approximately and logs a warning (e.g. "multipleOf is not
supported; ignoring multipleOf"): such a grammar can admit outputs the schema rejects, so those
schemas are counted apart. Warnings are read from the C++ log on file descriptor 2, which makes
this module a benchmark helper: not thread-safe, not for the serving path. (llguidance refuses
what it cannot enforce instead of approximating, so it reports no warnings.)
`python -m vllm_blockdiff.grammar.coverage TOKENIZER_DIR [ROOT] [--backend llguidance]` prints
the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import msgspec

from vllm_blockdiff.grammar.backend import GrammarBackend
from vllm_blockdiff.grammar.spec import GrammarError, GrammarSpec

_WARNING = re.compile(r"Warning:\s*(.*)")
UNUSABLE = "schema not usable for validation"


class SchemaResult(msgspec.Struct, frozen=True):
    path: str
    compiled: bool
    error: str | None = None  # the compiler's (or the JSON parser's) message
    warnings: tuple[str, ...] = ()  # approximations the compiler reported


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
        """Compiled without approximation warnings."""
        return sum(r.compiled and not r.warnings for r in self.results)

    @property
    def declared_coverage(self) -> float:
        return self.compiled / self.total if self.total else 0.0

    @property
    def compiled_paths(self) -> list[str]:
        return [r.path for r in self.results if r.compiled]

    def summary(self) -> str:
        exact = f"; {self.exact} without compiler warnings" if self.warnings_checked else ""
        return (f"{self.split}: declared coverage {self.declared_coverage:.1%} "
                f"({self.compiled}/{self.total}{exact})")


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
                      full: bool = False) -> SchemaResult:
    """Whether one benchmark schema compiles: `backend.validate` (schema to grammar, where
    compilation fails), or with `full` the whole `backend.compile` (adds the vocabulary pass,
    ~10x slower). With `warnings`, also collect the compiler's warnings."""
    try:
        spec = GrammarSpec.from_json(load_schema(path))
    except (json.JSONDecodeError, GrammarError) as e:
        return SchemaResult(str(path), False, error=str(e))
    log: list[str] = []
    with captured_stderr_fd() if warnings else contextlib.nullcontext(log) as log:
        try:
            (backend.compile if full else backend.validate)(spec)
            error = None
        except GrammarError as e:
            error = e.detail
    found = (_WARNING.search(line) for line in log)
    messages = tuple(dict.fromkeys(m.group(1).strip() for m in found if m))
    return SchemaResult(str(path), error is None, error=error, warnings=messages)


def split_coverage(backend: GrammarBackend, split_dir: str | Path, limit: int | None = None,
                   workers: int = 1, full: bool = False) -> SplitCoverage:
    """Check every schema of one split (sorted; the first `limit` if given); `full` compiles.

    With `workers` > 1 schemas are checked on that many threads (xgrammar releases the GIL), and
    warnings are not collected (fd 2 is process-wide): `exact` then equals `compiled`.
    """
    paths = sorted(Path(split_dir).glob("*.json"))[:limit]
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda p: check_schema_file(backend, p, False, full), paths))
    else:
        results = [check_schema_file(backend, p, True, full) for p in paths]
    return SplitCoverage(Path(split_dir).name, results, warnings_checked=workers <= 1)


def coverage(backend: GrammarBackend, root: str | Path, limit: int | None = None,
             workers: int = 1, full: bool = False) -> dict[str, SplitCoverage]:
    """Coverage of every split under `root` (a directory of split directories)."""
    splits = sorted(p for p in Path(root).iterdir() if p.is_dir())
    return {p.name: split_coverage(backend, p, limit, workers, full) for p in splits}


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

    from vllm_blockdiff.grammar.backend import BACKENDS, make_backend

    parser = argparse.ArgumentParser(description="JSONSchemaBench declared coverage")
    parser.add_argument("tokenizer", help="checkpoint or tokenizer directory")
    parser.add_argument("root", nargs="?", default="/work/shared/data/jsonschemabench")
    parser.add_argument("--backend", choices=BACKENDS, default="xgrammar")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N schemas per split")
    parser.add_argument("--workers", type=int, default=1,
                        help=">1 checks in parallel but does not collect warnings")
    parser.add_argument("--full", action="store_true",
                        help="compile completely (vocabulary pass included), not only validate")
    a = parser.parse_args()
    backend = make_backend(a.backend, a.tokenizer, a.vocab_size)
    for split in coverage(backend, a.root, a.limit, a.workers, a.full).values():
        print(split.summary())


if __name__ == "__main__":
    main()
