"""Per-request denoising state kept on the device, indexed by Model Runner V2's request slot.

The canvas holds the current block by block offset (offset j is absolute position s + j for the
block starting at s). Positions left of the first uncommitted one have been handed to vLLM as
output; `committed` marks canvas positions a policy has filled. Everything else about a request's
progress (block start, offset, expected canvas size) is derived each step from the scheduler's
token counts, so the host never waits on the device for it, except in a window
(`engine/scheduler.py`, asynchronous scheduling): there the block start and offset kept here on
the device decide which of the window's two blocks is denoised.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import NamedTuple

import numpy as np
import torch

from vllm_blockdiff.grammar import CanvasConstraint
from vllm_blockdiff.options import DecodeOptions, ServeConfig
from vllm_blockdiff.policies import POLICIES
from vllm_blockdiff.policies.block_switch import (
    NEVER,
    block_length_at,
    fine_block_length,
    marker_of,
    switch_position,
)
from vllm_blockdiff.policies.subblock import cached_query, cached_sub_block

MAX_STOP_TOKENS = 16  # flagged for the policies (the first 16); vLLM itself checks every stop
POLICY_NAMES = list(POLICIES)  # a request's policy, by index (`BlockStates.policy_np`)
MAX_POLICY_FIELDS = max(len(p.params_cls.__struct_fields__) for p in POLICIES.values())
# The device state of a request's open block that its emitted tokens do not carry: what is kept
# for a preempted request (`BlockStates.save_block`).
BLOCK_FIELDS = ("canvas", "committed", "committed_confidence", "step", "offset", "pred_token",
                "pred_confidence", "pred_valid")


class SavedBlock(NamedTuple):
    """Device copies of a preempted request's block state, taken in stream order."""

    block_start: torch.Tensor
    rows: tuple[torch.Tensor, ...]  # BLOCK_FIELDS


def runs_windows(options: DecodeOptions, constrained: bool, serve: ServeConfig) -> bool:
    """Whether a request may run windows: it needs no host work between steps (grammars,
    drafting policies such as FreeDave, a TCCF marker, the sub-block cache and shifted logits
    all do)."""
    return not (constrained or POLICIES[options.policy].verifies_drafts
                or marker_of(options) is not None or cached_sub_block(options)
                or serve.shifted_logits)


