"""Token bitmasks: one bit per vocabulary id, packed little-endian into int32 words.

This is the layout xgrammar and llguidance both fill, so it is the interface between a grammar
backend and the sampler. Everything here is plain torch and works on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BITS = 32


def words(vocab_size: int) -> int:
    return (vocab_size + BITS - 1) // BITS


def allocate(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V / 32)] int32 on the CPU (backends fill host memory), all tokens allowed."""
    return torch.full((rows, words(vocab_size)), -1, dtype=torch.int32)


def to_bool(bitmask: torch.Tensor, size: int) -> torch.Tensor:
    """Unpack [..., W] int32 words into [..., size] bool; ids beyond the mask's 32*W are False."""
    shifts = torch.arange(BITS, device=bitmask.device, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)
    if bits.shape[-1] >= size:
        return bits[..., :size]
    pad = torch.zeros(*bits.shape[:-1], size - bits.shape[-1], dtype=torch.bool,
                      device=bitmask.device)
    return torch.cat([bits, pad], -1)


def apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set disallowed logits to -inf in place; [..., V] logits against [..., W] words.

    Columns past the grammar's vocabulary (the model's lm_head may be wider than the tokenizer,
    padded to a multiple of 64 or 128) are disallowed as well: they are not tokens.
    """
    allowed = to_bool(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    logits.masked_fill_(~allowed, float("-inf"))


def allowed_ids(row: torch.Tensor, limit: int) -> list[int] | None:
    """The allowed ids of one [W] host bitmask row if there are at most `limit`, else None.

    Cheap on large vocabularies (a popcount over W words), so it can run at every fast-forward
    check without materialising a V-long boolean.
    """
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")
    if int(bits.sum()) > limit:
        return None
    return np.flatnonzero(bits).tolist()


def pack(allowed: np.ndarray, num_words: int) -> torch.Tensor:
    """A [num_words] host row allowing the ids where the bool array `allowed` is True (the
    inverse of `to_bool`); ids past `allowed` are disallowed."""
    bits = np.zeros(num_words * BITS, dtype=bool)
    bits[:len(allowed)] = allowed
    return torch.from_numpy(np.packbits(bits, bitorder="little").view(np.int32))


def pack_ids(ids: Sequence[int], num_words: int) -> torch.Tensor:
    """A [num_words] host row allowing exactly `ids`."""
    allowed = np.zeros(num_words * BITS, dtype=bool)
    allowed[list(ids)] = True
    return pack(allowed, num_words)


def allow_only(row: torch.Tensor, ids: Sequence[int]) -> None:
    """Overwrite one [W] host bitmask row so that exactly `ids` are allowed."""
    row.copy_(pack_ids(ids, row.shape[-1]))
