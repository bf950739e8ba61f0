"""Validate a request when an endpoint asks for its output, so a refused stream is an HTTP 400.

vLLM 0.26's `AsyncLLM.generate` is an async generator: the request's `SamplingParams.verify` and
prompt checks run on its first iteration (`add_request` -> `InputProcessor.process_inputs`). The
OpenAI endpoints (`_create_completion`, `_create_chat_completion`, ...) call `generate()` and,
with `stream: true`, return the SSE body generator that first iterates it, which
`StreamingResponse` runs after sending HTTP 200. So a request refused there (`logprobs` or a bad
`vllm_xargs` value for a block-diffusion model, an out-of-vocabulary or too long prompt) got 200
and an error event where the same request without streaming got a 400. These checks now also
run when `generate()` is called, raising in the endpoint before any response starts;
`process_inputs` repeats them, which they allow (the plugin's own: `engine/validation.py`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from vllm.inputs import split_enc_dec_input
from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.input_processor import InputProcessor

from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def validate(processor: InputProcessor, prompt: Any, params: Any) -> None:
    """What `process_inputs` checks of sampling params and of a rendered prompt (`EngineInput`)."""
    if isinstance(params, SamplingParams):
        params.verify(processor.model_config, processor.speculative_config,
                      processor.structured_outputs_config, processor.tokenizer)
    if isinstance(prompt, dict) and "type" in prompt:
        processor._validate_model_inputs(*split_enc_dec_input(prompt))


def apply() -> None:
    @wrap_once(AsyncLLM, "generate")
    def generate(original, self: AsyncLLM, prompt: Any, sampling_params: Any, *args: Any,
                 **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        validate(self.input_processor, prompt, sampling_params)
        return original(self, prompt, sampling_params, *args, **kwargs)
