"""Structured outputs for block diffusion: grammar constraints on a canvas committed out of order.

`spec` (what a request asks for) -> `backend` (resolve: choose and check; compile, one matcher
per request) -> `canvas` (exact mask at the first uncommitted position, grammar-valid commit runs,
fast-forward). Backends: xgrammar (`backend.py`), llguidance (`llguidance_backend.py`) and, the
default, the exact one of the two per request (`auto.py`), by `make_backend`. JSON schemas are
rewritten into equivalent forms the compilers enforce exactly (`schema_rewrite`, reading drafts
as `schema_draft` does); `xgrammar_gaps` says where xgrammar would still approximate.
`coverage` measures which JSONSchemaBench schemas a backend compiles, and how. No vLLM imports.
"""

from vllm_blockdiff.grammar.backend import (
    BACKEND_NAMES,
    BACKENDS,
    GrammarBackend,
    Matcher,
    XGrammarBackend,
    make_backend,
)
from vllm_blockdiff.grammar.canvas import CanvasConstraint, ConstraintViolation
from vllm_blockdiff.grammar.spec import GrammarError, GrammarSpec, spec_from_structured_outputs

__all__ = [
    "BACKEND_NAMES",
    "BACKENDS",
    "CanvasConstraint",
    "ConstraintViolation",
    "GrammarBackend",
    "GrammarError",
    "GrammarSpec",
    "Matcher",
    "XGrammarBackend",
    "make_backend",
    "spec_from_structured_outputs",
]
