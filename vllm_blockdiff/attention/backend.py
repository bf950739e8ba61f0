"""vLLM attention backend for block-causal attention over the paged KV cache.

Every forward a block-diffusion model needs is one mask rule, "a query token sees the keys at
positions < kv_limit, except those in [skip_start, skip_end)". With kv_limit = (p // B + 1) * B for
the token at position p and block length B, and no skip, it covers the block-causal prompt
prefill, a denoising step (the block sees the cached prefix and itself), and a commit of the
finished block fused with the next block's first step; the skip range keeps drafts that run side
by side (FreeDave) apart. The model state computes the ranges per token (`engine/layout.py`), so
requests with different block lengths, prefills, denoise steps and drafts share one batch.
B = 1 is ordinary causal attention.

Keys and values are written to the paged cache for every scheduled token; a denoising step's
(provisional) entries are overwritten when the block is committed, and the scheduler only counts a
block's KV as computed once it was produced from the final tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import vllm.envs as envs
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_blockdiff.attention.ops import paged_block_causal_attention, write_kv_cache
from vllm_blockdiff.transfer import Staging


@dataclass
class BlockDiffusionAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_table: torch.Tensor  # [R, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int64
    kv_limit: torch.Tensor  # [T] int32: token t sees key positions < kv_limit[t] ...
    skip_start: torch.Tensor  # [T] int32: ... except [skip_start[t], skip_end[t])
    skip_end: torch.Tensor


class BlockDiffusionAttentionMetadataBuilder(
    AttentionMetadataBuilder[BlockDiffusionAttentionMetadata]
):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        # Persistent buffer (fixed addresses for CUDA graphs): kv_limit, skip_start, skip_end
        # of each token. Tokens the model state did not annotate (padding) see no keys.
        self._ranges = torch.zeros(3, max_tokens, dtype=torch.int32, device=device)
        self._staging = Staging(device)

    def set_key_ranges(self, kv_limit: np.ndarray, skip_start: np.ndarray,
                       skip_end: np.ndarray) -> None:
        """Key ranges of each scheduled token of the next batch (set by the model state)."""
        ranges = np.stack([kv_limit, skip_start, skip_end])
        n = ranges.shape[1]
        self._staging.to_device(ranges, out=self._ranges[:, :n])
        self._ranges[:, n:].fill_(0)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> BlockDiffusionAttentionMetadata:
        m = common_attn_metadata
        n = m.num_actual_tokens
        return BlockDiffusionAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            kv_limit=self._ranges[0, :n],
            skip_start=self._ranges[1, :n],
            skip_end=self._ranges[2, :n],
        )


class BlockDiffusionAttentionImpl(AttentionImpl[BlockDiffusionAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
    ) -> None:
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise ValueError("block-diffusion attention: no alibi, sliding window or soft cap")
        if kv_sharing_target_layer_name is not None:
            raise ValueError("block-diffusion attention does not share KV caches between layers")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: BlockDiffusionAttentionMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("block-diffusion attention does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = kv_cache.unbind(0)
        write_kv_cache(key[:n], value[:n], key_cache, value_cache, attn_metadata.slot_mapping[:n],
                       (layer._k_scale, layer._v_scale))
        paged_block_causal_attention(
            query[:n],
            key_cache,
            value_cache,
            output[:n],
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            attn_metadata.block_table,
            attn_metadata.kv_limit[:n],
            attn_metadata.skip_start[:n],
            attn_metadata.skip_end[:n],
            self.scale,
            attn_metadata.max_query_len,
            # Split-K makes a row's reduction order depend on its batch's size.
            num_splits=1 if envs.VLLM_BATCH_INVARIANT else None,
        )
        return output


class BlockDiffusionAttentionBackend(AttentionBackend):
    """Registered as vLLM's CUSTOM backend and attached per layer by the plugin's models."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_impl_cls() -> type[BlockDiffusionAttentionImpl]:
        return BlockDiffusionAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[BlockDiffusionAttentionMetadataBuilder]:
        return BlockDiffusionAttentionMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        """With one split (as `forward` launches under VLLM_BATCH_INVARIANT=1), a token's output
        depends only on its own request's keys, tiled from the request's query start in a fixed
        order (`triton_kernel.py`)."""
        return True

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER
