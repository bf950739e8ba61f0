"""Write HF-layout checkpoints (config, safetensors, tokenizer files) for SDAR-family and AR models.

Shared by `make_tiny_checkpoint` (random weights for tests) and the testbed trainer, so every model
the project ships or tests with has exactly the layout real checkpoints use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vllm_blockdiff.reference.modeling import QWEN2_LAYOUTS, CausalLM, ModelArgs

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK = "<|MASK|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, MASK]

# Qwen-style chat format, kept small: system/user/assistant turns, then the assistant prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHITECTURES = {
    "sdar": ("SDARForCausalLM", "sdar"),
    "sdar_moe": ("SDARMoeForCausalLM", "sdar_moe"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "fast_dllm": ("Fast_dLLM_QwenForCausalLM", "Fast_dLLM_Qwen"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the SDAR special tokens (EOS, chat markers, mask) at fixed low ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tokenizer(outdir: Path, tok: Tokenizer) -> dict[str, int]:
    """Save tokenizer.json plus the HF side files; returns the special-token ids."""
    tok.save(str(outdir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "mask_token": MASK,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (outdir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {"eos_token": EOS, "pad_token": EOS, "mask_token": MASK,
                   "additional_special_tokens": [IM_START, IM_END, MASK]}
    (outdir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return ids


def model_config(
    arch: str,
    args: ModelArgs,
    special_ids: dict[str, int],
    block_size: int | None,
    max_position_embeddings: int,
    torch_dtype: str,
) -> dict:
    """config.json in the published Qwen3 / SDAR layout (SDAR adds only the training-copy keys)."""
    architecture, model_type = ARCHITECTURES[arch]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.dim_per_head,
        "hidden_act": "silu",
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": args.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": args.num_hidden_layers,
        "bos_token_id": special_ids[EOS],
        "eos_token_id": special_ids[EOS],
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if args.num_experts:
        config.update(
            num_experts=args.num_experts,
            num_experts_per_tok=args.num_experts_per_tok,
            moe_intermediate_size=args.moe_intermediate_size,
            norm_topk_prob=args.norm_topk_prob,
            decoder_sparse_step=args.decoder_sparse_step,
            mlp_only_layers=args.mlp_only_layers,
        )
    if model_type in QWEN2_LAYOUTS:  # Qwen2 config.json: no head_dim or attention_bias keys
        del config["head_dim"], config["attention_bias"]
        config["pad_token_id"] = special_ids[EOS]
    if arch == "fast_dllm":
        # Keys of the published Fast-dLLM v2 config.json: remote code, the block size, and
        # `layer_types`, which its attention layers index.
        config["auto_map"] = {
            "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
            "AutoModel": "modeling.Fast_dLLM_QwenModel",
            "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
        }
        config["bd_size"] = block_size or 32
        config["layer_types"] = ["full_attention"] * args.num_hidden_layers
    if arch.startswith("sdar"):
        # Keys of the published SDAR config.json that inference ignores (remote code, training).
        stem, cls = ("sdar_moe", "SDARMoe") if args.num_experts else ("sdar", "SDAR")
        config["auto_map"] = {
            "AutoConfig": f"configuration_{stem}.{cls}Config",
            "AutoModel": f"modeling_{stem}.{cls}Model",
            "AutoModelForCausalLM": f"modeling_{stem}.{cls}ForCausalLM",
        }
        config["fuse_cross_entropy"] = True
        if block_size is not None:
            # SDAR's training copy of config.json adds these two keys; published ones lack them.
            config["block_size"] = block_size
            config["mask_token_id"] = special_ids[MASK]
    return config


def write_checkpoint(
    outdir: str | Path,
    model: CausalLM,
    tok: Tokenizer,
    arch: str,
    block_size: int | None = 4,
    max_position_embeddings: int = 2048,
    torch_dtype: str = "float32",
) -> Path:
    """Write a complete checkpoint directory that `vllm serve` and the reference decoder load."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(outdir, tok)
    config = model_config(arch, model.args, ids, block_size, max_position_embeddings, torch_dtype)
    (outdir / "config.json").write_text(json.dumps(config, indent=2))
    generation_config = {
        "bos_token_id": ids[EOS],
        "eos_token_id": [ids[IM_END], ids[EOS]],
        "pad_token_id": ids[EOS],
    }
    (outdir / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    model.save_weights(outdir)
    return outdir
