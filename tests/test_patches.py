"""Each patch under patches/: what it changes in vLLM, shown by a test that fails without it."""

from types import SimpleNamespace

import pytest
import vllm
from vllm.sampling_params import SamplingParams

from vllm_blockdiff.patches import PATCHES, apply_patches, diffusion_sampling_params

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
