"""Seeded Gumbel-max sampling on the host: where vLLM's Triton kernel cannot run (Triton's
interpreter lacks the libdevice call it uses), keyed like it by (request seed, offset) per row.

Per row: one generator seeded from (seed, offset) draws the row's noise, so a row's token does
not depend on the other rows of the batch.
"""

from __future__ import annotations

import numpy as np
import torch


def gumbel_sample_host(logits: torch.Tensor, seeds: np.ndarray, offsets: np.ndarray
                       ) -> torch.Tensor:
    """argmax(logits + Gumbel noise) per row, the noise seeded by (seeds[i], offsets[i])."""
    noise = torch.empty_like(logits)
    for row, (seed, offset) in enumerate(zip(seeds.tolist(), offsets.tolist(), strict=True)):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + offset) % (1 << 63))
        u = torch.rand(logits.shape[-1], generator=gen).clamp_(min=1e-20)
        noise[row] = -torch.log(-torch.log1p(-u))
    return (logits + noise).argmax(-1)
