"""Each patch under patches/: what it changes in vLLM, shown by a test that fails without it."""

from pathlib import Path
from types import MethodType, SimpleNamespace

import pytest
import vllm
from vllm.sampling_params import SamplingParams

from vllm_blockdiff.options import GRAMMAR_KEY
from vllm_blockdiff.patches import PATCHES, apply_patches, diffusion_sampling_params
from vllm_blockdiff.patches.wrap import wrap_once

SERVE = {"block_length": 4, "max_block_length": 16, "mask_token_id": 3}


def _model(blockdiff=SERVE):
    hf = SimpleNamespace(canvas_length=16)
    if blockdiff is not None:
        hf.blockdiff = dict(blockdiff)
    return SimpleNamespace(is_diffusion=True, hf_config=hf)


@pytest.fixture(autouse=True)
def patched():
    apply_patches()


def test_diffusion_sampling_params_lifts_vllm_restrictions_for_plugin_models():
    greedy_seeded = SamplingParams(temperature=0.0, seed=3, min_tokens=2)
    greedy_seeded._validate_diffusion(_model())  # accepted by the plugin's validation
    original = SamplingParams._validate_diffusion.__wrapped__
    with pytest.raises(ValueError, match="not yet supported with diffusion models"):
        original(greedy_seeded, _model())  # what vLLM 0.26 alone answers


def test_diffusion_sampling_params_validates_plugin_options():
    with pytest.raises(ValueError, match=r"vllm_xargs\.policy"):
        SamplingParams(extra_args={"policy": "nope"})._validate_diffusion(_model())


def test_diffusion_sampling_params_keeps_vllm_rules_for_other_diffusion_models():
    with pytest.raises(ValueError, match="not yet supported with diffusion models"):
        SamplingParams(temperature=0.0)._validate_diffusion(_model(blockdiff=None))


def test_patches_refuse_other_vllm_versions(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="targets vLLM"):
        apply_patches()


def test_every_patch_declares_its_versions_and_is_idempotent():
    for patch in PATCHES:
        assert patch.VLLM_VERSIONS and vllm.__version__.startswith(patch.VLLM_VERSIONS)
    before = SamplingParams._validate_diffusion
    diffusion_sampling_params.apply()
    assert SamplingParams._validate_diffusion is before


def test_wrap_once_installs_one_wrapper_that_reaches_the_original(monkeypatch):
    import functools
    import sys
    from types import ModuleType

    class Owner:
        @classmethod
        def build(cls, x):
            return (cls.__name__, x)

        @functools.lru_cache  # noqa: B019 (an original that vLLM wrapped itself: has __wrapped__)
        def cached(self, x):
            return x

    users = [ModuleType(f"blockdiff_user_{i}") for i in range(2)]
    for module in users:
        module.build = Owner.build  # bound before the class is patched: keeps the original
        monkeypatch.setitem(sys.modules, module.__name__, module)
    names = [module.__name__ for module in users]
    for _ in range(2):  # the second call finds its own wrapper and leaves it
        wrap_once(Owner, "build")(lambda original, cls, x: original(cls, x + 1))
        wrap_once(Owner, "cached")(lambda original, self, x: original(self, x) * 10)
        wrap_once(users[0], "build", users=names)(lambda original, x: ("user", original(x)))
    assert Owner.build(1) == ("Owner", 2)  # still a classmethod, wrapped once
    assert Owner().cached(3) == 30
    assert Owner.build.__wrapped__(Owner, 1) == ("Owner", 1)
    assert users[0].build is users[1].build and users[1].build(1) == ("user", ("Owner", 1))


def test_diffusion_structured_outputs_routes_grammars_to_the_plugin(tiny_sdar):
    from transformers import AutoTokenizer
    from vllm.config import StructuredOutputsConfig
    from vllm.sampling_params import StructuredOutputsParams

    from vllm_blockdiff.engine.validation import grammar_of

    tok = AutoTokenizer.from_pretrained(tiny_sdar)
    model = _model()
    model.get_vocab_size = lambda: 384
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    params._validate_structured_outputs(model, None, tok)
    assert params.structured_outputs is None  # vLLM's grammar manager never sees it
    assert grammar_of(params.extra_args).kind == "regex"
    vllm_only = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    original = SamplingParams._validate_structured_outputs.__wrapped__
    with pytest.raises(ValueError, match="not yet supported for diffusion"):
        original(vllm_only, model, StructuredOutputsConfig(), tok)  # vLLM 0.26 alone


