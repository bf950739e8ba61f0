"""Structured outputs for block diffusion: grammar constraints on a canvas committed out of order.

`spec` (what a request asks for) -> `backend` (compile, one matcher per request) -> `canvas`
(exact mask at the first uncommitted position, grammar-valid commit runs, fast-forward).
`coverage` measures which JSONSchemaBench schemas a backend compiles. No vLLM imports.
"""

from vllm_blockdiff.grammar.backend import GrammarBackend, Matcher, XGrammarBackend
from vllm_blockdiff.grammar.canvas import CanvasConstraint, ConstraintViolation
from vllm_blockdiff.grammar.spec import GrammarError, GrammarSpec, spec_from_structured_outputs

__all__ = [
    "CanvasConstraint",
    "ConstraintViolation",
    "GrammarBackend",
    "GrammarError",
    "GrammarSpec",
    "Matcher",
    "XGrammarBackend",
    "spec_from_structured_outputs",
]
