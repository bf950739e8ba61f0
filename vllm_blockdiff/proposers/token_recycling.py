"""Token Recycling (Luo et al., 2024): draft from the target's own earlier top-k candidates.

A V x `width` adjacency table holds, for each token, the target's top-`width` next tokens (and
their log-probabilities) from the last position where that token was fed, rejected drafts
included: candidates a step computed anyway are recycled. The table lives in the proposer
instance, one per engine worker, so it carries over from request to request of one model and
never to another model. Each step grows a tree template from the request's last token, as the
paper does (`branching` children of rank 0, 1, ... per depth, `num_speculative_tokens` deep; the
paper's has 80 nodes), and drafts its best chain: the root-to-leaf path with the largest expected
accepted length (the sum over depth of the path's probability so far, from the stored
log-probabilities), because vLLM verifies one chain per request, not a tree.

The target's top-k comes from `observe_step`, which the plugin's patch
(`patches/proposer_step.py`) calls before sampling with the logits of every scored position
(a request with a structured output contributes its grammar's allowed top-k).
Per step: one top-k over those logits on the device; on the host one numpy scatter into the
table, a numpy walk of the template over the whole batch (a loop over depth, not tokens), and one
list per request.
"""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple

import msgspec
import numpy as np
import torch

from vllm_blockdiff.proposers.base import Proposer


class Options(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Candidates kept per token: the paper's k.
    width: Annotated[int, msgspec.Meta(ge=1)] = 8
    # Children per node at depth 1, 2, ...; the last entry repeats to the draft length. A child
    # of rank r holds its parent's r-th candidate.
    branching: tuple[Annotated[int, msgspec.Meta(ge=1)], ...] = (4, 2, 2, 1)


class Template(NamedTuple):
    """The draft tree in breadth-first order: node i holds candidate `rank[i]` of `parent[i]`
    (-1: the root, the request's last token); `levels[d]` is depth d + 1's node range."""

    parent: np.ndarray
    rank: np.ndarray
    levels: tuple[tuple[int, int], ...]
    paths: np.ndarray  # [leaves, depth]: the nodes from depth 1 down to each leaf


def build_template(branching: tuple[int, ...], depth: int, width: int) -> Template:
    parent: list[int] = []
    rank: list[int] = []
    levels = []
    frontier = [-1]
    for d in range(depth):
        children = min(branching[min(d, len(branching) - 1)], width)
        start = len(parent)
        for p in frontier:
            parent += [p] * children
            rank += list(range(children))
        levels.append((start, len(parent)))
        frontier = list(range(start, len(parent)))
    parent_arr = np.asarray(parent, dtype=np.int64)
    paths = np.empty((len(frontier), depth), dtype=np.int64)
    paths[:, -1] = frontier
    for d in range(depth - 2, -1, -1):
        paths[:, d] = parent_arr[paths[:, d + 1]]
    return Template(parent_arr, np.asarray(rank, dtype=np.int64), tuple(levels), paths)


class TokenRecyclingProposer(Proposer):
    Options = Options

    def __init__(self, vllm_config: Any) -> None:
        super().__init__(vllm_config)
        width = self.options.width
        # Row `vocab_size` is the unknown token: its candidates are unknown, with probability 0.
        self.unknown = self.vocab_size
        self.adjacency = np.full((self.vocab_size + 1, width), self.unknown, dtype=np.int64)
        self.logprobs = np.full((self.vocab_size + 1, width), -np.inf, dtype=np.float32)
        self.template = build_template(self.options.branching, self.num_speculative_tokens, width)
        self._observed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def observe_step(self, runner: Any, logits: torch.Tensor, spec_decode_metadata: Any) -> None:
        """Keeps the top-k of every scored row with the token that row was fed (V1 runner:
        `logits_indices` into the step's `input_ids`); copied to the host in `propose`, after the
        runner has synchronised anyway."""
        super().observe_step(runner, logits, spec_decode_metadata)
        if spec_decode_metadata is not None:
            rows = spec_decode_metadata.logits_indices
        else:
            rows = runner.query_start_loc.gpu[1:logits.shape[0] + 1] - 1
        top = logits.topk(self.options.width, dim=-1)
        logprobs = top.values - torch.logsumexp(logits, dim=-1, keepdim=True)
        self._observed.append((runner.input_ids.gpu[rows], top.indices, logprobs))

    def update(self, fed: np.ndarray, candidates: np.ndarray, logprobs: np.ndarray) -> None:
        """The target's candidates after token `fed[i]` are `candidates[i]` (best first)."""
        self.adjacency[fed] = candidates
        self.logprobs[fed] = logprobs

    def draft(self, rows: np.ndarray, lengths: np.ndarray, budgets: np.ndarray,
              new_tokens: list[list[int]], history: np.ndarray) -> list[list[int]]:
        for fed, candidates, logprobs in self._observed:
            self.update(fed.cpu().numpy(), candidates.cpu().numpy(),
                        logprobs.float().cpu().numpy())
        self._observed.clear()
        chains = self.best_chains(history[rows, lengths - 1].astype(np.int64))
        known = np.concatenate([chains != self.unknown,
                                np.zeros((len(rows), 1), dtype=bool)], axis=1)
        ends = np.minimum(np.argmin(known, axis=1), np.maximum(budgets, 0))
        return [chain[:end].tolist() for chain, end in zip(chains, ends, strict=True)]

    def best_chains(self, roots: np.ndarray) -> np.ndarray:
        """[batch, depth] tokens of the template path with the largest expected accepted
        length from each root."""
        t = self.template
        n = len(t.parent)
        tokens = np.empty((len(roots), n), dtype=np.int64)
        logp = np.empty((len(roots), n), dtype=np.float32)
        gain = np.empty((len(roots), n), dtype=np.float32)
        for depth, (start, stop) in enumerate(t.levels):
            parent, rank = t.parent[start:stop], t.rank[start:stop]
            from_tokens = roots[:, None] if depth == 0 else tokens[:, parent]
            tokens[:, start:stop] = self.adjacency[from_tokens, rank]
            logp[:, start:stop] = self.logprobs[from_tokens, rank]
            if depth:
                logp[:, start:stop] += logp[:, parent]
            gain[:, start:stop] = np.exp(logp[:, start:stop])
            if depth:
                gain[:, start:stop] += gain[:, parent]
        start, _ = t.levels[-1]
        leaves = np.argmax(gain[:, start:], axis=1)
        return np.take_along_axis(tokens, t.paths[leaves], axis=1)
