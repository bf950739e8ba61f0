"""ADED (Liu et al., 2024): a tri-gram matrix of the target's own outputs, with adaptive drafts.

The matrix maps the last two tokens (a, b) to ranked next tokens with counts. The paper builds it
from a corpus and keeps updating it with verified tokens, so that it follows the target's output
distribution. Here it starts empty and learns from verified tokens (accepted drafts and the token
the target sampled after them) and, as the corpus, from the last `prompt_window` tokens of each
request's prompt; it is kept across the requests of one engine. Each context keeps its
`candidates` most frequent next tokens (the paper prunes to the top 12); a full context evicts its
rarest token for a new one.

Drafting follows the matrix's most probable continuation, token by token, while the estimated
probability of the whole draft (the product of the tri-gram probabilities) stays at or above
`min_prob`: a draft is as long as the matrix is confident, from none up to
`num_speculative_tokens`. The paper grows a tree with MCTS to explore alternatives for tree
verification; vLLM verifies one chain, so only the exploiting path is drafted.

Per step, in Python: at most `num_speculative_tokens + 1` dictionary updates and lookups per
request (each O(`candidates`)), plus `prompt_window` updates once per request, at its first step;
no work over the vocabulary.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import numpy as np

from vllm_blockdiff.proposers.base import Proposer


class Options(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Ranked next tokens kept per (a, b) context.
    candidates: Annotated[int, msgspec.Meta(ge=1)] = 8
    # The draft stops before its estimated probability falls below this.
    min_prob: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.1
    # Prompt tokens (the last ones) a request adds to the matrix at its first step.
    prompt_window: Annotated[int, msgspec.Meta(ge=0)] = 256
    # Contexts kept; the oldest is forgotten past this (bounds memory on a long-running server).
    max_contexts: Annotated[int, msgspec.Meta(ge=1)] = 1 << 22


class NextTokens:
    """Counts of the tokens seen after one context, and the most frequent of them."""

    __slots__ = ("best", "counts", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.best = -1

    def add(self, token: int, capacity: int) -> None:
        counts = self.counts
        if token not in counts and len(counts) >= capacity:
            rarest = min(counts, key=counts.__getitem__)
            self.total -= counts.pop(rarest)
        counts[token] = counts.get(token, 0) + 1
        self.total += 1
        if counts[token] > counts.get(self.best, 0):
            self.best = token


class ADEDProposer(Proposer):
    Options = Options

    def __init__(self, vllm_config: Any) -> None:
        super().__init__(vllm_config)
        self.matrix: dict[int, NextTokens] = {}

    def observe(self, a: int, b: int, c: int) -> None:
        """Token c was verified after (a, b)."""
        key = a * self.vocab_size + b
        entry = self.matrix.get(key)
        if entry is None:
            if len(self.matrix) >= self.options.max_contexts:
                del self.matrix[next(iter(self.matrix))]
            entry = self.matrix[key] = NextTokens()
        entry.add(c, self.options.candidates)

    def continuation(self, a: int, b: int, budget: int) -> list[int]:
        """The most probable continuation of (a, b), as long as it stays probable enough."""
        out: list[int] = []
        prob = 1.0
        while len(out) < budget:
            entry = self.matrix.get(a * self.vocab_size + b)
            if entry is None:
                break
            prob *= entry.counts[entry.best] / entry.total
            if prob < self.options.min_prob:
                break
            out.append(entry.best)
            a, b = b, entry.best
        return out

    def draft(self, rows: np.ndarray, lengths: np.ndarray, budgets: np.ndarray,
              new_tokens: list[list[int]], history: np.ndarray) -> list[list[int]]:
        drafts = []
        prompt_lengths = self.input_batch.num_prompt_tokens[rows].tolist()
        for row, length, budget, new, prompt_length in zip(
                rows.tolist(), lengths.tolist(), budgets.tolist(), new_tokens, prompt_lengths,
                strict=True):
            first = length - len(new)  # the first position verified this step
            if first == prompt_length:  # the request's first step: its prompt joins the corpus
                first = max(0, first - self.options.prompt_window)
            recent = history[row, max(0, first - 2):length].tolist()
            for j in range(2, len(recent)):
                self.observe(recent[j - 2], recent[j - 1], recent[j])
            drafts.append(self.continuation(recent[-2], recent[-1], budget)
                          if len(recent) >= 2 else [])
        return drafts
