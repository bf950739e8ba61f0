"""Per-request denoising state kept on the device, indexed by Model Runner V2's request slot.

The canvas holds the current block by block offset (offset j is absolute position s + j for the
block starting at s). Positions left of the first uncommitted one have been handed to vLLM as
output; `committed` marks canvas positions a policy has filled. Everything else about a request's
progress (block start, offset, expected canvas size) is derived each step from the scheduler's
token counts, so the host never waits on the device for it.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_blockdiff.grammar import CanvasConstraint
from vllm_blockdiff.options import DecodeOptions

MAX_STOP_TOKENS = 16  # flagged for the policies (the first 16); vLLM itself checks every stop


class BlockStates:
    def __init__(self, max_num_reqs: int, max_block_length: int, mask_token_id: int,
                 device: torch.device):
        self.max_block_length = max_block_length
        self.mask_token_id = mask_token_id
        self.canvas = torch.full((max_num_reqs, max_block_length), mask_token_id,
                                 dtype=torch.int64, device=device)
        self.committed = torch.zeros(max_num_reqs, max_block_length, dtype=torch.bool,
                                     device=device)
        # Confidence each committed position had when it was committed (policy history).
        self.committed_confidence = torch.zeros(max_num_reqs, max_block_length,
                                                dtype=torch.float32, device=device)
        self.step = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)
        # Host copies: the block length is needed to plan every step, options by the sampler.
        self.block_length_np = np.ones(max_num_reqs, dtype=np.int64)
        self.options: list[DecodeOptions | None] = [None] * max_num_reqs
        # Each request's stop tokens (EOS, stop_token_ids), padded with -1, for the policies.
        self.stop_table = torch.full((max_num_reqs, MAX_STOP_TOKENS), -1, dtype=torch.int64,
                                     device=device)
        # Grammar state of constrained requests (host objects; see vllm_blockdiff/grammar).
        self.constraints: list[CanvasConstraint | None] = [None] * max_num_reqs

    def add_request(self, slot: int, options: DecodeOptions, stop_token_ids: list[int],
                    constraint: CanvasConstraint | None = None) -> None:
        self.options[slot] = options
        ids = stop_token_ids[:MAX_STOP_TOKENS]
        self.stop_table[slot] = torch.tensor(ids + [-1] * (MAX_STOP_TOKENS - len(ids)))
        self.constraints[slot] = constraint
        self.block_length_np[slot] = options.block_length
        self.reset_blocks(torch.tensor([slot], device=self.canvas.device))

    def reset_blocks(self, slots: torch.Tensor) -> None:
        """Start a fresh, fully masked block for these slots."""
        self.canvas[slots] = self.mask_token_id
        self.committed[slots] = False
        self.committed_confidence[slots] = 0.0
        self.step[slots] = 0
