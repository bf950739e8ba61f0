"""The reference network in Qwen2's layout (Fast-dLLM v2's base) against vLLM's own Qwen2.

Both read the same tiny checkpoint (q/k/v biases, no q/k norms, tied embeddings); vLLM serves
it as the ordinary AR model it is and returns every prompt token's log-probability, which the
reference computes with causal attention (block length 1). This pins the layout the Fast-dLLM v2
executor and reference decoder build on.
"""

from __future__ import annotations

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from vllm_blockdiff.reference.modeling import CausalLM, block_causal_mask
from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.engine


def test_reference_qwen2_logits_equal_vllm_qwen2(tmp_path):
    from conftest import ENGINE_ARGS

    # head_dim 32: vLLM's CPU attention has no kernel for the default 16
    path = make_tiny_checkpoint(tmp_path / "qwen2", arch="qwen2", seed=3, hidden_size=128)
    prompt = [(7 * j) % 300 + 10 for j in range(37)]
    llm = LLM(str(path), **ENGINE_ARGS)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    out = llm.generate(TokensPrompt(prompt_token_ids=prompt), params, use_tqdm=False)[0]
    served = [next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]
    del llm

    reference = CausalLM.from_pretrained(path)
    ids = torch.tensor([prompt])
    positions = torch.arange(len(prompt))[None]
    mask = block_causal_mask(positions[0], len(prompt), 1)[None]
    with torch.no_grad():
        logits, _ = reference(ids, positions, mask)
    logp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(served), logp, atol=1e-4, rtol=1e-4)
