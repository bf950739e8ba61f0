"""Fast-dLLM confidence threshold with a forced top-1.

Commit every masked position whose confidence is at least `threshold`, and always the most
confident one (Fast-dLLM v1 `get_transfer_index`, Fast-dLLM v2 `batch_sample`, LMDeploy
`low_confidence_dynamic`). Use it as the default: speed adapts to how sure the model is.
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import Policy, PolicyInput, masked_confidence, top1_mask


class ThresholdParams(msgspec.Struct, forbid_unknown_fields=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    confident = masked_confidence(inp) >= params["threshold"][:, None]
    return confident | top1_mask(inp)


POLICY = Policy("threshold", ThresholdParams, select, doc=__doc__ or "")
