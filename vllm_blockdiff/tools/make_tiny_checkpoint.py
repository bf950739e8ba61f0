"""Write a tiny random-weight SDAR, Fast-dLLM v2 (or Qwen3 / Qwen2) checkpoint with a locally
trained tokenizer.

    python -m vllm_blockdiff.tools.make_tiny_checkpoint OUTDIR --arch sdar --block-size 4

The tokenizer is trained on this Python installation's standard-library sources, so no network or
model hub is needed. Random logits are made peaky (`--logit-scale`) so that confidence-based
policies commit several tokens in some steps and one in others, as trained models do.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch

from vllm_blockdiff.reference.modeling import CausalLM, ModelArgs
from vllm_blockdiff.tools.checkpoint import train_tokenizer, write_checkpoint

STDLIB_SAMPLE = ["textwrap.py", "string.py", "heapq.py", "bisect.py", "fnmatch.py", "colorsys.py"]


def stdlib_corpus() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / name).read_text() for name in STDLIB_SAMPLE]


def random_model(args: ModelArgs, seed: int, logit_scale: float) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(std=p.shape[-1] ** -0.5)  # unit-scale activations: context matters
        model.model.embed_tokens.weight.normal_(std=0.1)
        model.lm_head.weight.normal_(std=logit_scale / args.hidden_size**0.5)
    return model


def make_tiny_checkpoint(
    outdir: str | Path,
    arch: str = "sdar",
    block_size: int | None = 4,
    vocab_size: int = 384,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    logit_scale: float = 6.0,
    torch_dtype: str = "float32",
    num_experts: int = 4,
) -> Path:
    """`num_experts` applies to the MoE architecture only (top-2 routing, as small as it gets)."""
    tok = train_tokenizer(stdlib_corpus(), vocab_size)
    args = ModelArgs(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        **(dict(num_experts=num_experts, num_experts_per_tok=2,
                moe_intermediate_size=hidden_size * 2) if arch == "sdar_moe" else {}),
        # Qwen2 layers (Fast-dLLM v2 1.5B: q/k/v biases, no q/k norms, tied embeddings)
        **(dict(attention_bias=True, qk_norm=False, tie_word_embeddings=True)
           if arch in ("fast_dllm", "qwen2") else {}),
    )
    model = random_model(args, seed, logit_scale)
    return write_checkpoint(outdir, model, tok, arch, block_size, torch_dtype=torch_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--arch", choices=["sdar", "sdar_moe", "qwen3", "fast_dllm", "qwen2"],
                        default="sdar")
    parser.add_argument("--block-size", type=int, default=4,
                        help="block length in config.json (0: omit it, like published SDAR)")
    parser.add_argument("--vocab-size", type=int, default=384)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-scale", type=float, default=6.0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = parser.parse_args()
    path = make_tiny_checkpoint(
        a.outdir, a.arch, a.block_size or None, a.vocab_size, a.hidden_size, a.num_layers,
        seed=a.seed, logit_scale=a.logit_scale, torch_dtype=a.dtype,
    )
    print(path)


if __name__ == "__main__":
    main()
