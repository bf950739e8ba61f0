"""Seeded sampling on CPU without vLLM's Triton Gumbel kernel.

Model Runner V2 in vLLM 0.26 samples every non-greedy token with `gumbel_sample`
(v1/worker/gpu/sample/gumbel.py), a Triton kernel. With this plugin's Triton CPU backend that
kernel runs in Triton's interpreter, which lacks the libdevice call it uses: any request with a
temperature above 0 killed the engine of an AR model served on CPU. On CPU this patch samples
the same way on the host (temperature, then argmax of the logits plus Gumbel noise keyed by the
request's seed and the token's position, `kernels/gumbel_host.py`); greedy rows take the argmax.
Calls that also ask for the processed logits, and every call on a GPU, keep vLLM's kernel.

The function is bound by name in the modules that import it, so each binding is replaced.
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu.sample import gumbel

from vllm_blockdiff.kernels.gumbel_host import gumbel_sample_host
from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)
# Modules that import `gumbel_sample` by name (vLLM 0.26).
_USERS = ("vllm.v1.worker.gpu.sample.gumbel", "vllm.v1.worker.gpu.sample.sampler",
          "vllm.v1.worker.gpu.spec_decode.speculator")


def apply() -> None:
    @wrap_once(gumbel, "gumbel_sample", users=_USERS)
    def gumbel_sample(original, logits: torch.Tensor, expanded_idx_mapping: torch.Tensor,
                      temperature: torch.Tensor, seed: torch.Tensor, pos: torch.Tensor,
                      apply_temperature: bool, output_processed_logits=None,
                      output_processed_logits_col=None, use_fp64: bool = False
                      ) -> torch.Tensor:
        if logits.device.type != "cpu" or output_processed_logits is not None:
            return original(logits, expanded_idx_mapping, temperature, seed, pos,
                            apply_temperature, output_processed_logits,
                            output_processed_logits_col, use_fp64)
        req = expanded_idx_mapping.long()
        temp = temperature[req].to(torch.float64 if use_fp64 else torch.float32)
        greedy = temp == 0
        x = logits.to(temp.dtype)
        if apply_temperature:
            x = x / torch.where(greedy, 1.0, temp)[:, None]
        sampled = gumbel_sample_host(x, seed[req].numpy(), pos.long().numpy())
        return torch.where(greedy, x.argmax(-1), sampled)
