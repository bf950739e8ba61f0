"""Learn2PD ("Learning to Parallel Decode"): a small learned filter picks the final proposals.

Rule (Learn2PD `generate_learn2parallel`): an MLP f: R^B -> R^B, one per block length B, reads
the confidence vector of the current block and predicts, per position, whether the proposal there
already is the token the position will finally get. Every masked position with
sigmoid(f(c))_i > `accept` is committed, and the most confident masked position always is. The
filter sees the confidence at masked positions and 0 elsewhere (committed positions, the fixed head
left of the canvas), as the trainer logs it.
Training (`python -m vllm_blockdiff.testbed.learn2pd`): decode with one token per forward, log
every step's confidence vector and which proposals equal the final tokens, fit f with BCE.

Parameters: `filter`, the path of a filter file (safetensors, per block length B the tensors
`B{B}.w1` [H, B], `B{B}.b1` [H], `B{B}.w2` [B, H], `B{B}.b2` [B]; default: the served model
directory's `learn2pd/filters.safetensors`, in a subdirectory because weight loaders read every
top-level *.safetensors file), which must hold the request's block length; only the server
sets it (`--additional-config '{"blockdiff": {"filter": PATH}}'`), so requests cannot make it
read files; `accept` 0.96 (the paper's).
Use it when a filter trained for the served model is at hand: it learns where this model's
confidence can be trusted instead of applying one global threshold.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, NamedTuple

import msgspec
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from vllm_blockdiff.policies.base import Policy, PolicyInput, intern, top1_mask

DEFAULT_PATH = "learn2pd/filters.safetensors"  # in the served model's directory
_KEY = re.compile(r"B(\d+)\.(w1|b1|w2|b2)")


class MLP(NamedTuple):
    """One block length's filter: logits = w2 relu(w1 c + b1) + b2."""

    w1: torch.Tensor  # [H, B]
    b1: torch.Tensor  # [H]
    w2: torch.Tensor  # [B, H]
    b2: torch.Tensor  # [B]

    def __call__(self, confidence: torch.Tensor) -> torch.Tensor:
        """[N, B] confidences (0 where not masked) -> [N, B] logits.

        Row by row (a product and a sum per row, no GEMM): a matrix multiply's summation order
        depends on the number of rows, and a greedy request's commits must not depend on what
        shares its batch."""
        hidden = F.relu((confidence[:, None, :] * self.w1).sum(-1) + self.b1)
        return (hidden[:, None, :] * self.w2).sum(-1) + self.b2

    def to(self, device: torch.device) -> MLP:
        return MLP(*(t.to(device=device, dtype=torch.float32) for t in self))


def read_filters(path: str) -> dict[int, MLP]:
    """The MLPs of a filter file by block length; ValueError saying what is wrong with it."""
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot read filter file {path!r}: {e}") from None
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"filter file {path!r}: unexpected tensor {key!r}")
        parts.setdefault(int(match[1]), {})[match[2]] = tensor
    if not parts:
        raise ValueError(f"filter file {path!r} holds no filter")
    mlps = {}
    for b, p in sorted(parts.items()):
        if set(p) != {"w1", "b1", "w2", "b2"}:
            raise ValueError(f"filter file {path!r}: B{b} needs w1, b1, w2, b2, has {sorted(p)}")
        h = p["b1"].shape[0]
        shapes = [tuple(p[k].shape) for k in ("w1", "b1", "w2", "b2")]
        if shapes != [(h, b), (h,), (b, h), (b,)]:
            raise ValueError(f"filter file {path!r}: B{b} shapes {shapes} are not an MLP B->H->B")
        mlps[b] = MLP(p["w1"], p["b1"], p["w2"], p["b2"]).to(torch.device("cpu"))
    return mlps


# Filters loaded in this process, by the interned handle of their resolved path; requests carry
# the handle (`Policy.batch_params`), and `select` applies each loaded filter to its rows.
_LOADED: dict[int, dict[int, MLP]] = {}
_ON_DEVICE: dict[tuple[int, int, torch.device], MLP] = {}


def load(path: str) -> dict[int, MLP]:
    """The filters of `path` (resolved), read once per process."""
    handle = intern(path)
    if handle not in _LOADED:
        _LOADED[handle] = read_filters(path)
    return _LOADED[handle]


class Learn2PDParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    accept: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.96
    filter: str

    def __post_init__(self) -> None:
        # The "- at `$.filter`" suffix is msgspec's path format, so the request error names it.
        try:
            self.filter = str(Path(self.filter).expanduser().resolve())
            load(self.filter)
        except (OSError, ValueError) as e:
            raise ValueError(f"{e} - at `$.filter`") from None

    def block_length_error(self, block_length: int) -> tuple[str, str] | None:
        """(field, message) when the filter file cannot decode blocks of `block_length`."""
        lengths = sorted(load(self.filter))
        if block_length in lengths:
            return None
        return "filter", (f"{self.filter} has no filter for block_length {block_length} "
                          f"(it has {lengths})")


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    conf = inp.confidence * inp.masked  # what the filter saw in training
    width = conf.shape[-1]
    accepted = torch.zeros_like(inp.masked)
    # Every loaded (file, B) filter runs on all rows and keeps its own: no host sync per row.
    for handle, mlps in _LOADED.items():
        for b, mlp in mlps.items():
            if b > width:
                continue
            key = (handle, b, conf.device)
            if key not in _ON_DEVICE:
                _ON_DEVICE[key] = mlp.to(conf.device)
            passed = torch.sigmoid(_ON_DEVICE[key](conf[:, :b])) > params["accept"][:, None]
            rows = (params["filter"] == handle) & (inp.block_length == b)
            accepted[:, :b] |= passed & rows[:, None]
    return (accepted & inp.masked) | top1_mask(inp)


# Not graph-safe: the filters a step runs are the files loaded so far (`_LOADED`).
POLICY = Policy("learn2pd", Learn2PDParams, select, server_params=("filter",),
                graph_safe=False, doc=__doc__ or "")
