"""Refuse token ids the model cannot have (HTTP 400) instead of letting them kill a worker.

Prompt ids: vLLM 0.26 (`InputProcessor._validate_model_input`) refuses ids above
`max(tokenizer.max_token_id, vocab_size - 1)`, but its cached HF tokenizer's `max_token_id` is
`max(largest id, tokenizer.vocab_size)`, a size: an id equal to the vocabulary size (768 on the
bundled testbeds) passes and the embedding lookup fails in the worker. Without a tokenizer
(`skip_tokenizer_init`) nothing is checked, and offline prompts may hold negative ids.

Stop ids: vLLM checks only that `stop_token_ids` are integers. Workers hold them in int64
tensors (vLLM's min_tokens state, the plugin's stop table), so 2**63 kills the engine and 2**64
fails to encode (HTTP 500).

Both now lie in [0, `vocabulary_limit`), for every model, AR ones included.

`seed` and `top_k`, the other request integers the workers store in int64 arrays, are not
bounded by vLLM either (its OpenAI server bounds `seed`, not `top_k`; offline requests neither):
2**63 kills the engine ("Python int too large to convert to C long" in the sampling states) and
2**64 fails to encode. They must fit in int64. So must every integer in `vllm_xargs`
(`extra_args`): the engine client's msgpack encoding fails from 2**64 on, an HTTP 500 (a
streamed request: HTTP 200, then an error event) for AR models too, which the plugin's
diffusion options do not cover.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def vocabulary_limit(model_config: Any, tokenizer: Any) -> int:
    """Token ids lie below this: the model's vocabulary size, or the tokenizer's where larger
    (multimodal placeholder tokens), vLLM's own rule counted in sizes on both sides."""
    limit = model_config.get_vocab_size()
    return limit if tokenizer is None else max(limit, len(tokenizer))


def _check(field: str, ids: list[int], limit: int) -> None:
    lowest, highest = min(ids), max(ids)
    if lowest < 0 or highest >= limit:
        bad = lowest if lowest < 0 else highest
        raise VLLMValidationError(f"{field}: token id {bad} is out of vocabulary [0, {limit})",
                                  parameter=field, value=bad)


INT64 = (-(2**63), 2**63)
_INT64_FIELDS = ("seed", "top_k")


def _check_int64(params: SamplingParams) -> None:
    for field in _INT64_FIELDS:
        value = getattr(params, field)
        if value is not None and not INT64[0] <= value < INT64[1]:
            raise VLLMValidationError(f"{field}: {value} does not fit in a 64-bit integer",
                                      parameter=field, value=value)


def _check_extra_args(value: Any, field: str) -> None:
    """Every integer in `vllm_xargs`, nested ones included, fits in int64."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_extra_args(item, f"{field}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_extra_args(item, f"{field}[{i}]")
    elif isinstance(value, int) and not INT64[0] <= value < INT64[1]:
        raise VLLMValidationError(f"{field}: {value} does not fit in a 64-bit integer",
                                  parameter=field, value=value)


def apply() -> None:
    @wrap_once(InputProcessor, "_validate_model_input")
    def _validate_model_input(validate_input, self: InputProcessor, prompt_input: Any,
                              prompt_type: Any) -> None:
        validate_input(self, prompt_input, prompt_type)
        ids = None if prompt_input["type"] == "embeds" else prompt_input["prompt_token_ids"]
        if ids:
            _check("prompt", ids, vocabulary_limit(self.model_config, self.tokenizer))

    @wrap_once(SamplingParams, "verify")
    def verify_stop_ids(verify, self: SamplingParams, model_config: Any, speculative_config: Any,
                        structured_outputs_config: Any, tokenizer: Any) -> None:
        verify(self, model_config, speculative_config, structured_outputs_config, tokenizer)
        _check_int64(self)
        _check_extra_args(self.extra_args or {}, "vllm_xargs")
        if self.stop_token_ids:
            _check("stop_token_ids", self.stop_token_ids,
                   vocabulary_limit(model_config, tokenizer))
