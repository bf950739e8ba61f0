"""Input-guided Aggressive Decoding (Ge et al., 2022): draft by copying the prompt.

For rewriting and correction requests the output mostly repeats the input. Each request keeps an
alignment: the prompt position its next output token should copy. After a step, if the verified
tokens are the prompt's tokens at the alignment, it moves past them and the copy goes on; if not
(an edit), the request re-aligns where the last `max_ngram` (then fewer) output tokens occur in
the prompt, at the first occurrence not before where the copy was heading (else the first one),
so alignments move forward through the input as in the paper. The draft is the prompt from the
alignment on. Unlike vLLM's `ngram`, it copies only from the prompt, keeps its place between
steps and needs no minimum match.

Request ids and prompt lengths come from the runner's input batch, which the plugin's patch
(`patches/proposer_step.py`) hands over each step. Per step, in Python: one comparison per
request; a re-alignment is a numpy scan of the prompt per n-gram length (no Python loop over
tokens).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from vllm_blockdiff.proposers.base import Proposer


class Options(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Longest output suffix a re-alignment looks up in the prompt.
    max_ngram: Annotated[int, msgspec.Meta(ge=1)] = 4


def align(prompt: np.ndarray, output: np.ndarray, expected: int, max_ngram: int) -> int | None:
    """The prompt position after the longest suffix of `output` (up to `max_ngram` tokens) found
    in the prompt: the first such position at or after `expected`, else the first; None if even
    the last output token is absent."""
    for n in range(min(max_ngram, len(output), len(prompt)), 0, -1):
        hits = np.flatnonzero((sliding_window_view(prompt, n) == output[-n:]).all(axis=1)) + n
        if len(hits):
            ahead = hits[hits >= expected]
            return int(ahead[0] if len(ahead) else hits[0])
    return None


class InputCopyProposer(Proposer):
    Options = Options

    def __init__(self, vllm_config: Any) -> None:
        super().__init__(vllm_config)
        # Request id -> prompt position its next output token copies (None: nothing to copy).
        self.alignments: dict[str, int | None] = {}

    def draft(self, rows: np.ndarray, lengths: np.ndarray, budgets: np.ndarray,
              new_tokens: list[list[int]], history: np.ndarray) -> list[list[int]]:
        req_ids = self.input_batch.req_ids
        prompt_lengths = self.input_batch.num_prompt_tokens[rows].tolist()
        drafts = []
        alignments: dict[str, int | None] = {}
        for row, length, budget, new, prompt_length in zip(
                rows.tolist(), lengths.tolist(), budgets.tolist(), new_tokens, prompt_lengths,
                strict=True):
            prompt = history[row, :prompt_length]
            aligned = self.alignments.get(req_ids[row])
            verified = history[row, length - len(new):length]
            if aligned is not None and np.array_equal(prompt[aligned:aligned + len(new)],
                                                      verified):
                aligned += len(new)
            else:
                aligned = align(prompt, history[row, prompt_length:length],
                                (aligned or 0) + len(new), self.options.max_ngram)
            alignments[req_ids[row]] = aligned
            drafts.append([] if aligned is None or budget <= 0
                          else prompt[aligned:aligned + budget].tolist())
        # Only the requests of this batch keep an alignment: finished ones are forgotten.
        self.alignments = alignments
        return drafts
