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

from vllm_blockdiff.engine.validation import grammar_of
from vllm_blockdiff.options import resolve_options, serve_config_of
from vllm_blockdiff.policies.block_switch import (
    NEVER,
    block_length_at,
    fine_block_length,
    marker_of,
    switch_position,
)
from vllm_blockdiff.policies.subblock import cached_query, cached_sub_block


@dataclass
class _Progress:
    block_length: int
    drafts: int = 1  # drafts of the block per forward the policy asks for (FreeDave)
    forwards: int = 0
    query_tokens: int = 0  # computed over all its forwards (prompt, recomputed KV, canvases)
    block_start: int = -1  # of the last scheduled step: a block's first step has one draft
    # Block-length switch at a marker (TCCF, `policies/block_switch.py`).
    marker: int | None = None
    fine_block_length: int = 1
    switch_at: int = NEVER
    scanned: int = 0  # output tokens already searched for the marker
    # Sub-block cache (`policies/subblock.py`): its sub-block length (0: off) and the start of
    # the block whose KV a refresh left in the cache; the workers track the same.
    cache_sub: int = 0
    cache_block: int = -1

    def cached(self, num_tokens: int) -> tuple[bool, int, int]:
        """Whether the next step runs only the active sub-block, and its bounds (meaningless
        where it does not)."""
        if not self.cache_sub:  # per request and step: skip numpy when there is no cache
            return False, 0, 0
        b = self.block_length_at(num_tokens)
        start = num_tokens // b * b
        cached, sub_start, sub_end = cached_query(start, num_tokens - start, b, self.cache_sub,
                                                  self.cache_block == start)
        return bool(cached), int(sub_start), int(sub_end)

    def block_length_at(self, position: int) -> int:
        return int(block_length_at(position, self.block_length, self.fine_block_length,
                                   self.switch_at))

    def blocks(self, prompt_len: int, end: int) -> int:
        """Blocks the output spans (fine blocks after a switch)."""
        b, switch = self.block_length, min(self.switch_at, end)
        coarse = max(-(-switch // b) - prompt_len // b, 0)
        return coarse + -(-(end - switch) // self.fine_block_length)

    def observe(self, request: Request) -> None:
        if self.marker is None or self.switch_at != NEVER:
            return
        new = request.output_token_ids[self.scanned:]
        self.switch_at = switch_position(new, request.num_prompt_tokens + self.scanned,
                                         self.marker, self.block_length)
        self.scanned += len(new)


class BlockDiffusionScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.serve = serve_config_of(vllm_config.model_config.hf_config)
        self._progress: dict[str, _Progress] = {}
        # Shifted-logit models predict a block's first position from the position before it,
        # which therefore stays in every query (its KV is final; it is recomputed).
        self._shift = int(self.serve.shifted_logits)

    def add_request(self, request: Request) -> None:
        if request.request_id not in self._progress:
            options = resolve_options(request.sampling_params.extra_args, self.serve)
            drafts = getattr(options.params, "drafts", 1)
            marker, fine = marker_of(options), fine_block_length(options)
            self._progress[request.request_id] = _Progress(options.block_length, drafts,
                                                           marker=marker, fine_block_length=fine,
                                                           cache_sub=cached_sub_block(options))
            # Block-causal KV depends on the block length(s): keep it out of other caches.
            salt = f"blockdiff:B={options.block_length}"
            if marker is not None:
                salt += f",then {fine} after {marker}"
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
            request.block_hashes = []
            request.update_block_hashes()
        super().add_request(request)

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        mask = self.serve.mask_token_id
        for request in self.running:
            request.spec_token_ids = [mask] * self._canvas_size(request)
        return super().schedule(*args, **kwargs)

    def _canvas_size(self, request: Request) -> int:
        """The masked rest of the block, plus a whole copy of the block per extra draft.

        Drafts (FreeDave) need the previous step's predictions, so a block's first step runs
        one; they are limited by the canvas length and must fit below max_model_len whole.
        """
        progress = self._progress[request.request_id]
        n = request.num_tokens
        cached, _, sub_end = progress.cached(n)
        if cached:
            return sub_end - n
        b = progress.block_length_at(n)
        start = n // b * b
        rest = start + b - n
        extra = 0
        if progress.drafts > 1 and start == progress.block_start:
            room = min(self.serve.canvas_length - rest, self.max_model_len - 1 - n - rest)
            extra = max(0, min(progress.drafts - 1, room // b))
        progress.block_start = start
        return rest + extra * b

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
            progress.query_tokens += scheduler_output.num_scheduled_tokens[req_id]
            drafts = len(scheduler_output.scheduled_spec_decode_tokens.get(req_id, ()))
            num_tokens = request.num_computed_tokens - drafts
            b = progress.block_length_at(num_tokens)
            start = num_tokens // b * b
            computed[req_id] = max(start - self._shift, 0)
            if progress.cache_sub and drafts == start + b - num_tokens > 0 and num_tokens > start:
                # The whole block ran after its AR step: a refresh of its cached KV.
                first = request.num_computed_tokens - scheduler_output.num_scheduled_tokens[req_id]
                if first <= computed[req_id]:
                    progress.cache_block = start
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, num_computed in computed.items():
            request = self.requests.get(req_id)
            if request is not None and not request.is_finished():
                progress = self._progress[req_id]
                cached, sub_start, _ = progress.cached(request.num_tokens)
                # From the cache the next step runs the active sub-block, keeping the KV before it.
                request.num_computed_tokens = sub_start if cached else num_computed
                progress.observe(request)
        return outputs

    def _preempt_request(self, request: Request, timestamp: float) -> None:
        super()._preempt_request(request, timestamp)
        # The workers take a resumed request afresh: no block KV of it is cached any more.
        progress = self._progress.get(request.request_id)
        if progress is not None:
            progress.cache_block = -1

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        kv_params, ec_params = super()._free_request(request, delay_free_blocks)
        progress = self._progress.pop(request.request_id, None)
        if progress is not None:
            tokens = request.num_output_tokens
            b = progress.block_length
            blocks = progress.blocks(request.num_prompt_tokens, request.num_prompt_tokens + tokens)
            stats = {
                "forwards": progress.forwards,
                "query_tokens": progress.query_tokens,
                "output_tokens": tokens,
                "tokens_per_forward": round(tokens / max(progress.forwards, 1), 4),
                "block_length": b,
                "blocks": blocks,
                # the first forward is the prompt; each block costs its denoising steps, the
                # recomputation of a finished block riding on the next block's first step
                "forwards_per_block": round((progress.forwards - 1) / max(blocks, 1), 4),
            }
            params = request.sampling_params
            if params is not None and (spec := grammar_of(params.extra_args)) is not None:
                # Which compiler enforced the constraint, and whether its grammar may admit
                # outputs the schema rejects (decided in the API server: grammar/auto.py).
                stats["grammar"] = {"backend": spec.backend, "approximated": spec.approximated,
                                    "rewritten": spec.rewritten}
            kv_params = {**(kv_params or {}), "blockdiff": stats}
        return kv_params, ec_params
