"""The default grammar backend: per request, the compiler that enforces its constraint exactly.

llguidance refuses what it cannot enforce exactly, so it is tried first, on the constraint as
given and then on the equivalent rewritten schema (`schema_rewrite`). What it refuses xgrammar
compiles (99-100% of JSONSchemaBench), rewritten into the form it enforces best, and resolves as
approximated where its grammar may still admit outputs the schema rejects (`xgrammar_gaps`). The
decision is made once, in the API server (`resolve`), and recorded in the spec; the workers
compile with the backend the spec names.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from vllm_blockdiff.grammar.backend import CachingBackend, GrammarBackend, Matcher, make_backend
from vllm_blockdiff.grammar.spec import GrammarError, GrammarSpec


class AutoBackend(CachingBackend):
    """`GrammarBackend` over llguidance and xgrammar (each built on first use); the arguments
    are `CachingBackend`'s. A compiled spec is the pair (backend, its compiled grammar)."""

    name = "auto"
    compiles = frozenset({"xgrammar", "llguidance"})

    def __init__(self, tokenizer: Any, vocab_size: int | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 excluded_token_ids: Sequence[int] = (), cache_size: int = 256):
        super().__init__(tokenizer, vocab_size, stop_token_ids, excluded_token_ids, cache_size)
        self._args = (self.tokenizer, self.vocab_size, self.stop_token_ids, excluded_token_ids)
        self._backends: dict[str, GrammarBackend] = {}
        self._lock = threading.Lock()

    def backend(self, name: str) -> GrammarBackend:
        with self._lock:
            if name not in self._backends:
                self._backends[name] = make_backend(name, *self._args)
            return self._backends[name]

    def validate(self, spec: GrammarSpec) -> None:
        self.resolve(spec)

    def _resolve(self, spec: GrammarSpec) -> GrammarSpec:
        try:
            return self.backend("llguidance").resolve(spec)
        except GrammarError:
            return self.backend("xgrammar").resolve(spec)

    def _compile(self, spec: GrammarSpec) -> tuple[GrammarBackend, Any]:
        backend = self.backend(spec.backend)
        return backend, backend.compile(spec)

    def matcher(self, compiled: tuple[GrammarBackend, Any],
                stop_token_ids: Sequence[int] | None = None) -> Matcher:
        backend, grammar = compiled
        return backend.matcher(grammar, stop_token_ids)
