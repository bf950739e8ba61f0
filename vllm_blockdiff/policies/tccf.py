"""TCCF (TDAR's "Think Coarse, Critic Fine"): parallel blocks until a marker, then finer blocks.

Rule (TDAR `tdar_sample_tccf.py`): stage 1 decodes with the request's block length B and the
threshold rule (commit confidence >= `threshold`, always the top-1) until the model writes the
`marker` token (`</think>` for thinking models); stage 2 decodes with block length
`fine_block_length` (1 in the paper: autoregressive, one token per forward), so the answer and its
check get full left-to-right attention. The switch happens at the end of the block that holds the
marker: block-causal KV is only final once a block is complete, so blocks never split.
`fine_block_length` must divide B, keeping every block aligned. The paper also appends a critic
prompt ("Let's check if there are any mistakes ...") at the switch; here that is the client's
prompt design (e.g. continue with it in a follow-up request), the plugin only switches decoding.

Parameters: `marker` (token id, required), `threshold` 0.9, `fine_block_length` 1.
Use it for reasoning models: fast coarse thinking, careful final answer.
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies import threshold
from vllm_blockdiff.policies.base import BlockBounded, Policy, PolicyInput, TokenId


class TCCFParams(msgspec.Struct, forbid_unknown_fields=True):
    marker: TokenId
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    fine_block_length: Annotated[BlockBounded, msgspec.Meta(ge=1)] = 1


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Both stages commit with the threshold rule; stage 2's short blocks make it fine."""
    return threshold.select(inp, params)


POLICY = Policy("tccf", TCCFParams, select, doc=__doc__ or "")
