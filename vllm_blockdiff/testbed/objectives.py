"""Training losses: SDAR and Fast-dLLM v2 block diffusion over [x_t ; x_0], and the twin's LM loss.

Block diffusion (SDAR / BD3-LM): the model reads the noisy copy x_t and the clean copy x_0 of the
same sequence side by side, both at positions 0..L-1, under one mask (`block_diffusion_mask`):

    x_t query -> x_t key: same block (bidirectional inside the block being denoised)
    x_t query -> x_0 key: key block strictly before the query block (the committed, clean prefix)
    x_0 query -> x_0 key: key block at or before the query block (block-causal, as the KV cache)
    x_0 query -> x_t key: never

Blocks are aligned to absolute position 0, exactly as at inference. Each block of each row draws
its own mask ratio t ~ U(eps, 1); answer tokens (EOS and EOS padding up to the next `pad_align`
boundary included, so the model learns to stop and to fill a block after its EOS) are masked with
probability t; prompt tokens are never masked. The loss is cross-entropy at masked x_t positions
with no logit shift, weighted by 1/t and divided by the number of loss-eligible tokens (the
MDLM / LLaDA estimate of the per-token ELBO), or with `weighting="mean"` the plain mean over
masked tokens.

Fast-dLLM v2 keeps that layout and mask but shifts the logits as its AR parent does: the token
at position j is predicted from position j - 1, which for a block's first position is the clean
copy's last token of the previous block (the AR step the decoder takes there). Each row also
trains on the complementary mask (every answer token masked in exactly one of the two copies,
the second copy's ratio 1 - t), so no token goes unseen in a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_blockdiff.reference.modeling import CausalLM, block_causal_mask


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, L] float32 cross-entropy at every position.

    Callers weight it with masks instead of gathering the masked positions, which would force a
    host sync (nonzero) on every CUDA step.
    """
    n, seq_len, vocab = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1), reduction="none")
    return ce.view(n, seq_len)


def _weighted(ce: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, eligible: torch.Tensor,
              weighting: str) -> torch.Tensor:
    """Cross-entropy at masked positions, weighted by 1/t over the `eligible` count, or the mean."""
    if weighting == "inv_t":
        return (ce * masked / t).sum() / eligible.clamp(min=1)
    if weighting == "mean":
        return (ce * masked).sum() / masked.sum().clamp(min=1)
    raise ValueError(f"unknown loss weighting {weighting!r}")


def block_diffusion_mask(
    seq_len: int, block_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """[2L, 2L] bool attention mask over the concatenation [x_t ; x_0] (True = may attend)."""
    pos = torch.arange(seq_len, device=device)
    blk = pos // block_size
    same = blk[:, None] == blk[None, :]
    before = blk[:, None] > blk[None, :]
    clean = block_causal_mask(pos, seq_len, block_size)
    top = torch.cat([same, before], dim=1)
    bottom = torch.cat([torch.zeros_like(same), clean], dim=1)
    return torch.cat([top, bottom], dim=0)


def answer_region(
    prompt_len: torch.Tensor, end: torch.Tensor, seq_len: int, device: torch.device
) -> torch.Tensor:
    """[N, L] bool: positions in [prompt_len, end) of each row."""
    pos = torch.arange(seq_len, device=device)
    return (pos[None, :] >= prompt_len[:, None]) & (pos[None, :] < end[:, None])


def noise(
    ids: torch.Tensor,
    region: torch.Tensor,
    block_size: int,
    mask_id: int,
    eps: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each block's eligible tokens with its own ratio t ~ U(eps, 1).

    Returns x_t, the masked positions and each position's t (for the 1/t weight).
    """
    n, seq_len = ids.shape
    n_blocks = -(-seq_len // block_size)
    t_block = eps + (1 - eps) * torch.rand(n, n_blocks, device=ids.device, generator=generator)
    t = t_block.repeat_interleave(block_size, dim=1)[:, :seq_len]
    u = torch.rand(n, seq_len, device=ids.device, generator=generator)
    masked = (u < t) & region
    return ids.masked_fill(masked, mask_id), masked, t


def sdar_loss(
    model: CausalLM,
    ids: torch.Tensor,
    prompt_len: torch.Tensor,
    length: torch.Tensor,
    block_size: int,
    mask_id: int,
    pad_align: int = 16,
    eps: float = 1e-3,
    weighting: str = "inv_t",
    generator: torch.Generator | None = None,
    shifted: bool = False,
) -> torch.Tensor:
    """Block-diffusion loss of a right-padded batch `ids` [N, L] (see the module docstring);
    `shifted`: Fast-dLLM v2's, with shifted logits and complementary masks."""
    n, seq_len = ids.shape
    end = torch.clamp(-(-length // pad_align) * pad_align, max=seq_len)
    region = answer_region(prompt_len, end, seq_len, ids.device)
    x_t, masked, t = noise(ids, region, block_size, mask_id, eps, generator)
    clean, eligible = ids, region.sum()
    if shifted:  # the complementary copy: every answer token masked in exactly one of the two
        other = region & ~masked
        x_t = torch.cat([x_t, ids.masked_fill(other, mask_id)])
        masked, t = torch.cat([masked, other]), torch.cat([t, (1 - t).clamp(min=eps)])
        clean, eligible = torch.cat([ids, ids]), 2 * eligible
    pos = torch.arange(seq_len, device=ids.device)
    mask = block_diffusion_mask(seq_len, block_size, ids.device)[None]
    logits, _ = model(torch.cat([x_t, clean], dim=1), torch.cat([pos, pos])[None], mask)
    if not shifted:
        return _weighted(token_ce(logits[:, :seq_len], ids), masked, t, eligible, weighting)
    # Position j's logits come from j - 1: the noisy copy inside a block, the clean copy across
    # a block boundary.
    noisy, from_clean = logits[:, : seq_len - 1], logits[:, seq_len : 2 * seq_len - 1]
    starts = (pos[1:] % block_size == 0)[None, :, None]
    ce = token_ce(torch.where(starts, from_clean, noisy), clean[:, 1:])
    return _weighted(ce, masked[:, 1:], t[:, 1:], eligible, weighting)


def ar_loss(
    model: CausalLM, ids: torch.Tensor, prompt_len: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens (EOS included) under a causal mask."""
    n, seq_len = ids.shape
    pos = torch.arange(seq_len, device=ids.device)
    mask = block_causal_mask(pos, seq_len, 1)[None]
    logits, _ = model(ids, pos[None], mask)
    targets = answer_region(prompt_len, length, seq_len, ids.device)[:, 1:]
    ce = token_ce(logits[:, :-1], ids[:, 1:])
    return (ce * targets).sum() / targets.sum().clamp(min=1)
