"""Frontend validation of a request to a block-diffusion model (errors become HTTP 400)."""

from __future__ import annotations

from typing import Any

from vllm_blockdiff.options import OptionsError, resolve_options, serve_config_of


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
    resolve_options(params.extra_args, serve_config_of(hf_config))
