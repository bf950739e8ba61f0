"""Explore-Then-Exploit (ETE), after "From Bits to Rounds" (no public code; this rule is ours).

The paper's argument: a decode needs at least NLL(sample) / (bits committed per round) rounds, so
rounds that only commit near-certain tokens carry little information and the decode takes many of
them. Committing a few uncertain tokens ("exploring") sharpens their neighbours' conditionals and
triggers cascades of confident commits in later rounds.

Rule implemented here, per row:
  1. exploit: commit every masked position with confidence >= `threshold`, and always the most
     confident one (the threshold policy);
  2. bits = sum over the exploited positions of -log2(confidence), the information this round
     commits;
  3. if bits < `min_bits`, also commit the `explore` highest-entropy masked positions not already
     chosen (ties: leftmost).

Parameters: `threshold` 0.9 (the usual Fast-dLLM/SDAR threshold, as in the paper's exploit step);
`explore` 1 (the paper commits "a few" tokens; one keeps the quality risk to one token per round);
`min_bits` 1.0: a round is worth less than a single fair binary decision when below it. A
threshold-0.9 token carries at most 0.15 bits, so 1 bit means "fewer than about seven borderline
tokens, or a forced top-1 more confident than 0.5". `explore` 0 or `min_bits` 0 gives the plain
threshold policy.

The paper's other half, cross-block decoding (committing confident tokens of later blocks too), is
not possible in this engine: blocks are committed left to right and a block's canvas is the only
one the model sees, so exploration stays inside the current block.
Use it on long blocks whose rounds stall on confident-only commits (few tokens per forward).
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import (
    BlockBounded,
    Policy,
    PolicyInput,
    masked_confidence,
    top1_mask,
    topk_mask,
)


class ETEParams(msgspec.Struct, forbid_unknown_fields=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    min_bits: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    explore: Annotated[BlockBounded, msgspec.Meta(ge=0)] = 1


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    if inp.entropy is None:
        raise ValueError("the ete policy needs PolicyInput.entropy")
    exploit = (masked_confidence(inp) >= params["threshold"][:, None]) | top1_mask(inp)
    surprisal = -torch.log2(inp.confidence.clamp(min=torch.finfo(inp.confidence.dtype).tiny))
    bits = torch.where(exploit, surprisal, 0.0).sum(-1)
    open_ = inp.masked & ~exploit
    count = torch.where(bits < params["min_bits"], params["explore"], 0)
    explore = topk_mask(inp.entropy.masked_fill(~open_, float("-inf")), count, open_)
    return exploit | explore


POLICY = Policy("ete", ETEParams, select, needs_entropy=True, doc=__doc__ or "")
