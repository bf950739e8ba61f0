"""What one request's structured output must match, and the error that names the offending field.

A `GrammarSpec` is a frozen, hashable value (it keys the compiled-grammar cache) built from vLLM's
structured-output request fields: `json` (schema), `json_object`, `regex`, `choice`, `grammar`
(EBNF / GBNF as xgrammar accepts it). It is backend-neutral until the API server resolves it
(`GrammarBackend.resolve`), which records the compiler, any schema rewrite and whether the grammar
approximates the schema; the workers compile what it records.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]

# vLLM's StructuredOutputsParams fields this package understands, in its own precedence order.
FIELDS: tuple[Kind, ...] = ("json", "regex", "choice", "grammar", "json_object")
DEFAULT_PREFIX = "structured_outputs"


class GrammarError(ValueError):
    """A constraint that cannot be compiled; `field` names the request field it came from.

    The message is `"<field>: <compiler message>"`. The server decides how the field is spelled
    for the client (`structured_outputs.json` offline, `response_format.json_schema` in the
    OpenAI API): `with_field` re-labels the error without touching the compiler's message.
    """

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail

    def with_field(self, field: str) -> GrammarError:
        return GrammarError(field, self.detail)


class GrammarSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One request's constraint. `source` is the schema as JSON text, the regex or the EBNF."""

    kind: Kind
    source: str = ""
    choices: tuple[str, ...] = ()
    # vLLM's `disable_any_whitespace` inverted: JSON may hold any whitespace between tokens.
    any_whitespace: bool = True
    # Decided in the API server (`GrammarBackend.resolve`), followed by the workers: the backend
    # that compiles this spec ("": not decided yet), whether `source` is the request's schema
    # rewritten into an equivalent form (`schema_rewrite`), and whether the grammar may admit
    # outputs the schema rejects (`xgrammar_gaps`).
    backend: str = ""
    rewritten: bool = False
    approximated: bool = False

    @property
    def field(self) -> str:
        """The request field errors are reported against (before any re-labelling)."""
        return f"{DEFAULT_PREFIX}.{self.kind}"

    @classmethod
    def from_json(cls, schema: dict[str, Any] | bool | str, any_whitespace: bool = True
                  ) -> GrammarSpec:
        """A JSON schema given as a dict or as JSON text (key order is kept: it orders output)."""
        field = f"{DEFAULT_PREFIX}.json"
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(field, f"schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError(field, f"schema must be an object or a boolean, not "
                                      f"{type(schema).__name__}")
        try:
            source = json.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise GrammarError(field, f"schema is not JSON-serializable: {e}") from None
        return cls(kind="json", source=source, any_whitespace=any_whitespace)

    @classmethod
    def json_object(cls, any_whitespace: bool = True) -> GrammarSpec:
        return cls(kind="json_object", any_whitespace=any_whitespace)

    @classmethod
    def from_regex(cls, pattern: str) -> GrammarSpec:
        if not isinstance(pattern, str):
            raise GrammarError(f"{DEFAULT_PREFIX}.regex", "must be a string")
        return cls(kind="regex", source=pattern)

    @classmethod
    def from_choice(cls, choices: Sequence[str]) -> GrammarSpec:
        field = f"{DEFAULT_PREFIX}.choice"
        if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
            raise GrammarError(field, "must be a list of strings")
        if not choices:
            raise GrammarError(field, "must hold at least one choice")
        return cls(kind="choice", choices=tuple(choices))

    @classmethod
    def from_grammar(cls, ebnf: str) -> GrammarSpec:
        if not isinstance(ebnf, str):
            raise GrammarError(f"{DEFAULT_PREFIX}.grammar", "must be a string")
        return cls(kind="grammar", source=ebnf)


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF alternation of literal strings (JSON string escapes are valid EBNF escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def spec_from_structured_outputs(params: Any) -> GrammarSpec | None:
    """Build the spec from a `StructuredOutputsParams`-like object (attribute access only).

    Returns None when `params` is None. Exactly one of `json`, `regex`, `choice`, `grammar`,
    `json_object` must be set; `structural_tag` is not supported by the canvas constraint.
    """
    if params is None:
        return None
    if getattr(params, "structural_tag", None) is not None:
        raise GrammarError(f"{DEFAULT_PREFIX}.structural_tag",
                           "structural tags are not supported for block diffusion")
    present = [f for f in FIELDS if getattr(params, f, None) not in (None, False)]
    if len(present) != 1:
        raise GrammarError(DEFAULT_PREFIX, "exactly one of json, regex, choice, grammar, "
                                           f"json_object must be set (got {present or 'none'})")
    kind = present[0]
    value = getattr(params, kind)
    any_whitespace = not getattr(params, "disable_any_whitespace", False)
    if kind == "json":
        return GrammarSpec.from_json(value, any_whitespace)
    if kind == "json_object":
        return GrammarSpec.json_object(any_whitespace)
    if kind == "regex":
        return GrammarSpec.from_regex(value)
    if kind == "choice":
        return GrammarSpec.from_choice(value)
    return GrammarSpec.from_grammar(value)
