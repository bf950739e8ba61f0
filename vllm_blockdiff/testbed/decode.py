"""Batched greedy decoders over `CausalLM` with a KV prefix: SDAR one-token-per-forward, and AR.

These are the trainer's own yardstick, independent of vLLM: the SDAR decoder commits the single
most confident masked position per forward (ties: leftmost), block by block with blocks aligned
to absolute position 0, then runs the finished block once more to store its clean keys/values.
Requests of different prompt lengths share a batch through per-row positions and a validity mask
over cache slots, so a row's padding slots are never attended to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_blockdiff.reference.modeling import CausalLM, KVPrefix, block_causal_mask


class SlotCache:
    """Per-layer keys/values for a batch, plus which slots each row may attend to."""

    def __init__(self, batch: int, device: torch.device):
        self.kv: list[KVPrefix] | None = None
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self._pending: list[KVPrefix] = []

    def mask(self, within: torch.Tensor) -> torch.Tensor:
        """[R, q, slots + q] mask: valid cache slots, then `within` [R, q, q] for the new tokens.

        Each new token also sees itself, so a padding row never has an empty softmax (NaN).
        """
        q = within.shape[1]
        eye = torch.eye(q, dtype=torch.bool, device=within.device)
        return torch.cat([self.valid[:, None, :].expand(-1, q, -1), within | eye], dim=2)

    def append(self, new_kv: list[KVPrefix], valid: torch.Tensor) -> None:
        if self.kv is None:
            self.kv = new_kv
        else:
            self.kv = [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                       for (k0, v0), (k1, v1) in zip(self.kv, new_kv, strict=True)]
        self.valid = torch.cat([self.valid, valid], dim=1)

    def forward(self, model: CausalLM, tokens: torch.Tensor, positions: torch.Tensor,
                within: torch.Tensor) -> torch.Tensor:
        """Logits of `tokens` at `positions` [R, q] given the cache; `commit` may keep their K/V."""
        logits, new_kv = model(tokens, positions, self.mask(within), self.kv)
        self._pending = new_kv
        return logits

    def commit(self, valid: torch.Tensor) -> None:
        """Keep the keys/values of the last `forward` (valid where `valid` [R, q])."""
        self.append(self._pending, valid)


def _pad(rows: Sequence[Sequence[int]], width: int, fill: int, device) -> torch.Tensor:
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], device=device)


def _truncate(rows: list[list[int]], eos: int, max_new: int) -> list[list[int]]:
    return [r[: r.index(eos)] if eos in r else r[:max_new] for r in rows]


@torch.no_grad()
def sdar_greedy(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    block_size: int,
    mask_id: int,
    eos_id: int,
    max_new_tokens: int,
    shifted: bool = False,
) -> list[list[int]]:
    """Generated ids per prompt (EOS and what follows removed), one committed token per forward.

    `shifted` (Fast-dLLM v2): position j is proposed from position j - 1's logits, a block's first
    position from the last position of the previous forward over clean tokens (prefill or
    commit)."""
    device = model.lm_head.weight.device
    n, b = len(prompts), block_size
    plen = torch.tensor([len(p) for p in prompts], device=device)
    full = plen // b * b  # prompt positions in complete blocks: prefilled block-causally
    cache = SlotCache(n, device)
    width = int(full.max())
    if width:
        tokens = _pad([p[: int(f)] for p, f in zip(prompts, full, strict=True)], width, eos_id,
                      device)
        pos = torch.arange(width, device=device).expand(n, -1)
        valid = pos < full[:, None]
        within = block_causal_mask(pos[0], width, b)[None] & valid[:, None, :]
        logits = cache.forward(model, tokens, pos, within)
        cache.commit(valid)
        last = logits[torch.arange(n, device=device), (full - 1).clamp(min=0)]
    else:  # no row has a full prompt block: each first block starts with prompt tokens
        last = torch.zeros(n, model.lm_head.weight.shape[0], device=device)
    prompt_pad = _pad(prompts, int(plen.max()), eos_id, device)
    out: list[list[int]] = [[] for _ in range(n)]
    start = full.clone()
    all_in_block = torch.ones(n, b, b, dtype=torch.bool, device=device)
    while min(len(o) for o in out) < max_new_tokens and not all(eos_id in o for o in out):
        pos = start[:, None] + torch.arange(b, device=device)
        from_prompt = pos < plen[:, None]
        tail = prompt_pad.gather(1, pos.clamp(max=prompt_pad.shape[1] - 1))
        block = torch.where(from_prompt, tail, mask_id)
        masked = ~from_prompt
        while masked.any():
            logits = cache.forward(model, block, pos, all_in_block).float()
            if shifted:
                logits = torch.cat([last[:, None].float(), logits[:, :-1]], dim=1)
            logits[..., mask_id] = float("-inf")
            conf, tok = logits.softmax(-1).max(-1)
            pick = conf.masked_fill(~masked, -1.0).argmax(-1, keepdim=True)
            rows = masked.any(-1, keepdim=True)
            block = torch.where(rows, block.scatter(1, pick, tok.gather(1, pick)), block)
            masked = masked & ~(rows & torch.zeros_like(masked).scatter(1, pick, True))
        last = cache.forward(model, block, pos, all_in_block)[:, -1]
        cache.commit(torch.ones_like(masked))
        for i, (row, keep) in enumerate(zip(block.tolist(), (~from_prompt).tolist(), strict=True)):
            out[i].extend(t for t, k in zip(row, keep, strict=True) if k)
        start = start + b
    return _truncate(out, eos_id, max_new_tokens)


@torch.no_grad()
def ar_greedy(
    model: CausalLM, prompts: Sequence[Sequence[int]], eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Plain greedy autoregressive decoding with a KV prefix (the twin's yardstick)."""
    device = model.lm_head.weight.device
    n = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], device=device)
    width = int(plen.max())
    tokens = _pad(prompts, width, eos_id, device)
    pos = torch.arange(width, device=device).expand(n, -1)
    valid = pos < plen[:, None]
    cache = SlotCache(n, device)
    within = block_causal_mask(pos[0], width, 1)[None] & valid[:, None, :]
    logits = cache.forward(model, tokens, pos, within)
    cache.commit(valid)
    nxt = logits[torch.arange(n, device=device), plen - 1].argmax(-1)
    out: list[list[int]] = [[] for _ in range(n)]
    one = torch.ones(n, 1, 1, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        for i, t in enumerate(nxt.tolist()):
            out[i].append(t)
        if all(eos_id in o for o in out) or step == max_new_tokens - 1:
            break
        logits = cache.forward(model, nxt[:, None], (plen + step)[:, None], one)
        cache.commit(torch.ones(n, 1, dtype=torch.bool, device=device))
        nxt = logits[:, -1].argmax(-1)
    return _truncate(out, eos_id, max_new_tokens)
