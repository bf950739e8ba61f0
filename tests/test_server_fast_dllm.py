"""`vllm serve <Fast-dLLM v2 layout checkpoint>` answering OpenAI clients.

The checkpoint has the published Fast-dLLM v2 config.json (`Fast_dLLM_QwenForCausalLM`, the block
length in `bd_size`, auto_map to remote code): the plugin must serve it with no extra flags, with
the family's defaults (shifted logits, the `subblock` policy with its sub-block cache on).
"""

from __future__ import annotations

import json

import openai
import pytest
from test_server import CPU_FLAGS, SCHEMA

from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.server

# The published bd_size: with the subblock policy's default sub_block_length (8) a block holds
# several sub-blocks, so the sub-block cache has something to skip.
BD_SIZE = 32


@pytest.fixture(scope="module")
def fast_dllm(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("fast_dllm_serve"), arch="fast_dllm",
                                    block_size=BD_SIZE, seed=2))


@pytest.fixture(scope="module")
def server(fast_dllm, tmp_path_factory):
    from vllm_blockdiff.bench.soak import running_server

    log = tmp_path_factory.mktemp("server") / "serve.log"
    with running_server(fast_dllm, ["--enforce-eager", *CPU_FLAGS], log, 300) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        yield client, client.models.list().data[0].id


def stats_of(response) -> dict:
    return response.model_extra["kv_transfer_params"]["blockdiff"]


def test_completion_uses_bd_size_as_block_length(server):
    client, model = server
    out = client.completions.create(model=model, prompt="def f(x):", max_tokens=20,
                                    temperature=0, extra_body={"ignore_eos": True})
    stats = stats_of(out)
    assert out.usage.completion_tokens == stats["output_tokens"] == 20
    assert stats["block_length"] == BD_SIZE
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text and "<|MASK|>" not in out.choices[0].text


def test_chat_completion_streamed_and_not(server):
    client, model = server
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Say something."}],
                  max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**kwargs)
    full = out.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == full and full
    assert stats_of(out)["output_tokens"] == out.usage.completion_tokens == 24


@pytest.mark.parametrize("compact", [False, True], ids=["any_whitespace", "compact"])
def test_response_format_json_schema(server, compact):
    """Finished outputs validate against the schema; the grammar backend shows in the stats.
    With any whitespace (the default) the JSON may start with one space or newline."""
    import jsonschema

    client, model = server
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A city as JSON."}], max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
        # vLLM takes `disable_any_whitespace` only beside a constraint: the same schema
        extra_body={"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}
        if compact else None)
    choice = out.choices[0]
    text = choice.message.content
    assert stats_of(out)["grammar"]["backend"] in ("xgrammar", "llguidance")
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(text), SCHEMA)
    else:  # cut by max_tokens inside the object
        assert choice.finish_reason == "length" and text.lstrip().startswith("{")
    if compact:
        assert text.startswith("{") and "\n" not in text and "  " not in text


def test_sub_block_cache_is_on_by_default_and_saves_query_tokens(server):
    """`use_block_cache` is a `subblock` parameter, accepted without naming the policy only
    because it is this family's default; turning it off recomputes whole blocks."""
    client, model = server

    def run(xargs: dict) -> tuple[str, dict]:
        out = client.completions.create(model=model, prompt="import os\n", max_tokens=48,
                                        temperature=0,
                                        extra_body={"ignore_eos": True, "vllm_xargs": xargs})
        return out.choices[0].text, stats_of(out)

    text, cached = run({})
    _, uncached = run({"use_block_cache": False})
    assert run({"policy": "subblock", "use_block_cache": True}) == (text, cached)
    assert cached["output_tokens"] == uncached["output_tokens"] == 48
    # Between refreshes a step runs one 8-position sub-block instead of the 32-position block.
    assert uncached["query_tokens"] > 1.5 * cached["query_tokens"], (cached, uncached)
    with pytest.raises(openai.BadRequestError, match="use_block_cache"):
        run({"policy": "threshold", "use_block_cache": False})
