"""`GrammarBackend` with llguidance (serve setting `grammar_backend: "llguidance"`).

Kinds are read as vLLM's guidance backend reads them: JSON schemas by llguidance's JSON
compiler (keywords it cannot enforce are errors, not approximations), regexes in Rust `regex`
syntax, and `grammar` as Lark, or as GBNF (the xgrammar backend's syntax), which llguidance's own
converter turns into Lark. JSON keeps the xgrammar backend's whitespace contract, so outputs do
not depend on the backend: with `any_whitespace` any JSON whitespace between tokens plus one
leading space or newline (`json_schema_grammar` says why); without, `", "` and `": "`.

Stop tokens are the matcher's own business, as in xgrammar: llguidance never sees them, its mask
is cut to text tokens, and a stop is allowed exactly when llguidance's parser accepts.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import msgspec
import numpy as np
import torch

from vllm_blockdiff.grammar import bitmask as bitmask_ops
from vllm_blockdiff.grammar.backend import CachingBackend, is_text_token
from vllm_blockdiff.grammar.schema_rewrite import rewritten_spec
from vllm_blockdiff.grammar.spec import GrammarError, GrammarSpec

FLEXIBLE = {"whitespace_flexible": True}
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Ten times llguidance's default lexer fuel, which also caps the lexer expressions a compiled
# grammar may build over its lifetime (shared by every copy of it). At the default, replaying
# valid text into JSONSchemaBench `o21115` (strings of at most 50 words, 500 characters) ran out
# of expressions after 43 tokens, and the grammar then refused every token, for every request
# with that schema. The fuel caps work, it does not allocate: other schemas compile as before.
LIMITS = llguidance.LLParserLimits(initial_lexer_fuel=10_000_000)

# llguidance quotes the Lark source after its message ("   2 | json: %json {...}"), which for a
# schema is the whole schema; the location ("at 2(7): ") points into Lark text we generated.
_EXCERPT = re.compile(r"\n\s*\d+ \| .*", re.S)
_GENERATED_LOCATION = re.compile(r"^at \d+\(\d+\): (failed to compile JSON schema: )?")


def json_grammar(source: str, any_whitespace: bool) -> str:
    """The schema as a Lark grammar; the schema's own `x-guidance` options win, as in vLLM."""
    schema = json.loads(source)
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    options = FLEXIBLE if any_whitespace else COMPACT
    schema = {**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}}
    start = "start: json | /[ \\n]/ json" if any_whitespace else "start: json"
    return llguidance.LLMatcher.grammar_from_lark(f"{start}\njson: %json {json.dumps(schema)}")


def _looser_than_jsonschema(value: Any) -> bool:
    """A fractional `multipleOf`, or `format: date` (llguidance's dates admit February 29 of
    every year, `jsonschema` only of leap years: found by `coverage.walk` on JSONSchemaBench)."""
    if isinstance(value, dict):
        step = value.get("multipleOf")
        if (isinstance(step, float) and not step.is_integer()) or value.get("format") == "date":
            return True
        return any(_looser_than_jsonschema(v) for v in value.values())
    return isinstance(value, list) and any(_looser_than_jsonschema(v) for v in value)


def error_message(error: str, spec: GrammarSpec) -> str:
    text = _EXCERPT.sub("", error).strip()
    return text if spec.kind == "grammar" else _GENERATED_LOCATION.sub("", text)


class LLGuidanceMatcher:
    """`Matcher` over a copy of a compiled `llguidance.LLMatcher`.

    Tokens are tried with `try_consume_tokens`, which refuses without entering llguidance's
    error state (`consume_token` would, for good). The stop token is tracked here.
    """

    def __init__(self, compiled: llguidance.LLMatcher, stop_token_ids: tuple[int, ...],
                 blocked: np.ndarray, text_words: torch.Tensor, ll_vocab_size: int):
        self.stop_token_ids = stop_token_ids
        self._stops = frozenset(stop_token_ids)
        self._blocked = blocked
        self._text_words = text_words  # [W] the ids llguidance's mask may keep
        self._stop_words = bitmask_ops.pack_ids(stop_token_ids, len(text_words))
        self._scratch = bitmask_ops.allocate(1, ll_vocab_size)  # llguidance's exact mask size
        self._m = compiled.deep_copy()
        self._terminated = False

    def accept(self, token: int) -> bool:
        token = int(token)
        if self._terminated:
            return False
        if token in self._stops:
            self._terminated = self._m.is_accepting()
            return self._terminated
        return is_text_token(self._blocked, token) and self._m.try_consume_tokens([token]) == 1

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and self._terminated:
            self._terminated = False
            num_tokens -= 1
        if num_tokens:
            self._m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        out = bitmask[row]
        if self._terminated:
            bitmask_ops.allow_only(out, self.stop_token_ids)
            return
        llguidance.torch.fill_next_token_bitmask(self._m, self._scratch, 0)
        words = len(self._text_words)
        mask = self._scratch[0, :words] & self._text_words
        if self._m.is_accepting():
            mask |= self._stop_words
        out[:words] = mask
        out[words:] = 0

    def is_completed(self) -> bool:
        return self._terminated or self._m.is_accepting()

    def is_terminated(self) -> bool:
        return self._terminated

    def jump_forward_string(self) -> str:
        if self._terminated:
            return ""
        # Forced bytes may end inside a UTF-8 character: keep the complete characters.
        return codecs.getincrementaldecoder("utf-8")().decode(self._m.compute_ff_bytes())

    def reset(self) -> None:
        self._m.reset()
        self._terminated = False


