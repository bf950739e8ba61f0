"""vLLM general plugin: registers the block-diffusion models, applies the version-guarded patches.

vLLM calls `register()` in every process it starts (API server, engine core, workers).
"""

from __future__ import annotations

import importlib

SUPPORTED_VLLM = "0.26."


def _load(qualname: str):
    module, _, name = qualname.partition(":")
    return getattr(importlib.import_module(module), name)


def register() -> None:
    import vllm
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.config import _CONFIG_REGISTRY
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_blockdiff.engine.config_hook import BlockDiffusionConfigHook
    from vllm_blockdiff.models import FAMILIES
    from vllm_blockdiff.patches import apply_patches

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm-blockdiff supports vLLM {SUPPORTED_VLLM}x, found {vllm.__version__}"
        )
    for family in FAMILIES:
        ModelRegistry.register_model(family.architecture, family.executor)
        _CONFIG_REGISTRY[family.model_type] = _load(family.hf_config)
        MODELS_CONFIG_MAP[family.architecture] = BlockDiffusionConfigHook
    register_backend(
        AttentionBackendEnum.CUSTOM,
        "vllm_blockdiff.attention.backend.BlockDiffusionAttentionBackend",
    )
    apply_patches()
