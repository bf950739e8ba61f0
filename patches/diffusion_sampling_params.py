"""Let requests to block-diffusion models use the sampling parameters the plugin implements.

vLLM 0.26 refuses temperature != 1, seed, min_p, min_tokens, logit_bias and allowed_token_ids for
every diffusion model (`SamplingParams._validate_diffusion`, written for DiffusionGemma's fixed
temperature schedule). For the plugin's models only, this replaces that check with the plugin's
own validation, which also validates the block-diffusion options in `extra_args`; other
diffusion models keep vLLM's check.
"""

from __future__ import annotations

from vllm.sampling_params import SamplingParams

from vllm_blockdiff.engine.validation import validate_request
from vllm_blockdiff.options import is_block_diffusion
from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def apply() -> None:
    @wrap_once(SamplingParams, "_validate_diffusion")
    def _validate_diffusion(original, self: SamplingParams, model_config) -> None:
        if model_config is not None and is_block_diffusion(model_config.hf_config):
            validate_request(self, model_config.hf_config)
        else:
            original(self, model_config)
