"""Per-request option resolution and its error messages (they become HTTP 400 bodies)."""

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
