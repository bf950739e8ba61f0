"""Fast-dLLM v2 sub-block decoding: the confidence threshold, one sub-block at a time.

A block is decoded in sub-blocks of `sub_block_length` positions, left to right: each forward
applies the threshold rule (`threshold.py`: every position at least `threshold` confident, and
always the most confident one) to the first sub-block that still has masked positions only
(Fast-dLLM v2 `batch_sample`, `small_block_size`).

Fast-dLLM v2 predicts position j from position j - 1 (shifted logits), so on a block's first
forward its first position is predicted from the previous block's last position, which is final:
that forward commits only that position, the step the reference code takes autoregressively
after each finished block (and after a prompt that ends at a block boundary).
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies import threshold
from vllm_blockdiff.policies.base import BlockBounded, Policy, PolicyInput


class SubBlockParams(msgspec.Struct, forbid_unknown_fields=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    sub_block_length: Annotated[BlockBounded, msgspec.Meta(ge=1)] = 8


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    col = torch.arange(inp.masked.shape[-1], device=inp.masked.device)
    sub = params["sub_block_length"][:, None]
    first_open = inp.masked.int().argmax(-1, keepdim=True)  # rows without any: masked is empty
    active = inp.masked & (col // sub == first_open // sub)
    commit = threshold.select(inp._replace(masked=active), params) & active
    ar_step = (inp.step == 0) & inp.masked[:, 0]  # the block's first position, from final context
    return torch.where(ar_step[:, None], col == 0, commit)


POLICY = Policy("subblock", SubBlockParams, select, doc=__doc__ or "")
