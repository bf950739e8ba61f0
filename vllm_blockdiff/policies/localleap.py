"""LocalLeap: confident anchors relax the threshold of their neighbours.

Rule (LocalLeap `get_transfer_index`): anchors are the masked positions with confidence >= `tau`.
A masked position within `radius` positions of an anchor is committed if its confidence is
>= `tau_relax`, any other masked position only if >= `tau`; the most confident masked position is
always committed. Tokens next to a confident token are locally determined by it, so they can be
accepted with less confidence. LocalLeap's other half, filling the rest of a block with EOS once it
holds one, is what this engine already does: a request stops at its first stop token in
left-to-right order, and nothing after it is emitted.

Parameters (the paper's defaults): `tau` 0.9, `tau_relax` 0.75 (must not exceed `tau`), `radius` 4;
`radius` 0 reduces it to the plain threshold policy.
Use it for long blocks where confident tokens come in runs (code, copied spans, lists).
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
)

_FAR = 1 << 40  # farther than any canvas position, for rows or sides without an anchor


class LocalLeapParams(msgspec.Struct, forbid_unknown_fields=True):
    tau: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    tau_relax: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.75
    radius: Annotated[BlockBounded, msgspec.Meta(ge=0)] = 4

    def __post_init__(self) -> None:
        if self.tau_relax > self.tau:
            # The "- at `$.tau_relax`" suffix is msgspec's path format, so the error names it.
            raise ValueError(
                f"must not exceed tau ({self.tau}), got {self.tau_relax} - at `$.tau_relax`"
            )


def anchor_distance(anchor: torch.Tensor) -> torch.Tensor:
    """[R, L] int64: distance from each position to the nearest anchor of its row (_FAR: none)."""
    pos = torch.arange(anchor.shape[-1], device=anchor.device).expand_as(anchor)
    left = torch.where(anchor, pos, -_FAR).cummax(-1).values
    right = torch.where(anchor, pos, _FAR).flip(-1).cummin(-1).values.flip(-1)
    return torch.minimum(pos - left, right - pos)


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    conf = masked_confidence(inp)
    anchor = conf >= params["tau"][:, None]
    near = anchor_distance(anchor) <= params["radius"][:, None]
    relaxed = near & (conf >= params["tau_relax"][:, None])
    return anchor | relaxed | top1_mask(inp)


POLICY = Policy("localleap", LocalLeapParams, select, doc=__doc__ or "")
