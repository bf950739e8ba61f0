"""Accept structured outputs for the plugin's models and route them to the canvas-aware grammar.

vLLM 0.26 refuses structured outputs for every diffusion model (`_validate_structured_outputs`,
PR #45468): its grammar manager checks tokens left to right, one per step. For the plugin's
models only, the constraint is compiled-checked in the API server (bad schema -> HTTP 400 with
the compiler's message) and moved into `extra_args`, where the plugin's sampler enforces it on
the canvas; other models keep vLLM's check.
"""

from __future__ import annotations

from vllm.sampling_params import SamplingParams

from vllm_blockdiff.engine.validation import attach_grammar
from vllm_blockdiff.options import is_block_diffusion, serve_config_of
from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def apply() -> None:
    @wrap_once(SamplingParams, "_validate_structured_outputs")
    def _validate_structured_outputs(original, self: SamplingParams, model_config,
                                     structured_outputs_config, tokenizer) -> None:
        if (model_config is None or self.structured_outputs is None
                or not is_block_diffusion(model_config.hf_config)):
            return original(self, model_config, structured_outputs_config, tokenizer)
        if tokenizer is None:
            raise ValueError("structured outputs need a tokenizer (not with skip_tokenizer_init)")
        attach_grammar(self, model_config.get_vocab_size(), tokenizer,
                       serve_config_of(model_config.hf_config).grammar_backend)
