"""Grammar backends behind a small interface: resolve and compile a spec, one matcher per request.

The canvas logic (`canvas.py`) only needs a matcher that accepts a token, rolls back, fills a
token bitmask and names the text the grammar forces next; `XGrammarBackend` provides that with
xgrammar, `LLGuidanceBackend` (`llguidance_backend.py`) with llguidance, and `AutoBackend`
(`auto.py`, the default) with whichever of the two enforces a request's constraint exactly.
`make_backend` picks one by name (the serve setting `grammar_backend`).

The API server resolves each request's spec (`resolve`: compiles it or raises, and records the
backend, any schema rewrite and whether the grammar approximates the schema); the workers compile
the resolved spec, so both sides always agree on the grammar.
"""

from __future__ import annotations

import json
import os
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np
import torch
import xgrammar as xgr

from vllm_blockdiff.grammar import bitmask as bitmask_ops
from vllm_blockdiff.grammar.schema_rewrite import rewritten_spec
from vllm_blockdiff.grammar.spec import GrammarError, GrammarSpec, choice_ebnf
from vllm_blockdiff.grammar.xgrammar_gaps import xgrammar_gaps


class Matcher(Protocol):
    """Grammar state after the tokens accepted so far. Not thread-safe: one per request."""

    stop_token_ids: tuple[int, ...]

    def accept(self, token: int) -> bool:
        """Advance over `token` if the grammar allows it here; False (state unchanged) if not."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed next tokens into row `row` of a host int32 bitmask (where the
        grammar forces text, llguidance allows only the tokens of its canonical tokenization)."""

    def is_completed(self) -> bool:
        """The text so far is a complete sentence of the grammar: a stop token may follow."""

    def is_terminated(self) -> bool:
        """A stop token has been accepted: nothing more may follow."""

    def jump_forward_string(self) -> str:
        """The longest text every continuation starts with (may be empty)."""

    def reset(self) -> None:
        """Back to the empty prefix."""


class GrammarBackend(Protocol):
    name: str  # the serve setting's value: "auto", "xgrammar", "llguidance"
    vocab_size: int  # the model's (bitmask width in tokens); may exceed the tokenizer's
    stop_token_ids: tuple[int, ...]  # default stop tokens a complete sentence may end with

    def validate(self, spec: GrammarSpec) -> None:
        """Cheap check that `spec` compiles (no vocabulary pass); raises GrammarError."""

    def resolve(self, spec: GrammarSpec) -> GrammarSpec:
        """`validate`, then the spec to compile: `backend` named, a JSON schema possibly
        rewritten (`rewritten`), `approximated` where the grammar may admit outputs the schema
        rejects. Cached by spec; raises GrammarError."""

    def compile(self, spec: GrammarSpec) -> Any:
        """Compile the resolved spec (resolving it first if undecided; cached by spec); raises
        GrammarError naming the spec's field."""

    def matcher(self, compiled: Any, stop_token_ids: Sequence[int] | None = None) -> Matcher:
        """A fresh matcher; `stop_token_ids` overrides the backend's default stop tokens."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (used to fast-forward forced text)."""


_LOG_PREFIX = re.compile(r"^\[[\d:.]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"^Check failed: \(.*?\) is false:\s*")


def compiler_message(err: BaseException) -> str:
    """xgrammar's message without its C++ log location, e.g. 'Unsupported type "foo"'."""
    text = _LOG_PREFIX.sub("", str(err).strip())
    return _CHECK_PREFIX.sub("", text).strip() or type(err).__name__


# xgrammar 0.2.8 writes the characters of length-limited strings (minLength / maxLength) as
# [^"\\\r\n], which admits raw control characters (tab, \x16, ...) that JSON forbids inside
# strings: outputs would not parse. The JSON string character class fixes it (no escapes there,
# as before: a restriction, never invalid JSON).
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def json_schema_grammar(source: str, any_whitespace: bool) -> xgr.Grammar:
    """The schema's grammar (vLLM's settings: strict mode), with JSON-valid string characters.

    With `any_whitespace` the value may also start with one space or newline: byte-level BPE
    tokenizers merge the space after a colon into the brace (" {", " ["), and a model that
    learned to write `JSON: {` must not be forced onto a tokenization it never saw. Leading
    whitespace is valid JSON. (Recursive references to `root` now allow it too: still JSON.)
    """
    grammar = xgr.Grammar.from_json_schema(source, any_whitespace=any_whitespace)
    text = str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)
    if any_whitespace:
        text = re.sub(r"^root ::=", "json_value ::=", text, count=1, flags=re.M)
        text = 'root ::= [ \\n]? json_value\n' + text
    elif text == str(grammar):
        return grammar
    return xgr.Grammar.from_ebnf(text)


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids that never stand for text: special tokens and added tokens flagged special.

    xgrammar reads added tokens such as `<|im_end|>` or `<|MASK|>` as their literal text and
    would allow them inside JSON strings; the detokenizer then drops them (or the engine stops on
    them), so they must be excluded from every mask.
    """
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as is; a path through AutoTokenizer (never running remote code: SDAR
    configs carry an `auto_map`, which would otherwise make transformers ask on stdin)."""
    if isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False)
    return tokenizer


