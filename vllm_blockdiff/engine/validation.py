"""Frontend validation of a request to a block-diffusion model (errors become HTTP 400)."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from vllm_blockdiff.grammar import (
    GrammarBackend,
    GrammarSpec,
    make_backend,
    spec_from_structured_outputs,
)
from vllm_blockdiff.options import GRAMMAR_KEY, OptionsError, resolve_options, serve_config_of
from vllm_blockdiff.policies import POLICIES


def validate_request(params: Any, hf_config: Any) -> None:
    """Accept what the block-diffusion sampler implements; name the field of anything else.

    Temperature, top-p, top-k, min-p, seed, logit bias, allowed tokens and min_tokens are applied
    per canvas position; stop conditions are vLLM's. Penalties need a left-to-right token history
    and logprobs are not produced yet, so those are refused rather than silently ignored.
    """
    unsupported = {
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "repetition_penalty": params.repetition_penalty != 1.0,
        "bad_words": bool(params.bad_words),
        "logprobs": params.logprobs is not None,
        "prompt_logprobs": params.prompt_logprobs is not None,
    }
    for field, used in unsupported.items():
        if used:
            raise OptionsError(f"{field}: not supported by block-diffusion models")
    _check_grammar_key(params.extra_args)
    serve = serve_config_of(hf_config)
    options = resolve_options(params.extra_args, serve)
    if POLICIES[options.policy].verifies_drafts and serve.shifted_logits:
        # A draft copy's first position would need the position before the block in its copy.
        raise OptionsError(f"vllm_xargs.policy: {options.policy!r} is not supported for models "
                           "with shifted logits (Fast-dLLM v2)")
    if POLICIES[options.policy].verifies_drafts:
        # Drafts are verified against greedy decoding, token for token.
        if params.temperature != 0.0:
            raise OptionsError(f"temperature: policy {options.policy!r} is greedy; set it to 0")
        if params.structured_outputs is not None or GRAMMAR_KEY in (params.extra_args or {}):
            raise OptionsError(f"structured_outputs: not supported with policy {options.policy!r}")


def _check_grammar_key(extra_args: dict[str, Any] | None) -> None:
    """Refuse a client's `GRAMMAR_KEY`: only `attach_grammar` sets it, to a `GrammarSpec` object.

    No JSON request can produce that object, so the value tells the plugin's key from a client's;
    the order of checks cannot: vLLM verifies one `SamplingParams` more than once (offline
    `LLM.generate` once per prompt, `patches/early_validation` before the stream starts), so the
    key the plugin moved there on the first pass is present on the next. A forged value would
    fail to decode, or compile unchecked, in a worker and take the engine down.
    """
    args = extra_args or {}
    if GRAMMAR_KEY in args and not isinstance(args[GRAMMAR_KEY], GrammarSpec):
        raise OptionsError(f"vllm_xargs.{GRAMMAR_KEY}: set by the server from the request's "
                           "structured outputs (response_format, structured_outputs), not by "
                           "clients")


@functools.cache
def _frontend_backend(name: str, tokenizer: Any, vocab_size: int) -> GrammarBackend:
    return make_backend(name, tokenizer, vocab_size=vocab_size)


def attach_grammar(params: Any, vocab_size: int, tokenizer: Any, backend: str) -> None:
    """Check a request's structured-output constraint and hand it to the plugin's sampler.

    vLLM's structured-output manager assumes tokens arrive left to right one at a time, so the
    constraint leaves vLLM's fields and travels in `extra_args`, compiled by the workers. A
    schema, regex or grammar that does not compile raises here (HTTP 400, compiler message):
    `backend` is the serve setting `grammar_backend`, the one the workers compile with. The spec
    travels resolved: the compiler chosen, the schema as rewritten, approximation recorded.
    """
    spec = spec_from_structured_outputs(params.structured_outputs)
    if spec is None:
        return
    spec = _frontend_backend(backend, tokenizer, vocab_size).resolve(spec)
    params.extra_args = {**(params.extra_args or {}), GRAMMAR_KEY: spec}
    params.structured_outputs = None


def grammar_of(extra_args: dict[str, Any] | None) -> GrammarSpec | None:
    """The request's grammar; the spec crosses to the engine as a msgpack map."""
    raw = (extra_args or {}).get(GRAMMAR_KEY)
    return None if raw is None else msgspec.convert(raw, GrammarSpec)
