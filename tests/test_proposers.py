"""The training-free proposers (vllm_blockdiff/proposers/): their tables and drafts alone, then
through vLLM on the testbed AR model, where greedy output must be identical to decoding without
speculation and sampled output distributed as without it."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
import regex
import torch
from conftest import ENGINE_ARGS
from test_engine_ar_cpu import AR_MODEL

from vllm_blockdiff.proposers.aded import ADEDProposer, NextTokens
from vllm_blockdiff.proposers.input_copy import InputCopyProposer, align
from vllm_blockdiff.proposers.token_recycling import TokenRecyclingProposer
from vllm_blockdiff.testbed.tasks import generate

PROPOSERS = {"token_recycling": "vllm_blockdiff.proposers.token_recycling.TokenRecyclingProposer",
             "aded": "vllm_blockdiff.proposers.aded.ADEDProposer",
             "input_copy": "vllm_blockdiff.proposers.input_copy.InputCopyProposer"}


def _config(k: int = 4, vocab: int = 16, max_model_len: int = 64, **options) -> SimpleNamespace:
    """The parts of a VllmConfig a proposer reads."""
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: vocab),
        additional_config={"proposer": options})


def _step(proposer, rows: list[list[int]], new: list[list[int]], prompt_lengths: list[int],
          req_ids: list[str] | None = None) -> list[list[int]]:
    """One `propose` call as vLLM's V1 runner makes it: the batch's histories (`rows`, whose
    last `len(new[i])` tokens were verified this step) in a [batch, max_model_len] array."""
    history = np.zeros((len(rows), proposer.max_model_len), dtype=np.int32)
    for i, row in enumerate(rows):
        history[i, :len(row)] = row
    # What `observe_step` keeps of the runner (`patches/proposer_step.py` calls it).
    proposer.input_batch = SimpleNamespace(
        req_ids=req_ids or [str(i) for i in range(len(rows))],
        num_prompt_tokens=np.asarray(prompt_lengths))
    return proposer.propose(new, np.asarray([len(r) for r in rows]), history)


def _recycling(k: int = 3, **options) -> TokenRecyclingProposer:
    proposer = TokenRecyclingProposer(_config(k=k, width=2, branching=(2, 1), **options))
    log = np.log
    # After 1: 2 (0.6) or 3 (0.4); after 2: 4 (0.2); after 4: 5; after 3: 6 (1.0); after 6: 7.
    proposer.update(np.array([1, 2, 4, 3, 6]),
                    np.array([[2, 3], [4, 8], [5, 8], [6, 8], [7, 8]]),
                    log(np.array([[0.6, 0.4], [0.2, 0.1], [0.2, 0.1], [1.0, 1e-9], [1.0, 1e-9]])))
    return proposer


def test_token_recycling_drafts_the_chain_with_the_most_expected_accepted_tokens():
    """Rank 0 first (2, 4, 5) expects 0.6 + 0.12 + 0.024 accepted tokens; the rank-1 branch
    (3, 6, 7) expects 0.4 * 3: the template's best chain is the second."""
    proposer = _recycling()
    assert _step(proposer, [[9, 1]], [[1]], [1]) == [[3, 6, 7]]
    assert _step(proposer, [[9, 2]], [[2]], [1]) == [[4, 5]]  # 5 has no candidates yet
    assert _step(proposer, [[9, 11]], [[11]], [1]) == [[]]  # an unseen token: no draft
    full = [9] * 61 + [1]  # max_model_len 64: one more token fits after these 62
    assert _step(proposer, [full], [[1]], [1]) == [[3]]
    assert _step(proposer, [[9, 1], [9, 1]], [[], [1]], [2, 1]) == [[], [3, 6, 7]]  # a prefill


def test_token_recycling_refreshes_rows_and_keeps_tables_per_instance():
    proposer = _recycling()
    proposer.update(np.array([3]), np.array([[2, 6]]), np.log(np.array([[0.1, 0.05]])))
    assert _step(proposer, [[9, 1]], [[1]], [1]) == [[2, 4, 5]]  # 3's candidates were replaced
    other = TokenRecyclingProposer(_config(k=3, width=2, branching=(2, 1)))
    assert _step(other, [[9, 1]], [[1]], [1]) == [[]]  # another engine's table: empty


def test_token_recycling_recycles_every_scored_position_of_a_verification_step():
    """A step that verified drafts scores every drafted position (`logits_indices` of vLLM's
    spec-decode metadata): each one refreshes the row of the token fed there, rejected or not."""
    proposer = TokenRecyclingProposer(_config(k=2, vocab=30, width=3))
    # One request fed [4, 11, 12] (its last token, then two drafts), another fed [5].
    runner = SimpleNamespace(input_batch=None, input_ids=SimpleNamespace(
        gpu=torch.tensor([4, 11, 12, 5])))
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    proposer.observe_step(runner, logits,
                          SimpleNamespace(logits_indices=torch.tensor([0, 1, 2, 3])))
    _step(proposer, [[1, 4, 11], [1, 5]], [[11], [5]], [1, 1])
    top = logits.topk(3, dim=-1)
    assert (proposer.adjacency[[4, 11, 12, 5]] == top.indices.numpy()).all()
    expected = torch.log_softmax(logits, dim=-1).gather(1, top.indices)
    assert np.allclose(proposer.logprobs[[4, 11, 12, 5]], expected.numpy(), atol=1e-5)