def blocked_ids(tokenizer: Any, vocab_size: int, excluded: Sequence[int] = ()) -> np.ndarray:
    """[vocab_size] bool: ids no grammar may produce as text (special tokens, `excluded`, and
    ids the tokenizer lacks, i.e. lm_head padding); matchers allow their stop tokens apart."""
    blocked = np.ones(vocab_size, dtype=bool)
    blocked[[i for i in tokenizer.get_vocab().values() if i < vocab_size]] = False
    blocked[[i for i in special_token_ids(tokenizer) | set(excluded) if i < vocab_size]] = True
    return blocked


def is_text_token(blocked: np.ndarray, token: int) -> bool:
    return 0 <= token < len(blocked) and not blocked[token]


def tokenizer_info(tokenizer: Any, blocked: np.ndarray, stop_token_ids: Sequence[int]
                   ) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, with `blocked` ids blanked."""
    vocab_size = len(blocked)
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
    encoded = [""] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and not blocked[i]:
            encoded[i] = token
    return xgr.TokenizerInfo(encoded, detected.vocab_type, vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids),
                             add_prefix_space=detected.add_prefix_space)


class XGrammarMatcher:
    """`Matcher` over `xgrammar.GrammarMatcher`.

    Ids that can never be accepted (special tokens other than its stops, ids past the vocabulary)
    are refused here: xgrammar would refuse them too, but logs a warning for each.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: tuple[int, ...],
                 blocked: np.ndarray):
        self.stop_token_ids = stop_token_ids
        self._stops = frozenset(stop_token_ids)
        self._blocked = blocked
        self._m = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids))

    def accept(self, token: int) -> bool:
        token = int(token)
        if token not in self._stops and not is_text_token(self._blocked, token):
            return False
        return self._m.accept_token(token)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        if self._m.is_terminated():  # xgrammar refuses; the request has ended
            bitmask_ops.allow_only(bitmask[row], self.stop_token_ids)
            return
        self._m.fill_next_token_bitmask(bitmask, row)

    def is_completed(self) -> bool:
        return self._m.is_completed()

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def jump_forward_string(self) -> str:
        return "" if self._m.is_terminated() else self._m.find_jump_forward_string()

    def reset(self) -> None:
        self._m.reset()


class LRUCache:
    """Thread-safe least-recently-used values by key, computed on a miss outside the lock."""

    def __init__(self, size: int):
        self._values: OrderedDict[Hashable, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[Any], Any]) -> Any:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = compute(key)
        with self._lock:
            self._values[key] = value
            while len(self._values) > self._size:
                self._values.popitem(last=False)
        return value


