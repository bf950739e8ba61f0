"""The accuracy harness: policy specs and one configuration through the engine."""

import pytest

from vllm_blockdiff.bench.accuracy import parse_policy, run_config
from vllm_blockdiff.testbed.tasks import generate


def test_policy_specs():
    assert parse_policy("threshold:0.8") == {"policy": "threshold", "threshold": 0.8}
    assert parse_policy("static:2") == {"policy": "static", "steps": 2}
    assert parse_policy("dynamic:0.7:steps=2") == {"policy": "dynamic", "threshold": 0.7,
                                                   "steps": 2}
    assert parse_policy("bacd") == {"policy": "bacd"}
    assert parse_policy("subblock:sub_block_length=4:use_block_cache=false") == {
        "policy": "subblock", "sub_block_length": 4, "use_block_cache": False}
    with pytest.raises(SystemExit):
        parse_policy("nope")


@pytest.mark.engine
def test_one_configuration(llm):
    examples = {"lists": generate("lists", "test", 3), "arithmetic": generate("arithmetic",
                                                                                 "test", 2)}
    rows = run_config(llm, examples, {"policy": "static", "steps": 2, "block_length": 4},
                      "static:2", 4, "tiny")
    assert [(r.task, r.n) for r in rows] == [("lists", 3), ("arithmetic", 2)]
    for r in rows:
        assert 0.0 <= r.accuracy <= 1.0 and r.forwards_per_request > 0
        assert r.tokens_per_forward > 0 and r.tokens_per_s > 0
