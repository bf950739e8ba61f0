"""Structured outputs of AR models on CPU: Model Runner V2's grammar bitmask applied on the host.

With this plugin's Triton CPU backend installed, vLLM 0.26 runs AR models on CPU with Model
Runner V2 (it picks V1 only where Triton does not import). V2's `StructuredOutputsWorker.
apply_grammar_bitmask` (v1/worker/gpu/structured_outputs.py) copies the bitmask through pinned
memory on a CUDA stream and masks with a Triton kernel: on CPU the first request with a
`json_schema`, regex or grammar killed the engine ("Found no NVIDIA driver"). On CPU this patch
sets the disallowed logits of the constrained requests' rows to -inf in place on the host (the
same rows and bits as the kernel); on GPUs nothing changes.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.structured_outputs import StructuredOutputsWorker

from vllm_blockdiff.grammar import bitmask as bits
from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def apply() -> None:
    @wrap_once(StructuredOutputsWorker, "apply_grammar_bitmask")
    def apply_grammar_bitmask(original, self, logits: torch.Tensor, input_batch: InputBatch,
                              grammar_req_ids: list[str], grammar_bitmask: np.ndarray) -> None:
        if logits.device.type != "cpu" or not grammar_req_ids:
            return original(self, logits, input_batch, grammar_req_ids, grammar_bitmask)
        # One bitmask row per logit row of the constrained requests, in their order (as vLLM's).
        index = {req_id: i for i, req_id in enumerate(input_batch.req_ids)}
        cu = input_batch.cu_num_logits_np
        rows = torch.from_numpy(np.concatenate([np.arange(cu[index[r]], cu[index[r] + 1])
                                                for r in grammar_req_ids]))
        target = logits[rows]
        bits.apply(target, torch.from_numpy(grammar_bitmask[:len(rows)]))
        logits[rows] = target