def test_diffusion_sampling_params_refuses_a_clients_grammar_key(tiny_sdar):
    """Only the plugin sets GRAMMAR_KEY (to a GrammarSpec); a client's value would reach a worker
    and fail there. The plugin's own key passes a second verification (one SamplingParams is
    verified once per prompt offline, and before a stream starts and again when added)."""
    from transformers import AutoTokenizer
    from vllm.sampling_params import StructuredOutputsParams

    for forged in ('{"kind": "regex", "source": "a"}', "{}", 3, {"kind": "regex"}):
        with pytest.raises(ValueError, match=rf"^vllm_xargs\.{GRAMMAR_KEY}: set by the server"):
            SamplingParams(extra_args={GRAMMAR_KEY: forged})._validate_diffusion(_model())
    model = _model()
    model.get_vocab_size = lambda: 384
    routed = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    routed._validate_diffusion(model)
    routed._validate_structured_outputs(model, None, AutoTokenizer.from_pretrained(tiny_sdar))
    routed._validate_diffusion(model)  # verified again: the plugin's key is accepted


TESTBED = Path(__file__).parents[1] / "examples" / "models" / "sdar-testbed"
TESTBED_VOCAB = 768


def _input_processor(tokenizer=None):
    """The parts of vLLM's InputProcessor its checks read, for a block-diffusion model."""
    from vllm.v1.engine.input_processor import InputProcessor

    model = _model()
    model.max_logprobs, model.logits_processors = 20, None
    model.get_vocab_size = lambda: TESTBED_VOCAB
    processor = SimpleNamespace(model_config=model, tokenizer=tokenizer, speculative_config=None,
                                structured_outputs_config=None,
                                _validate_prompt_len=lambda length, kind: None)
    for name in ("_validate_model_input", "_validate_model_inputs"):
        setattr(processor, name, MethodType(getattr(InputProcessor, name), processor))
    return processor


def test_token_ids_refuses_prompt_ids_past_the_vocabulary():
    from transformers import AutoTokenizer
    from vllm.tokenizers.hf import get_cached_tokenizer
    from vllm.v1.engine.input_processor import InputProcessor

    tokenizer = get_cached_tokenizer(AutoTokenizer.from_pretrained(TESTBED))
    assert tokenizer.max_token_id == TESTBED_VOCAB  # vLLM's off-by-one: a size, not an id
    processor = _input_processor(tokenizer)
    check = InputProcessor._validate_model_input
    past = {"type": "token", "prompt_token_ids": [10, TESTBED_VOCAB, 11]}
    check.__wrapped__(processor, past, "decoder")  # vLLM 0.26 alone lets it through
    with pytest.raises(ValueError, match=f"^prompt: token id {TESTBED_VOCAB} is out of vocab"):
        check(processor, past, "decoder")
    check(processor, {"type": "token", "prompt_token_ids": [0, TESTBED_VOCAB - 1]}, "decoder")
    for ids in ([10, TESTBED_VOCAB], [-1, 10]):  # no tokenizer (skip_tokenizer_init): unchecked
        without_tokenizer = _input_processor()
        check.__wrapped__(without_tokenizer, {"type": "token", "prompt_token_ids": ids}, "decoder")
        with pytest.raises(ValueError, match="^prompt: token id .* is out of vocabulary"):
            check(without_tokenizer, {"type": "token", "prompt_token_ids": ids}, "decoder")


@pytest.mark.parametrize("ids", [[2**63], [2**64], [-1], [5, TESTBED_VOCAB]])
@pytest.mark.parametrize("diffusion", [True, False])  # a block-diffusion model, an AR one
def test_token_ids_refuses_stop_ids_past_the_vocabulary(ids, diffusion):
    """The workers hold stop ids in int64 tensors: 2**63 killed the engine (AR models too, with
    min_tokens), 2**64 failed to encode (HTTP 500)."""
    model = _input_processor().model_config
    if not diffusion:
        model.is_diffusion = False
        del model.hf_config.blockdiff
    params = SamplingParams(temperature=0.0, stop_token_ids=ids)
    SamplingParams.verify.__wrapped__(params, model, None, None, None)  # vLLM 0.26 alone
    with pytest.raises(ValueError, match=r"^stop_token_ids: token id .* is out of vocabulary"):
        params.verify(model, None, None, None)


