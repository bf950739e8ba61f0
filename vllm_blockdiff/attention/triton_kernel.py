"""Triton kernel: attention over the paged KV cache with a per-token key range.

A query token sees the keys below its kv_limit except those in [skip_start, skip_end) (the other
drafts, when several run side by side).

One program handles BLOCK_Q query tokens of one request for one KV head and all query heads that
share it (GQA), streaming that request's keys in tiles of BLOCK_N positions with an online softmax.
A query row only loads key tiles below its tile's largest limit, so a denoising block costs one pass
over the cached prefix, and block-causal prefill skips the upper triangle block by block.

The launch grid depends only on the (padded) token and request counts, never on the batch's
query lengths: program i finds its request and tile by binary search over `query_start_loc`
(request r owns the tiles from `query_start_loc[r] // BLOCK_Q + r` on). One captured launch is
therefore valid for every batch of that size, so the kernel runs inside FULL CUDA graphs for
mixed batches (prefill chunks, denoising steps, block commits and drafts together).

With `num_splits` > 1 (split-K, as in flash-decoding) a third grid axis divides each tile's keys
into that many ranges; every program writes its partial softmax state (running max, sum,
unnormalised output) and `_combine_splits_kernel` merges them. A small batch then occupies more
than tiles x KV heads programs. The split count is a launch constant, so a captured graph stays
valid. By default (`auto_splits`) it grows while the launch fills at most two waves of the
GPU's SMs: small decode batches, whose few programs would otherwise each stream a long context
alone, get up to 16 splits; prefills and large batches keep one. A row's reduction order then
depends on its batch's size, as in vLLM's unified attention (its 3D kernel for small decode
batches), so the backend uses one split under VLLM_BATCH_INVARIANT.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vllm.utils.platform_utils import num_compute_units


# The token count changes with every batch: no recompilation for its divisibility.
@triton.jit(do_not_specialize=["num_tokens"])
def _paged_block_causal_attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_ptr, stats_ptr,  # split-K partials: [S, T, H, head_size] output, [2, S, T, H] max, sum
    query_start_loc_ptr, block_table_ptr, kv_limit_ptr, skip_start_ptr,
    skip_end_ptr,
    scale,
    num_reqs,
    num_tokens,
    num_heads,
    stride_qt, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    num_groups: tl.constexpr,  # query heads per KV head
    head_size: tl.constexpr,
    page_size: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" keeps float32 models exact (no TF32)
    NUM_SPLITS: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # The last request whose first tile is at or before this one; request r's tiles start at
    # query_start_loc[r] // BLOCK_Q + r, which leaves room for its cdiv(q_len, BLOCK_Q) tiles.
    lo = 0
    hi = num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    req = lo
    q_start = tl.load(query_start_loc_ptr + req)
    q_tile = tile - (q_start // BLOCK_Q + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return

    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // BLOCK_G
    grp = rows % BLOCK_G
    row_valid = (tok < q_len) & (grp < num_groups)
    head = kv_head * num_groups + grp
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_size

    t = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    # The limits end at the request's keys (`engine/layout.py`), which may lie beyond its query
    # (a sub-block run from the cache sees the rest of its block).
    limit = tl.load(kv_limit_ptr + t, mask=row_valid, other=0)
    skip_lo = tl.load(skip_start_ptr + t, mask=row_valid, other=0)
    skip_hi = tl.load(skip_end_ptr + t, mask=row_valid, other=0)
    kv_end = tl.max(limit, axis=0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634  # log2(e): the softmax uses exp2

    # This program's keys: all of them, or its split's share in whole tiles.
    chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    n_lo = split * chunk
    n_hi = tl.minimum(n_lo + chunk, kv_end)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_valid = pos < n_hi
        page_ptr = block_table_ptr + req * stride_bt + pos // page_size
        page = tl.load(page_ptr, mask=pos_valid, other=0)
        page = page.to(tl.int64)
        slot_in_page = pos % page_size
        kv_mask = pos_valid[:, None] & dim_valid[None, :]
        k = tl.load(
            k_cache_ptr + page[:, None] * stride_kp + slot_in_page[:, None] * stride_ks
            + kv_head * stride_kh + dims[None, :],
            mask=kv_mask, other=0.0,
        )
        v = tl.load(
            v_cache_ptr + page[:, None] * stride_vp + slot_in_page[:, None] * stride_vs
            + kv_head * stride_vh + dims[None, :],
            mask=kv_mask, other=0.0,
        )
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=PRECISION).to(tl.float32)
        s = s * qk_scale
        visible = (pos[None, :] < limit[:, None]) & (
            (pos[None, :] < skip_lo[:, None]) | (pos[None, :] >= skip_hi[:, None]))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows that have seen no key yet keep m = -inf; shift them by 0 to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:  # a split with no keys stores max -inf and sum 0: the merge gives it no weight
        row = (split * num_tokens + t) * num_heads + head
        tl.store(part_ptr + row[:, None] * head_size + dims[None, :], acc,
                 mask=row_valid[:, None] & dim_valid[None, :])
        tl.store(stats_ptr + row, m_i, mask=row_valid)
        tl.store(stats_ptr + NUM_SPLITS * num_tokens * num_heads + row, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["num_tokens"])
def _combine_splits_kernel(
    part_ptr, stats_ptr, out_ptr, query_start_loc_ptr,
    num_reqs, num_tokens, num_heads,
    stride_ot, stride_oh,
    head_size: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (token, query head): the splits' partial softmax states merged in split order.
    Padding tokens (past the last request's query) are left alone, as the main kernel does."""
    t = tl.program_id(0)
    head = tl.program_id(1)
    if t >= tl.load(query_start_loc_ptr + num_reqs):
        return
    splits = tl.arange(0, BLOCK_S)
    split_valid = splits < NUM_SPLITS
    row = (splits * num_tokens + t).to(tl.int64) * num_heads + head
    m = tl.load(stats_ptr + row, mask=split_valid, other=float("-inf"))
    l_s = tl.load(stats_ptr + NUM_SPLITS * num_tokens * num_heads + row, mask=split_valid,
                  other=0.0)
    m_max = tl.max(m, axis=0)
    weight = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(weight * l_s, axis=0)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_size
    acc = tl.load(part_ptr + row[:, None] * head_size + dims[None, :],
                  mask=split_valid[:, None] & dim_valid[None, :], other=0.0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_valid)


