"""Hugging Face config classes for block-diffusion `model_type`s that transformers does not know.

Published SDAR and Fast-dLLM v2 checkpoints point `auto_map` at remote code; registering these
classes lets `vllm serve PATH` read the unchanged config.json without `--trust-remote-code`.
"""

from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig


class SDARConfig(Qwen3Config):
    """Qwen3 fields; SDAR's training copy of config.json adds `block_size` and `mask_token_id`,
    which are kept as plain attributes when present."""

    model_type = "sdar"


class SDARMoeConfig(Qwen3MoeConfig):
    model_type = "sdar_moe"


class FastDLLMQwenConfig(Qwen2Config):
    """Qwen2 fields; Fast-dLLM v2 adds `bd_size` (the block length) and `layer_types`, kept as
    plain attributes."""

    model_type = "Fast_dLLM_Qwen"
