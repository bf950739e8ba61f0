"""SDAR-MoE (Qwen3-MoE layout) through vLLM's fused-MoE layers, against the reference decoder."""

import pytest
import torch
from conftest import ENGINE_ARGS
from test_engine_parity import EOS, IM_END, MASK, SERVE, prompts, run
from vllm import LLM

from vllm_blockdiff.options import resolve_options
from vllm_blockdiff.reference.decode import generate
from vllm_blockdiff.reference.modeling import CausalLM
from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_moe"), arch="sdar_moe"))


def test_moe_greedy_parity(tiny_moe):
    engine = LLM(tiny_moe, **ENGINE_ARGS)
    requests = [(p, {"policy": policy, "block_length": 4})
                for policy in ("threshold", "static") for p in prompts(tiny_moe)]
    outputs = run(engine, requests)
    del engine
    reference = CausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    assert any(isinstance(m, torch.nn.ModuleList) and len(m) == 4 for m in reference.modules())
    for (prompt, args), (tokens, _) in zip(requests, outputs, strict=True):
        ref = generate(reference, prompt, resolve_options(args, SERVE), MASK, 40, {EOS, IM_END})
        assert tokens == ref.token_ids, args