@pytest.mark.parametrize("field", ["seed", "top_k"])
@pytest.mark.parametrize("value", [2**63, 2**64])
def test_token_ids_refuses_seed_and_top_k_past_int64(field, value):
    """The workers hold seeds and top-k in int64 arrays: 2**63 killed the engine (measured on
    the bundled model, AR or diffusion), 2**64 failed to encode (HTTP 500)."""
    model = _input_processor().model_config
    params = SamplingParams(temperature=1.0, **{field: value})
    SamplingParams.verify.__wrapped__(params, model, None, None, None)  # vLLM 0.26 alone
    with pytest.raises(ValueError, match=rf"^{field}: {value} does not fit in a 64-bit integer"):
        params.verify(model, None, None, None)
    SamplingParams(temperature=1.0, **{field: 2**63 - 1}).verify(model, None, None, None)


def test_token_ids_refuses_vllm_xargs_integers_past_int64():
    """An integer of 2**64 in `vllm_xargs` failed to encode for the engine (HTTP 500, also for an
    AR model, whose extra arguments the plugin's options do not check)."""
    model = _input_processor().model_config
    model.is_diffusion, model.hf_config = False, SimpleNamespace()  # an AR model
    params = SamplingParams(extra_args={"anything": {"deep": [1, 2**64]}})
    SamplingParams.verify.__wrapped__(params, model, None, None, None)  # vLLM 0.26 alone
    with pytest.raises(ValueError, match=r"^vllm_xargs\.anything\.deep\[1\]: 18446744073709551616"):
        params.verify(model, None, None, None)
    SamplingParams(extra_args={"n": 2**63 - 1, "s": "x"}).verify(model, None, None, None)


def test_early_validation_refuses_when_generate_is_called():
    """vLLM 0.26 validates a request on the first iteration of `AsyncLLM.generate`, which a
    streamed response runs after sending HTTP 200; patched, calling `generate()` raises."""
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = SimpleNamespace(input_processor=_input_processor())
    prompt = {"type": "token", "prompt_token_ids": [10, 11]}
    huge_steps = {"policy": "static", "steps": 2**63}
    refused = [(prompt, SamplingParams(logprobs=1), "^logprobs: not supported"),
               (prompt, SamplingParams(temperature=0.0, extra_args=huge_steps),
                r"vllm_xargs\.steps"),
               ({"type": "token", "prompt_token_ids": [10, TESTBED_VOCAB]},
                SamplingParams(temperature=0.0), "out of vocabulary")]
    for bad_prompt, params, message in refused:
        AsyncLLM.generate.__wrapped__(engine, bad_prompt, params, "r")  # nothing checked yet
        with pytest.raises(ValueError, match=message):
            AsyncLLM.generate(engine, bad_prompt, params, "r")
    AsyncLLM.generate(engine, prompt, SamplingParams(temperature=0.0), "r")


def test_cpu_top_k_top_p_takes_the_pytorch_path():
    """With the plugin's Triton CPU backend installed, vLLM 0.26 sends CPU logits to its Triton
    top-k/top-p kernel, which fails in the interpreter (a request with top_k killed the engine);
    the patch keeps vLLM's PyTorch implementation on CPU, in every module that imports it."""
    import importlib

    import torch
    from vllm.v1.sample.ops import topk_topp_sampler

    from vllm_blockdiff.patches import cpu_top_k_top_p

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    k, p = torch.tensor([5, 50, 1]), torch.tensor([1.0, 0.5, 1.0])
    expected = topk_topp_sampler.apply_top_k_top_p_pytorch(logits.clone(), k, p,
                                                           allow_cpu_sync=True)
    for name in cpu_top_k_top_p._USERS:
        patched = importlib.import_module(name).apply_top_k_top_p
        assert torch.equal(patched(logits.clone(), k, p), expected), name
    with pytest.raises(Exception, match="has no attribute 'to'"):  # vLLM 0.26 alone
        topk_topp_sampler.apply_top_k_top_p.__wrapped__(logits.clone(), k, p)


