"""The diffusion-aware scheduler: vLLM's scheduler with block-diffusion token accounting.

vLLM schedules `num_tokens + len(spec_token_ids) - num_computed_tokens` tokens per request. This
subclass sets the draft ("spec") tokens of every running request to the masked remainder of its
current block, so each step's query is exactly what block diffusion needs: the whole prompt on
the first step, then the current block, or the just-finished block (recomputed with its final
tokens) plus the next one. After the step it winds `num_computed_tokens` back to the current
block's start, because only KV produced from final tokens may stay cached. Everything else
(admission, paged KV, preemption, stop checks, outputs, metrics) is vLLM's own.

With asynchronous scheduling (`--async-scheduling`) a step is planned while the previous one
runs, before its tokens are known, so a query cannot depend on them. A request that needs no
host work per step (`block_state.runs_windows`) then runs a fixed window of two blocks from the
start of the block its last step denoised: the workers decide on the device whether that block
is still open (the second block then waits, masked) or finished (it is recomputed with its final
tokens and the second block takes its first step); KV stays computed up to the block the step
denoised, which the host learns one step late. Other requests keep the synchronous rule and wait
while a step of theirs is in flight.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from vllm_blockdiff.engine.block_state import runs_windows
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

# What a request's step ran, kept until its output is processed (`_Progress.pending`).
CHUNK, CANVAS, WINDOW = "chunk", "canvas", "window"  # prompt only; synchronous rule; a window


def _window_end(known: int, block_length: int, end: int) -> int:
    """Where KV stays computed after a window whose query ended at `end`, with `known` tokens
    known before it: the start of the block it denoised (the one holding the first unknown
    token), unless the window was cut short inside the finished block before that one, which
    is then recomputed again (the workers decide the same: `BlockDiffusionSampler._rejected`)."""
    start = known // block_length * block_length
    return start if end >= start else start - block_length


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
    # Asynchronous scheduling: whether the request runs windows once a canvas of it has run
    # (`ran`), and what each of its steps not yet processed ran, with the tokens known before it.
    windows: bool = False
    ran: bool = False
    pending: deque = field(default_factory=deque)

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
            constrained = grammar_of(request.sampling_params.extra_args) is not None
            windows = self.serve.windows and runs_windows(options, constrained, self.serve)
            self._progress[request.request_id] = _Progress(options.block_length, drafts,
                                                           marker=marker, fine_block_length=fine,
                                                           cache_sub=cached_sub_block(options),
                                                           windows=windows)
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
        windows = set()
        for request in self.running:
            progress = self._progress[request.request_id]
            if (start := self._window(request, progress)) is not None:
                request.num_computed_tokens = start
                size = start + 2 * progress.block_length - request.num_tokens
                windows.add(request.request_id)
            elif progress.pending and not self._after_chunks(request, progress):
                # its last step's outcome decides this one: wait for it
                request.next_decode_eligible_step = self.current_step + 2
                continue
            else:
                size = self._canvas_size(request)
            request.spec_token_ids = [mask] * size
        output = super().schedule(*args, **kwargs)
        for req_id in output.num_scheduled_tokens:
            progress = self._progress[req_id]
            drafts = len(output.scheduled_spec_decode_tokens.get(req_id, ()))
            progress.ran |= drafts > 0
            computed = self.requests[req_id].num_computed_tokens  # where the step's query ends
            if req_id in windows:  # planned from fewer tokens than it runs with: see the update
                progress.pending.append((WINDOW, -1, computed))
            else:  # the tokens known before the step (a prompt chunk: computed so far)
                progress.pending.append((CANVAS if drafts else CHUNK, computed - drafts, computed))
        return output

    def _window(self, request: Request, progress: _Progress) -> int | None:
        """The start of the window the request's next step runs, or None where it runs none
        (`block_state.BlockStates.windows` decides the same on the workers from the same counts).
        Its drafts are the two blocks from there, less the tokens known there."""
        if not (progress.windows and progress.ran):
            return None
        start = self._window_start(request, progress)
        return start if start + 2 * progress.block_length <= self.max_model_len else None

    def _window_start(self, request: Request, progress: _Progress) -> int:
        """Where the KV the workers keep ends. With the request's last step in flight (a window),
        its outcome is `_window_end` of the tokens known now; once processed,
        `update_from_output` left it in `num_computed_tokens`."""
        if progress.pending:
            _, _, end = progress.pending[-1]
            return _window_end(request.num_tokens, progress.block_length, end)
        return request.num_computed_tokens

    def _after_chunks(self, request: Request, progress: _Progress) -> bool:
        """Whether only prompt chunks are in flight: they commit nothing, so the KV they leave
        is known (up to the start of the block their end falls in) and need not be waited for."""
        if any(ran != CHUNK for ran, _, _ in progress.pending):
            return False
        known = progress.pending[-1][1]
        b = progress.block_length_at(known)
        request.num_computed_tokens = max(known // b * b - self._shift, 0)
        return True

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
            progress = self._progress.get(req_id)
            if request is None or progress is None:
                continue
            ran, num_tokens, end = progress.pending.popleft()
            progress.forwards += 1
            progress.query_tokens += scheduler_output.num_scheduled_tokens[req_id]
            drafts = len(scheduler_output.scheduled_spec_decode_tokens.get(req_id, ()))
            if ran == WINDOW:  # the tokens known before it: the host knows them now
                num_tokens = request.num_tokens
            b = progress.block_length_at(num_tokens)
            start = num_tokens // b * b
            if progress.pending:  # a window planned since: it set its own start
                continue
            if ran == WINDOW:
                start = _window_end(num_tokens, b, end)
            computed[req_id] = max(start - self._shift, 0)
            if progress.cache_sub and drafts == start + b - num_tokens > 0 and num_tokens > start:
                # The whole block ran after its AR step: a refresh of its cached KV.
                first = num_tokens + drafts - scheduler_output.num_scheduled_tokens[req_id]
                if first <= computed[req_id]:
                    progress.cache_block = start
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, num_computed in computed.items():
            request = self.requests.get(req_id)
            # (Asynchronous scheduling may have preempted it meanwhile: it restarts from 0.)
            if request is not None and request.status == RequestStatus.RUNNING:
                progress = self._progress[req_id]
                cached, sub_start, _ = progress.cached(request.num_tokens)
                # From the cache the next step runs the active sub-block, keeping the KV before it.
                request.num_computed_tokens = sub_start if cached else num_computed
                progress.observe(request)
        return outputs

    def _preempt_request(self, request: Request, timestamp: float) -> None:
        super()._preempt_request(request, timestamp)
        # The workers take a resumed request afresh: no block KV of it is cached any more, and
        # its first step (a prompt) runs no window.
        progress = self._progress.get(request.request_id)
        if progress is not None:
            progress.cache_block = -1
            progress.ran = False

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
