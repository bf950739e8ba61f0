"""Each policy's rule, checked exactly on synthetic confidences (no model, no vLLM)."""

from pathlib import Path

import torch

from vllm_blockdiff.policies import POLICIES, PolicyInput
from vllm_blockdiff.policies.base import topk_mask, transfer_count


def _input(conf, masked=None, step=0, block_length=None):
    conf = torch.tensor(conf, dtype=torch.float32)
    masked = torch.ones_like(conf, dtype=torch.bool) if masked is None else torch.tensor(masked)
    r, length = conf.shape
    return PolicyInput(
        confidence=conf,
        masked=masked,
        tokens=torch.zeros(r, length, dtype=torch.long),
        step=torch.full((r,), step),
        block_length=torch.full((r,), block_length or length),
        committed_confidence_sum=torch.zeros(r),
        committed_count=torch.zeros(r, dtype=torch.long),
        is_stop=torch.zeros(r, length, dtype=torch.bool),
        entropy=torch.ones(r, length),  # policies with needs_entropy read it
    )


# Parameters a policy requires (no default), for the tests that run every policy.
LEARN2PD_DIR = Path(__file__).parent.parent / "examples/models/sdar-testbed/learn2pd"
REQUIRED_PARAMS = {"tccf": {"marker": 0},
                   "learn2pd": {"filter": str(LEARN2PD_DIR / "filters.safetensors")}}


def _select(name, inp, **params):
    policy = POLICIES[name]
    p = policy.params_cls(**params)
    r = inp.confidence.shape[0]
    batched = policy.batch_params([p] * r, inp.block_length.tolist(), torch.device("cpu"))
    return policy.select(inp, batched).tolist()


def test_threshold_commits_all_confident_and_forces_top1():
    inp = _input([[0.95, 0.2, 0.9, 0.5], [0.3, 0.6, 0.1, 0.2]])
    assert _select("threshold", inp, threshold=0.9) == [
        [True, False, True, False],  # >= threshold (0.9 itself included)
        [False, True, False, False],  # nobody passes: the most confident one
    ]


def test_threshold_ignores_unmasked_positions():
    inp = _input([[0.99, 0.4, 0.3]], masked=[[False, True, True]])
    assert _select("threshold", inp, threshold=0.9) == [[False, True, False]]


def test_transfer_count_spreads_block_over_steps_remainder_first():
    b = torch.tensor([8, 8, 8, 5])
    steps = torch.tensor([3, 3, 3, 2])
    assert transfer_count(b, steps, torch.tensor([0, 1, 2, 0])).tolist() == [3, 3, 2, 3]
    # past the last scheduled step everything left is due
    assert transfer_count(b, steps, torch.tensor([3, 5, 9, 2])).tolist() == [8, 8, 8, 5]


def test_static_commits_exactly_the_scheduled_count():
    inp = _input([[0.1, 0.9, 0.5, 0.7]], step=0)
    assert _select("static", inp, steps=2) == [[False, True, False, True]]
    # default steps = block length: one per step
    assert _select("static", inp) == [[False, True, False, False]]


def test_dynamic_threshold_with_minimum():
    # steps=2 over B=4 -> at least 2 per step
    many = _input([[0.95, 0.96, 0.97, 0.2]])
    assert _select("dynamic", many, threshold=0.9, steps=2) == [[True, True, True, False]]
    few = _input([[0.95, 0.5, 0.6, 0.2]])
    assert _select("dynamic", few, threshold=0.9, steps=2) == [[True, False, True, False]]
    # dynamic uses a strict ">" (SDAR's rule)
    edge = _input([[0.9, 0.1, 0.2, 0.3]])
    assert _select("dynamic", edge, threshold=0.9, steps=4) == [[True, False, False, False]]


def test_topk_ties_break_leftmost_whatever_the_padding():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    eligible = torch.ones(1, 4, dtype=torch.bool)
    assert topk_mask(scores, torch.tensor([2]), eligible).tolist() == [[True, True, False, False]]
    padded = torch.tensor([[0.5, 0.5, 0.5, 0.5, float("-inf"), float("-inf")]])
    eligible = torch.tensor([[True] * 4 + [False] * 2])
    chosen = topk_mask(padded, torch.tensor([2]), eligible).tolist()[0][:4]
    assert chosen == [True, True, False, False]


def test_every_policy_makes_progress_on_hard_blocks():
    inp = _input([[0.01, 0.02, 0.03, 0.04]], masked=[[True, True, False, True]])
    for name in POLICIES:
        commit = torch.tensor(_select(name, inp, **REQUIRED_PARAMS.get(name, {})))
        assert commit.sum() >= 1, name
        assert not commit[0, 2], name  # never an unmasked position
