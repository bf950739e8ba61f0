"""Block-diffusion model families the plugin serves, and what each checkpoint layout implies.

Kept free of vLLM imports: the plugin reads this table in every vLLM process at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    architecture: str  # config.json "architectures" entry
    model_type: str  # config.json "model_type"
    executor: str  # "module:Class" registered with vLLM's ModelRegistry
    hf_config: str  # "module:Class" registered for model_type
    default_block_length: int
    # config.json keys that may carry the trained block length (first present wins)
    block_length_keys: tuple[str, ...] = ("block_size",)
    # Position j is predicted from the hidden state at j - 1, as in an AR model (Fast-dLLM v2).
    shifted_logits: bool = False
    default_policy: str = "threshold"  # the decoding rule the checkpoint's own code uses


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        architecture="SDARForCausalLM",
        model_type="sdar",
        executor="vllm_blockdiff.models.sdar:SDARForCausalLM",
        hf_config="vllm_blockdiff.models.hf_configs:SDARConfig",
        default_block_length=4,
    ),
    ModelFamily(
        architecture="SDARMoeForCausalLM",
        model_type="sdar_moe",
        executor="vllm_blockdiff.models.sdar:SDARMoeForCausalLM",
        hf_config="vllm_blockdiff.models.hf_configs:SDARMoeConfig",
        default_block_length=4,
    ),
    ModelFamily(
        architecture="Fast_dLLM_QwenForCausalLM",
        model_type="Fast_dLLM_Qwen",
        executor="vllm_blockdiff.models.fast_dllm:FastDLLMQwenForCausalLM",
        hf_config="vllm_blockdiff.models.hf_configs:FastDLLMQwenConfig",
        default_block_length=32,
        block_length_keys=("bd_size",),
        shifted_logits=True,
        default_policy="subblock",
    ),
)

BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}