def test_aded_learns_verified_trigrams_and_drafts_while_probable():
    """Verified a token at a time (the prompt is [1, 2]): a context drafts once seen, and the
    draft goes on while the product of its trigram probabilities stays at least min_prob."""
    tokens = [1, 2, 3, 4, 5, 3, 4, 6, 3, 4]
    for min_prob, last in ((0.4, [5, 3, 4]), (0.6, [])):
        proposer = ADEDProposer(_config(k=4, min_prob=min_prob))
        drafts = [_step(proposer, [tokens[:n]], [[tokens[n - 1]]], [2])[0]
                  for n in range(3, len(tokens) + 1)]
        # (3, 4) -> 5 -> 3 -> 4 -> 5 is certain until (3, 4) is also seen followed by 6; then
        # each token of the draft (5, 3, 4, 5) has probability 1/2, 1, 1, 1/2.
        assert drafts == [[], [], [], [], [5, 3, 4, 5], [], [], last]


def test_aded_adds_a_requests_prompt_once():
    proposer = ADEDProposer(_config(k=3))
    prompt = [5, 6, 7, 8, 5, 6]
    assert _step(proposer, [prompt + [9]], [[9]], [len(prompt)])[0] == []
    assert _step(proposer, [[1, 5, 6]], [[6]], [1])[0] == [7, 8, 5]  # from the first prompt
    capped = ADEDProposer(_config(k=3, prompt_window=2))
    _step(capped, [prompt + [9]], [[9]], [len(prompt)])
    assert _step(capped, [[1, 5, 6]], [[6]], [1])[0] == [9]  # only (5, 6) -> 9 was added


def test_aded_context_keeps_its_most_frequent_next_tokens():
    entry = NextTokens()
    for token in (1, 1, 2, 3):
        entry.add(token, capacity=2)
    assert entry.counts == {1: 2, 3: 1} and entry.total == 3 and entry.best == 1


def test_input_copy_copies_the_prompt_and_realigns_after_an_edit():
    proposer = InputCopyProposer(_config(k=3))
    prompt = [1, 10, 11, 12, 13, 14, 15, 2]
    assert _step(proposer, [prompt + [10]], [[10]], [8], ["a"]) == [[11, 12, 13]]
    # 11, 12 accepted, 7 sampled instead of 13 (an edit): re-align on (12, 7)... absent; then
    # on 7, absent: no draft.
    assert _step(proposer, [prompt + [10, 11, 12, 7]], [[11, 12, 7]], [8], ["a"]) == [[]]
    # The output goes back to the input: 14 re-aligns right after it.
    assert _step(proposer, [prompt + [10, 11, 12, 7, 14]], [[14]], [8], ["a"]) == [[15, 2]]
    assert _step(proposer, [prompt + [10, 11, 12, 7, 14, 15]], [[15]], [8], ["a"]) == [[2]]
    assert list(proposer.alignments) == ["a"]
    _step(proposer, [[1, 10, 11]], [[11]], [2], ["b"])
    assert list(proposer.alignments) == ["b"]  # a finished request is forgotten


def test_input_copy_alignment_moves_forward():
    prompt = np.array([7, 1, 2, 9, 1, 2, 8, 1, 2, 6])
    assert align(prompt, np.array([1, 2]), 0, 4) == 3  # first occurrence
    assert align(prompt, np.array([1, 2]), 4, 4) == 6  # the first one not behind the copy
    assert align(prompt, np.array([1, 2]), 10, 4) == 3  # none ahead: the first
    assert align(prompt, np.array([5, 9, 1]), 0, 4) == 5  # longest suffix present: (9, 1)
    assert align(prompt, np.array([5]), 0, 4) is None


def test_options_come_from_additional_config_and_are_checked():
    assert ADEDProposer(_config(min_prob=0.3)).options.min_prob == 0.3
    with pytest.raises(ValueError, match=r"additional_config\.proposer: .*`nope`"):
        InputCopyProposer(_config(nope=1))
    with pytest.raises(ValueError, match=r"additional_config\.proposer: .*width"):
        TokenRecyclingProposer(_config(width=0))


# --- Through vLLM, on the testbed AR model -------------------------------------------------

SHUFFLE = "Line: Jon, Cy, Eli, Ann, Ray, Lea. Do: shuffle. Result:"
SAMPLES = 320  # seeded requests per engine for the distribution test
ALPHA = 1e-3  # chance that one proposer's distribution test fails with a correct proposer