class CachingBackend(ABC):
    """What every backend shares: one tokenizer + model vocabulary, default stop tokens, the ids
    never allowed, and thread-safe caches of resolved and compiled specs (subclasses `_resolve`
    and `_compile`).

    `vocab_size` is the model's (lm_head rows); ids past the tokenizer are never allowed.
    `stop_token_ids` are the ids a complete sentence may end with (the model's EOS ids, primary
    first, e.g. `<|im_end|>`, `<|endoftext|>`), the tokenizer's EOS if not given.
    `excluded_token_ids` are never allowed either (the diffusion mask token, should a tokenizer
    not flag it special).
    """

    name = ""
    compiles: frozenset[str] = frozenset()  # the `GrammarSpec.backend` values it compiles

    def __init__(self, tokenizer: Any, vocab_size: int | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 excluded_token_ids: Sequence[int] = (), cache_size: int = 256):
        self.tokenizer = load_tokenizer(tokenizer)
        vocab = self.tokenizer.get_vocab()
        self.tokenizer_size = max(len(vocab), max(vocab.values()) + 1)
        self.vocab_size = vocab_size or self.tokenizer_size
        if stop_token_ids is None:
            stop_token_ids = [self.tokenizer.eos_token_id]
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.blocked = blocked_ids(self.tokenizer, self.vocab_size, excluded_token_ids)
        self._resolved = LRUCache(cache_size)
        self._compiled = LRUCache(cache_size)

    def resolve(self, spec: GrammarSpec) -> GrammarSpec:
        if spec.backend:
            return spec
        return self._resolved.get(spec, self._resolve)

    def compile(self, spec: GrammarSpec) -> Any:
        spec = self.resolve(spec)
        if spec.backend not in self.compiles:
            # The API server resolved it for another backend than the workers serve with.
            raise GrammarError(spec.field, f"resolved for {spec.backend}, not {self.name}")
        return self._compiled.get(spec, self._compile)

    @abstractmethod
    def _resolve(self, spec: GrammarSpec) -> GrammarSpec:
        """Resolve an undecided `spec` (uncached); raises GrammarError."""

    @abstractmethod
    def _compile(self, spec: GrammarSpec) -> Any:
        """Compile a resolved `spec` (uncached); raises GrammarError naming the spec's field."""

    def _stops(self, stop_token_ids: Sequence[int] | None) -> tuple[int, ...]:
        return self.stop_token_ids if stop_token_ids is None else tuple(stop_token_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class XGrammarBackend(CachingBackend):
    """`GrammarBackend` with xgrammar (EBNF grammars); see `CachingBackend` for the arguments.

    JSON schemas compile rewritten into the equivalent form it enforces best (`schema_rewrite`;
    the schema as given if that fails to compile), and resolve as approximated where its grammar
    may still admit outputs the schema rejects (`xgrammar_gaps`).
    """

    name = "xgrammar"
    compiles = frozenset({"xgrammar"})

    def __init__(self, tokenizer: Any, vocab_size: int | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 excluded_token_ids: Sequence[int] = (), cache_size: int = 256,
                 max_threads: int | None = None):
        super().__init__(tokenizer, vocab_size, stop_token_ids, excluded_token_ids, cache_size)
        info = tokenizer_info(self.tokenizer, self.blocked, self.stop_token_ids)
        threads = max_threads or min(8, os.cpu_count() or 1)
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)

    def validate(self, spec: GrammarSpec) -> None:
        """Raise GrammarError if `spec` does not compile, without the token-level work.

        Converting a spec to a grammar is where compilation fails; the vocabulary pass that
        follows is the costly part (milliseconds to seconds per schema), so request validation
        in the API server calls this and the engine calls `compile`.
        """
        self._grammar(spec)

    def _resolve(self, spec: GrammarSpec) -> GrammarSpec:
        rewritten = rewritten_spec(spec)
        if rewritten is not None:
            try:
                self.validate(rewritten)
                spec = rewritten
            except GrammarError:
                self.validate(spec)
        else:
            self.validate(spec)
        gaps = xgrammar_gaps(json.loads(spec.source)) if spec.kind == "json" else ()
        return msgspec.structs.replace(spec, backend=self.name, approximated=bool(gaps))

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        grammar = self._grammar(spec)
        try:
            return self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(spec.field, compiler_message(e)) from None

    def _grammar(self, spec: GrammarSpec) -> xgr.Grammar:
        try:
            if spec.kind in ("json", "json_object"):
                source = spec.source if spec.kind == "json" else '{"type": "object"}'
                return json_schema_grammar(source, spec.any_whitespace)
            if spec.kind == "regex":
                return xgr.Grammar.from_regex(spec.source)
            if spec.kind == "choice":
                return xgr.Grammar.from_ebnf(choice_ebnf(spec.choices))
            return xgr.Grammar.from_ebnf(spec.source)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(spec.field, compiler_message(e)) from None

    def matcher(self, compiled: xgr.CompiledGrammar,
                stop_token_ids: Sequence[int] | None = None) -> XGrammarMatcher:
        return XGrammarMatcher(compiled, self._stops(stop_token_ids), self.blocked)


BACKENDS = ("xgrammar", "llguidance")  # the grammar compilers
BACKEND_NAMES = ("auto", *BACKENDS)  # the serve setting's values


def make_backend(name: str, tokenizer: Any, vocab_size: int | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 excluded_token_ids: Sequence[int] = ()) -> GrammarBackend:
    """The backend called `name` (one of `BACKEND_NAMES`); llguidance is imported when used."""
    if name == "auto":
        from vllm_blockdiff.grammar.auto import AutoBackend

        return AutoBackend(tokenizer, vocab_size, stop_token_ids, excluded_token_ids)
    if name == "llguidance":
        from vllm_blockdiff.grammar.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, vocab_size, stop_token_ids, excluded_token_ids)
    if name == "xgrammar":
        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids, excluded_token_ids)
    raise ValueError(f"unknown grammar backend {name!r}; choose one of {list(BACKEND_NAMES)}")
