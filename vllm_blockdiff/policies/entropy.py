"""Entropy-bounded unmasking (EB-Sampler, arXiv 2505.24857), as SDAR and JetEngine implement it.

Rule: sort the masked positions by the entropy H (nats) of their predictive distribution, lowest
first, and commit the longest prefix whose cumulative entropy S_k = H_(0) + ... + H_(k) stays
strictly below `gamma` (SDAR `generate.py` / JetEngine `entropy_bounded`: a `searchsorted` with
right=False); always at least the lowest-entropy position. Summed entropy bounds the dependence
between tokens committed together, so a step takes as many near-certain tokens as the budget allows.

With `subtract_max` the bound is the EB-Sampler paper's (also diffusers' `EntropyBoundScheduler`
behind DiffusionGemma): S_k - max(H_(0..k)) <= gamma, i.e. the highest entropy of the set is free,
which commits one more position than the SDAR rule at the same gamma.

Parameters: `gamma` 0.35 nats, the `--eb_threshold` default of SDAR's `generate.py` and of the other
SDAR-family scripts (JetEngine's README example uses 0.6; diffusers' DiffusionGemma scheduler uses
0.1 with the paper's bound); `subtract_max` false (the SDAR form, the models this plugin serves).
Use it when confidence alone misjudges flat-but-safe distributions; gamma trades speed for error.
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import Policy, PolicyInput, topk_mask


class EntropyParams(msgspec.Struct, forbid_unknown_fields=True):
    gamma: Annotated[float, msgspec.Meta(ge=0.0)] = 0.35
    subtract_max: bool = False


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    if inp.entropy is None:
        raise ValueError("the entropy policy needs PolicyInput.entropy")
    masked = inp.masked
    ent = inp.entropy.masked_fill(~masked, float("inf"))
    ascending = torch.sort(ent, dim=-1, stable=True).values
    present = torch.arange(ent.shape[-1], device=ent.device) < masked.sum(-1, keepdim=True)
    ascending = ascending.masked_fill(~present, 0.0)
    cumulative = ascending.cumsum(-1)
    gamma = params["gamma"][:, None]
    ok = torch.where(params["subtract_max"].bool()[:, None],
                     cumulative - ascending <= gamma,  # ascending: the running max is the last one
                     cumulative < gamma) & present
    count = ok.long().cumprod(-1).sum(-1).clamp(min=1)  # a prefix: stop at the first failure
    return topk_mask(-ent, count, masked)


POLICY = Policy("entropy", EntropyParams, select, needs_entropy=True, doc=__doc__ or "")
