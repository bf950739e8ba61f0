"""The diffusion-aware scheduler: vLLM's scheduler with block-diffusion token accounting.

vLLM schedules `num_tokens + len(spec_token_ids) - num_computed_tokens` tokens per request. This
subclass sets the draft ("spec") tokens of every running request to the masked remainder of its
current block, so each step's query is exactly what block diffusion needs: the whole prompt on
the first step, then the current block, or the just-finished block (recomputed with its final
tokens) plus the next one. After the step it winds `num_computed_tokens` back to the current
block's start, because only KV produced from final tokens may stay cached. Everything else
(admission, paged KV, preemption, stop checks, outputs, metrics) is vLLM's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
from vllm.v1.request import Request

from vllm_blockdiff.options import resolve_options, serve_config_of


@dataclass
class _Progress:
    block_length: int
    forwards: int = 0


class BlockDiffusionScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.serve = serve_config_of(vllm_config.model_config.hf_config)
        self._progress: dict[str, _Progress] = {}

    def add_request(self, request: Request) -> None:
        if request.request_id not in self._progress:
            options = resolve_options(request.sampling_params.extra_args, self.serve)
            self._progress[request.request_id] = _Progress(options.block_length)
            # Block-causal KV depends on the block length: keep it out of other lengths' caches.
            salt = f"blockdiff:B={options.block_length}"
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
            request.block_hashes = []
            request.update_block_hashes()
        super().add_request(request)

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        mask = self.serve.mask_token_id
        for request in self.running:
            b = self._progress[request.request_id].block_length
            n = request.num_tokens
            request.spec_token_ids = [mask] * (n // b * b + b - n)
        return super().schedule(*args, **kwargs)

    def update_draft_token_ids(self, draft_token_ids: DraftTokenIds) -> None:
        """Canvas sizes come from `schedule`; the runner keeps the canvas values itself."""

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, Any]:
        computed: dict[str, int] = {}
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None:
                continue
            progress = self._progress[req_id]
            progress.forwards += 1
            drafts = len(scheduler_output.scheduled_spec_decode_tokens.get(req_id, ()))
            b = progress.block_length
            computed[req_id] = (request.num_computed_tokens - drafts) // b * b
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, num_computed in computed.items():
            request = self.requests.get(req_id)
            if request is not None and not request.is_finished():
                request.num_computed_tokens = num_computed
        return outputs

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        kv_params, ec_params = super()._free_request(request, delay_free_blocks)
        progress = self._progress.pop(request.request_id, None)
        if progress is not None:
            tokens = request.num_output_tokens
            b = progress.block_length
            end = request.num_prompt_tokens + tokens
            blocks = -(-end // b) - request.num_prompt_tokens // b
            stats = {
                "forwards": progress.forwards,
                "output_tokens": tokens,
                "tokens_per_forward": round(tokens / max(progress.forwards, 1), 4),
                "block_length": b,
                "blocks": blocks,
                # the first forward is the prompt; each block costs its denoising steps, the
                # recomputation of a finished block riding on the next block's first step
                "forwards_per_block": round((progress.forwards - 1) / max(blocks, 1), 4),
            }
            kv_params = {**(kv_params or {}), "blockdiff": stats}
        return kv_params, ec_params