def test_cpu_gumbel_sample_runs_on_the_host():
    """Model Runner V2 samples with a Triton kernel that Triton's interpreter cannot run (a
    sampled request killed a CPU server); the patch samples on the host: greedy rows take the
    argmax, a sampled row's token depends on its seed and position only."""
    import torch
    from vllm.v1.worker.gpu.sample import gumbel, sampler

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([0, 1, 2], dtype=torch.int32)
    temperature = torch.tensor([0.0, 1.0, 0.7])
    seeds, pos = torch.tensor([5, 6, 7]), torch.tensor([3, 9, 9])
    tokens = sampler.gumbel_sample(logits, idx, temperature, seeds, pos, True)
    assert tokens[0] == logits[0].argmax()
    for row in (1, 2):  # the same token alone as in the batch
        alone = sampler.gumbel_sample(logits[row:row + 1], torch.tensor([0], dtype=torch.int32),
                                      temperature[row:row + 1], seeds[row:row + 1],
                                      pos[row:row + 1], True)
        assert alone[0] == tokens[row]
    draws = {int(sampler.gumbel_sample(logits[1:2], idx[:1], temperature[1:2],
                                       torch.tensor([s]), pos[1:2], True)[0]) for s in range(30)}
    assert len(draws) > 1  # sampled, not greedy
    with pytest.raises(Exception, match="NoneType"):  # vLLM 0.26 alone, in the interpreter
        gumbel.gumbel_sample.__wrapped__(logits, idx, temperature, seeds, pos, True)


def test_proposer_step_shows_a_custom_proposer_the_step_it_drafts_for():
    """vLLM 0.26's V1 runner gives a `custom_class` proposer neither logits nor request ids;
    patched, `_sample` first hands the drafter the step: Token Recycling keeps the target's top-k
    at every scored position, under the token fed there. Sampling itself is unchanged."""
    import numpy as np
    import torch
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_blockdiff.proposers.token_recycling import TokenRecyclingProposer

    vocab = 40
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=2), additional_config={},
        model_config=SimpleNamespace(max_model_len=32, get_vocab_size=lambda: vocab))
    zeros = torch.zeros(2)
    metadata = SamplingMetadata(
        temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None,
        generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=zeros, presence_penalties=zeros, repetition_penalties=zeros + 1,
        output_token_ids=[[], []], allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=LogitsProcessors())
    # Two requests: the step fed 5, 6, 7 (a prompt chunk) and 9; their logits rows are the
    # positions of 7 and 9.
    runner = SimpleNamespace(
        drafter=TokenRecyclingProposer(config), sampler=Sampler(),
        input_batch=SimpleNamespace(sampling_metadata=metadata, req_ids=["a", "b"],
                                    update_async_output_token_ids=lambda: None),
        input_ids=SimpleNamespace(gpu=torch.tensor([5, 6, 7, 9])),
        query_start_loc=SimpleNamespace(gpu=torch.tensor([0, 3, 4])))
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    history = np.zeros((2, 32), dtype=np.int32)
    history[:, :2] = [[7, 1], [9, 2]]

    def propose() -> list[list[int]]:
        return runner.drafter.propose([[1], [2]], np.array([2, 2]), history)

    alone = GPUModelRunner._sample.__wrapped__(runner, logits.clone(), None)  # vLLM 0.26 alone
    with pytest.raises(RuntimeError, match="needs vllm-blockdiff's patch proposer_step"):
        propose()
    patched = GPUModelRunner._sample(runner, logits.clone(), None)
    assert torch.equal(patched.sampled_token_ids, alone.sampled_token_ids)
    propose()
    top = logits.topk(8, dim=-1).indices.numpy()
    assert (runner.drafter.adjacency[[7, 9]] == top).all()
    assert (runner.drafter.adjacency[[5, 6]] == vocab).all()  # not scored: still unknown


