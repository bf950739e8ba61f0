"""A small, plain-PyTorch SDAR / Qwen3 (and Fast-dLLM v2 / Qwen2) transformer that reads and
writes the HF checkpoint layout.

It is the independent half of the parity tests (no vLLM code is used) and the network the testbed
trains. Attention takes an explicit boolean mask, so the same module runs causal (the AR twin),
block-causal (SDAR prefill / commit) and bidirectional-within-block (denoising) forwards, with an
optional per-layer key/value prefix standing in for the KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


class ModelArgs(msgspec.Struct, kw_only=True):
    """The config.json fields the network reads (Qwen3 names; extra keys are ignored)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = True  # Qwen3 normalises queries and keys per head; Qwen2 does not
    # Qwen3-MoE (SDAR-MoE) fields; num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = []

    def is_sparse_layer(self, layer: int) -> bool:
        """Qwen3-MoE's rule for which decoder layers use the expert MLP."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        fields = set(cls.__struct_fields__)
        values = {k: v for k, v in config.items() if k in fields}
        if config.get("model_type") in QWEN2_LAYOUTS:  # hard-coded in Qwen2's layers
            values.update(attention_bias=True, qk_norm=False)
        return msgspec.convert(values, cls)


# model_types with Qwen2's layers: q/k/v biases, no query/key norms (Fast-dLLM v2 is Qwen2.5).
QWEN2_LAYOUTS = ("qwen2", "Fast_dLLM_Qwen")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX-style rotary embedding of x [batch, heads, tokens, dim] at positions [batch, tokens]."""
    dim = x.shape[-1]
    exponents = torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + _rotate_half(x) * sin


KVPrefix = tuple[torch.Tensor, torch.Tensor]  # [batch, kv_heads, prefix_len, head_dim] each


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d, h, kv = args.dim_per_head, args.num_attention_heads, args.num_key_value_heads
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, kv * d, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, kv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        prefix: KVPrefix | None,
    ) -> tuple[torch.Tensor, KVPrefix]:
        b, t, _ = x.shape
        a = self.args
        d = a.dim_per_head
        q = self.q_norm(self.q_proj(x).view(b, t, a.num_attention_heads, d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, a.num_key_value_heads, d)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, a.num_key_value_heads, d).transpose(1, 2)
        q = apply_rope(q, positions, a.rope_theta)
        k = apply_rope(k, positions, a.rope_theta)
        new_kv = (k, v)
        if prefix is not None:
            k = torch.cat([prefix[0], k], dim=2)
            v = torch.cat([prefix[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), new_kv


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Qwen3-MoE block: softmax router, top-k experts, optionally renormalised weights."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(args.hidden_size, args.moe_intermediate_size)
                                     for _ in range(args.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = self.gate(flat).float().softmax(-1)
        weights, chosen = probs.topk(self.args.num_experts_per_tok, dim=-1)
        if self.args.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if len(rows):
                out[rows] += weights[rows, slot, None].to(flat.dtype) * expert(flat[rows])
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = (SparseMoE(args) if args.is_sparse_layer(index)
                    else MLP(args.hidden_size, args.intermediate_size))
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, positions, mask, prefix):
        h, new_kv = self.self_attn(self.input_layernorm(x), positions, mask, prefix)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """Qwen3-layout language model: `model.*` backbone plus `lm_head` (HF state-dict names)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: list[KVPrefix] | None = None,
    ) -> tuple[torch.Tensor, list[KVPrefix]]:
        """Logits for `input_ids` [batch, tokens] and each layer's new keys/values.

        `mask` [batch, tokens, prefix_len + tokens] is True where a query may attend; `cache` holds
        each layer's key/value prefix. The caller decides which new keys/values to keep.
        """
        x = self.model.embed_tokens(input_ids)
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, positions, mask, cache[i] if cache else None)
            new_cache.append(kv)
        return self.lm_head(self.model.norm(x)), new_cache

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> CausalLM:
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        model = cls(ModelArgs.from_config(config))
        state = {}
        for shard in sorted(path.glob("*.safetensors")):
            state.update(load_file(shard))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = model.args.tie_word_embeddings
        missing = [m for m in missing if not (m == "lm_head.weight" and tied)]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        return model.to(dtype).eval()

    def save_weights(self, path: str | Path) -> None:
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.args.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})


def block_causal_mask(
    q_positions: torch.Tensor, kv_len: int, block_length: int
) -> torch.Tensor:
    """[tokens, kv_len] mask: a query at absolute position p sees keys at < (p // B + 1) * B.

    Blocks are aligned to absolute position 0 (SDAR, TraDo, LLaDA2.0, Fast-dLLM v2); block_length 1
    gives ordinary causal attention.
    """
    limit = (q_positions // block_length + 1) * block_length
    return torch.arange(kv_len, device=q_positions.device)[None, :] < limit[:, None]
