"""`vllm serve <published-layout SDAR checkpoint>` answering OpenAI clients.

The checkpoint has the published SDAR config.json (no block size, no mask id, auto_map to remote
code): the plugin must find the mask token in the tokenizer and serve it with no extra flags.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request
from pathlib import Path

import openai
import pytest

from vllm_blockdiff.options import GRAMMAR_KEY
from vllm_blockdiff.policies import POLICIES

pytestmark = pytest.mark.server

CPU_FLAGS = ["--gpu-memory-utilization", "0.3", "--max-model-len", "512", "--dtype", "float32"]


@pytest.fixture(scope="module")
def server(published_sdar, tmp_path_factory):
    from vllm_blockdiff.bench.soak import running_server

    log = tmp_path_factory.mktemp("server") / "serve.log"
    with running_server(published_sdar, ["--enforce-eager", *CPU_FLAGS], log, 300) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="none")


def test_completion_reports_tokens_per_forward(server):
    _, client = server
    out = client.completions.create(model=client.models.list().data[0].id, prompt="def f(x):",
                                    max_tokens=20, temperature=0,
                                    extra_body={"vllm_xargs": {"block_length": 8}})
    stats = out.model_extra["kv_transfer_params"]["blockdiff"]
    assert stats["block_length"] == 8
    assert stats["output_tokens"] == out.usage.completion_tokens
    assert stats["tokens_per_forward"] == pytest.approx(
        stats["output_tokens"] / stats["forwards"], abs=1e-3)
    assert "<|MASK|>" not in out.choices[0].text


def test_streamed_completion_equals_single_response(server):
    _, client = server
    model = client.models.list().data[0].id
    kwargs = dict(model=model, prompt="import os\n", max_tokens=30, temperature=0,
                  extra_body={"vllm_xargs": {"policy": "dynamic", "steps": 2}, "ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)]
    assert "".join(chunks) == full
    assert len([c for c in chunks if c]) > 1  # tokens arrive as blocks resolve, not at the end


def test_chat_completion_streamed_and_not(server):
    _, client = server
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Say something."}]
    kwargs = dict(model=model, messages=messages, max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == full and full


BAD_XARGS = [
    ({"policy": "nonsense"}, "policy"),
    ({"threshold": "high"}, "threshold"),
    ({"block_length": 999}, "block_length"),
    ({"policy": "static", "threshold": 0.5}, "threshold"),
    ({"policy": "tccf"}, "marker"),
    ({"policy": "tccf", "marker": 5, "fine_block_length": 3}, "fine_block_length"),
    ({"policy": "freedave", "drafts": 0}, "drafts"),
    ({"policy": "adablock", "delimiter": -1}, "delimiter"),
    ({"policy": "learn2pd", "filter": "/etc/hostname"}, "filter"),
    ({"policy": "entropy", "gamma": "inf"}, "gamma"),
    ({GRAMMAR_KEY: '{"kind": "regex", "source": "a"}'}, GRAMMAR_KEY),  # the plugin's internal key
    # Integers past int64 (the workers' tensors overflowed: the engine died) or past msgpack's
    # uint64 (HTTP 500).
    *[({**xargs, field: huge}, field) for huge in (2**63, 2**64) for xargs, field in [
        ({}, "block_length"),
        ({"policy": "static"}, "steps"),
        ({"policy": "dynamic"}, "steps"),
        ({"policy": "localleap"}, "radius"),
        ({"policy": "ete"}, "explore"),
        ({"policy": "tccf"}, "marker"),
        ({"policy": "tccf", "marker": 5}, "fine_block_length"),
        ({"policy": "adablock"}, "delimiter"),
        ({"policy": "freedave"}, "drafts"),
    ]],
]
# (request fields, what the 400 says); a callable gets the model's vocabulary size. Streamed
# requests must be refused before the stream starts, as the others are.
BAD_REQUESTS = [
    *[({"extra_body": {"vllm_xargs": xargs}}, f"vllm_xargs.{field}") for xargs, field in BAD_XARGS],
    ({"prompt": lambda vocab: [10, vocab, 11]}, "prompt: token id"),  # vLLM's own off-by-one
    ({"extra_body": {"stop_token_ids": [2**63]}}, "stop_token_ids: token id"),
    ({"seed": 2**64}, "'seed'"),  # vLLM's server bounds it (the patch: offline requests)
    ({"extra_body": {"top_k": 2**64}}, "top_k: "),  # HTTP 500 (msgpack)
    ({"logprobs": 1, "stream": True}, "logprobs"),
    ({"stream": True, "extra_body": {"vllm_xargs": {"policy": "static", "steps": 2**63}}},
     "vllm_xargs.steps"),
    ({"stream": True, "prompt": lambda vocab: [vocab]}, "prompt: token id"),
]


@pytest.fixture(scope="module")
def vocab_size(published_sdar) -> int:
    return json.loads((Path(published_sdar) / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("bad, message", BAD_REQUESTS)
def test_bad_options_get_400_while_others_are_served(server, vocab_size, bad, message):
    _, client = server
    model = client.models.list().data[0].id
    good = dict(model=model, prompt="x = 1\n", max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True})
    request = {"model": model, "prompt": "x", "max_tokens": 4,
               **{k: v(vocab_size) if callable(v) else v for k, v in bad.items()}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(client.completions.create, **good) for _ in range(3)]
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**request)
        assert err.value.status_code == 400
        assert message in str(err.value)
        assert all(len(g.result().choices[0].text) > 0 for g in goods)


def test_prometheus_metrics(server):
    base, client = server
    client.completions.create(model=client.models.list().data[0].id, prompt="abc",
                              max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    text = urllib.request.urlopen(f"{base}/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("vllm:diffusion_num_denoising_steps_total",
                     "vllm:diffusion_num_committed_tokens_total"):
            if line.startswith(name):
                values[name] = float(line.rsplit(" ", 1)[1])
    assert values["vllm:diffusion_num_committed_tokens_total"] >= 8
    assert values["vllm:diffusion_num_denoising_steps_total"] >= 1


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "n": {"type": "integer"}},
          "required": ["city", "n"], "additionalProperties": False}


def test_response_format_json_schema_streamed_and_not(server):
    import jsonschema

    _, client = server
    model = client.models.list().data[0].id
    kwargs = dict(model=model, messages=[{"role": "user", "content": "A city as JSON."}],
                  max_tokens=200, temperature=0,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "city", "schema": SCHEMA}})
    out = client.chat.completions.create(**kwargs)
    text = out.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == text
    if out.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(text), SCHEMA)
    else:  # cut by max_tokens inside the object, reported as vLLM does for AR models
        assert out.choices[0].finish_reason == "length" and text.startswith("{")


def test_uncompilable_schema_is_a_400_with_the_compilers_message(server):
    _, client = server
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "foo"}}})
    assert err.value.status_code == 400 and 'Unsupported type "foo"' in str(err.value)


def test_every_policy_is_selectable_through_the_api(server):
    """Each policy answers a completion; FreeDave is greedy-only, Learn2PD needs a server-set
    filter (this random-weight model has none): both refusals name the field."""
    _, client = server
    model = client.models.list().data[0].id
    required = {"tccf": {"marker": 5}, "adablock": {"delimiter": 5}}
    for name in POLICIES:
        xargs = {"policy": name, **required.get(name, {})}
        kwargs = dict(model=model, prompt="x = 1\n", max_tokens=12, temperature=0,
                      extra_body={"vllm_xargs": xargs, "ignore_eos": True})
        if name == "learn2pd":
            with pytest.raises(openai.BadRequestError, match=r"vllm_xargs\.filter"):
                client.completions.create(**kwargs)
            continue
        assert len(client.completions.create(**kwargs).choices[0].text) > 0, name
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model, prompt="x", max_tokens=4, temperature=0.8,
                                  extra_body={"vllm_xargs": {"policy": "freedave"}})


def test_load_and_faults_never_kill_the_server_or_change_greedy_text(server):
    """Concurrent streamed and plain greedy requests, sampled ones, cancelled streams and bad
    requests of every refused kind: no 5xx, no hang, every bad request a 4xx, every greedy text
    byte-identical to the one served alone, and the engine still healthy."""
    from vllm_blockdiff.bench.soak import soak

    base, _ = server
    result = soak(base, requests=48, clients=8)
    assert result["5xx"] == 0 and result["hangs"] == 0, result
    assert result["greedy_mismatches"] == 0 and result["engine_deaths"] == 0, result
    assert not any(k.startswith("bad:") and not k.endswith(":4xx") for k in result["by_kind"])
