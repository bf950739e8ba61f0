"""SDAR "dynamic with minimum" (`low_confidence_dynamic` in SDAR's generate.py and JetEngine).

At step k of a block, commit every masked position with confidence above `threshold` if there are
at least n_k of them, otherwise the n_k most confident ones, where n_k spreads the block over
`steps` forwards (B // steps each, remainder first). `steps` defaults to the block length, giving
at least one token per forward; fewer steps force more tokens per forward.
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


class DynamicParams(msgspec.Struct, forbid_unknown_fields=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    steps: Annotated[BlockBounded, msgspec.Meta(ge=1)] | None = None


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    conf = masked_confidence(inp)
    need = transfer_count(inp.block_length, params["steps"], inp.step)
    confident = conf > params["threshold"][:, None]
    enough = confident.sum(-1) >= need
    return torch.where(enough[:, None], confident, topk_mask(conf, need, inp.masked))


POLICY = Policy("dynamic", DynamicParams, select, doc=__doc__ or "")