def _requests() -> tuple[list[str], list]:
    """Concurrent greedy requests of every task, two with structured outputs, and sampled ones
    (temperatures, top-k, seeds) in the same batch."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    examples = [e for t in ("arithmetic", "lists", "json", "code") for e in generate(t, "test", 3)]
    prompts = [e.prompt for e in examples]
    params = [SamplingParams(temperature=0.0, max_tokens=48)] * len(prompts)
    record = examples[6]
    prompts += [record.prompt, examples[0].prompt]
    params += [SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=(
                   StructuredOutputsParams(json=record.meta["schema"]))),
               SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=(
                   StructuredOutputsParams(regex=r"([0-9]\+[0-9]\+[0-9]=[0-9]+,)+")))]
    prompts += [examples[3].prompt, examples[9].prompt, SHUFFLE]
    params += [SamplingParams(temperature=1.0, max_tokens=24, seed=1),
               SamplingParams(temperature=0.7, top_k=5, max_tokens=24, seed=2),
               SamplingParams(temperature=1.0, max_tokens=24)]
    return prompts, params


def _run(speculative_config: dict | None) -> dict:
    """Everything the engine tests compare, from one engine (then shut down). Without
    speculation it is Model Runner V1 too, the runner speculation runs on, so both sides sample
    alike. The suite's small token budget splits prompts, seeded ones included: on CPU that
    killed V1 before `patches/cpu_seeded_chunks.py`."""
    from vllm import LLM, SamplingParams

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
        llm = LLM(str(AR_MODEL), **ENGINE_ARGS, disable_log_stats=False,
                  speculative_config=speculative_config)
    prompts, params = _requests()
    outs = llm.generate(prompts, params, use_tqdm=False)
    before = _spec_counters(llm)
    # Disjoint seeds from the reference's: its draws and these are independent.
    offset = SAMPLES if speculative_config else 0
    sampled = llm.generate([SHUFFLE] * SAMPLES,
                           [SamplingParams(temperature=1.0, max_tokens=3, seed=offset + i)
                            for i in range(SAMPLES)], use_tqdm=False)
    after = _spec_counters(llm)
    del llm
    return {"outputs": [o.outputs[0] for o in outs], "params": params,
            "sampled": Counter(tuple(o.outputs[0].token_ids) for o in sampled),
            "spec": {k: after[k] - before[k] for k in after}}


def _spec_counters(llm) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics()
            if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value")}


@pytest.fixture(scope="module")
def without_speculation() -> dict:
    return _run(None)


@pytest.fixture(scope="module", params=sorted(PROPOSERS))
def with_proposer(request) -> dict:
    return _run({"method": "custom_class", "model": PROPOSERS[request.param],
                 "num_speculative_tokens": 4})


@pytest.mark.engine
def test_greedy_output_is_identical_to_decoding_without_speculation(without_speculation,
                                                                    with_proposer):
    ref, got = without_speculation, with_proposer
    for params, a, b in zip(ref["params"], ref["outputs"], got["outputs"], strict=True):
        if params.temperature == 0.0:
            assert b.token_ids == a.token_ids, (a.text, b.text)
        else:
            assert b.token_ids  # sampled beside them
    record, arithmetic = got["outputs"][12], got["outputs"][13]
    jsonschema.validate(json.loads(record.text), ref["params"][12].structured_outputs.json)
    assert regex.fullmatch(r"([0-9]\+[0-9]\+[0-9]=[0-9]+,)+", arithmetic.text, partial=True)


def _chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of equal distributions (equal sample sizes); categories seen
    fewer than 10 times in both samples together are pooled."""
    keys = sorted(set(a) | set(b))
    x = np.array([a[k] for k in keys], dtype=np.float64)
    y = np.array([b[k] for k in keys], dtype=np.float64)
    rare = x + y < 10
    x = np.append(x[~rare], x[rare].sum())
    y = np.append(y[~rare], y[rare].sum())
    keep = x + y > 0
    x, y = x[keep], y[keep]
    stat = float((((x - y) ** 2) / (x + y)).sum())
    dof = len(x) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.engine
def test_sampled_output_is_distributed_as_without_speculation(without_speculation,
                                                              with_proposer):
    """The first three tokens of SAMPLES seeded temperature-1 completions of a shuffle request
    (a name, a comma, a name: many outcomes), with and without speculation, pass a two-sample
    chi-square test at level ALPHA; drafts were both accepted and rejected along the way."""
    spec = with_proposer["spec"]
    assert spec["vllm:spec_decode_num_drafts"] > 0
    assert 0 < spec["vllm:spec_decode_num_accepted_tokens"] < spec[
        "vllm:spec_decode_num_draft_tokens"]
    p = _chi_square_p(without_speculation["sampled"], with_proposer["sampled"])
    assert p > ALPHA, (p, without_speculation["sampled"].most_common(8),
                       with_proposer["sampled"].most_common(8))
