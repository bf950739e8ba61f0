"""SDAR / TraDo executors: vLLM's Qwen3 (dense) and Qwen3-MoE models on block-causal attention.

SDAR checkpoints are Qwen3 checkpoints (same weight names, q/k RMSNorm, no logit shift) trained
for block diffusion, so the executors reuse vLLM's Qwen3 layers and weight loading unchanged and
only swap every attention layer onto the block-diffusion backend. The decoding itself lives in
the model state this class points Model Runner V2 to.
"""

from __future__ import annotations

import importlib

from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from vllm_blockdiff.attention.backend import BlockDiffusionAttentionBackend

# Model Runner V2's state for these executors, named the way vLLM's registries name classes: the
# decoding is vLLM glue (`engine/`), which uses the models and is never imported by them.
MODEL_STATE = "vllm_blockdiff.engine.model_state:BlockDiffusionModelState"


def use_block_diffusion_attention(model: nn.Module) -> None:
    """Rebuild every vLLM `Attention` layer of `model` on the block-diffusion backend.

    The layers keep their names (the KV cache is bound by name) and their head layout, scale,
    cache and quantization settings; only the backend changes.
    """
    vllm_config = get_current_vllm_config()
    registry = vllm_config.compilation_config.static_forward_context
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Attention):
                continue
            del registry[child.layer_name]
            setattr(parent, name, Attention(
                child.num_heads,
                child.head_size,
                child.impl.scale,
                num_kv_heads=child.num_kv_heads,
                cache_config=vllm_config.cache_config,
                quant_config=child.quant_config,
                prefix=child.layer_name,
                attn_backend=BlockDiffusionAttentionBackend,
            ))


class BlockDiffusionExecutor:
    """Mixin for a vLLM causal-LM class: block-causal attention and the diffusion model state."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        use_block_diffusion_attention(self)

    @staticmethod
    def get_model_state_cls():
        module, _, name = MODEL_STATE.partition(":")
        return getattr(importlib.import_module(module), name)


class SDARForCausalLM(BlockDiffusionExecutor, Qwen3ForCausalLM):
    pass


class SDARMoeForCausalLM(BlockDiffusionExecutor, Qwen3MoeForCausalLM):
    pass
