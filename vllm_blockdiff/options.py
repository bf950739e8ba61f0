"""Serve-time settings and per-request decoding options, validated before the engine sees them.

Per request, options travel in `SamplingParams.extra_args` (the OpenAI API's `vllm_xargs`) as flat
keys: `policy`, `block_length`, and the chosen policy's own parameters (e.g. `threshold`,
`steps`). Serve-time defaults come from `--additional-config '{"blockdiff": {...}}'` with the same
keys plus `max_block_length`. Every error names the offending field.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi

from vllm_blockdiff.policies import POLICIES

REQUEST_KEYS = ("policy", "block_length")
# Set by the plugin itself (not by clients): the request's grammar, moved out of vLLM's
# structured-output fields by the API-server validation (`engine/validation.py`).
GRAMMAR_KEY = "_blockdiff_grammar"
# Structured-output backends (`vllm_blockdiff.grammar.BACKEND_NAMES`).
GrammarBackendName = Literal["auto", "xgrammar", "llguidance"]


class ServeConfig(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    """What the plugin resolved for a served checkpoint; stored on the HF config as `blockdiff`."""

    block_length: Annotated[int, msgspec.Meta(ge=1)]
    max_block_length: Annotated[int, msgspec.Meta(ge=1)]
    mask_token_id: int
    policy: str = "threshold"
    # Defaults for policy parameters, by field name (apply to whichever policy declares them).
    policy_defaults: dict[str, Any] = {}
    # Block lengths must divide this (the KV page size) when prefix caching is on; 0: no constraint.
    block_length_divides: int = 0
    # Draft tokens a request may run per forward (several drafts of a block: FreeDave); 0 means
    # max_block_length, one block.
    canvas_length: int = 0
    # Compiles and enforces structured outputs, in the API server and in the workers.
    grammar_backend: GrammarBackendName = "auto"
    # Token-id options (`TokenId`, e.g. `marker`) lie below it. The config hook sets the model's;
    # the default bounds them only by the int64 the workers hold them in.
    vocab_size: int = 2**63
    # Replays the sampler's per-step tensor work from CUDA graphs (steps without grammars or
    # drafts; `engine/sampler.py` TailGraphs). None: on CUDA unless enforce_eager; True off CUDA
    # runs the same static buffers eagerly (how CPU tests cover them).
    sampler_graphs: bool | None = None
    # The model predicts position j from position j - 1 (`ModelFamily.shifted_logits`).
    shifted_logits: bool = False
    # Asynchronous scheduling (`--async-scheduling`): requests that need no host work per step
    # run fixed windows of two blocks, planned before the previous step's tokens are known
    # (`engine/scheduler.py`).
    windows: bool = False

    def __post_init__(self) -> None:
        if self.canvas_length < self.max_block_length:
            self.canvas_length = self.max_block_length


def serve_config_of(hf_config: Any) -> ServeConfig:
    """The settings the config hook stored on a served model's HF config."""
    return msgspec.convert(hf_config.blockdiff, ServeConfig)


def is_block_diffusion(hf_config: Any) -> bool:
    return isinstance(getattr(hf_config, "blockdiff", None), dict)


class DecodeOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Resolved options of one request."""

    policy: str
    block_length: int
    params: msgspec.Struct


class OptionsError(ValueError):
    """A request option is invalid; the message names the field (vLLM answers HTTP 400)."""


def _field_error(field: str, message: str) -> OptionsError:
    return OptionsError(f"vllm_xargs.{field}: {message}")


def _convert(value: dict[str, Any], cls: type[msgspec.Struct], where: str) -> msgspec.Struct:
    try:
        return msgspec.convert(value, cls, strict=False)
    except msgspec.ValidationError as e:
        # msgspec says "... - at `$.threshold`"; lead with the field so the 400 names it.
        text = str(e)
        field = text.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in text else where
        if "missing required field `" in text:
            field = text.split("missing required field `", 1)[1].split("`", 1)[0]
        raise _field_error(field, text.split(" - at ")[0]) from None


@functools.cache
def _field_types(cls: type[msgspec.Struct]) -> tuple[tuple[str, mi.Type], ...]:
    """Each field's type as msgspec sees it, without the `None` of an optional one."""
    def present(t: mi.Type) -> mi.Type:
        if isinstance(t, mi.UnionType):
            return next(u for u in t.types if not isinstance(u, mi.NoneType))
        return t

    return tuple((f.name, present(f.type)) for f in mi.type_info(cls).fields)


