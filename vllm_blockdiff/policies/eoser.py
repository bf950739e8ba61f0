"""EOS early rejection with ascending step size (EOSER + ASS, `eoser_ass_generate`).

Rule, at step s of a block of length B (s counts forwards spent on the block, from 0):
  - T = ceil(log2(B)) steps finish the block: ASS commits 2^s positions at step s, and the last
    step (s = T - 1) commits everything left. 1 + 2 + ... + 2^(T-2) = 2^(T-1) - 1 < B, so the
    last step always has work; for B = 2^T it commits 2^(T-1) + 1 (B = 256: 8 steps, as in the
    paper's 256-token/8-step setting). B = 1 gives T = 0: one step.
  - EOSER: a position whose proposed token would stop the request (EOS or a stop token) has its
    confidence scaled by gamma(s) = g_min + (1 - g_min) * (2^(s+1) - 1) / 2^T, from about g_min on
    the first step to 1 - (1 - g_min) / 2^T on the last. This keeps a block from committing an
    early EOS while its content is still mostly masked (the failure the paper fixes).
  - Commit the 2^s (or, on the last step, all) masked positions with the highest scaled
    confidence; ties go leftmost.

Parameters: `g_min` 0.01, the ASS variant's default (plain EOSER's linear schedule uses 0.4).
The paper schedules the whole generation as one log-step canvas; here each block is scheduled on
its own, T following from the request's block length.
Use it with long blocks (64-256) to finish each in log2(B) forwards at a fixed, predictable cost.
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import Policy, PolicyInput, topk_mask

_MAX_SHIFT = 62  # 2^62 still fits int64; larger steps only ever mean "everything left"


class EOSERParams(msgspec.Struct, forbid_unknown_fields=True):
    g_min: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.01


def log2_steps(block_length: torch.Tensor) -> torch.Tensor:
    """ceil(log2(B)) exactly, as integers: the bit length of B - 1."""
    shifts = torch.arange(_MAX_SHIFT + 1, device=block_length.device)
    return ((block_length - 1)[:, None] >> shifts > 0).sum(-1)


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    t = log2_steps(inp.block_length)
    step = inp.step.clamp(0, _MAX_SHIFT)
    ramp = ((2.0 ** (step + 1).float() - 1.0) / 2.0 ** t.float()).clamp(max=1.0)
    g_min = params["g_min"]
    gamma = g_min + (1.0 - g_min) * ramp
    conf = inp.confidence
    scaled = torch.where(inp.is_stop, conf * gamma[:, None], conf)
    scaled = scaled.masked_fill(~inp.masked, float("-inf"))
    count = torch.where(step < t - 1, torch.ones_like(step) << step, inp.block_length)
    return topk_mask(scaled, count, inp.masked)


POLICY = Policy("eoser", EOSERParams, select, doc=__doc__ or "")
