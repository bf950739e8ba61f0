"""Fast-dLLM v2 sub-block decoding: the confidence threshold, one sub-block at a time.

A block is decoded in sub-blocks of `sub_block_length` positions, left to right: each forward
applies the threshold rule (`threshold.py`: every position at least `threshold` confident, and
always the most confident one) to the first sub-block that still has masked positions only
(Fast-dLLM v2 `batch_sample`, `small_block_size`).

Fast-dLLM v2 predicts position j from position j - 1 (shifted logits), so on a block's first
forward its first position is predicted from the previous block's last position, which is final:
that forward commits only that position, the step the reference code takes autoregressively
after each finished block (and after a prompt that ends at a block boundary).

Sub-block cache (`use_block_cache`, Fast-dLLM v2's block cache): a forward over the whole block
leaves every block position's KV in the cache; while the active sub-block's first position is
committed, later forwards recompute only the active sub-block and read the rest of the block from
that KV (stale by design). The whole block runs again (a refresh) on the block's first forward
after its AR step and whenever the active sub-block's first position is still masked.
"""

from typing import Annotated

import msgspec
import numpy as np
import torch

from vllm_blockdiff.policies import threshold
from vllm_blockdiff.policies.base import BlockBounded, Policy, PolicyInput


class SubBlockParams(msgspec.Struct, forbid_unknown_fields=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    sub_block_length: Annotated[BlockBounded, msgspec.Meta(ge=1)] = 8
    use_block_cache: bool = True


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    col = torch.arange(inp.masked.shape[-1], device=inp.masked.device)
    sub = params["sub_block_length"][:, None]
    first_open = inp.masked.int().argmax(-1, keepdim=True)  # rows without any: masked is empty
    active = inp.masked & (col // sub == first_open // sub)
    commit = threshold.select(inp._replace(masked=active), params) & active
    ar_step = (inp.step == 0) & inp.masked[:, 0]  # the block's first position, from final context
    return torch.where(ar_step[:, None], col == 0, commit)


def cached_sub_block(options) -> int:
    """The sub-block length a request recomputes alone between refreshes; 0 without the cache."""
    params = options.params
    return params.sub_block_length if getattr(params, "use_block_cache", False) else 0


def cached_query(block_start, offset, block_length, sub, cache_valid):
    """Whether a forward runs only the active sub-block, and where that sub-block starts and ends.

    Scalars or arrays: `offset` is the block's first open position, `sub` the cached sub-block
    length (0: no cache), `cache_valid` whether the block's KV comes from a refresh. Returns
    (cached, sub_start, sub_end); where not cached the bounds are meaningless."""
    sub = np.asarray(sub)
    safe = np.maximum(sub, 1)
    cached = (sub > 0) & np.asarray(cache_valid) & (np.asarray(offset) % safe != 0)
    sub_start = block_start + offset - offset % safe
    return cached, sub_start, np.minimum(sub_start + safe, block_start + block_length)


POLICY = Policy("subblock", SubBlockParams, select, doc=__doc__ or "")
