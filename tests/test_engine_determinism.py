"""Greedy requests give the same tokens whatever shares their batch.

A greedy request beside sampled ones (other temperatures, seeds, top-k / top-p / min-p), other
policies, block lengths, FreeDave drafts and grammars must produce exactly what it produces alone:
the sampler processes each logit row with its own request's parameters only. (On CPU the tiny
model's float32 logits are themselves batch-invariant, so any difference is the sampler's.)
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.engine

PROMPTS = ["def merge(a, b):\n    out = []\n", "import heapq\n\n", "class Wrapper:\n    def "]
MAX_TOKENS = 24

# Greedy requests: the probe's entropy policy at B=8, a threshold at B=4, FreeDave's drafts, and
# one under a grammar.
GREEDY = [
    (PROMPTS[0], dict(extra_args={"policy": "entropy", "block_length": 8})),
    (PROMPTS[1], dict(extra_args={"policy": "threshold", "threshold": 0.7, "block_length": 4})),
    (PROMPTS[2], dict(extra_args={"policy": "freedave", "drafts": 4, "block_length": 4})),
    (PROMPTS[0], dict(extra_args={"policy": "dynamic", "block_length": 16},
                      structured_outputs=StructuredOutputsParams(regex=r"[a-z_ ]+\(\w*\)"))),
]

# Sampled neighbours: every sampling parameter, several policies and block lengths, a grammar.
SAMPLED = [
    (PROMPTS[i % 3], dict(temperature=t, seed=i, top_p=top_p, top_k=top_k, min_p=min_p,
                          extra_args={"policy": policy, "block_length": b}))
    for i, (t, top_p, top_k, min_p, policy, b) in enumerate([
        (1.0, 1.0, 0, 0.0, "entropy", 8),
        (1.0, 0.9, 0, 0.0, "entropy", 8),
        (0.7, 1.0, 50, 0.0, "threshold", 4),
        (1.3, 0.8, 20, 0.05, "static", 16),
        (1.0, 1.0, 0, 0.1, "bacd", 2),
    ])
] + [
    (PROMPTS[1], dict(temperature=1.0, seed=9,
                      extra_args={"policy": "threshold", "block_length": 8},
                      structured_outputs=StructuredOutputsParams(regex=r"[0-9]{2,6}-[a-z]+"))),
]


def generate(llm, requests: list[tuple[str, dict]]) -> list[list[int]]:
    params = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **{"temperature": 0.0, **kw})
              for _, kw in requests]
    outs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    return [generate(llm, [request])[0] for request in GREEDY]


def test_greedy_beside_sampled_requests_equals_alone(llm, alone):
    n = len(GREEDY)
    for requests, greedy_at in ((GREEDY + SAMPLED, slice(0, n)),
                                (SAMPLED + GREEDY, slice(len(SAMPLED), None))):
        outputs = generate(llm, requests)
        assert outputs[greedy_at] == alone
    # The first neighbour is the first greedy request at temperature 1: it did sample.
    assert outputs[0] != alone[0]


def test_greedy_beside_greedy_of_other_kinds_equals_alone(llm, alone):
    """Other greedy requests, including drafting and constrained ones, repeated in one batch."""
    outputs = generate(llm, GREEDY * 3)
    assert outputs == alone * 3


_SLOW_GRAMMAR = """
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the delay below applies
sys.path.insert(0, sys.argv[2])
from vllm_blockdiff.engine.model_state import BlockDiffusionModelState as State
compile_grammar = State._constraint
def slow(self, *args, **kwargs):
    time.sleep(0.3)
    return compile_grammar(self, *args, **kwargs)
State._constraint = slow
from vllm import LLM
from conftest import ENGINE_ARGS
import test_engine_determinism as t
llm = LLM(sys.argv[1], **ENGINE_ARGS)
print(json.dumps([t.generate(llm, [t.GREEDY[3]])[0],
                  t.generate(llm, t.SAMPLED + t.GREEDY)[len(t.SAMPLED) + 3]]))
"""


def test_greedy_equals_alone_while_grammars_compile(tiny_sdar):
    """Slowly compiling grammars (0.3 s each, one after the other) keep their requests waiting
    while the small token budget cuts other canvases short: a step that runs none of a request's
    canvas must keep its block state (it used to reset it, and the greedy output changed)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    run = subprocess.run([sys.executable, "-c", _SLOW_GRAMMAR, tiny_sdar, tests],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    alone, beside = json.loads(run.stdout.strip().splitlines()[-1])
    assert beside == alone
