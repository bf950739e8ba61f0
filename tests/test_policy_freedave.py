"""FreeDave's draft-and-verify rule on synthetic confidences, without vLLM.

A toy "model" whose predictions depend on the whole canvas drives both static decoding (one
token per forward) and FreeDave built from `policies/freedave.py`: the decoded blocks must be
identical, in fewer forwards when predictions are stable. The engine's identity test is
`tests/test_engine_parity.py::test_freedave_equals_static_one_token_per_step`.
"""

from types import SimpleNamespace

import pytest
import torch

from vllm_blockdiff.engine.validation import validate_request
from vllm_blockdiff.grammar import GrammarSpec
from vllm_blockdiff.options import GRAMMAR_KEY, OptionsError
from vllm_blockdiff.policies import POLICIES
from vllm_blockdiff.policies.freedave import draft_fill, draft_order, static_step, verify

MASK = -1
T, F = True, False


def test_drafts_fill_the_most_confident_predictions_in_order():
    conf = torch.tensor([[0.5, 0.9, 0.1, 0.9, 0.7]])
    available = torch.tensor([[T, T, F, T, T]])
    order, count = draft_order(conf, available)
    assert order[0, :4].tolist() == [1, 3, 4, 0] and count.tolist() == [4]  # ties: leftmost
    fill = draft_fill(order, count, 3)[0].tolist()
    assert fill == [[F, F, F, F, F], [F, T, F, F, F], [F, T, F, T, F]]


def test_verify_accepts_drafts_while_each_static_step_matches_the_next():
    order = torch.tensor([[2, 0, 3, 1], [2, 0, 3, 1], [2, 0, 3, 1]])
    pred_tok = torch.tensor([[10, 11, 12, 13]] * 3)
    count = torch.tensor([4, 4, 1])
    k = torch.tensor([4, 4, 4])
    # T_0 fills position 2 with 12 (= draft 1); T_1 fills 0 with 10 (= draft 2); T_2 differs.
    step_pos = torch.tensor([[2, 0, 1, 1], [2, 3, 3, 1], [2, 0, 3, 1]])
    step_tok = torch.tensor([[12, 10, 13, 13], [12, 10, 12, 13], [12, 10, 12, 13]])
    best = verify(step_pos, step_tok, order, pred_tok, count, k)
    # row 1: T_1 picks position 3, not 0; row 2: only one prediction to draft from
    assert best.tolist() == [2, 1, 1]
    assert verify(step_pos, step_tok, order, pred_tok, count, torch.tensor([2, 4, 4]))[0] == 1


def _toy_model(canvas: list[int], vocab: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposals that depend on the whole canvas: mostly stable, sometimes not."""
    filled = sum(t != MASK for t in canvas)
    g = torch.Generator().manual_seed(1000 + sum((i + 1) * (t + 2) for i, t in enumerate(canvas)))
    base = torch.linspace(0.9, 0.3, len(canvas)).roll(filled % 3)
    conf = base + 0.05 * torch.rand(len(canvas), generator=g)
    tok = (torch.arange(len(canvas)) * 3 + (torch.rand(len(canvas), generator=g) > 0.8).long())
    return tok % vocab, conf


def _static(length: int) -> tuple[list[int], int]:
    canvas, forwards = [MASK] * length, 0
    while MASK in canvas:
        tok, conf = _toy_model(canvas)
        forwards += 1
        masked = torch.tensor([t == MASK for t in canvas])
        pos, _ = static_step(conf, masked)
        canvas[int(pos)] = int(tok[pos])
    return canvas, forwards


def _freedave(length: int, drafts: int) -> tuple[list[int], int]:
    canvas = [MASK] * length
    pred_tok, pred_conf = _toy_model(canvas)  # the block's first forward
    forwards = 1
    masked = torch.tensor([[t == MASK for t in canvas]])
    pos, _ = static_step(pred_conf[None], masked)
    canvas[int(pos)] = int(pred_tok[pos])
    while MASK in canvas:
        open_ = torch.tensor([[t == MASK for t in canvas]])
        order, count = draft_order(pred_conf[None], open_)
        fill = draft_fill(order, count, drafts)[0]
        rows = [[int(pred_tok[j]) if fill[k, j] else canvas[j] for j in range(length)]
                for k in range(drafts)]
        outs = [_toy_model(r) for r in rows]  # one forward over all drafts
        forwards += 1
        tok3 = torch.stack([t for t, _ in outs])[None]
        conf3 = torch.stack([c for _, c in outs])[None]
        step_pos, has = static_step(conf3, open_[:, None] & ~fill[None])
        step_tok = tok3.gather(2, step_pos[..., None]).squeeze(-1)
        best = int(verify(step_pos, step_tok, order, pred_tok[None], count,
                          torch.tensor([drafts]))[0])
        canvas = rows[best]
        if has[0, best]:
            canvas[int(step_pos[0, best])] = int(step_tok[0, best])
        pred_tok, pred_conf = outs[best]
    return canvas, forwards


@pytest.mark.parametrize("length", [4, 8, 16])
def test_freedave_decodes_exactly_what_static_decoding_does(length):
    static, static_forwards = _static(length)
    for drafts in (1, 2, 4, 8):
        decoded, forwards = _freedave(length, drafts)
        assert decoded == static, drafts
        assert forwards <= static_forwards
        if drafts == 1:
            assert forwards == static_forwards
    assert _freedave(length, 8)[1] < static_forwards


def _params(temperature=0.0, structured=None, extra=None):
    return SimpleNamespace(
        presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, bad_words=None,
        logprobs=None, prompt_logprobs=None, temperature=temperature,
        structured_outputs=structured, extra_args={"policy": "freedave", **(extra or {})})


def test_freedave_is_greedy_and_unconstrained():
    hf = SimpleNamespace(blockdiff={"block_length": 4, "max_block_length": 16,
                                    "mask_token_id": 3})
    validate_request(_params(), hf)
    with pytest.raises(OptionsError, match="^temperature"):
        validate_request(_params(temperature=0.7), hf)
    with pytest.raises(OptionsError, match="^structured_outputs"):
        # a grammar the plugin moved out of structured_outputs (a re-verified request)
        validate_request(_params(extra={GRAMMAR_KEY: GrammarSpec(kind="json_object")}), hf)
    with pytest.raises(OptionsError, match=r"vllm_xargs\.drafts"):
        validate_request(_params(extra={"drafts": 0}), hf)
    assert POLICIES["freedave"].verifies_drafts
