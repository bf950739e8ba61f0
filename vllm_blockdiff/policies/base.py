"""The unmasking-policy interface: which masked positions of a block to commit after a forward.

A policy is a pure function of per-position confidences and the block's state, batched over the
requests that chose it. It never sees vLLM: the same functions drive the vLLM sampler and the
plain-PyTorch reference decoder, and unit tests call them on synthetic confidences.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, NamedTuple

import msgspec
import msgspec.inspect
import torch

# Integer parameters bounded by a serve setting, which msgspec's `Meta` (constants only) cannot
# express: `options.resolve_options` checks them against the `ServeConfig` field `extra` names.
# A count or length within a block (steps, radius, ...): at most the server's max_block_length.
BlockBounded = Annotated[int, msgspec.Meta(extra={"at_most": "max_block_length"})]
# A token id: below the served model's vocabulary size.
TokenId = Annotated[int, msgspec.Meta(ge=0, extra={"below": "vocab_size"})]


class PolicyInput(NamedTuple):
    """One denoising step for R requests whose canvases are padded to L positions."""

    confidence: torch.Tensor  # [R, L] float32: probability of the proposed token
    masked: torch.Tensor  # [R, L] bool: position is still masked (False for padding)
    tokens: torch.Tensor  # [R, L] int64: committed token where committed, else the proposal
    step: torch.Tensor  # [R] int64: forwards already spent denoising this block (0 on the first)
    block_length: torch.Tensor  # [R] int64: block length B of each request
    # Block history: confidences (at commit time) of the positions committed so far in the block.
    committed_confidence_sum: torch.Tensor  # [R] float32
    committed_count: torch.Tensor  # [R] int64
    is_stop: torch.Tensor  # [R, L] bool: the proposed token would stop the request (EOS, stop ids)
    entropy: torch.Tensor | None = None  # [R, L] float32, for policies with needs_entropy


SelectFn = Callable[[PolicyInput, dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Policy:
    """A named policy: its per-request parameters (validated) and its selection rule.

    `select(inp, params)` returns a [R, L] bool mask of positions to commit. It must commit at least
    one masked position per row that has any, so every forward makes progress. `params` maps each
    field of `params_cls` to a [R] tensor (float32, or int64 for ints and `intern`ed strings).
    """

    name: str
    params_cls: type[msgspec.Struct]
    select: SelectFn
    needs_entropy: bool = False
    # The engine runs several drafts per forward and verifies them (FreeDave): greedy only,
    # without structured outputs; `select` is the rule each draft is verified against.
    verifies_drafts: bool = False
    # Parameters only the server sets (serve defaults): e.g. a file path the server would read.
    server_params: tuple[str, ...] = ()
    # `select` is tensor work on its inputs only (no host state that may change between steps),
    # so the engine may replay it from a CUDA graph.
    graph_safe: bool = True
    doc: str = ""

    def values(self, params: msgspec.Struct) -> list[float]:
        """One request's parameters as numbers, in field order: a string becomes its `intern`
        handle, None (a field that defaults to the block length) NaN. The engine keeps these
        rows on the device from the request's arrival (`params_from_values` reads them)."""
        row = [getattr(params, field) for field in self.params_cls.__struct_fields__]
        return [float("nan") if v is None else float(intern(v) if isinstance(v, str) else v)
                for v in row]

    def params_from_values(self, values: torch.Tensor, block_length: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        """`select`'s params from [R, >= fields] float64 rows of `values` and the rows' block
        lengths: tensor ops only, no host sync."""
        out: dict[str, torch.Tensor] = {}
        for j, field in enumerate(self.params_cls.__struct_fields__):
            column = values[:, j]
            if field in _float_fields(self.params_cls):
                out[field] = column.float()
            else:
                out[field] = torch.where(column.isnan(), block_length, column.long())
        return out

    def batch_params(self, rows: list[msgspec.Struct], block_lengths: list[int],
                     device: torch.device) -> dict[str, torch.Tensor]:
        """`params_from_values` for parameter structs given on the host (tests, reference)."""
        values = torch.tensor([self.values(p) for p in rows], dtype=torch.float64).reshape(
            len(rows), -1)
        return self.params_from_values(values.to(device),
                                       torch.tensor(block_lengths, device=device))


@functools.cache
def _float_fields(params_cls: type[msgspec.Struct]) -> frozenset[str]:
    """Fields typed float (float32 tensors); the others are integers, bools or handles (int64)."""
    info = msgspec.inspect.type_info(params_cls)
    return frozenset(f.name for f in info.fields if isinstance(f.type, msgspec.inspect.FloatType))


_INTERNED: dict[str, int] = {}


def intern(value: str) -> int:
    """A process-wide integer handle for a string parameter: per-row tensors hold only numbers."""
    return _INTERNED.setdefault(value, len(_INTERNED))


def masked_confidence(inp: PolicyInput) -> torch.Tensor:
    """Confidences with non-masked positions at -inf, so they never rank or pass a threshold."""
    return inp.confidence.masked_fill(~inp.masked, float("-inf"))


def topk_mask(scores: torch.Tensor, k: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Per row, the k[r] highest-scoring eligible positions (ties: leftmost first).

    The order is decided by a stable sort, so the choice does not depend on batch shape or device.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return (rank < k[:, None]) & eligible


def top1_mask(inp: PolicyInput) -> torch.Tensor:
    """The single most confident masked position of each row (the progress guarantee)."""
    return topk_mask(masked_confidence(inp), torch.ones_like(inp.step), inp.masked)


def transfer_count(
    block_length: torch.Tensor, steps: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """Tokens to commit at `step` when B tokens are spread over `steps` forwards.

    SDAR's `get_num_transfer_tokens`: B // steps each, the remainder going to the first steps.
    Past the last scheduled step every remaining token is due.
    """
    base = block_length // steps
    extra = (step < block_length % steps).long()
    return torch.where(step < steps, base + extra, block_length)
