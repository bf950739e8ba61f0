"""Block-diffusion decoding in plain PyTorch, one request at a time, without vLLM.

It performs exactly the schedule the vLLM integration performs, so greedy float32 outputs (and
forward counts) must match token for token:
  - forward 1 runs the whole prompt block-causally; KV is kept up to the last full block;
  - every later forward runs [uncached tokens of the current block's predecessors, current block]
    (the current block = fixed head + canvas, masked positions holding the mask token), keeps KV
    up to the current block's start, proposes tokens at the canvas positions and lets the policy
    commit some; committed positions contiguous with the emitted text are emitted;
  - a request stops at EOS / a stop token (kept in the output, as vLLM does) or max_tokens;
  - a policy with a `marker` (TCCF) switches to its fine block length after the block holding
    the first marker it emits;
  - with `shifted` logits (Fast-dLLM v2) position j is proposed from position j - 1: KV is kept
    up to the position before the current block, which every forward recomputes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_blockdiff.options import DecodeOptions
from vllm_blockdiff.policies import POLICIES, PolicyInput
from vllm_blockdiff.policies.block_switch import (
    NEVER,
    block_length_at,
    fine_block_length,
    marker_of,
    switch_position,
)
from vllm_blockdiff.policies.subblock import cached_query, cached_sub_block
from vllm_blockdiff.reference.modeling import CausalLM, KVPrefix, block_causal_mask


@dataclass
class Generation:
    token_ids: list[int]
    forwards: int
    finish_reason: str
    steps_per_block: list[int] = field(default_factory=list)


@dataclass
class _Request:
    prompt: list[int]
    tokens: list[int]
    cache: list[KVPrefix] | None = None
    computed: int = 0
    last_kv: list[KVPrefix] | None = None  # the last `_forward`'s keys/values, from `computed`


def _propose(logits: torch.Tensor, mask_token_id: int, temperature: float,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits.float().clone()
    logits[:, mask_token_id] = float("-inf")
    if temperature > 0:
        logits = logits / temperature
        probs = logits.softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = logits.argmax(-1)
    logp = logits.log_softmax(-1)
    confidence = logp.gather(-1, tokens[:, None]).squeeze(-1).exp()
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    return tokens, confidence, entropy


@torch.inference_mode()
def _forward_sub_block(model: CausalLM, req: _Request, query: list[int], sub_start: int,
                       block: list[KVPrefix], block_from: int) -> torch.Tensor:
    """Run the active sub-block at [sub_start, ...) over the cached prefix and the rest of the
    block's keys/values from its last refresh (`block`, positions from `block_from`); the
    sub-block sees the whole block. Caches nothing."""
    n = len(query)
    lo, hi = sub_start - block_from, sub_start - block_from + n
    prefix = [(torch.cat([ck, k[:, :, :lo], k[:, :, hi:]], 2),
               torch.cat([cv, v[:, :, :lo], v[:, :, hi:]], 2))
              for (ck, cv), (k, v) in zip(req.cache, block, strict=True)]
    positions = torch.arange(sub_start, sub_start + n)
    mask = torch.ones(1, n, prefix[0][0].shape[2] + n, dtype=torch.bool)
    logits, _ = model(torch.tensor([query]), positions[None], mask, prefix)
    return logits[0]


@torch.inference_mode()
def _forward(model: CausalLM, req: _Request, query: list[int], block_length: Callable,
             keep_until: int) -> torch.Tensor:
    """Run `query` at positions [computed, ...) over the cached prefix; cache KV < keep_until.

    `block_length(positions)` gives the block length at each position."""
    start = req.computed
    positions = torch.arange(start, start + len(query))
    mask = block_causal_mask(positions, start + len(query), block_length(positions))
    logits, new_kv = model(torch.tensor([query]), positions[None], mask[None], req.cache)
    req.last_kv = new_kv
    keep = keep_until - start
    kept = [(k[:, :, :keep], v[:, :, :keep]) for k, v in new_kv]
    if req.cache is None:
        req.cache = kept
    else:
        req.cache = [(torch.cat([ck, k], 2), torch.cat([cv, v], 2))
                     for (ck, cv), (k, v) in zip(req.cache, kept, strict=True)]
    req.computed = keep_until
    return logits[0]


def generate(
    model: CausalLM,
    prompt: list[int],
    options: DecodeOptions,
    mask_token_id: int,
    max_tokens: int,
    stop_token_ids: set[int],
    temperature: float = 0.0,
    seed: int | None = None,
    on_step: Callable[[PolicyInput, torch.Tensor], None] | None = None,
    shifted: bool = False,
) -> Generation:
    """Decode one request; `on_step(inp, commit)` sees every policy call (trainers log it)."""
    coarse = b = options.block_length
    fine, marker, switch_at = fine_block_length(options), marker_of(options), NEVER
    policy = POLICIES[options.policy]
    params = policy.batch_params([options.params], [b], torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    req = _Request(prompt=list(prompt), tokens=list(prompt))

    def lengths(positions: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(block_length_at(positions.numpy(), coarse, fine, switch_at))

    shift = int(shifted)
    sub = cached_sub_block(options)
    block_kv: list[KVPrefix] = []  # the block's keys/values from its last refresh ...
    block_from, cache_block = 0, -1  # ... from this position, for the block starting here
    _forward(model, req, req.tokens, lengths, max(len(prompt) // b * b - shift, 0))
    forwards, steps_per_block = 1, []
    canvas = [mask_token_id] * b
    committed = [False] * b
    history: list[float] = []  # confidences of this block's committed positions
    step = 0
    while True:
        n = len(req.tokens)
        start = n // b * b
        offset = n - start
        cached, sub_start, sub_end = cached_query(start, offset, b, sub, cache_block == start)
        if cached:  # only the active sub-block, over the block's KV from its refresh
            query = req.tokens[sub_start:] + canvas[offset:sub_end - start]
            logits = _forward_sub_block(model, req, query, sub_start, block_kv, block_from)
            open_end = sub_end - start
        else:
            query = req.tokens[req.computed:] + canvas[offset:]
            first = req.computed
            logits = _forward(model, req, query, lengths, max(start - shift, 0))
            if sub and offset > 0:  # a refresh (not the block's AR step): keep the block's KV
                block_from, cache_block = first, start
                block_kv = req.last_kv
            open_end = b
        logits = logits[len(logits) - (open_end - offset) - shift:len(logits) - shift]
        forwards += 1
        tokens, confidence, entropy = _propose(logits, mask_token_id, temperature, generator)
        pad = torch.zeros(offset)
        tail = torch.zeros(b - open_end)  # positions the forward did not run (sub-block cache)
        tokens, confidence, entropy = (torch.cat([x, tail.to(x.dtype)])
                                       for x in (tokens, confidence, entropy))
        masked = torch.tensor([False] * offset + [not c and j < open_end
                                                  for j, c in enumerate(committed)][offset:])
        proposed = torch.cat([pad.long(), tokens])
        proposed = torch.where(torch.tensor(committed), torch.tensor(canvas), proposed)
        inp = PolicyInput(
            confidence=torch.cat([pad, confidence])[None],
            masked=masked[None],
            tokens=proposed[None],
            step=torch.tensor([step]),
            block_length=torch.tensor([b]),
            committed_confidence_sum=torch.tensor([sum(history)], dtype=torch.float32),
            committed_count=torch.tensor([len(history)]),
            is_stop=torch.tensor([[t in stop_token_ids for t in proposed.tolist()]]),
            entropy=torch.cat([pad, entropy])[None] if policy.needs_entropy else None,
        )
        commit_mask = policy.select(inp, params) & masked[None]
        if on_step is not None:
            on_step(inp, commit_mask)
        commit = commit_mask[0].tolist()
        for j in range(offset, b):
            if commit[j]:
                canvas[j] = int(tokens[j - offset])
                committed[j] = True
                history.append(float(confidence[j - offset]))
        step += 1
        for j in range(offset, b):
            if not committed[j]:
                break
            req.tokens.append(canvas[j])
            if marker is not None and switch_at == NEVER:
                switch_at = switch_position([canvas[j]], start + j, marker, coarse)
            emitted = req.tokens[len(prompt):]
            if canvas[j] in stop_token_ids:
                return Generation(emitted, forwards, "stop", steps_per_block)
            if len(emitted) >= max_tokens:
                return Generation(emitted, forwards, "length", steps_per_block)
        if all(committed[offset:]):
            steps_per_block.append(step)
            b = int(block_length_at(len(req.tokens), coarse, fine, switch_at))
            canvas, committed, history, step = [mask_token_id] * b, [False] * b, [], 0
