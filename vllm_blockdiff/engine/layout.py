"""Where each scheduled token sits: its key range for attention and its rotary position.

A request's query is its history (a prompt chunk, or a finished block recomputed with its final
tokens) and its current block: the block's emitted tokens, scheduled as history, then its open
rest, scheduled as drafts. Drafting policies (FreeDave) append further whole copies of the block,
one per extra draft, in the KV slots that follow. A token at position p before the current block
sees the keys below its block's end, (p // B + 1) * B. A token of draft k sees the keys before the
block and its own copy of the block, never another draft's, and takes the rotary position it has
in the block; each draft, the block's emitted tokens included, is computed exactly as if it were
the only one. With one draft (every other policy) this is plain block-causal attention.
A request that switches block length at a marker (TCCF) uses its fine block length from the
switch position on (`policies/block_switch.py`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vllm_blockdiff.policies.block_switch import NEVER, block_length_at


class TokenLayout(NamedTuple):
    kv_limit: np.ndarray  # [T] keys at positions < kv_limit are visible ...
    skip_start: np.ndarray  # [T] ... except those in [skip_start, skip_end)
    skip_end: np.ndarray
    rope_positions: np.ndarray | None  # [T], None where they equal the slot positions
    request: np.ndarray  # [T] the token's request (batch index)
    # [T] the token is already known (prompt or emitted): its id comes from the token history
    from_history: np.ndarray


def token_layout(computed: np.ndarray, query: np.ndarray, drafts: np.ndarray,
                 block_length: np.ndarray, fine_block_length: np.ndarray | None = None,
                 switch_at: np.ndarray | None = None,
                 key_end: np.ndarray | None = None) -> TokenLayout:
    """Per request: tokens computed before, tokens scheduled, of which drafts, block length
    (and, for requests that switch, the fine block length and the switch position). Keys end
    at `key_end` (default: with the query; beyond it for a sub-block run from the cache)."""
    computed, query, drafts, coarse = (np.asarray(a, dtype=np.int64)
                                       for a in (computed, query, drafts, block_length))
    fine = coarse if fine_block_length is None else np.asarray(fine_block_length, np.int64)
    switch = np.full_like(coarse, NEVER) if switch_at is None else np.asarray(switch_at, np.int64)
    req = np.repeat(np.arange(len(query)), query)
    starts = np.cumsum(query) - query
    pos = computed[req] + np.arange(len(req)) - starts[req]
    # The current block starts where the emitted tokens' block does (requests with drafts).
    num_tokens = computed + query - drafts
    current = block_length_at(num_tokens, coarse, fine, switch)
    block_start = np.where(drafts > 0, num_tokens // current * current, computed + query)[req]
    in_block = pos >= block_start
    b = np.where(in_block, current[req], block_length_at(pos, coarse[req], fine[req], switch[req]))
    k = np.where(in_block, (pos - block_start) // b, 0)
    kv_limit = np.where(in_block, block_start + (k + 1) * b, (pos // b + 1) * b)
    kv_limit = np.minimum(kv_limit, (computed + query if key_end is None else key_end)[req])
    skip_start = np.where(in_block, block_start, 0)
    skip_end = np.where(in_block, block_start + k * b, 0)
    in_place = np.where(in_block, block_start + (pos - block_start) % b, pos)
    rope = in_place if (k > 0).any() else None
    from_history = in_place < (computed + query - drafts)[req]
    return TokenLayout(kv_limit, skip_start, skip_end, rope, req, from_history)
