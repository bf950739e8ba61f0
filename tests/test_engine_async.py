"""Asynchronous scheduling (`--async-scheduling`): windows planned before the last step's tokens.

The CPU build keeps vLLM's overlapped engine for block-diffusion models (patch
`cpu_async_scheduling`), so while a request's step runs, its next one is planned. Requests that
need no host work between steps run fixed windows of two blocks whose open block the device
picks; the others (grammars, FreeDave's drafts, TCCF markers) wait for their step's tokens.
Greedy float32: outputs equal the reference decoder's and the synchronous engine's, with a small
token budget that chunks prompts and cuts windows short, beside sampled requests, and at
max_model_len, where windows no longer fit. The sampler's graph path is on (on CPU: its static
buffers, eagerly), so the window fields of its captured inputs are covered too.
"""

from __future__ import annotations

import pytest
from conftest import ENGINE_ARGS
from test_engine_determinism import GREEDY, SAMPLED
from test_engine_determinism import generate as generate_ignoring_eos
from test_engine_parity import EOS, IM_END, MASK, MAX_TOKENS, SERVE, prompts, run

from vllm_blockdiff.options import resolve_options
from vllm_blockdiff.reference.decode import generate

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def async_llm(tiny_sdar):
    from vllm import LLM

    engine = LLM(tiny_sdar, **ENGINE_ARGS, async_scheduling=True,
                 additional_config={"blockdiff": {"sampler_graphs": True}})
    yield engine
    del engine


def test_engine_schedules_asynchronously_with_windows(async_llm):
    config = async_llm.llm_engine.vllm_config
    assert config.scheduler_config.async_scheduling is True
    assert config.model_config.hf_config.blockdiff["windows"] is True
    # a window's drafts reach two blocks of the largest block length
    assert config.diffusion_config.canvas_length == 2 * SERVE.max_block_length


@pytest.mark.parametrize("block_length", [4, 8])
def test_greedy_parity_with_reference(async_llm, tiny_sdar, reference, block_length):
    requests = [(p, {"block_length": block_length, "policy": policy})
                for policy in ("threshold", "dynamic", "static", "entropy")
                for p in prompts(tiny_sdar)]
    outputs = run(async_llm, requests)
    for (prompt, args), (tokens, _) in zip(requests, outputs, strict=True):
        ref = generate(reference, prompt, resolve_options(args, SERVE), MASK, MAX_TOKENS,
                       {EOS, IM_END})
        assert tokens == ref.token_ids, (args, len(prompt))


def test_alone_a_request_runs_windows_in_the_references_forwards(async_llm, tiny_sdar,
                                                                 reference):
    """Served alone: the prompt, one canvas, then windows of 2B tokens, as many forwards as the
    reference takes."""
    b = 4
    for prompt in prompts(tiny_sdar)[2::3]:
        args = {"block_length": b, "policy": "threshold"}
        [(tokens, stats)] = run(async_llm, [(prompt, args)])
        ref = generate(reference, prompt, resolve_options(args, SERVE), MASK, MAX_TOKENS,
                       {EOS, IM_END})
        assert (tokens, stats["forwards"]) == (ref.token_ids, ref.forwards), len(prompt)
        windows = stats["forwards"] - 2
        assert windows > 0 and stats["query_tokens"] == len(prompt) + b + 2 * b * windows


def test_requests_that_wait_beside_windows_equal_the_synchronous_engine(async_llm, llm):
    """Grammars, FreeDave's drafts and seeded sampled requests beside windows, each repeated:
    the same tokens as the synchronous engine serves them."""
    requests = (GREEDY + SAMPLED) * 2
    assert generate_ignoring_eos(async_llm, requests) == generate_ignoring_eos(llm, requests)


def test_windows_give_way_at_max_model_len(async_llm, tiny_sdar, reference):
    """The last blocks before max_model_len run the synchronous rule (a window would not fit);
    the 490-token prompt is chunked by the token budget."""
    base = prompts(tiny_sdar)[-1]
    prompt = (base * (490 // len(base) + 1))[:490]
    room = ENGINE_ARGS["max_model_len"] - len(prompt)
    args = {"block_length": 8, "policy": "threshold"}
    [(tokens, _)] = run(async_llm, [(prompt, args)])  # stops at max_model_len
    ref = generate(reference, prompt, resolve_options(args, SERVE), MASK, room, {EOS, IM_END})
    assert tokens == ref.token_ids


def test_preempted_windows_resume_like_the_reference(tiny_sdar, reference):
    """A KV cache of 10 pages for 16 concurrent requests forces preemptions, planned while the
    preempted request's last step may still run: a resumed request runs its prompt, one canvas,
    then windows, continues its block as preemption left it (the patch
    `preempted_block_state`), and decodes exactly like the reference. Before that patch an
    entropy request decoded differently on the GPU, its resumed block having lost the positions
    committed after a gap; with it, this test passes there (H100, FULL graphs, 2026-12-07). On
    CPU the tiny model shows the difference only now and then."""
    from vllm import LLM

    engine = LLM(tiny_sdar, **{**ENGINE_ARGS, "max_model_len": 128, "num_gpu_blocks_override": 10,
                               "disable_log_stats": False}, async_scheduling=True,
                 additional_config={"blockdiff": {"sampler_graphs": True}})
    requests = [(p, {"block_length": 4, "policy": policy})
                for policy in ("threshold", "entropy") for p in prompts(tiny_sdar)]
    outputs = run(engine, requests)
    preemptions = sum(m.value for m in engine.get_metrics() if m.name == "vllm:num_preemptions")
    del engine
    assert preemptions > 0
    for (prompt, args), (tokens, _) in zip(requests, outputs, strict=True):
        ref = generate(reference, prompt, resolve_options(args, SERVE), MASK, MAX_TOKENS,
                       {EOS, IM_END})
        assert tokens == ref.token_ids, (args, len(prompt))
