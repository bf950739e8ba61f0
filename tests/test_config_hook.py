"""`vllm serve <checkpoint>` configuration for block-diffusion checkpoints, without an engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import EngineArgs

CONFIGS = Path(__file__).parent / "data" / "sdar_configs"
SCHEDULER = "vllm_blockdiff.engine.scheduler.BlockDiffusionScheduler"


def engine_config(model: str, **kwargs):
    return EngineArgs(model=model, gpu_memory_utilization=0.3, max_model_len=512,
                      **kwargs).create_engine_config()


def test_published_layout_gets_block_length_4_and_the_tokenizers_mask(published_sdar):
    cfg = engine_config(published_sdar)
    serve = cfg.model_config.hf_config.blockdiff
    assert serve["block_length"] == 4 and serve["max_block_length"] == 16
    assert serve["mask_token_id"] == 3  # "<|MASK|>" in the tokenizer, not in config.json
    assert serve["vocab_size"] == cfg.model_config.hf_config.vocab_size  # bounds token-id options
    assert cfg.model_config.is_diffusion and cfg.diffusion_config.canvas_length == 16
    assert cfg.scheduler_config.scheduler_cls == SCHEDULER
    assert cfg.scheduler_config.async_scheduling is False


def test_training_layout_block_size_is_read(tiny_sdar, tmp_path):
    ckpt = tmp_path / "b8"
    shutil.copytree(tiny_sdar, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "block_size": 8}))
    assert engine_config(str(ckpt)).model_config.hf_config.blockdiff["block_length"] == 8


def test_serve_time_overrides(published_sdar):
    cfg = engine_config(published_sdar, additional_config={"blockdiff": {
        "block_length": 8, "max_block_length": 32, "policy": "dynamic", "threshold": 0.7}})
    serve = cfg.model_config.hf_config.blockdiff
    assert (serve["block_length"], serve["max_block_length"], serve["policy"]) == (8, 32, "dynamic")
    newline = AutoTokenizer.from_pretrained(published_sdar).encode("\n", add_special_tokens=False)
    # AdaBlock's delimiter defaults to the tokenizer's newline token
    assert serve["policy_defaults"] == {"threshold": 0.7, "delimiter": newline[0]}
    assert len(newline) == 1
    assert cfg.diffusion_config.canvas_length == 32
    overridden = engine_config(published_sdar, additional_config={"blockdiff": {
        "delimiter": None}}).model_config.hf_config.blockdiff
    assert overridden["policy_defaults"] == {"delimiter": None}
    # blocks must not straddle KV pages while prefix caching is on: the page grows to fit
    assert cfg.cache_config.block_size % 8 == 0


@pytest.mark.parametrize("settings, key", [
    ({"block_lenght": 8}, "block_lenght"),
    ({"block_length": 32, "max_block_length": 16}, "block_length"),
    ({"policy": "nope"}, "policy"),
    ({"threshold": 3.0}, "threshold"),
    ({"grammar_backend": "outlines"}, "grammar_backend"),
])
def test_bad_serve_settings_name_the_key(published_sdar, settings, key):
    with pytest.raises(Exception, match=key):
        engine_config(published_sdar, additional_config={"blockdiff": settings})


@pytest.mark.parametrize("setting, vllm_backend, expected", [
    (None, "auto", "auto"),  # the plugin's default: per request, the exact compiler
    ("xgrammar", "auto", "xgrammar"),
    ("llguidance", "auto", "llguidance"),
    (None, "guidance", "llguidance"),  # vLLM's own option, if the plugin's is not set
    ("llguidance", "guidance", "llguidance"),
    (None, "xgrammar", "xgrammar"),
])
def test_grammar_backend(published_sdar, setting, vllm_backend, expected):
    settings = {} if setting is None else {"grammar_backend": setting}
    cfg = engine_config(published_sdar, additional_config={"blockdiff": settings},
                        structured_outputs_config=StructuredOutputsConfig(backend=vllm_backend))
    assert cfg.model_config.hf_config.blockdiff["grammar_backend"] == expected


@pytest.mark.parametrize("setting, vllm_backend, message", [
    ("xgrammar", "guidance", r"grammar_backend \('xgrammar'\) contradicts"),
    (None, "outlines", "structured-outputs-config.backend outlines"),
])
def test_grammar_backend_refused(published_sdar, setting, vllm_backend, message):
    settings = {} if setting is None else {"grammar_backend": setting}
    with pytest.raises(Exception, match=message):
        engine_config(published_sdar, additional_config={"blockdiff": settings},
                      structured_outputs_config=StructuredOutputsConfig(backend=vllm_backend))


@pytest.mark.parametrize("name", ["SDAR-1.7B-Chat", "SDAR-4B-Chat", "SDAR-8B-Chat"])
def test_real_sdar_config_json_is_served_unchanged(published_sdar, tmp_path, name):
    """The verbatim published config.json (weights are not needed to configure the engine)."""
    source = CONFIGS / f"{name}-config.json"
    ckpt = tmp_path / name
    shutil.copytree(published_sdar, ckpt)
    shutil.copy(source, ckpt / "config.json")
    cfg = engine_config(str(ckpt))
    assert cfg.model_config.architecture == "SDARForCausalLM"
    assert cfg.model_config.hf_config.blockdiff["block_length"] == 4
    assert cfg.model_config.hf_config.num_hidden_layers == json.loads(source.read_text())[
        "num_hidden_layers"]


@pytest.mark.parametrize("chosen, expected", [(None, "FULL"), ("PIECEWISE", "PIECEWISE"),
                                              ("NONE", "NONE")])
def test_full_cuda_graphs_unless_the_user_chose(chosen, expected):
    """Diffusion batches mix B- and 2B-token queries and prefills: FULL graphs for mixed
    batches (the block-causal kernel is graph-safe for any mix), unless -cc.cudagraph_mode says."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode

    from vllm_blockdiff.engine.config_hook import use_full_cuda_graphs

    compilation = CompilationConfig(cudagraph_mode=chosen and CUDAGraphMode[chosen])
    use_full_cuda_graphs(SimpleNamespace(compilation_config=compilation,
                                         scheduler_config=SimpleNamespace(max_num_seqs=256)), 4)
    assert compilation.cudagraph_mode == CUDAGraphMode[expected]


@pytest.mark.parametrize("max_num_seqs, block_length, user, expected", [
    (256, 4, None, 2048), (256, 16, None, 2048), (64, 4, None, 512), (8, 4, None, 512),
    (256, 4, 128, 128)])
def test_full_graphs_cover_a_commit_and_a_step_per_request(max_num_seqs, block_length, user,
                                                           expected):
    """Up to 2B tokens per request (at least vLLM's 512, at most 2048), unless the user chose."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig

    from vllm_blockdiff.engine.config_hook import use_full_cuda_graphs

    compilation = CompilationConfig(max_cudagraph_capture_size=user)
    use_full_cuda_graphs(SimpleNamespace(
        compilation_config=compilation,
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs)), block_length)
    assert compilation.max_cudagraph_capture_size == expected


def test_async_scheduling_runs_windows_of_two_blocks(published_sdar):
    cfg = engine_config(published_sdar, async_scheduling=True)
    assert cfg.model_config.hf_config.blockdiff["windows"] is True
    assert cfg.diffusion_config.canvas_length == 32  # two blocks of max_block_length 16
    with pytest.raises(ValueError, match="less than twice max_block_length"):
        engine_config(published_sdar, async_scheduling=True,
                      additional_config={"blockdiff": {"canvas_length": 16}})
