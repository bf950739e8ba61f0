"""Request semantics through the offline API: stopping, sampling, per-request options, errors."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

pytestmark = pytest.mark.engine

MASK = 3
PROMPT = "def merge(a, b):\n    out = []\n"


def gen(llm, prompt=PROMPT, n=1, **kwargs):
    kwargs.setdefault("max_tokens", 32)
    kwargs.setdefault("temperature", 0.0)
    outs = llm.generate([prompt] * n, SamplingParams(**kwargs), use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.fixture(scope="module")
def long_output(llm):
    out = gen(llm, max_tokens=40, ignore_eos=True, extra_args={"block_length": 8})[0]
    assert len(out.token_ids) == 40
    return out


def test_max_tokens_cuts_inside_a_block(llm, long_output):
    for n in (1, 5, 11):
        out = gen(llm, max_tokens=n, ignore_eos=True, extra_args={"block_length": 8})[0]
        assert list(out.token_ids) == list(long_output.token_ids[:n])
        assert out.finish_reason == "length"


def test_stop_token_ids_cut_at_first_occurrence(llm, long_output):
    ids = list(long_output.token_ids)
    k = next(i for i in range(5, len(ids)) if i % 8 not in (0, 7))  # strictly inside a block
    stop = ids[k]
    first = ids.index(stop)
    out = gen(llm, max_tokens=40, ignore_eos=True, stop_token_ids=[stop],
              extra_args={"block_length": 8})[0]
    assert list(out.token_ids) == ids[:first + 1]  # the stop token is kept, like AR models
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_stop_strings(llm, long_output):
    text = long_output.text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    out = gen(llm, max_tokens=40, ignore_eos=True, stop=[needle],
              extra_args={"block_length": 8})[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(needle)]


def test_no_mask_or_padding_reaches_the_user(llm):
    for out in gen(llm, n=4, temperature=1.0, max_tokens=24, extra_args={"block_length": 16}):
        assert MASK not in out.token_ids
        assert "<|MASK|>" not in out.text


def test_seeded_sampling_is_reproducible(llm):
    a = gen(llm, temperature=0.9, top_p=0.9, top_k=50, seed=7)[0].token_ids
    b = gen(llm, temperature=0.9, top_p=0.9, top_k=50, seed=7)[0].token_ids
    c = gen(llm, temperature=0.9, top_p=0.9, top_k=50, seed=8)[0].token_ids
    assert a == b
    assert a != c


def test_top_k_and_top_p_filter_the_proposals(llm):
    """top_k=1 and a tiny top_p both leave one candidate per position (confidence 1)."""
    top1 = gen(llm, temperature=0.7, top_k=1, seed=3)[0].token_ids
    assert gen(llm, temperature=0.7, top_p=1e-6, seed=4)[0].token_ids == top1
    assert gen(llm, temperature=0.7, top_k=1, seed=5)[0].token_ids == top1


def test_min_tokens_and_allowed_token_ids_apply_per_position(llm):
    allowed = [40, 41, 42, 43]
    out = gen(llm, allowed_token_ids=allowed, max_tokens=12)[0]
    assert set(out.token_ids) <= set(allowed)
    eos_early = gen(llm, max_tokens=8, min_tokens=8, extra_args={"block_length": 4})[0]
    assert len(eos_early.token_ids) == 8


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(extra_args={"policy": "bogus"}), "policy"),
        (dict(extra_args={"block_length": 1000}), "block_length"),
        (dict(extra_args={"threshold": 2}), "threshold"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(logprobs=2), "logprobs"),
    ],
)
def test_invalid_requests_are_refused_before_the_engine(llm, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7])], SamplingParams(**params),
                     use_tqdm=False)
    assert len(gen(llm, max_tokens=4, ignore_eos=True)[0].token_ids) == 4  # still serving


def test_statistics_per_request(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                extra_args={"policy": "static", "steps": 1,
                                                            "block_length": 8}),
                       use_tqdm=False)[0]
    stats = out.kv_transfer_params["blockdiff"]
    # one forward for the prompt, then one per block (static with steps=1 commits a whole block)
    blocks = 2 + (len(out.prompt_token_ids) % 8 > 0)
    # the prompt (less any prefix-cache hit), the first block, then each block with the finished
    # one recomputed
    canvases = 8 + 16 * (blocks - 1)
    assert canvases < stats.pop("query_tokens") <= len(out.prompt_token_ids) + canvases
    assert stats == {"forwards": 1 + blocks, "output_tokens": 16,
                     "tokens_per_forward": pytest.approx(16 / stats["forwards"], abs=1e-4),
                     "block_length": 8, "blocks": blocks, "forwards_per_block": 1.0}
