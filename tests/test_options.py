"""Per-request option resolution and its error messages (they become HTTP 400 bodies)."""

import re

import pytest

from vllm_blockdiff.options import OptionsError, ServeConfig, resolve_options


@pytest.fixture
def serve():
    return ServeConfig(block_length=4, max_block_length=16, mask_token_id=3,
                       policy_defaults={"threshold": 0.8}, block_length_divides=16)


def test_defaults_come_from_the_server(serve):
    opts = resolve_options(None, serve)
    assert (opts.policy, opts.block_length, opts.params.threshold) == ("threshold", 4, 0.8)


def test_request_overrides(serve):
    opts = resolve_options({"policy": "dynamic", "block_length": 8, "steps": 2}, serve)
    assert (opts.policy, opts.block_length, opts.params.steps) == ("dynamic", 8, 2)
    assert opts.params.threshold == 0.8  # server default for a field the policy declares
    static = resolve_options({"policy": "static"}, serve)
    assert static.params.steps is None  # defaults to the block length at decode time


@pytest.mark.parametrize(
    "args, field",
    [
        ({"policy": "nope"}, "policy"),
        ({"policy": 3}, "policy"),
        ({"block_length": 0}, "block_length"),
        ({"block_length": 32}, "block_length"),
        ({"block_length": 6}, "block_length"),  # does not divide the KV page (16)
        ({"block_length": "4"}, "block_length"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"treshold": 0.5}, "treshold"),
        ({"policy": "static", "threshold": 0.5}, "threshold"),
        ({"policy": "dynamic", "steps": 0}, "steps"),
    ],
)
def test_errors_name_the_field(serve, args, field):
    with pytest.raises(OptionsError, match=rf"vllm_xargs\.{field}:"):
        resolve_options(args, serve)


# Integer options bounded by the server: steps, radius, explore, fine_block_length <= the
# server's max_block_length (16); marker, delimiter < the model's vocabulary size (768).
INT_OPTIONS = [
    ("dynamic", "steps", {}),
    ("static", "steps", {}),
    ("localleap", "radius", {}),
    ("ete", "explore", {}),
    ("tccf", "fine_block_length", {"marker": 5}),
    ("tccf", "marker", {}),
    ("adablock", "delimiter", {}),
    ("freedave", "drafts", {}),
]
FLOAT_OPTIONS = [("entropy", "gamma"), ("ete", "min_bits"), ("factor", "factor"),
                 ("threshold", "threshold"), ("bacd", "lo"), ("eoser", "g_min")]


@pytest.fixture
def sized():
    return ServeConfig(block_length=4, max_block_length=16, mask_token_id=3, vocab_size=768)


@pytest.mark.parametrize("policy, field, rest", INT_OPTIONS)
@pytest.mark.parametrize("value", [2**63, 2**64, 2**200, -1, -(2**63) - 1, True, "2**63",
                                   str(2**63), 1.5, float("nan"), [1]])
def test_integer_options_are_bounded(sized, policy, field, rest, value):
    with pytest.raises(OptionsError, match=rf"^vllm_xargs\.{field}:"):
        resolve_options({"policy": policy, field: value, **rest}, sized)


@pytest.mark.parametrize("policy, field, rest", INT_OPTIONS)
def test_integer_options_accept_their_whole_range(sized, policy, field, rest):
    top = {"marker": 767, "delimiter": 767, "drafts": 64}.get(field, 16)
    for value in (top, 1):
        args = {"policy": policy, field: value, **rest}
        if field == "fine_block_length":
            args["block_length"] = value
        assert getattr(resolve_options(args, sized).params, field) == value


@pytest.mark.parametrize("field, value, message", [
    ("steps", 17, "<= 16 (the server's max_block_length)"),
    ("marker", 768, "< 768 (the model's vocab_size)"),
])
def test_server_bounds_are_named(sized, field, value, message):
    policy = "tccf" if field == "marker" else "static"
    with pytest.raises(OptionsError, match=rf"vllm_xargs\.{field}: .*{re.escape(message)}"):
        resolve_options({"policy": policy, field: value}, sized)


@pytest.mark.parametrize("policy, field", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf",
                                   10**400, True, "high"])
def test_float_options_are_finite_numbers(sized, policy, field, value):
    with pytest.raises(OptionsError, match=rf"^vllm_xargs\.{field}:"):
        resolve_options({"policy": policy, field: value}, sized)


@pytest.mark.parametrize("value", [2**63, 2**64, -1, True, 4.0, float("nan")])
def test_block_length_is_bounded(sized, value):
    with pytest.raises(OptionsError, match=r"^vllm_xargs\.block_length:"):
        resolve_options({"block_length": value}, sized)


def test_serve_defaults_are_bounded_too(sized):
    serve = ServeConfig(block_length=4, max_block_length=16, mask_token_id=3, vocab_size=768,
                        policy_defaults={"radius": 2**63})
    with pytest.raises(OptionsError, match=r"vllm_xargs\.radius"):
        resolve_options({"policy": "localleap"}, serve)