class BlockStates:
    def __init__(self, max_num_reqs: int, max_block_length: int, mask_token_id: int,
                 device: torch.device, serve: ServeConfig | None = None,
                 max_model_len: int = 0):
        self.max_block_length = max_block_length
        self.mask_token_id = mask_token_id
        self.serve = serve
        self.max_model_len = max_model_len
        # Device tensors have one row more: the scratch slot that padding rows of a captured
        # sampler step read and write (`engine/sampler.py`), never a request's.
        self.scratch = max_num_reqs
        max_num_reqs += 1
        self.canvas = torch.full((max_num_reqs, max_block_length), mask_token_id,
                                 dtype=torch.int64, device=device)
        self.committed = torch.zeros(max_num_reqs, max_block_length, dtype=torch.bool,
                                     device=device)
        # Confidence each committed position had when it was committed (policy history).
        self.committed_confidence = torch.zeros(max_num_reqs, max_block_length,
                                                dtype=torch.float32, device=device)
        self.step = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)
        # Absolute start of the current block (kept by every denoising step; read by windows).
        self.block_start = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)
        # The block's first open offset after the last step that ran the request's canvas: a
        # step that runs none of it (its query cut short by the token budget) cannot tell.
        self.offset = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)
        # Drafting policies (FreeDave): the last forward's proposals for the open positions.
        self.pred_token = torch.zeros(max_num_reqs, max_block_length, dtype=torch.int64,
                                      device=device)
        self.pred_confidence = torch.zeros(max_num_reqs, max_block_length, dtype=torch.float32,
                                           device=device)
        self.pred_valid = torch.zeros(max_num_reqs, max_block_length, dtype=torch.bool,
                                      device=device)
        # Host copies: the block length is needed to plan every step, options by the sampler.
        self.block_length_np = np.ones(max_num_reqs, dtype=np.int64)
        # Sub-block cache (`policies/subblock.py`): its sub-block length (0: off), and the start
        # of the block whose KV a refresh left in the cache (-1: none).
        self.cache_sub_np = np.zeros(max_num_reqs, dtype=np.int64)
        self.cache_block_np = np.full(max_num_reqs, -1, dtype=np.int64)
        # Block-length switch at a marker (TCCF, `policies/block_switch.py`).
        self.fine_block_length_np = np.ones(max_num_reqs, dtype=np.int64)
        self.switch_at_np = np.full(max_num_reqs, NEVER, dtype=np.int64)
        self.marker: list[int | None] = [None] * max_num_reqs
        self.verifies_drafts_np = np.zeros(max_num_reqs, dtype=bool)
        # Windows (asynchronous scheduling): requests that may run them, and those of them a
        # canvas ran for (the scheduler's `_Progress.windows` and `ran`).
        self.windows_np = np.zeros(max_num_reqs, dtype=bool)
        self.ran_np = np.zeros(max_num_reqs, dtype=bool)
        self.options: list[DecodeOptions | None] = [None] * max_num_reqs
        # Each request's policy (index into POLICY_NAMES) and its parameters as numbers
        # (`Policy.values`), written once when it arrives: a step only indexes them.
        self.policy_np = np.zeros(max_num_reqs, dtype=np.int64)
        self.policy_values = torch.zeros(max_num_reqs, max(MAX_POLICY_FIELDS, 1),
                                         dtype=torch.float64, device=device)
        self.policy_values[self.scratch] = float("nan")  # every parameter at its default
        # Each request's stop tokens (EOS, stop_token_ids), padded with -1, for the policies.
        self.stop_table = torch.full((max_num_reqs, MAX_STOP_TOKENS), -1, dtype=torch.int64,
                                     device=device)
        # Grammar state of constrained requests (host objects; see vllm_blockdiff/grammar), or
        # the compilation still running for it.
        self.constraints: list[CanvasConstraint | Future | None] = [None] * max_num_reqs
        self.constrained_np = np.zeros(max_num_reqs, dtype=bool)

    def add_request(self, slot: int, options: DecodeOptions, stop_token_ids: list[int],
                    constraint: CanvasConstraint | Future | None = None, prompt_len: int = 0,
                    emitted: Sequence[int] = ()) -> None:
        """`emitted`: the output so far of a resumed (preempted) request."""
        self.options[slot] = options
        ids = stop_token_ids[:MAX_STOP_TOKENS]
        self.stop_table[slot] = torch.tensor(ids + [-1] * (MAX_STOP_TOKENS - len(ids)))
        policy = POLICIES[options.policy]
        self.policy_np[slot] = POLICY_NAMES.index(options.policy)
        values = policy.values(options.params)
        if values:
            self.policy_values[slot, :len(values)] = torch.tensor(values, dtype=torch.float64)
        self.constraints[slot] = constraint
        self.constrained_np[slot] = constraint is not None
        self.block_length_np[slot] = options.block_length
        self.cache_sub_np[slot] = cached_sub_block(options)
        self.cache_block_np[slot] = -1
        self.fine_block_length_np[slot] = fine_block_length(options)
        self.marker[slot] = marker_of(options)
        self.switch_at_np[slot] = NEVER
        self.observe(slot, prompt_len, emitted)
        self.verifies_drafts_np[slot] = policy.verifies_drafts
        self.windows_np[slot] = (self.serve is not None and self.serve.windows
                                 and runs_windows(options, constraint is not None, self.serve))
        self.ran_np[slot] = False
        self.reset_blocks(slot)  # an int index: no per-request host-to-device copy

    def grammar_ready(self, slot: int) -> bool:
        """False while the request's grammar compiles: it waits (is not denoised) meanwhile.

        The API server compiled the spec once already, so an error here is an engine bug and
        is raised.
        """
        constraint = self.constraints[slot]
        if isinstance(constraint, Future):
            if not constraint.done():
                return False
            self.constraints[slot] = constraint.result()
        return True

    def observe(self, slot: int, first_position: int, tokens: Sequence[int]) -> None:
        """Emitted tokens of a request still waiting for its marker (TCCF)."""
        marker = self.marker[slot]
        if marker is not None and self.switch_at_np[slot] == NEVER:
            self.switch_at_np[slot] = switch_position(tokens, first_position, marker,
                                                      int(self.block_length_np[slot]))

    def windows(self, slots: np.ndarray, computed: np.ndarray) -> np.ndarray:
        """Which requests run a window this step: the scheduler's rule (`_window`) on the
        counts it sent, a window starting where the computed tokens end."""
        fits = computed + 2 * self.block_length_np[slots] <= self.max_model_len
        return self.windows_np[slots] & self.ran_np[slots] & fits

    def block_lengths(self, slots: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
        """Each request's block length for the block holding its next position."""
        return block_length_at(num_tokens, self.block_length_np[slots],
                               self.fine_block_length_np[slots], self.switch_at_np[slots])

    def sub_block_steps(self, slots: np.ndarray, num_tokens: np.ndarray, drafts: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which requests run only their active sub-block this step (the sub-block cache), where
        it ends, and where their block ends: their queries see the whole block."""
        b = np.maximum(self.block_lengths(slots, num_tokens), 1)
        start = num_tokens // b * b
        cached, _, sub_end = cached_query(start, num_tokens - start, b, self.cache_sub_np[slots],
                                          self.cache_block_np[slots] == start)
        return cached & (drafts > 0), sub_end, start + b

    def save_block(self, slot: int) -> SavedBlock:
        """The slot's block state as the steps queued so far leave it (device copies, no sync)."""
        return SavedBlock(self.block_start[slot].clone(),
                          tuple(getattr(self, name)[slot].clone() for name in BLOCK_FIELDS))

    def restore_block(self, slot: int, saved: SavedBlock, num_tokens: int) -> None:
        """A resumed request with `num_tokens` known tokens takes its saved block state back if
        it continues that block: the positions committed beyond its emitted text, their
        confidences and the step count (a block the saved state finished, or one never started,
        is fully masked either way). Decided on the device, so nothing waits for the GPU."""
        b = int(self.block_lengths(np.array([slot]), np.array([num_tokens]))[0])
        same = saved.block_start == num_tokens // b * b
        for name, row in zip(BLOCK_FIELDS, saved.rows, strict=True):
            field = getattr(self, name)
            field[slot] = torch.where(same, row, field[slot])

    def reset_blocks(self, slots: torch.Tensor | int) -> None:
        """Start a fresh, fully masked block for these slots."""
        self.canvas[slots] = self.mask_token_id
        self.committed[slots] = False
        self.committed_confidence[slots] = 0.0
        self.step[slots] = 0
        self.offset[slots] = 0
        self.pred_valid[slots] = False
