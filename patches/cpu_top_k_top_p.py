"""Top-k / top-p on CPU through vLLM's PyTorch path, whatever Triton backend is installed.

vLLM 0.26's `apply_top_k_top_p` (v1/sample/ops/topk_topp_sampler.py) sends CPU logits to its
Triton kernel whenever Triton imports. This plugin installs a Triton CPU backend (Triton's
interpreter, for its own kernels), and vLLM's top-k/top-p kernel fails there ("'int' object has
no attribute 'to'"): any request with `top_k` or `top_p` killed the engine of every model on a
CPU server, AR models included, and speculative decoding could not start. On CPU this patch
takes vLLM's own PyTorch implementation instead; on GPUs nothing changes.

The function is bound by name in the modules that import it, so each binding is replaced.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.ops import topk_topp_sampler

from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)
# Modules that import `apply_top_k_top_p` by name (vLLM 0.26).
_USERS = ("vllm.v1.sample.ops.topk_topp_sampler", "vllm.v1.sample.rejection_sampler",
          "vllm.v1.worker.gpu.sample.states", "vllm.v1.worker.gpu.sample.sampler")


def apply() -> None:
    @wrap_once(topk_topp_sampler, "apply_top_k_top_p", users=_USERS)
    def apply_top_k_top_p(original, logits: torch.Tensor, k: torch.Tensor | None,
                          p: torch.Tensor | None) -> torch.Tensor:
        if logits.device.type == "cpu" and (k is not None or p is not None):
            return topk_topp_sampler.apply_top_k_top_p_pytorch(logits, k, p,
                                                                allow_cpu_sync=True)
        return original(logits, k, p)
