"""Model Runner V2 sampler for block diffusion: propose, let the policy commit, emit the prefix.

Each forward gives logits for the masked remainder of every request's current block (the canvas,
scheduled as draft tokens). Per step and request the sampler
  1. proposes a token and its confidence at every canvas position, with the request's own
     temperature / top-k / top-p / seed (vLLM's sampling states and Gumbel sampler). Each logit
     row sees only its own request's parameters: greedy rows are an argmax of logits no other
     row's temperature, filters or noise touched, so a greedy request's output does not depend
     on what shares its batch,
  2. asks the request's policy which masked positions to commit,
  3. emits the committed positions that are contiguous with the emitted text (vLLM then applies
     EOS, stop tokens, stop strings and max_tokens token by token, exactly as for AR models),
  4. reports `num_rejected` so that vLLM keeps only KV computed from final tokens: everything up
     to the current block's start. A finished block is therefore recomputed once more, fused with
     the first denoising step of the next block (block-causal attention makes that one forward).

Per step: the host plans from the scheduler's counts (numpy) and uploads the plan in one pinned
copy; proposals are one pass per logit row (`kernels/vocab_pass.py`); the rest (`tail`: load the
block state, the policies, commit, emit, store) is tensor work over all canvases, one policy call
per policy present, with parameters kept on the device. No Python loop over requests touches the
device and nothing waits for it, except for grammars (masks and runs: host work per constrained
request), FreeDave's drafts and TCCF markers. Steps without those replay `tail` from a CUDA graph
(`TailGraphs`). A window (asynchronous scheduling, `engine/scheduler.py`) is planned before the
tokens of the step in flight are known: its block start and first open offset are read from the
device block state inside `tail`, which also moves its logit rows to the open block.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p, apply_top_k_top_p_pytorch
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.sample.gumbel import gumbel_sample
from vllm.v1.worker.gpu.sample.output import SamplerOutput
from vllm.v1.worker.gpu.sample.sampler import Sampler
from vllm.v1.worker.gpu.sample.states import SamplingStates
from vllm.v1.worker.gpu.states import RequestState

from vllm_blockdiff.engine.block_state import POLICY_NAMES, BlockStates
from vllm_blockdiff.grammar import bitmask
from vllm_blockdiff.kernels.gumbel_host import gumbel_sample_host
from vllm_blockdiff.kernels.vocab_pass import vocab_stats
from vllm_blockdiff.policies import POLICIES, PolicyInput, freedave
from vllm_blockdiff.policies.block_switch import NEVER
from vllm_blockdiff.transfer import Staging

# The runner reads `penalties_state.output_bin_counts`; block diffusion keeps no token counts.
_NO_PENALTIES = SimpleNamespace(output_bin_counts=None)
_PARALLEL_MASK_ROWS = 64  # below this many constrained requests, threads cost more than they save


def fill_masks(constraints: list, masks: torch.Tensor,
               pool: ThreadPoolExecutor | None = None) -> None:
    """Row j of `masks` = the tokens constraint j allows next; on `pool`'s threads if given.

    Inference mode is per thread: the pool's threads enter the caller's, or writing into
    `masks` (an inference tensor while sampling) would fail.
    """
    inference = torch.is_inference_mode_enabled()

    def fill(j: int) -> None:
        with torch.inference_mode(inference):
            constraints[j].fill_bitmask(masks, j)

    if pool is None:
        for j in range(len(constraints)):
            fill(j)
    else:
        list(pool.map(fill, range(len(constraints))))


class StepPlan:
    """Host-side plan of one step, derived from the scheduler's token counts."""

    def __init__(self, input_batch: InputBatch, states: BlockStates, max_model_len: int,
                 sampling: SamplingStates, shift: int = 0):
        r = input_batch.num_reqs
        self.slots = input_batch.idx_mapping_np[:r]
        query = input_batch.num_scheduled_tokens[:r].astype(np.int64)
        computed = input_batch.num_computed_tokens_np[:r].astype(np.int64)
        drafts = input_batch.num_draft_tokens_per_req
        self.drafts = np.zeros(r, np.int64) if drafts is None else drafts[:r].astype(np.int64)
        end = computed + query
        num_tokens = end - self.drafts
        self.num_tokens = num_tokens
        self.block_length = np.maximum(states.block_lengths(self.slots, num_tokens), 1)
        block_start = num_tokens // self.block_length * self.block_length
        self.offset = num_tokens - block_start
        self.rest = self.block_length - self.offset  # the open part of the block: draft 0
        self.block_start, self.end = block_start, end
        # Windows (`engine/scheduler.py`): the device decides which of the two blocks is denoised.
        self.window = states.windows(self.slots, computed)
        # Further drafts (FreeDave) are whole copies of the block (`engine/layout.py`).
        extra = self.drafts - self.rest
        full_canvas = (self.drafts > 0) & (extra >= 0) & (extra % self.block_length == 0)
        # Sub-block cache (`policies/subblock.py`): a request whose block KV comes from a refresh
        # runs only its active sub-block; a full canvas there is the rest of that sub-block.
        cached, sub_end, _ = states.sub_block_steps(self.slots, num_tokens, self.drafts)
        sub = states.cache_sub_np[self.slots]
        valid = states.cache_block_np[self.slots] == block_start
        full_canvas = np.where(cached, self.drafts == sub_end - num_tokens, full_canvas)
        # A forward over the whole block after its AR step refreshes the block's cached KV.
        self.refreshed = ((sub > 0) & ~cached & (self.drafts == self.rest) & (self.offset > 0)
                          & (computed <= np.maximum(block_start - shift, 0)))
        # The sub-block length with which the next step may run from the cache (0: it cannot).
        self.cache_sub = np.where(valid | self.refreshed, sub, 0)
        # A canvas cut short by max_model_len is denoised as is (the request ends there); one cut
        # short by the token budget is not denoised at all, so batching never changes outputs.
        self.denoise = (self.drafts > 0) & (full_canvas | (end >= max_model_len))
        self.denoise = np.where(self.window, query == 2 * self.block_length, self.denoise)
        # A request whose grammar still compiles waits: the step is redone once it is ready.
        self.constrained = states.constrained_np[self.slots]
        for i in np.flatnonzero(self.denoise & self.constrained):
            self.denoise[i] = states.grammar_ready(int(self.slots[i]))
        # Drafts side by side (FreeDave); one for every other policy.
        self.num_drafts = np.where(self.denoise & ~self.window,
                                   1 + np.maximum(extra, 0) // self.block_length, self.denoise)
        # Requests whose policy drafts (FreeDave), and those of them denoised this step.
        self.drafting = states.verifies_drafts_np[self.slots]
        self.verify = self.denoise & self.drafting
        # Denoising requests grouped by policy: (name, start, end) into `group_rows`, or, when
        # the whole batch shares one policy, one group of every row (no gathers).
        policy = states.policy_np[self.slots]
        names = np.unique(policy[self.denoise])
        if len(names) == 1 and (policy == names[0]).all():
            self.group_rows = np.zeros(0, np.int64)
            self.groups = [(POLICY_NAMES[names[0]], None, None)]
        else:
            rows = [np.flatnonzero(self.denoise & (policy == k)) for k in names]
            self.group_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
            ends = np.cumsum([len(r) for r in rows])
            self.groups = [(POLICY_NAMES[k], int(e - len(r)), int(e))
                           for k, r, e in zip(names, rows, ends, strict=True)]
        # Logit rows (one per draft token) of greedy requests, and of requests that filter their
        # proposals with top-k / top-p (never greedy ones: SamplingParams resets them).
        self.greedy_row = np.repeat(sampling.temperature.np[self.slots] == 0.0, self.drafts)
        self.sampled_rows = np.flatnonzero(~self.greedy_row)
        self.filtered = ((sampling.top_k.np[self.slots] != sampling.vocab_size)
                         | (sampling.top_p.np[self.slots] != 1.0))
        self.filter_rows = np.flatnonzero(np.repeat(self.filtered, self.drafts))
        # Every logit row (one per draft token): its request, draft and block offset.
        rows_req = np.repeat(np.arange(r), self.drafts)
        rows_local = np.arange(len(rows_req)) - (np.cumsum(self.drafts) - self.drafts)[rows_req]
        rest, b = self.rest[rows_req], self.block_length[rows_req]
        beyond = np.maximum(rows_local - rest, 0)  # into the extra drafts (whole blocks)
        k = np.where(rows_local < rest, 0, 1 + beyond // b)
        col = np.where(rows_local < rest, rows_local + self.offset[rows_req], beyond % b)
        # A window's rows on the grid: those of its second block (`BlockDiffusionSampler.tail`
        # moves them to the first where that is the one denoised).
        second = rows_local - (self.drafts[rows_req] - b)
        window = self.window[rows_req]
        self.rows = (rows_req, np.where(window, np.where(second >= 0, 0, -1), k),
                     np.where(window, second, col))

    def request_rows(self, pad: int = 0, scratch: int = 0) -> np.ndarray:
        """[8, R + pad]: the fields of `_Req`; padding rows are inert requests on the scratch
        slot. A request that ran no canvas has offset -1: its query may stop short of its known
        tokens, so the plan cannot tell its offset; nor can it for a window."""
        offset = np.where((self.drafts > 0) & ~self.window, self.offset, -1)
        rows = np.stack([self.slots, offset, self.block_length, self.denoise, self.block_start,
                         self.end, self.cache_sub, self.window])
        padding = np.array([[scratch], [0], [1], [0], [0], [0], [0], [0]]).repeat(pad, axis=1)
        return np.concatenate([rows.astype(np.int64), padding], axis=1)

    def grid_rows(self, canvas_length: int, pad: int = 0) -> np.ndarray:
        """[R + pad, canvas]: the logit row proposing each position of a denoised request's
        open block (its first draft), -1 elsewhere."""
        rows_req, rows_k, rows_col = self.rows
        keep = self.denoise[rows_req] & (rows_k == 0)
        grid = np.full((len(self.slots) + pad, canvas_length), -1, dtype=np.int64)
        grid[rows_req[keep], rows_col[keep]] = np.flatnonzero(keep)
        return grid


@dataclass
class GrammarStats:
    """What enforcing grammars costs and saves (read by benchmarks/structured.py)."""

    steps: deque = field(default_factory=lambda: deque(maxlen=100_000))  # host s per step
    host_seconds: float = 0.0  # of the current step
    committed: int = 0  # tokens committed under a grammar
    forced: int = 0  # of which the grammar filled in (not the policy's proposal)

    def count(self, run: list[int], proposed: list[int], chosen: list[bool]) -> None:
        self.committed += len(run)
        self.forced += sum(j > 0 and not (chosen[j] and t == proposed[j])
                           for j, t in enumerate(run))


class _Req(NamedTuple):
    """Per-request inputs of a step's tensor work, [R] each (padded rows: the scratch slot)."""

    slots: torch.Tensor
    offset: torch.Tensor  # first open block offset (the emitted prefix ends there)
    block_length: torch.Tensor
    denoise: torch.Tensor  # bool: the request's canvas ran this forward
    block_start: torch.Tensor
    end: torch.Tensor  # of the step's query
    cache_sub: torch.Tensor  # `StepPlan.cache_sub`
    window: torch.Tensor  # bool: the request ran a window (its block state is on the device)

    @classmethod
    def of(cls, rows: torch.Tensor) -> _Req:
        """From the [8, R] int64 rows of `StepPlan.request_rows`."""
        return cls(rows[0], rows[1], rows[2], rows[3] != 0, rows[4], rows[5], rows[6],
                   rows[7] != 0)


REQ_ROWS = len(_Req._fields)


class _Device(NamedTuple):
    """The step plan's arrays on the device (one host-to-device copy per step)."""

    req: _Req
    grid_row: torch.Tensor  # [R, canvas] the logit row proposing each open position, or -1
    logit_req: torch.Tensor  # the request of every logit row
    drafts_req: torch.Tensor  # logit rows of requests that verify drafts: their request ...
    drafts_k: torch.Tensor  # ... draft ...
    drafts_col: torch.Tensor  # ... block offset ...
    drafts_logit: torch.Tensor  # ... and index into the logits
    num_drafts: torch.Tensor  # drafts each request ran
    greedy_row: torch.Tensor  # [logit rows] bool: the row's request is greedy
    filter_rows: torch.Tensor  # logit rows whose request uses top-k / top-p
    group_rows: torch.Tensor  # denoising requests by policy (`StepPlan.groups`)


class _Tail(NamedTuple):
    """What a step's tensor work leaves for the runner and the host-side hooks."""

    sampled: torch.Tensor  # [R, canvas] the emitted tokens, left-aligned
    num_sampled: torch.Tensor  # [R] int32
    next_canvas: torch.Tensor  # [R, canvas] the next step's draft tokens
    canvas: torch.Tensor
    committed: torch.Tensor
    offset: torch.Tensor  # the next step's first open offset
    rejected: torch.Tensor  # [R] int32: query tokens whose KV is recomputed next step


class BlockDiffusionSampler:
    def __init__(
        self,
        base: Sampler,
        states: BlockStates,
        req_states: RequestState,
        max_model_len: int,
        draft_capacity: int,
        max_logit_rows: int = 0,
        cuda_graphs: bool = False,
        shifted_logits: bool = False,
        default_policy: str | None = None,
    ):
        self.base = base
        self.sampling_states = base.sampling_states
        self.penalties_state = _NO_PENALTIES
        self.states = states
        self.req_states = req_states
        self.max_model_len = max_model_len
        self.canvas_length = states.max_block_length
        self.draft_capacity = draft_capacity  # draft tokens a request may run per forward
        self.shift = int(shifted_logits)  # logit row j was computed at position j - shift
        self._staging = Staging(states.canvas.device)
        self.grammar_stats = GrammarStats()
        # Large batches fill grammar masks on threads (the matchers release the GIL), as vLLM's
        # structured-output manager does.
        self._mask_pool = ThreadPoolExecutor(max_workers=min(8, max(1, (os.cpu_count() or 2) // 2)),
                                             thread_name_prefix="blockdiff-mask")
        self._graphs = TailGraphs(self, max_logit_rows) if cuda_graphs else None
        if self._graphs is not None and default_policy is not None:
            self._graphs.capture(default_policy)

    def add_request(self, req_idx: int, prompt_len: int, sampling_params) -> None:
        self.base.sampling_states.add_request(req_idx, sampling_params)
        self.base.logit_bias_state.add_request(req_idx, prompt_len, sampling_params)

    def apply_staged_writes(self) -> None:
        self.base.sampling_states.apply_staged_writes()
        self.base.logit_bias_state.apply_staged_writes()

    def _upload(self, plan: StepPlan, graph: tuple[str, bool, int] | None) -> _Device:
        """Copy the plan to the device in one asynchronous transfer; for a step replayed from a
        graph, straight into the graph's input buffer, with the request rows padded to its
        size."""
        rows_req, rows_k, rows_col = plan.rows
        drafts = plan.verify[rows_req]
        r = len(plan.slots)
        size = r if graph is None else graph[2]
        parts = [plan.request_rows(size - r, self.states.scratch),
                 plan.grid_rows(self.canvas_length, size - r),
                 rows_req, rows_req[drafts], rows_k[drafts], rows_col[drafts],
                 np.flatnonzero(drafts), plan.num_drafts, plan.greedy_row, plan.filter_rows,
                 plan.group_rows]
        flat = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in parts])
        out = None if graph is None else self._graphs.inputs[:flat.size]
        views = torch.split(self._staging.to_device(flat, out), [np.size(a) for a in parts])
        return _Device(_Req.of(views[0].view(REQ_ROWS, size)[:, :r]),
                       views[1].view(size, self.canvas_length)[:r],
                       *views[2:-3], views[-3].bool(), *views[-2:])

    def __call__(self, logits: torch.Tensor, input_batch: InputBatch) -> SamplerOutput:
        plan = StepPlan(input_batch, self.states, self.max_model_len, self.sampling_states,
                        self.shift)
        denoise = bool(plan.denoise.any())
        need_entropy = any(POLICIES[name].needs_entropy for name, _, _ in plan.groups)
        graph = (self._graphs.key(plan, need_entropy)
                 if self._graphs is not None and denoise else None)
        d = self._upload(plan, graph)
        self.states.cache_block_np[plan.slots[plan.refreshed]] = plan.block_start[plan.refreshed]
        proposals = None
        if denoise:
            proposals = self._propose(logits, input_batch, plan, d, need_entropy)
        if graph is not None:
            out = self._graphs.replay(graph, proposals)
        else:
            out = self.tail(plan, d.req, d.grid_row, proposals, d)
        r = input_batch.num_reqs
        self.states.ran_np[plan.slots[plan.drafts > 0]] = True
        # The next step's canvas (the scheduler sizes it; the runner reads the values from here).
        self.req_states.draft_tokens[d.req.slots, :self.canvas_length] = out.next_canvas[:r]
        if plan.drafting.any():  # also when not denoised: the line above overwrote their drafts
            self._write_drafts(plan, d, out.canvas, out.committed, out.offset)
        sampled, num_sampled = out.sampled[:r], out.num_sampled[:r]
        if graph is not None:
            # vLLM copies these to the host on its own stream, which is not ordered before the
            # next step's replay rewriting the graph's outputs (asynchronous scheduling).
            sampled, num_sampled = sampled.clone(), num_sampled.clone()
        self._observe_markers(plan, sampled, num_sampled)
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs_tensors=None,
            num_nans=None,
            num_sampled=num_sampled,
            num_rejected=out.rejected[:r],
        )

    def tail(self, plan: StepPlan, req: _Req, grid_row: torch.Tensor,
             proposals: tuple | None, d: _Device | None = None) -> _Tail:
        """A step's work after the proposals: load the requests' block state, let the policies
        commit, emit, store the state. Tensor ops only, no host sync, unless the plan has
        grammars or drafts (`d` is needed then); `TailGraphs` captures it for other steps."""
        states = self.states
        cl = self.canvas_length
        # A request's block state was reset when it was added (or resumed); a step that runs
        # none of its canvas (a prefill chunk, or a token budget that cut it) keeps it as is.
        # A window's block and offset are the ones its previous step left.
        req = req._replace(offset=torch.where(req.offset >= 0, req.offset,
                                              states.offset[req.slots]),
                           block_start=torch.where(req.window, states.block_start[req.slots],
                                                   req.block_start))
        grid_row = self._window_grid(req, grid_row)
        canvas = states.canvas[req.slots]
        committed = states.committed[req.slots]
        history = states.committed_confidence[req.slots]
        step = states.step[req.slots]
        if proposals is None:
            offset = req.offset
            sampled = torch.zeros_like(canvas)
            num_sampled = torch.zeros_like(offset, dtype=torch.int32)
            finished = torch.zeros_like(req.denoise)
        else:
            canvas, committed, history, step, offset, sampled, num_sampled, finished = (
                self._denoise(plan, req, grid_row, proposals, d, canvas, committed, history,
                              step))
        states.block_start[req.slots] = req.block_start + req.block_length * finished
        states.canvas[req.slots] = canvas
        states.committed[req.slots] = committed
        states.committed_confidence[req.slots] = history
        states.step[req.slots] = step
        states.offset[req.slots] = offset
        columns = (offset[:, None] + torch.arange(cl, device=canvas.device)).clamp(max=cl - 1)
        return _Tail(sampled, num_sampled, canvas.gather(1, columns), canvas, committed, offset,
                     self._rejected(req, offset))

    def _window_grid(self, req: _Req, grid_row: torch.Tensor) -> torch.Tensor:
        """Windows' logit rows by block offset: the plan put those of the second block on the
        grid; where the first block is the one open, its rows are a block earlier."""
        cols = torch.arange(self.canvas_length, device=grid_row.device)[None, :]
        second = req.block_start >= req.end - req.block_length
        row = grid_row - torch.where(second, 0, req.block_length)[:, None]
        valid = ((grid_row >= 0) & (cols >= req.offset[:, None])
                 & (cols < req.block_length[:, None]))
        return torch.where(req.window[:, None], torch.where(valid, row, -1), grid_row)

    def _rejected(self, req: _Req, offset: torch.Tensor) -> torch.Tensor:
        """KV stays computed up to the current block's start: its own (and a just finished
        block's) KV was produced from masked inputs and is recomputed next step. A shifted-logit
        model also recomputes the position before the block, which predicts its first token.
        A request whose next step runs from the sub-block cache keeps the KV before its active
        sub-block (`policies/subblock.py`); that depends on what this step committed."""
        sub = req.cache_sub.clamp(min=1)
        cached = (req.cache_sub > 0) & (offset % sub != 0)
        keep = torch.where(cached, req.block_start + offset - offset % sub,
                           (req.block_start - self.shift).clamp(min=0))
        # A window cut short before the end of the finished block it recomputes leaves that
        # block's KV unfinished: it is recomputed again (`engine/scheduler.py`, `_window_end`).
        short = req.window & (req.end < req.block_start)
        keep = torch.where(short, req.block_start - req.block_length, keep)
        return (req.end - keep).to(torch.int32)

    def _propose(self, logits: torch.Tensor, input_batch: InputBatch, plan: StepPlan,
                 d: _Device, need_entropy: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token, confidence (and entropy) of every logit row, with each request's sampling
        params.

        Every operation is row by row and touches only rows whose request asks for it, so a
        row's proposal is the same whatever shares the batch (for greedy rows bit for bit).
        """
        idx = input_batch.expanded_idx_mapping
        idx_np = input_batch.idx_mapping_np
        logits = logits.float()
        logits[:, self.states.mask_token_id] = float("-inf")  # the mask is never proposed
        self._mask_grammar_rows(logits, input_batch, plan)
        pos = input_batch.positions[input_batch.logits_indices] + self.shift
        self.base.logit_bias_state.apply_logit_bias(logits, idx, idx_np, pos)
        tokens = None  # greedy rows' proposals: the argmax (the first maximum on ties)
        if plan.sampled_rows.size:
            logits, tokens = self._sample(logits, input_batch, plan, d, pos, logits.argmax(-1))
        # One pass over each row on its own (the reference decoder's formula; on CUDA a kernel
        # per row, so a row's numbers do not depend on the batch's shape).
        tokens, confidence, entropy = vocab_stats(logits, tokens, need_entropy)
        return tokens, confidence, entropy

    def _sample(self, logits: torch.Tensor, input_batch: InputBatch, plan: StepPlan,
                d: _Device, pos: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature, min-p, top-k / top-p and seeded Gumbel noise for the sampled rows;
        greedy rows keep `tokens` and their logits (vLLM's temperature and min-p kernels skip
        rows with temperature 0 and min-p 0, as SamplingParams sets for greedy requests)."""
        ss = self.sampling_states
        idx = input_batch.expanded_idx_mapping
        idx_np = input_batch.idx_mapping_np
        ss.apply_temperature(logits, idx, idx_np)
        ss.apply_min_p(logits, idx, idx_np)
        logits = self._top_k_top_p(logits, idx, plan, d)
        # Seeded Gumbel noise is keyed by (seed, offset): vary it with the denoising step so a
        # position re-sampled in a later step draws fresh noise.
        row_step = self.states.step[d.req.slots][d.logit_req]
        rng_pos = pos.long() + row_step * self.max_model_len
        if logits.is_cuda:  # the kernel adds no noise to greedy rows; their argmax stays ours
            sampled = gumbel_sample(logits, idx, ss.temperature.gpu, ss.seeds.gpu, rng_pos,
                                    apply_temperature=False)
            return logits, torch.where(d.greedy_row, tokens, sampled)
        # Triton's interpreter lacks the libdevice call vLLM's kernel uses.
        rows = torch.from_numpy(plan.sampled_rows)
        tokens[rows] = gumbel_sample_host(logits[rows], ss.seeds.np[idx[rows].numpy()],
                                           rng_pos[rows].numpy())
        return logits, tokens

    def _top_k_top_p(self, logits: torch.Tensor, idx: torch.Tensor, plan: StepPlan,
                     d: _Device) -> torch.Tensor:
        """vLLM's top-k / top-p on the rows of requests that use them, only: on a whole batch
        its PyTorch version also rewrites the other rows (their zero-probability tail)."""
        if not plan.filter_rows.size:
            return logits
        every = plan.filter_rows.size == logits.shape[0]
        rows = logits if every else logits[d.filter_rows]
        top_k, top_p = self.sampling_states.get_top_k_top_p(
            idx if every else idx[d.filter_rows], plan.slots[plan.filtered])
        if rows.is_cuda:
            rows = apply_top_k_top_p(rows, top_k, top_p)
        else:  # vLLM's Triton version needs a GPU
            rows = apply_top_k_top_p_pytorch(rows, top_k, top_p, allow_cpu_sync=True)
        if every:
            return rows
        logits[d.filter_rows] = rows
        return logits

    def _constrained(self, plan: StepPlan) -> list[int]:
        """Batch indices of denoising requests with a grammar."""
        return np.flatnonzero(plan.denoise & plan.constrained).tolist()

    def _mask_grammar_rows(self, logits: torch.Tensor, input_batch: InputBatch,
                           plan: StepPlan) -> None:
        """Exact grammar mask at each constrained request's first uncommitted position.

        That position is the request's first logit row; positions further right are sampled
        freely and checked token by token when committed (`_commit_grammar_runs`).
        """
        rows = self._constrained(plan)
        if not rows:
            return
        started = time.perf_counter()
        masks = bitmask.allocate(len(rows), logits.shape[-1])
        fill_masks([self.states.constraints[plan.slots[i]] for i in rows], masks,
                   self._mask_pool if len(rows) >= _PARALLEL_MASK_ROWS else None)
        first = torch.from_numpy(input_batch.cu_num_logits_np[rows].astype(np.int64))
        first = first.to(logits.device)
        selected = logits[first]
        bitmask.apply(selected, masks)
        logits[first] = selected
        self.grammar_stats.host_seconds += time.perf_counter() - started

    def _commit_grammar_runs(self, plan: StepPlan, commit: torch.Tensor, grid_tok: torch.Tensor,
                             canvas: torch.Tensor, committed: torch.Tensor) -> None:
        """Under a grammar, emit only the longest grammar-valid run from the first open position.

        Walking right from it, a position takes its committed token (an earlier step's pick that
        lay beyond a gap), else the policy's pick, else what the grammar forces; the run ends at
        the first position with none of these that the grammar accepts. Picks beyond that point
        stay committed but unvalidated: they are checked when the run reaches them. A committed
        token the grammar rejects where the run ends is re-masked. So the emitted text is always
        grammar-valid, and confident tokens right of a gap are not thrown away.
        """
        rows = self._constrained(plan)
        if not rows:
            return
        started = time.perf_counter()
        # The constrained rows' state in one device-to-host copy, their updates in one copy back:
        # per-request reads would sync with the device several times per request and step.
        idx = torch.tensor(rows, device=commit.device)
        state = torch.stack([t[idx].long() for t in (committed, commit, canvas, grid_tok)])
        held_all, picked_all, canvas_h, grid_h = state.cpu().numpy()
        new_commit, new_committed = picked_all.astype(bool), held_all.astype(bool)
        for j, i in enumerate(rows):
            constraint = self.states.constraints[plan.slots[i]]
            off, b = int(plan.offset[i]), int(plan.block_length[i])
            held = new_committed[j, off:b]
            proposed = np.where(held, canvas_h[j, off:b], grid_h[j, off:b]).tolist()
            chosen = (held | new_commit[j, off:b]).tolist()
            run = constraint.commit_run(proposed, chosen)
            constraint.accept(run)
            self.grammar_stats.count(run, proposed, chosen)
            end = off + len(run)
            new_commit[j, off:end] = True
            grid_h[j, off:end] = run
            if end < b:  # the run stopped here: whatever was picked here is not valid
                new_commit[j, end] = False
                new_committed[j, end] = False
        update = torch.from_numpy(np.stack([new_commit, new_committed, grid_h])).to(commit.device)
        commit[idx] = update[0].bool()
        committed[idx] = update[1].bool()
        grid_tok[idx] = update[2].to(grid_tok.dtype)
        self.grammar_stats.host_seconds += time.perf_counter() - started
        self.grammar_stats.steps.append(self.grammar_stats.host_seconds)
        self.grammar_stats.host_seconds = 0.0

    def _denoise(self, plan: StepPlan, req: _Req, grid_row: torch.Tensor, proposals: tuple,
                 d: _Device | None, canvas, committed, history, step):
        """One denoising step on the loaded block state: the updated state, each request's
        next canvas offset, and the emitted tokens and their count."""
        cl = self.canvas_length
        states = self.states
        tokens, confidence, entropy = proposals
        # The denoising requests' first-draft proposals on [request, block offset] grids.
        has_logit = grid_row >= 0
        at = grid_row.clamp(min=0)
        grid_tok = torch.where(has_logit, tokens[at], 0)
        grid_conf = torch.where(has_logit, confidence[at], 0.0)
        grid_ent = None if entropy is None else torch.where(has_logit, entropy[at], 0.0)

        masked = has_logit & ~committed
        # Policies see the committed token where a position is committed, the proposal elsewhere.
        seen_tok = torch.where(committed, canvas, grid_tok)
        is_stop = (seen_tok[:, :, None] == states.stop_table[req.slots][:, None, :]).any(-1)
        commit = torch.zeros_like(masked)
        committed_conf_sum = (history * committed).sum(-1)
        committed_count = committed.sum(-1)
        values = states.policy_values[req.slots]
        for name, start, end in plan.groups:
            policy = POLICIES[name]
            r = slice(None) if start is None else d.group_rows[start:end]
            inp = PolicyInput(
                confidence=grid_conf[r],
                masked=masked[r],
                tokens=seen_tok[r],
                step=step[r],
                block_length=req.block_length[r],
                committed_confidence_sum=committed_conf_sum[r],
                committed_count=committed_count[r],
                is_stop=is_stop[r],
                entropy=grid_ent[r] if policy.needs_entropy else None,
            )
            params = policy.params_from_values(values[r], req.block_length[r])
            commit[r] = policy.select(inp, params) & masked[r]
        if plan.verify.any():
            self._verify_drafts(plan, d, tokens, confidence, masked, commit, grid_tok, grid_conf)
        self._commit_grammar_runs(plan, commit, grid_tok, canvas, committed)

        canvas = torch.where(commit, grid_tok, canvas)
        committed = committed | commit
        history = torch.where(commit, grid_conf, history)
        cols = torch.arange(cl, device=canvas.device)
        offset, block_length = req.offset, req.block_length
        outside = (cols[None, :] < offset[:, None]) | (cols[None, :] >= block_length[:, None])
        open_ = ~(committed | outside)
        first_open = torch.where(open_.any(-1), open_.int().argmax(-1), block_length)
        first_open = torch.where(req.denoise, first_open, offset)
        num_sampled = (first_open - offset).to(torch.int32)
        sampled = canvas.gather(1, (offset[:, None] + cols).clamp(max=cl - 1))

        # A finished block starts the next one fully masked (no host sync to find which).
        finished = req.denoise & (first_open >= block_length)
        if plan.drafting.any():
            states.pred_valid[req.slots] = states.pred_valid[req.slots] & ~finished[:, None]
        canvas = canvas.masked_fill(finished[:, None], states.mask_token_id)
        committed = committed & ~finished[:, None]
        history = history.masked_fill(finished[:, None], 0.0)
        step = torch.where(finished, 0, torch.where(req.denoise, step + 1, step))
        return (canvas, committed, history, step, torch.where(finished, 0, first_open), sampled,
                num_sampled, finished)

    def _verify_drafts(self, plan: StepPlan, d: _Device, tokens: torch.Tensor,
                       confidence: torch.Tensor, masked: torch.Tensor, commit: torch.Tensor,
                       grid_tok: torch.Tensor, grid_conf: torch.Tensor) -> None:
        """FreeDave (`policies/freedave.py`): commit the static step of the last verified draft.

        Each verifying request ran `num_drafts` drafts of its open positions; their proposals
        are gathered on a [request, draft, block offset] grid. The accepted draft's fills and
        its static step replace the policy's commit, and its proposals become the predictions
        the next step's drafts are built from.
        """
        device = tokens.device
        states = self.states
        rows = torch.tensor(np.flatnonzero(plan.verify), device=device)
        n = len(rows)
        local = torch.zeros(len(plan.slots), dtype=torch.int64, device=device)
        local[rows] = torch.arange(n, device=device)
        shape = (n, int(plan.num_drafts[plan.verify].max()), self.canvas_length)
        tok3 = torch.zeros(shape, dtype=torch.int64, device=device)
        conf3 = torch.zeros(shape, dtype=torch.float32, device=device)
        has3 = torch.zeros(shape, dtype=torch.bool, device=device)
        at = (local[d.drafts_req], d.drafts_k, d.drafts_col)
        tok3[at] = tokens[d.drafts_logit]
        conf3[at] = confidence[d.drafts_logit]
        has3[at] = True

        slots = d.req.slots[rows]
        open_ = masked[rows]
        pred_tok = states.pred_token[slots]
        pred_conf = states.pred_confidence[slots]
        order, count = freedave.draft_order(pred_conf, states.pred_valid[slots] & open_)
        fill = freedave.draft_fill(order, count, shape[1])
        step_pos, has_step = freedave.static_step(conf3, has3 & open_[:, None] & ~fill)
        step_tok = tok3.gather(2, step_pos[..., None]).squeeze(-1)
        best = freedave.verify(step_pos, step_tok, order, pred_tok, count, d.num_drafts[rows])

        pick = torch.arange(n, device=device), best
        filled = fill[pick]
        stepped = torch.nn.functional.one_hot(step_pos[pick], shape[2]).bool()
        commit[rows] = (filled | (stepped & has_step[pick][:, None])) & open_
        grid_tok[rows] = torch.where(filled, pred_tok, tok3[pick])
        grid_conf[rows] = torch.where(filled, pred_conf, conf3[pick])
        states.pred_token[slots] = tok3[pick]
        states.pred_confidence[slots] = conf3[pick]
        states.pred_valid[slots] = has3[pick]

    def _write_drafts(self, plan: StepPlan, d: _Device, canvas: torch.Tensor,
                      committed: torch.Tensor, offset: torch.Tensor) -> None:
        """The next step's drafts of drafting requests: draft k is the canvas with the k most
        confident predictions filled in. Draft 0 is the block's open rest, further drafts whole
        blocks (`engine/layout.py`); the scheduler decides how many run."""
        device = canvas.device
        states = self.states
        drafting = np.flatnonzero(plan.drafting)
        rows = torch.tensor(drafting, device=device)
        slots = d.req.slots[rows]
        k_max = max(states.options[plan.slots[i]].params.drafts for i in drafting)
        cols = torch.arange(self.canvas_length, device=device)
        off, b = offset[rows], d.req.block_length[rows]
        open_ = ~committed[rows] & (cols >= off[:, None]) & (cols < b[:, None])
        order, count = freedave.draft_order(states.pred_confidence[slots],
                                            states.pred_valid[slots] & open_)
        fill = freedave.draft_fill(order, count, k_max)
        drafts = torch.where(fill, states.pred_token[slots][:, None], canvas[rows][:, None])
        rest = (b - off)[:, None]
        c = torch.arange(self.draft_capacity, device=device)[None, :]
        beyond = (c - rest).clamp(min=0)
        k = torch.where(c < rest, 0, 1 + beyond // b[:, None]).clamp_(max=k_max - 1)
        j = torch.where(c < rest, off[:, None] + c, beyond % b[:, None])
        j = j.clamp_(max=self.canvas_length - 1)
        picked = drafts[torch.arange(len(drafting), device=device)[:, None], k, j]
        self.req_states.draft_tokens[slots, : self.draft_capacity] = picked

    def _observe_markers(self, plan: StepPlan, sampled: torch.Tensor,
                         num_sampled: torch.Tensor) -> None:
        """Show requests that wait for a marker (TCCF) what they emitted this step; the block
        length switches at the end of the block holding the marker (`policies/block_switch.py`)."""
        states = self.states
        rows = [i for i in np.flatnonzero(plan.denoise)
                if states.marker[plan.slots[i]] is not None
                and states.switch_at_np[plan.slots[i]] == NEVER]
        if not rows:
            return
        index = torch.tensor(rows, device=sampled.device)
        tokens, counts = sampled[index].tolist(), num_sampled[index].tolist()
        for i, row, count in zip(rows, tokens, counts, strict=True):
            states.observe(plan.slots[i], int(plan.num_tokens[i]), row[:count])


class TailGraphs:
    """CUDA graphs of `BlockDiffusionSampler.tail` for steps that need no host work.

    A step whose requests all use one graph-safe policy, without grammars or drafts, replays a
    graph captured once per (policy, entropy or not, request count rounded up to a power of
    two): the tail's ~100 small kernels become one launch. Its inputs live in persistent
    buffers: the step's one pinned upload lands in `inputs` (request rows and proposal grid
    first) and the proposals are copied in; padding rows are inert requests on the block
    state's scratch slot. A graph is captured the first time `key` names it, from inert inputs,
    before that step's upload: capturing runs the tail once for warm-up, which then touches
    only the scratch slot. The server's default policy has its graphs for every request count
    captured at start-up (`capture`), before vLLM profiles memory, so they are counted outside
    the KV cache and no served step waits for a capture; other policies are captured on first use.
    Off CUDA the same buffers and padding run eagerly, so CPU tests cover everything but the
    capture.
    """

    def __init__(self, sampler: BlockDiffusionSampler, max_logit_rows: int):
        self.sampler = sampler
        states = sampler.states
        device = states.canvas.device
        self.max_size = self._size(states.scratch)
        cl = sampler.canvas_length
        # The step's whole upload: request rows and grid (what the graphs read), then at most
        # 1 value per request and 3 per logit row (`BlockDiffusionSampler._upload`).
        self.inputs = torch.zeros(self.max_size * (REQ_ROWS + 1 + cl) + 3 * max_logit_rows,
                                  dtype=torch.int64, device=device)
        self._tokens = torch.zeros(max_logit_rows, dtype=torch.int64, device=device)
        self._confidence = torch.zeros(max_logit_rows, dtype=torch.float32, device=device)
        self._entropy = torch.zeros(max_logit_rows, dtype=torch.float32, device=device)
        self._graphs: dict[tuple[str, bool, int], Callable[[], _Tail]] = {}

    @staticmethod
    def _size(num_reqs: int) -> int:
        return 1 << max(num_reqs - 1, 0).bit_length()

    def key(self, plan: StepPlan, need_entropy: bool) -> tuple[str, bool, int] | None:
        """The graph a denoising step replays: (policy, entropy or not, padded request count),
        or None where the step needs the eager path (host work, several policy groups)."""
        if len(plan.groups) != 1 or plan.groups[0][1] is not None:
            return None
        if (not POLICIES[plan.groups[0][0]].graph_safe or plan.drafting.any()
                or plan.constrained.any() or len(plan.rows[0]) > self._tokens.shape[0]):
            return None
        key = plan.groups[0][0], need_entropy, self._size(len(plan.slots))
        self._ensure(key)  # before the step's upload: capturing writes inert inputs
        return key

    def capture(self, policy: str) -> None:
        """`policy`'s graphs for every padded request count, up front (the graph-safe ones)."""
        if POLICIES[policy].graph_safe:
            for bits in range(self.max_size.bit_length()):
                self._ensure((policy, POLICIES[policy].needs_entropy, 1 << bits))

    def _ensure(self, key: tuple[str, bool, int]) -> None:
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)

    def replay(self, key: tuple[str, bool, int], proposals: tuple) -> _Tail:
        """The step's tail from its graph; the plan was uploaded into `inputs` (`_upload`)."""
        tokens, confidence, entropy = proposals
        n = tokens.shape[0]
        self._tokens[:n].copy_(tokens)
        self._confidence[:n].copy_(confidence)
        if entropy is not None:
            self._entropy[:n].copy_(entropy)
        return self._graphs[key]()

    def _capture(self, policy: str, need_entropy: bool, size: int) -> Callable[[], _Tail]:
        cl = self.sampler.canvas_length
        inputs = self.inputs[:size * (REQ_ROWS + cl)]
        grid = inputs[REQ_ROWS * size:].view(size, cl)
        inert = SimpleNamespace(slots=np.zeros(0, np.int64), offset=np.zeros(0, np.int64),
                                drafts=np.zeros(0, np.int64), block_start=np.zeros(0, np.int64),
                                end=np.zeros(0, np.int64), cache_sub=np.zeros(0, np.int64),
                                block_length=np.zeros(0, np.int64), denoise=np.zeros(0, bool),
                                rows=(np.zeros(0, np.int64),) * 3,
                                groups=[(policy, None, None)], drafting=np.zeros(0, bool),
                                constrained=np.zeros(0, bool), window=np.zeros(0, bool),
                                verify=np.zeros(0, bool))
        rows = StepPlan.request_rows(inert, size, self.sampler.states.scratch)
        grid_rows = StepPlan.grid_rows(inert, cl, size)
        inputs.copy_(torch.from_numpy(np.concatenate([rows.ravel(), grid_rows.ravel()])))
        proposals = (self._tokens, self._confidence, self._entropy if need_entropy else None)

        def run() -> _Tail:
            req = _Req.of(inputs[:REQ_ROWS * size].view(REQ_ROWS, size))  # captured: its bools too
            return self.sampler.tail(inert, req, grid, proposals)

        if not inputs.is_cuda:  # the same buffers and padding, run eagerly (CPU tests)
            return run
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy initialisation outside the capture
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()

        def replay() -> _Tail:
            graph.replay()
            return out

        return replay