def _check_serve_bounds(params: msgspec.Struct, serve: ServeConfig) -> None:
    """What msgspec's constant constraints cannot say: floats are finite, and integers stay
    within the serve setting their type names (`policies.base.BlockBounded`, `TokenId`).

    The workers hold parameters in int64 / float32 tensors, so an unchecked 2**63 or inf fails
    there and takes the engine down instead of one request.
    """
    for name, t in _field_types(type(params)):
        value = getattr(params, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise _field_error(name, f"Expected a finite `float`, got {value}")
        extra = (t.extra or {}) if isinstance(t, mi.Metadata) else {}
        if value is None or not extra:
            continue
        if (setting := extra.get("at_most")) and value > (bound := getattr(serve, setting)):
            raise _field_error(name, f"Expected `int` <= {bound} (the server's {setting})")
        if (setting := extra.get("below")) and value >= (bound := getattr(serve, setting)):
            raise _field_error(name, f"Expected `int` < {bound} (the model's {setting})")


def resolve_options(extra_args: dict[str, Any] | None, serve: ServeConfig) -> DecodeOptions:
    """Merge a request's `extra_args` over the serve-time defaults and validate the result."""
    args = dict(extra_args or {})
    args.pop(GRAMMAR_KEY, None)
    policy_name = args.pop("policy", serve.policy)
    if not isinstance(policy_name, str) or policy_name not in POLICIES:
        raise _field_error(
            "policy", f"unknown policy {policy_name!r}; choose one of {sorted(POLICIES)}"
        )
    block_length = args.pop("block_length", serve.block_length)
    if isinstance(block_length, bool) or not isinstance(block_length, int):
        raise _field_error("block_length", f"expected an integer, got {block_length!r}")
    if not 1 <= block_length <= serve.max_block_length:
        raise _field_error(
            "block_length",
            f"must be between 1 and {serve.max_block_length} (the server's max_block_length)",
        )
    if serve.block_length_divides and serve.block_length_divides % block_length:
        raise _field_error(
            "block_length",
            f"must divide the KV cache page size {serve.block_length_divides} while prefix "
            "caching is enabled",
        )
    policy = POLICIES[policy_name]
    fields = set(policy.params_cls.__struct_fields__)
    unknown = sorted(set(args) - fields)
    for field in sorted(set(args) & set(policy.server_params)):
        raise _field_error(field, "set by the server (--additional-config "
                           f"'{{\"blockdiff\": {{\"{field}\": ...}}}}'), not per request")
    if unknown:
        raise _field_error(
            unknown[0],
            f"unknown option for policy {policy_name!r}; it takes {sorted(fields) or 'none'} "
            f"besides {list(REQUEST_KEYS)}",
        )
    merged = {k: v for k, v in serve.policy_defaults.items() if k in fields} | args
    params = _convert(merged, policy.params_cls, policy_name)
    _check_serve_bounds(params, serve)
    fine = getattr(params, "fine_block_length", None)
    if fine is not None and block_length % fine:
        raise _field_error("fine_block_length", f"must divide block_length ({block_length})")
    # A policy's parameters may not fit every block length (e.g. Learn2PD's per-length filters).
    check = getattr(params, "block_length_error", None)
    if check is not None and (error := check(block_length)) is not None:
        raise _field_error(*error)
    return DecodeOptions(policy=policy_name, block_length=block_length, params=params)
