"""FreeDave: lossless draft-and-verify of static one-token-per-step decoding.

Static decoding commits, each forward, the single most confident masked position (leftmost on
ties). FreeDave (Free Draft-and-Verification) runs several steps of that trajectory in one forward:
 - state: the committed canvas C and the predictions P (token, confidence per masked position) of
   the forward that produced C's last step; C's own logits are unknown;
 - drafts: D_0 = C, and D_k = C plus the k most confident positions of P filled with P's tokens
   (the static trajectory if predictions did not change); one forward runs D_0 .. D_{K-1};
 - verify: T_k is one static step applied to D_k with D_k's own logits. D_{k+1} is accepted after
   D_k exactly when it equals T_k, i.e. when T_k fills P's (k+1)-th position with P's token. With
   `best` the last accepted draft, the step commits T_best: `best + 1` tokens, exactly what static
   decoding commits in `best + 1` forwards, and D_best's logits become the next P.
Every draft attends to the prefix and to itself only (`engine/model_state.py` lays the drafts out
side by side, at the canvas's positions), so the output is token-identical to static decoding
with steps = B (greedy). The drafts cost K times the canvas in one forward, so the gain is largest
where decoding is latency-bound (small batches); at large batch sizes it spends compute.

Parameter: `drafts` K (default 8, the paper's), capped per step by the server's canvas length
(`canvas_length // (B - offset)` drafts) and by what remains of the block. Greedy only; not with
structured outputs. Use it when you need exactly the static-decoding output, faster.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import Policy, PolicyInput, top1_mask


class FreeDaveParams(msgspec.Struct, forbid_unknown_fields=True):
    drafts: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rule every draft is verified against: static decoding, one token per forward."""
    return top1_mask(inp)


def draft_order(pred_conf: torch.Tensor, available: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, L] positions of P from most to least confident (leftmost first on ties), and [R] how
    many are available."""
    scores = pred_conf.masked_fill(~available, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order, available.sum(-1)


def draft_fill(order: torch.Tensor, count: torch.Tensor, num_drafts: int) -> torch.Tensor:
    """[R, K, L] bool: the positions of P that draft k fills (its k most confident)."""
    r, length = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(length, device=order.device).expand(r, length))
    k = torch.arange(num_drafts, device=order.device)
    return (rank[:, None, :] < k[None, :, None]) & (rank < count[:, None])[:, None, :]


def static_step(confidence: torch.Tensor, masked: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., L] -> the position one static step commits (the most confident masked one, leftmost
    on ties) and whether there is one."""
    scores = confidence.masked_fill(~masked, float("-inf"))
    return scores.argmax(-1), masked.any(-1)


def verify(step_pos: torch.Tensor, step_tok: torch.Tensor, order: torch.Tensor,
           pred_tok: torch.Tensor, count: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """[R] index of the last accepted draft.

    step_pos/step_tok [R, K]: the static step T_k computed from draft k's logits. Draft k + 1 is
    accepted after draft k when T_k fills P's (k + 1)-th position (order[:, k]) with P's token.
    """
    n = min(step_pos.shape[1] - 1, order.shape[1])  # past the block, nothing is left to draft
    if n == 0:
        return torch.zeros_like(count)
    nxt = order[:, :n]
    k = torch.arange(n, device=order.device)
    ok = ((step_pos[:, :n] == nxt) & (step_tok[:, :n] == pred_tok.gather(1, nxt))
          & (k[None, :] < count[:, None]) & (k[None, :] + 1 < num_drafts[:, None]))
    return ok.long().cumprod(-1).sum(-1)


POLICY = Policy("freedave", FreeDaveParams, select, verifies_drafts=True, doc=__doc__ or "")
