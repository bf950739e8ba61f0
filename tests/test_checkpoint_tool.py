"""The tiny-checkpoint tool writes the real SDAR / Qwen3 layouts (config keys, weight names)."""

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from transformers import AutoTokenizer

from vllm_blockdiff.reference.modeling import CausalLM

CONFIGS = Path(__file__).parent / "data" / "sdar_configs"


def test_cli_writes_a_published_sdar_layout(tmp_path):
    out = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "vllm_blockdiff.tools.make_tiny_checkpoint", str(out),
                    "--block-size", "0"], check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["SDARForCausalLM"] and config["model_type"] == "sdar"
    assert "block_size" not in config and "mask_token_id" not in config
    published = CONFIGS / "SDAR-1.7B-Chat-config.json"  # same keys (values are tiny)
    ignored = {"transformers_version", "initializer_range"}
    assert set(json.loads(published.read_text())) - ignored <= set(config)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.mask_token == "<|MASK|>" and tok.mask_token_id is not None
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.1.mlp.gate_proj.weight",
            "lm_head.weight", "model.embed_tokens.weight"} <= names
    CausalLM.from_pretrained(out)


def test_moe_layout(tmp_path):
    from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint

    out = make_tiny_checkpoint(tmp_path / "moe", arch="sdar_moe")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["SDARMoeForCausalLM"] and config["num_experts"] == 4
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in set(f.keys())


def test_fast_dllm_layout(tmp_path):
    """Fast-dLLM v2 1.5B's layout: Qwen2 layers (q/k/v biases, no q/k norms), tied embeddings,
    `bd_size` and `layer_types`; the reference network reads it back."""
    from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint

    out = make_tiny_checkpoint(tmp_path / "fast", arch="fast_dllm", block_size=8)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Fast_dLLM_QwenForCausalLM"]
    assert config["bd_size"] == 8 and config["layer_types"] == ["full_attention"] * 2
    published = json.loads((CONFIGS / "Fast_dLLM_v2_1.5B-config.json").read_text())
    assert set(published) - {"transformers_version", "initializer_range"} <= set(config)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert not any("q_norm" in n or "lm_head" in n for n in names)
    model = CausalLM.from_pretrained(out)
    assert model.args.attention_bias and not model.args.qk_norm
