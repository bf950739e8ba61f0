"""What the proposers share: vLLM 0.26's `custom_class` contract and their options.

vLLM builds the class as `cls(vllm_config)`, calls `load_model(target_model)` once (the CPU
runner unconditionally), then after every step `propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu, slot_mappings=...)` with the rows of the runner's input batch. A row whose
`sampled_token_ids` entry is empty is a prefill chunk: it gets no draft. Nothing else reaches the
proposer, so options come from `--additional-config '{"proposer": {...}}'` (`additional_config`
offline), validated against the configured proposer's `Options`.

Per step, in Python: one pass over the batch rows; each proposer's `draft` does the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import msgspec
import numpy as np

OPTIONS_KEY = "proposer"


class Proposer(ABC):
    """A training-free drafter for an AR model, selected with `method: "custom_class"`."""

    Options: ClassVar[type[msgspec.Struct]]

    def __init__(self, vllm_config: Any) -> None:
        self.num_speculative_tokens: int = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len: int = vllm_config.model_config.max_model_len
        self.vocab_size: int = vllm_config.model_config.get_vocab_size()
        additional = vllm_config.additional_config
        raw = additional.get(OPTIONS_KEY, {}) if isinstance(additional, dict) else {}
        try:
            self.options = msgspec.convert(raw, self.Options)
        except msgspec.ValidationError as e:
            raise ValueError(f"additional_config.{OPTIONS_KEY}: {e}") from None
        self.input_batch: Any = None

    def observe_step(self, runner: Any, logits: Any, spec_decode_metadata: Any) -> None:
        """Called before sampling (`patches/proposer_step.py`): keeps the runner's input batch,
        whose rows `propose` gets, for request ids and prompt lengths."""
        self.input_batch = runner.input_batch

    def load_model(self, *args: Any, **kwargs: Any) -> None:  # noqa: B027 (vLLM calls it)
        """Nothing to load: the drafts come from tables, not from a model."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        """Drafts per batch row (up to `num_speculative_tokens`, none past `max_model_len`)."""
        if self.input_batch is None:
            raise RuntimeError(f"{type(self).__name__} needs vllm-blockdiff's patch "
                               "proposer_step (the plugin applies it on vLLM 0.26)")
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        rows = [i for i, new in enumerate(sampled_token_ids) if new]
        if not rows:
            return drafts
        index = np.asarray(rows)
        lengths = num_tokens_no_spec[index].astype(np.int64)
        budgets = np.minimum(self.num_speculative_tokens, self.max_model_len - 1 - lengths)
        new_tokens = [sampled_token_ids[i] for i in rows]
        for i, draft in zip(rows, self.draft(index, lengths, budgets, new_tokens, token_ids_cpu),
                            strict=True):
            drafts[i] = draft
        return drafts

    @abstractmethod
    def draft(self, rows: np.ndarray, lengths: np.ndarray, budgets: np.ndarray,
              new_tokens: list[list[int]], history: np.ndarray) -> list[list[int]]:
        """Drafts for `rows` of `history`, whose tokens end at `lengths`; the last
        `len(new_tokens[j])` of row j were verified in the step that just ran."""
