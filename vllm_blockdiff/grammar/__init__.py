"""Structured outputs for block diffusion: grammar constraints on a canvas committed out of order.

`spec` (what a request asks for) -> `backend` (compile, one matcher per request) -> `canvas`
(exact mask at the first uncommitted position, grammar-valid commit runs, fast-forward).
Backends: xgrammar (`backend.py`) and llguidance (`llguidance_backend.py`), by `make_backend`.
`coverage` measures which JSONSchemaBench schemas a backend compiles. No vLLM imports.
"""

from vllm_blockdiff.grammar.backend import (
    BACKENDS,
    GrammarBackend,
    Matcher,
    XGrammarBackend,
    make_backend,
)
from vllm_blockdiff.grammar.canvas import CanvasConstraint, ConstraintViolation
from vllm_blockdiff.grammar.spec import GrammarError, GrammarSpec, spec_from_structured_outputs

__all__ = [
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
