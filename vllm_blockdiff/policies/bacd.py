"""TDAR bounded adaptive confidence decoding (BACD).

Rule (TDAR's lmdeploy `unmasking.py::bounded_adaptive_confidence_decoding`): the threshold adapts
to how confident the model has been in this block. On the block's first step (nothing committed
yet) tau = clamp(max masked confidence, lo, hi); afterwards tau = clamp(mean confidence, at commit
time, of the positions already committed in the block, lo, hi). Commit every masked position with
confidence >= tau, and always the most confident one.

Parameters: `lo` (0.6) and `hi` (0.9) bound tau (TDAR's defaults); `lo` must not exceed `hi`.
Use it for reasoning models (TDAR, TraDo) where a fixed 0.9 threshold is too strict on easy blocks.
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import Policy, PolicyInput, masked_confidence, top1_mask


class BACDParams(msgspec.Struct, forbid_unknown_fields=True):
    lo: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.6
    hi: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9

    def __post_init__(self) -> None:
        if self.lo > self.hi:
            # The "- at `$.lo`" suffix is msgspec's path format, so the error names the field.
            raise ValueError(f"must not exceed hi ({self.hi}), got {self.lo} - at `$.lo`")


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    conf = masked_confidence(inp)
    first = inp.committed_count == 0
    history = inp.committed_confidence_sum / inp.committed_count.clamp(min=1)
    raw = torch.where(first, conf.max(-1).values, history)
    # max(lo, min(hi, raw)), in TDAR's order (also well defined for a row with nothing masked).
    tau = torch.maximum(torch.minimum(raw, params["hi"]), params["lo"])
    return (conf >= tau[:, None]) | top1_mask(inp)


POLICY = Policy("bacd", BACDParams, select, doc=__doc__ or "")
