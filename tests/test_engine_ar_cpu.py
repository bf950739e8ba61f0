"""An AR model of the same fleet served on CPU with the plugin installed: sampled requests
(temperature, top-k, top-p) and structured outputs run through PyTorch paths instead of Triton
kernels and CUDA copies that the plugin's Triton CPU backend cannot run
(`patches/cpu_top_k_top_p.py`, `cpu_gumbel_sample.py`, `cpu_grammar_bitmask.py`); before those
patches the first such request killed the engine."""

import json
from pathlib import Path

import pytest
from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.engine

AR_MODEL = Path(__file__).resolve().parent.parent / "examples" / "models" / "qwen3-testbed"


def test_sampled_requests_beside_greedy_ones_on_cpu():
    llm = LLM(str(AR_MODEL), dtype="float32", enforce_eager=True, max_model_len=256,
              gpu_memory_utilization=0.3)
    prompts = ["Q: 12+34=", "Line: Dan, Tom, Jo. Do: reverse. Result:"]
    sampled = [SamplingParams(max_tokens=12, temperature=1.0, seed=7),
               SamplingParams(max_tokens=12, temperature=0.8, top_k=5, top_p=0.9, seed=8)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    first = llm.generate(prompts + prompts, sampled + [greedy, greedy], use_tqdm=False)
    again = llm.generate(prompts, sampled, use_tqdm=False)
    alone = llm.generate(prompts, [greedy, greedy], use_tqdm=False)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    constrained = SamplingParams(max_tokens=24, temperature=0.0,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    structured = llm.generate(['Schema: {"a":"int"}\nData: a=5\nJSON:', prompts[0]],
                              [constrained, greedy], use_tqdm=False)
    del llm
    assert json.loads(structured[0].outputs[0].text)["a"] == 5
    assert structured[1].outputs[0].text == alone[0].outputs[0].text
    texts = [o.outputs[0].text for o in first]
    assert all(texts)
    assert [o.outputs[0].text for o in again] == texts[:2]  # seeded: reproducible
    assert [o.outputs[0].text for o in alone] == texts[2:]  # greedy beside sampled = alone
