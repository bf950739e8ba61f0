"""Static top-k per step (SDAR `low_confidence_static`).

At step k commit exactly the n_k most confident masked positions, n_k spreading the block over
`steps` forwards (B // steps each, remainder first). Predictable cost: B / steps tokens per
forward whatever the model's confidence; `steps` defaults to the block length (one per forward).
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import (
    BlockBounded,
    Policy,
    PolicyInput,
    masked_confidence,
    topk_mask,
    transfer_count,
)


class StaticParams(msgspec.Struct, forbid_unknown_fields=True):
    steps: Annotated[BlockBounded, msgspec.Meta(ge=1)] | None = None


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    need = transfer_count(inp.block_length, params["steps"], inp.step)
    return topk_mask(masked_confidence(inp), need, inp.masked)


POLICY = Policy("static", StaticParams, select, doc=__doc__ or "")
