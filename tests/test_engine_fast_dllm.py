"""Fast-dLLM v2 layout (Qwen2 layers, shifted logits) served by the plugin against the reference.

Greedy float32, concurrent requests with prompts that end inside a block and at its boundary,
the sub-block rule and other policies, under the small token budget that chunks prompts and cuts
canvases: the same tokens as the plain-PyTorch decoder with shifted logits, which proposes each
position from the one before it (a block's first token from the previous block's last position).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_blockdiff.options import ServeConfig, resolve_options
from vllm_blockdiff.reference.decode import generate
from vllm_blockdiff.reference.modeling import CausalLM
from vllm_blockdiff.testbed.data import encode_prompt, special_ids
from vllm_blockdiff.testbed.tasks import generate as examples
from vllm_blockdiff.testbed.tasks import score
from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.engine

MASK, EOS, IM_END = 3, 0, 2
MAX_TOKENS = 40
PROMPT_LENGTHS = [1, 5, 8, 13, 16, 22]  # 8 and 16 end at a block boundary (bd_size 8)
SERVE = ServeConfig(block_length=8, max_block_length=16, mask_token_id=MASK, shifted_logits=True,
                    policy="subblock")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("fast_dllm"), arch="fast_dllm",
                                    block_size=8, seed=2))


@pytest.fixture(scope="module")
def llm(checkpoint):
    from conftest import ENGINE_ARGS
    from vllm import LLM

    engine = LLM(checkpoint, **ENGINE_ARGS)
    yield engine
    del engine


def prompts() -> list[list[int]]:
    return [[(11 * i + 5 * j) % 300 + 10 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]


def test_served_like_the_shifted_reference(llm, checkpoint):
    reference = CausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    mixes = [{"policy": "subblock", "sub_block_length": 4},  # the sub-block cache on
             {"policy": "subblock", "sub_block_length": 4, "use_block_cache": False},
             {"policy": "subblock", "threshold": 0.5, "sub_block_length": 4, "block_length": 16},
             {}, {"policy": "threshold"}, {"policy": "static", "steps": 4}]
    requests = [(p, m) for m in mixes for p in prompts()]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=m)
              for _, m in requests]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests], params,
                        use_tqdm=False)
    multi = 0
    query_tokens = {}
    for (prompt, args), out in zip(requests, outs, strict=True):
        ref = generate(reference, prompt, resolve_options(args, SERVE), MASK, MAX_TOKENS,
                       {EOS, IM_END}, shifted=True)
        stats = out.kv_transfer_params["blockdiff"]
        assert list(out.outputs[0].token_ids) == ref.token_ids, (args, len(prompt))
        assert stats["forwards"] >= ref.forwards
        multi += stats["tokens_per_forward"] > 1
        key = (len(prompt), args.get("use_block_cache", True))
        if args.get("sub_block_length") == 4 and "threshold" not in args:
            query_tokens[key] = stats["query_tokens"] / stats["output_tokens"]
    assert multi > 0
    # The sub-block cache recomputes only the active sub-block on most steps.
    for n in PROMPT_LENGTHS:
        assert query_tokens[n, True] < query_tokens[n, False], n


def test_block_length_comes_from_bd_size_and_drafting_policies_are_refused(llm):
    from vllm_blockdiff.options import OptionsError

    serve = llm.llm_engine.model_config.hf_config.blockdiff
    assert serve["block_length"] == 8 and serve["shifted_logits"] is True
    with pytest.raises((OptionsError, ValueError), match="shifted logits"):
        llm.generate([TokensPrompt(prompt_token_ids=[10, 11])],
                     SamplingParams(temperature=0.0, extra_args={"policy": "freedave"}),
                     use_tqdm=False)


def test_preempted_requests_resume_without_their_cached_block(checkpoint):
    """A KV cache of 10 pages for 12 concurrent requests forces preemptions: a resumed request
    continues its block's committed positions but not its sub-block cache (its KV is gone), on
    both sides of vLLM (scheduler and workers), and still decodes exactly like the reference."""
    from conftest import ENGINE_ARGS
    from vllm import LLM

    args = {**ENGINE_ARGS, "max_model_len": 128, "num_gpu_blocks_override": 10,
            "disable_log_stats": False}
    engine = LLM(checkpoint, **args)
    reference = CausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    options = {"policy": "subblock", "sub_block_length": 4, "block_length": 16}
    batch = prompts() * 2
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=options)
    outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params,
                           use_tqdm=False)
    preemptions = sum(m.value for m in engine.get_metrics()
                      if m.name == "vllm:num_preemptions")
    del engine
    assert preemptions > 0
    for prompt, out in zip(batch, outs, strict=True):
        ref = generate(reference, prompt, resolve_options(options, SERVE), MASK, MAX_TOKENS,
                       {EOS, IM_END}, shifted=True)
        assert list(out.outputs[0].token_ids) == ref.token_ids, len(prompt)


def test_bundled_model_solves_testbed_prompts_like_the_reference():
    """The trained Fast-dLLM v2 testbed model, served from its published-style config alone
    (block length from bd_size 32, mask id from the tokenizer): cache on and off, greedy, the
    reference's tokens, and right answers with more than one token per forward."""
    from conftest import ENGINE_ARGS
    from vllm import LLM

    bundled = Path(__file__).parents[1] / "examples" / "models" / "fast-dllm-testbed"
    tok = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    ids = special_ids(tok)
    cases = [e for task in ("arithmetic", "lists", "json") for e in examples(task, "test", 2)]
    prompts = [encode_prompt(tok, e.prompt) for e in cases]
    mixes = [{}, {"use_block_cache": False}, {"block_length": 16, "sub_block_length": 4}]
    requests = [(i, m) for m in mixes for i in range(len(cases))]
    engine = LLM(str(bundled), **ENGINE_ARGS)
    assert engine.llm_engine.model_config.hf_config.blockdiff["block_length"] == 32
    outs = engine.generate(
        [TokensPrompt(prompt_token_ids=prompts[i]) for i, _ in requests],
        [SamplingParams(max_tokens=64, temperature=0.0, extra_args=m) for _, m in requests],
        use_tqdm=False)
    del engine
    serve = ServeConfig(block_length=32, max_block_length=32, mask_token_id=ids.mask,
                        shifted_logits=True, policy="subblock")
    model = CausalLM.from_pretrained(bundled, dtype=torch.float32)
    correct = 0
    for (i, args), out in zip(requests, outs, strict=True):
        ref = generate(model, prompts[i], resolve_options(args, serve), ids.mask, 64, {ids.eos},
                       shifted=True)
        assert list(out.outputs[0].token_ids) == ref.token_ids, (cases[i].prompt, args)
        correct += score(cases[i].task, cases[i], out.outputs[0].text)
    assert correct >= len(requests) - 2
    stats = [o.kv_transfer_params["blockdiff"] for o in outs]
    assert sum(s["output_tokens"] for s in stats) > 2 * sum(s["forwards"] for s in stats)