class LLGuidanceBackend(CachingBackend):
    """`GrammarBackend` with llguidance; the arguments are `CachingBackend`'s.

    A compiled spec is an `LLMatcher` that never consumes a token: each request's matcher is a
    deep copy of it (cheap), so the grammar is built once per spec. A JSON schema it refuses is
    tried once more rewritten into its equivalent form (`schema_rewrite`: e.g. without formats no
    validator checks, `oneOf` of disjoint branches as `anyOf`). What it compiles, it enforces
    exactly, with two differences from `jsonschema`: a fractional `multipleOf` is decimal to
    llguidance (2.01 is a multiple of 0.01) and binary floating point to the validator (it is
    not), and a `date` may be February 29 of any year; such schemas resolve as approximated.
    """

    name = "llguidance"
    compiles = frozenset({"llguidance"})

    def __init__(self, tokenizer: Any, vocab_size: int | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 excluded_token_ids: Sequence[int] = (), cache_size: int = 256):
        super().__init__(tokenizer, vocab_size, stop_token_ids, excluded_token_ids, cache_size)
        # llguidance's vocabulary covers the whole tokenizer even if the model's is smaller.
        self._ll = llguidance.hf.from_tokenizer(
            self.tokenizer, max(self.vocab_size, self.tokenizer_size),
            eos_token=list(self.stop_token_ids))
        text = ~self.blocked
        text[[t for t in self._ll.eos_tokens if t < self.vocab_size]] = False
        self._text_words = bitmask_ops.pack(text, bitmask_ops.words(self.vocab_size))

    def validate(self, spec: GrammarSpec) -> None:
        """Raise GrammarError if `spec` does not compile: llguidance checks the grammar without
        a tokenizer (no lexer over the vocabulary)."""
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            self._grammar(spec), limits=LIMITS)
        if failed:
            raise GrammarError(spec.field, error_message(messages[0], spec))

    def _resolve(self, spec: GrammarSpec) -> GrammarSpec:
        try:
            self.validate(spec)
        except GrammarError as refused:
            rewritten = rewritten_spec(spec)
            if rewritten is None:
                raise
            try:
                self.validate(rewritten)
            except GrammarError:
                raise refused from None
            spec = rewritten
        approximated = spec.kind == "json" and _looser_than_jsonschema(json.loads(spec.source))
        return msgspec.structs.replace(spec, backend=self.name, approximated=approximated)

    def _compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        compiled = llguidance.LLMatcher(self._ll, self._grammar(spec), log_level=0,
                                        limits=LIMITS)
        if compiled.is_error():
            raise GrammarError(spec.field, error_message(compiled.get_error(), spec))
        return compiled

    def _grammar(self, spec: GrammarSpec) -> str:
        try:
            if spec.kind == "json":
                return json_grammar(spec.source, spec.any_whitespace)
            if spec.kind == "json_object":
                return json_grammar('{"type": "object"}', spec.any_whitespace)
            if spec.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(spec.source)
            if spec.kind == "choice":
                return llguidance.grammar_from("choice", json.dumps(spec.choices))
            return llguidance.grammar_from("grammar", spec.source)  # Lark as is, GBNF converted
        except (ValueError, TypeError) as e:
            raise GrammarError(spec.field, str(e)) from None

    def matcher(self, compiled: llguidance.LLMatcher,
                stop_token_ids: Sequence[int] | None = None) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(compiled, self._stops(stop_token_ids), self.blocked,
                                 self._text_words, self._ll.vocab_size)
