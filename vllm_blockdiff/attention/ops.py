"""Paged block-causal attention: write new keys/values into the cache, attend to each token's
key range (below kv_limit, outside [skip_start, skip_end)).

On CUDA the attention runs the Triton kernel in `triton_kernel.py`; elsewhere (and as the test
oracle for the kernel) a per-request PyTorch implementation gathers each request's pages and
calls scaled_dot_product_attention with the same mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]; negative entries are padding
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # the layer's (k_scale, v_scale)
) -> None:
    """Write the new keys and values into their slots. On CUDA, with the cache in the model's
    dtype, vLLM's `reshape_and_cache_flash` writes both in one kernel that skips padding (the
    cache has FlashAttention's layout). The two `index_copy_` launches per layer it replaces took
    0.147 ms per step at batch 1, the AR twin's `reshape_and_cache_flash` 0.058 (one H100
    `benchmarks/step_profile.py` run)."""
    if key.is_cuda and key.dtype == key_cache.dtype and scales is not None:
        from vllm import _custom_ops

        _custom_ops.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                            "auto", *scales)
        return
    flat_k = key_cache.view(-1, *key_cache.shape[2:])
    flat_v = value_cache.view(-1, *value_cache.shape[2:])
    # Padding tokens (CUDA-graph padding) go to page 0, vLLM's never-allocated null block; this
    # avoids a host sync to filter them out.
    slots = slot_mapping.clamp(min=0)
    flat_k.index_copy_(0, slots, key.to(flat_k.dtype))
    flat_v.index_copy_(0, slots, value.to(flat_v.dtype))


def paged_block_causal_attention_torch(
    query: torch.Tensor,  # [T, H, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    value_cache: torch.Tensor,
    output: torch.Tensor,  # [T, H, D]
    query_start_loc: torch.Tensor,  # [R + 1]
    seq_lens: torch.Tensor,  # [R]
    block_table: torch.Tensor,  # [R, max_pages]
    kv_limit: torch.Tensor,  # [T]
    skip_start: torch.Tensor,  # [T]
    skip_end: torch.Tensor,  # [T]
    scale: float,
) -> None:
    page_size = key_cache.shape[1]
    starts = query_start_loc.tolist()
    for r in range(len(seq_lens)):
        qs, qe = starts[r], starts[r + 1]
        if qe <= qs:
            continue
        seq_len = int(kv_limit[qs:qe].max())  # the request's keys (may lie beyond its query)
        pages = block_table[r, : -(-seq_len // page_size)].long()
        k = key_cache[pages].flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, S, D]
        v = value_cache[pages].flatten(0, 1)[:seq_len].transpose(0, 1)
        q = query[qs:qe].transpose(0, 1)  # [H, Q, D]
        keys = torch.arange(seq_len, device=q.device)[None, :]
        mask = (keys < kv_limit[qs:qe, None]) & (
            (keys < skip_start[qs:qe, None]) | (keys >= skip_end[qs:qe, None]))
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
        )
        output[qs:qe] = out.transpose(0, 1)


def paged_block_causal_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    kv_limit: torch.Tensor,
    skip_start: torch.Tensor,
    skip_end: torch.Tensor,
    scale: float,
    max_query_len: int,
    num_splits: int | None = None,
) -> None:
    """On CUDA the Triton kernel (`num_splits`: its split-K count, None to choose by the
    launch's size), elsewhere the PyTorch reference."""
    if query.is_cuda:
        from vllm_blockdiff.attention.triton_kernel import paged_block_causal_attention_triton

        paged_block_causal_attention_triton(
            query, key_cache, value_cache, output, query_start_loc, seq_lens, block_table,
            kv_limit, skip_start, skip_end, scale, max_query_len, num_splits=num_splits,
        )
    else:
        paged_block_causal_attention_torch(
            query, key_cache, value_cache, output, query_start_loc, seq_lens, block_table,
            kv_limit, skip_start, skip_end, scale,
        )