def test_cpu_grammar_bitmask_masks_on_the_host():
    """Model Runner V2 masks grammar rows through pinned memory and a Triton kernel, which on CPU
    killed the engine at the first structured request of an AR model; patched, each constrained
    request's logit rows lose exactly the tokens its bitmask row disallows, other rows none."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from vllm.v1.worker.cpu_model_runner import _torch_cuda_wrapper
    from vllm.v1.worker.gpu.structured_outputs import StructuredOutputsWorker

    from vllm_blockdiff.grammar import bitmask

    with _torch_cuda_wrapper():  # the CPU runner's stand-ins for CUDA streams, as in the engine
        worker = StructuredOutputsWorker(8, 70, torch.device("cpu"))
    batch = SimpleNamespace(req_ids=["a", "b", "c"], cu_num_logits_np=np.array([0, 2, 3, 5]))
    allowed = {"c": [1, 5, 69], "a": [0, 64]}
    # One bitmask row per logit row of the constrained requests, in their order.
    masks = np.stack([bitmask.pack_ids(allowed[r], bitmask.words(70)).numpy() for r in "ccaa"])
    logits = torch.randn(5, 70, generator=torch.Generator().manual_seed(0))
    out = logits.clone()
    worker.apply_grammar_bitmask(out, batch, ["c", "a"], masks)
    for row, req in ((0, "a"), (1, "a"), (2, None), (3, "c"), (4, "c")):
        kept = torch.isfinite(out[row]).nonzero().flatten().tolist()
        assert kept == (allowed[req] if req else list(range(70))), row
        assert torch.equal(out[row, kept], logits[row, kept])
    with _torch_cuda_wrapper(), pytest.raises(RuntimeError, match="NVIDIA"):  # vLLM 0.26 alone
        StructuredOutputsWorker.apply_grammar_bitmask.__wrapped__(worker, logits.clone(), batch,
                                                                  ["c", "a"], masks)


def test_cpu_async_scheduling_is_kept_for_block_diffusion_models(tiny_sdar, published_sdar):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.cpu import CpuPlatform

    def config(model, **kwargs):
        return EngineArgs(model=model, max_model_len=512, **kwargs).create_engine_config()

    asked = config(tiny_sdar, async_scheduling=True)
    assert asked.scheduler_config.async_scheduling is True
    assert asked.model_config.hf_config.blockdiff["windows"] is True
    assert config(tiny_sdar).scheduler_config.async_scheduling is False  # not asked: off
    original = CpuPlatform.check_and_update_config.__wrapped__
    original(CpuPlatform, asked)
    assert asked.scheduler_config.async_scheduling is False  # what vLLM 0.26 alone decides


def test_preempted_block_state_tells_the_model_state_before_removing():
    """vLLM 0.26's Model Runner V2 removes preempted requests as if finished; patched, the model
    state first hears which were preempted (to keep their block state) and which finished."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    events = []

    class ModelState:
        def track_preemptions(self, preempted, finished):
            events.append(("track", preempted, sorted(finished)))

    runner = SimpleNamespace(model_state=ModelState(),
                             req_states=SimpleNamespace(req_id_to_index={"a": 0, "b": 1}),
                             _remove_request=lambda req_id: events.append(("remove", req_id)))
    output = SimpleNamespace(preempted_req_ids={"b"}, finished_req_ids={"a"})
    GPUModelRunner.finish_requests.__wrapped__(runner, output)  # vLLM 0.26 alone
    assert sorted(events) == [("remove", "a"), ("remove", "b")]
    events.clear()
    GPUModelRunner.finish_requests(runner, output)
    assert events[0] == ("track", {"b": 1}, ["a"]) and sorted(events[1:]) == [("remove", "a"),
                                                                           ("remove", "b")]
    events.clear()
    GPUModelRunner.finish_requests(runner, SimpleNamespace(preempted_req_ids=None,
                                                           finished_req_ids=set()))
    assert events == [("track", {}, [])]


def test_cpu_triton_interpreter_skips_the_overflow_checks_it_would_drop():
    """The interpreter computed every int32 add/sub/mul again in 64 bits for a check whose
    assert never fires without `debug`; the patch turns the check off, results unchanged."""
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow

    @triton.jit
    def add_mul(x_ptr, out_ptr, n: tl.constexpr):
        i = tl.arange(0, n)
        x = tl.load(x_ptr + i)
        tl.store(out_ptr + i, x * 3 + i - 7)

    x = torch.arange(-8, 8, dtype=torch.int32)
    out = torch.empty_like(x)
    add_mul[(1,)](x, out, 16)
    assert out.tolist() == (x * 3 + torch.arange(16, dtype=torch.int32) - 7).tolist()