MAX_SPLITS = 16
WAVES = 2  # of SMs that a split launch may fill


def auto_splits(num_tiles: int, num_kv_heads: int, num_sms: int) -> int:
    """The most splits (a power of two, at most MAX_SPLITS) with which `num_tiles` query tiles
    per KV head still fit two waves of `num_sms` programs. Two, not one: on an H100 a batch of
    16 sub-blocks over 4-32k contexts (64 programs) ran fastest with 4 splits, 1.2-1.5x faster
    than with 2 (`benchmarks/subblock_attention.py`)."""
    splits = 1
    while splits < MAX_SPLITS and num_tiles * num_kv_heads * splits * 2 <= WAVES * num_sms:
        splits *= 2
    return splits


def paged_block_causal_attention_triton(
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
    max_query_len: int,
    block_q: int = 16,
    block_n: int = 64,
    num_splits: int | None = None,
) -> None:
    """`max_query_len` only tunes the tile height; any value gives correct results, so a graph
    captured with one replays correctly for batches with others. `num_splits` > 1 divides each
    tile's keys between that many programs (split-K) and merges their results; None chooses
    it from the launch's size (`auto_splits`)."""
    num_reqs = seq_lens.shape[0]
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[2]
    num_groups = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(num_groups)
    block_q = max(1, min(block_q, triton.next_power_of_2(max(max_query_len, 1))))
    # Keep the tile's row count (tokens x grouped heads) at least 16 for tl.dot.
    while block_q * block_g < 16:
        block_q *= 2
    if num_splits is None:  # the programs that have work: a tile per request at least
        tiles = max(num_reqs, triton.cdiv(num_tokens, block_q))
        num_splits = auto_splits(tiles, num_kv_heads, num_compute_units(query.get_device()))
    grid = (num_tokens // block_q + num_reqs, num_kv_heads, num_splits)
    part = stats = output  # unused with one split
    if num_splits > 1:
        part = torch.empty(num_splits, num_tokens, num_heads, head_size, dtype=torch.float32,
                           device=query.device)
        stats = torch.empty(2, num_splits, num_tokens, num_heads, dtype=torch.float32,
                            device=query.device)
    _paged_block_causal_attn_kernel[grid](
        query, key_cache, value_cache, output, part, stats,
        query_start_loc, block_table, kv_limit, skip_start, skip_end,
        scale,
        num_reqs,
        num_tokens,
        num_heads,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        output.stride(0), output.stride(1),
        block_table.stride(0),
        num_groups=num_groups,
        head_size=head_size,
        page_size=key_cache.shape[1],
        BLOCK_Q=block_q,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_size),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        NUM_SPLITS=num_splits,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            part, stats, output, query_start_loc,
            num_reqs, num_tokens, num_heads,
            output.stride(0), output.stride(1),
            head_size=head_size,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(head_size),
        )
