"""Triton kernel: token, confidence and entropy of every logit row in one pass over the vocabulary.

Per row of logits [N, V] the sampler needs the proposed token (the argmax, or a given token), its
probability and, for some policies, the entropy of the softmax. PyTorch materialises log_softmax
([N, V] float32) for that; the kernel instead streams the row once, in tiles of BLOCK_V, with an
online softmax: running max m, s = sum exp(x - m) and t = sum exp(x - m) * (x - m), rescaled when
m grows, so that entropy = log(s) - t / s and confidence = exp(x[token] - m) / s.

One program handles one row, always visiting its tiles in the same order with the same tile width,
so a row's results depend only on that row: they are bit for bit the same whatever else (and however
many rows) the batch holds (batch invariance). Per step this is one kernel launch with grid (N,)
into freshly allocated outputs, with no host synchronisation; N is a runtime value, so batch sizes
do not recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _vocab_stats_kernel(
    logits_ptr, tokens_ptr, tokens_out_ptr, confidence_ptr, entropy_ptr,
    V,
    stride_row,
    HAS_TOKENS: tl.constexpr,
    NEED_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    m = float("-inf")  # running max (-inf until the first finite logit)
    s = 0.0  # sum of exp(x - m)
    t = 0.0  # sum of exp(x - m) * (x - m)
    best = float("-inf")  # running argmax value and index (first maximum wins)
    best_idx = 0
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + cols
        x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        tile_max = tl.max(x, axis=0)
        if not HAS_TOKENS:
            tile_idx = v0 + tl.argmax(x, axis=0, tie_break_left=True)
            better = tile_max > best
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_max, best)
        m_new = tl.maximum(m, tile_max)
        # Shift by 0 while every logit so far is -inf, so no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)  # 0 while m = -inf (then s = t = 0)
        finite = x > float("-inf")
        d = tl.where(finite, x - m_safe, 0.0)
        p = tl.where(finite, tl.exp(d), 0.0)
        if NEED_ENTROPY:
            shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
            t = alpha * (t + shift * s) + tl.sum(p * d, axis=0)
        s = s * alpha + tl.sum(p, axis=0)
        m = m_new

    if HAS_TOKENS:
        token = tl.load(tokens_ptr + row)
        x_token = tl.load(row_ptr + token).to(tl.float32)
    else:
        x_token = best
        tl.store(tokens_out_ptr + row, best_idx.to(tl.int64))
    tl.store(confidence_ptr + row, tl.exp(x_token - m) / s)
    if NEED_ENTROPY:
        tl.store(entropy_ptr + row, tl.log(s) - t / s)


def vocab_stats_triton(
    logits: torch.Tensor,  # [N, V], float32 / bfloat16 / float16, last dim contiguous
    tokens: torch.Tensor | None,  # [N] integer, or None for the argmax
    need_entropy: bool,
    *,
    block_v: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The Triton path of `vocab_stats`; `block_v` (a power of two) only tunes the tile width."""
    assert logits.dim() == 2 and logits.stride(-1) == 1, "rows must be contiguous"
    n, v = logits.shape
    tokens_out = torch.empty(n, dtype=torch.int64, device=logits.device) if tokens is None \
        else tokens
    confidence = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if need_entropy else None
    if n > 0:
        _vocab_stats_kernel[(n,)](
            logits, tokens_out, tokens_out, confidence,
            entropy if need_entropy else confidence,
            v,
            logits.stride(0),
            HAS_TOKENS=tokens is not None,
            NEED_ENTROPY=need_entropy,
            BLOCK_V=block_v,
        )
    return tokens_out, confidence, entropy


def vocab_stats_torch(
    logits: torch.Tensor, tokens: torch.Tensor | None, need_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The PyTorch path of `vocab_stats` (the sampler's formula, and the kernel's oracle)."""
    x = logits.float()
    tok = x.argmax(-1) if tokens is None else tokens
    logp = x.log_softmax(-1)
    confidence = logp.gather(-1, tok[:, None]).squeeze(-1).exp()
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) if need_entropy else None
    return tok, confidence, entropy


def vocab_stats(
    logits: torch.Tensor, tokens: torch.Tensor | None, need_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per row of logits [N, V]: token (argmax when tokens is None, first maximum on ties),
    confidence = softmax(row)[token] (float32), entropy = -sum p log p (float32, p=0 terms are 0).

    Runs the Triton kernel on CUDA tensors and PyTorch otherwise.
    """
    if logits.is_cuda:
        return vocab_stats_triton(logits, tokens, need_entropy)
    return vocab_stats_torch(logits, tokens, need_entropy)
