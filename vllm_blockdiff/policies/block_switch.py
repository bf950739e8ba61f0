"""Block-length switch at a marker token (TCCF), computed the same way by scheduler and workers.

A request whose policy names a `marker` decodes with its block length B until the block that holds
the first marker it writes ends, then with `fine_block_length`. Both sides of vLLM (the scheduler,
which sizes each step, and the worker, which denoises and lays out attention) observe the emitted
tokens and derive the same switch position, so no extra message crosses the process boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vllm_blockdiff.options import DecodeOptions

NEVER = 1 << 62  # the switch position of requests without (or before) a marker


def marker_of(options: DecodeOptions) -> int | None:
    return getattr(options.params, "marker", None)


def fine_block_length(options: DecodeOptions) -> int:
    return getattr(options.params, "fine_block_length", options.block_length)


def switch_position(tokens: Sequence[int], first_position: int, marker: int,
                    block_length: int) -> int:
    """The end of the block holding the first marker among `tokens` (at first_position...)."""
    for i, token in enumerate(tokens):
        if token == marker:
            return ((first_position + i) // block_length + 1) * block_length
    return NEVER


def block_length_at(position, coarse, fine, switch_at):
    """Block length of the block holding `position` (scalars or arrays).

    The scheduler asks per request and step: Python ints take no numpy round trip."""
    if isinstance(position, int) and isinstance(switch_at, int):
        return fine if position >= switch_at else coarse
    return np.where(np.asarray(position) >= switch_at, fine, coarse)
