"""Lets a `custom_class` speculative proposer see the step it drafts for.

vLLM 0.26's V1 model runner (the runner of AR models with a custom proposer) calls a custom
proposer's `propose` with the sampled ids and the token history only: no logits, no request ids.
Token Recycling refreshes its table from the target's top-k at every position the step scored,
rejected drafts included, and the input-copy proposer keeps per-request alignments. Before
sampling, this patch calls the drafter's `observe_step(runner, logits, spec_decode_metadata)` when
it defines one; the logits carry the structured-output masks and nothing else yet. Any other
drafter, or none, costs one attribute lookup per step.
"""

from __future__ import annotations

import torch
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def apply() -> None:
    @wrap_once(GPUModelRunner, "_sample")
    def _sample(original, self, logits: torch.Tensor | None,
                spec_decode_metadata: SpecDecodeMetadata | None):
        observe = getattr(getattr(self, "drafter", None), "observe_step", None)
        if observe is not None and logits is not None:
            observe(self, logits, spec_decode_metadata)
        return original(self, logits, spec_decode_metadata)
