"""Fast-dLLM factor-based parallel decoding (`get_transfer_index_dynamic`).

Rule: sort the masked confidences descending, c_(0) >= c_(1) >= ..., and commit the top n where n
is the length of the longest prefix with c_(i) >= 1 - factor / (i + 2) for the 0-based rank i;
the top one is always committed (the code sets its threshold to -1). Fast-dLLM's code builds the
thresholds as 1 - factor / (n + 1) for n = 1..N (1-based), i.e. (n + 1) * (1 - c_(n)) <= factor,
the condition of its Theorem 1 (with factor 1, decoding the n tokens in parallel from their
marginals picks what greedy decoding of their joint would). Later ranks need more confidence:
with factor 1, 2/3 for the second, 3/4 for the third, 4/5 for the fourth.

Deviation: Fast-dLLM's loop (`if top_i == 0 or top_i == len(threshs) - 1: top_i += 1`) cannot tell
"every rank passed" from "only the last rank failed", so it also commits the last remaining
candidate when it fails (with two masked positions left it always commits both). This module
follows the stated rule and never commits a failing rank.

Parameters: `factor` 1.0 (the function default and the value Fast-dLLM's eval scripts pass).
Use it when a fixed threshold is wrong for both small and large sets: few tokens need less
confidence, many need more.
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import Policy, PolicyInput, masked_confidence, topk_mask


class FactorParams(msgspec.Struct, forbid_unknown_fields=True):
    factor: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    conf = masked_confidence(inp)
    descending = torch.sort(conf, dim=-1, descending=True).values
    rank = torch.arange(conf.shape[-1], device=conf.device, dtype=conf.dtype)
    thresholds = 1.0 - params["factor"][:, None] / (rank + 2.0)
    ok = descending >= thresholds  # unmasked ranks hold -inf and fail
    ok[:, 0] = True
    count = ok.long().cumprod(-1).sum(-1)
    return topk_mask(conf, count, inp.masked)


POLICY = Policy("factor", FactorParams, select, doc=__doc__ or "")
