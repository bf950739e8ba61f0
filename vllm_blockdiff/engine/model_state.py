"""Model Runner V2 `ModelState` for block-diffusion models.

It tells the runner that no bonus token is sampled (every forward only denoises drafts), provides
the block-diffusion sampler, fills the input ids of tokens that are neither prompt nor draft (a
finished block being recomputed with its final tokens), and gives the attention backend each
token's block length so one batch can mix prefills, denoise steps and block lengths.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.states import RequestState
from vllm.v1.worker.utils import AttentionGroup

from vllm_blockdiff.attention.backend import BlockDiffusionAttentionMetadataBuilder
from vllm_blockdiff.engine.block_state import BlockStates, SavedBlock
from vllm_blockdiff.engine.layout import TokenLayout, token_layout
from vllm_blockdiff.engine.sampler import BlockDiffusionSampler
from vllm_blockdiff.engine.validation import grammar_of
from vllm_blockdiff.grammar import CanvasConstraint, GrammarBackend, GrammarSpec, make_backend
from vllm_blockdiff.options import resolve_options, serve_config_of
from vllm_blockdiff.transfer import Staging


class BlockDiffusionModelState(DefaultModelState):
    num_new_sampled_tokens_per_step: int = 0

    def __init__(self, vllm_config: VllmConfig, model: torch.nn.Module, encoder_cache,
                 device: torch.device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.serve = serve_config_of(self.model_config.hf_config)
        self.states = BlockStates(self.max_num_reqs, self.serve.max_block_length,
                                  self.serve.mask_token_id, device, self.serve,
                                  self.max_model_len)
        self._grammar: GrammarBackend | None = None  # built on the first constrained request
        # One thread compiles grammars in arrival order (xgrammar and llguidance release the GIL).
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockdiff-grammar")
        self._staging = Staging(device)
        self._layout: TokenLayout | None = None  # set by prepare_attn for prepare_inputs
        self._windows: np.ndarray | None = None  # [R] likewise: the requests running windows
        # The block state of preempted requests until they resume (`track_preemptions`, called
        # by the patch `preempted_block_state`).
        self._preempted: dict[str, SavedBlock] = {}

    def get_supported_generation_tasks(self):
        return ("generate",)

    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        extra_args = params.extra_args if params is not None else None
        stop_ids = sorted(params.all_stop_token_ids) if params is not None else []
        prompt_len = len(new_req_data.prompt_token_ids or ())
        # A resumed (preempted) request carries its output so far in its prefill tokens.
        emitted = new_req_data.prefill_token_ids[prompt_len:]
        constraint = None
        if (spec := grammar_of(extra_args)) is not None:
            # The grammar may end the output with the model's EOS ids, not with user stop ids
            # (those are ordinary text tokens).
            eos = sorted(params.all_stop_token_ids - set(params.stop_token_ids or ()))
            # Compiling takes milliseconds to seconds: off the step, while the prompt runs.
            constraint = self._compiler.submit(self._constraint, spec, eos, emitted)
        self.states.add_request(req_index, resolve_options(extra_args, self.serve), stop_ids,
                                constraint, prompt_len, emitted)
        if (saved := self._preempted.pop(new_req_data.req_id, None)) is not None:
            self.states.restore_block(req_index, saved, len(new_req_data.prefill_token_ids))

    def track_preemptions(self, preempted: dict[str, int], finished: set[str]) -> None:
        """Keep the block state of requests preempted now (their slots by id), drop that of
        preempted requests that finished (were aborted) meanwhile. A resumed request gets back
        its emitted text only; the positions committed after a gap in it, with the step count
        and confidences the policies read, would be lost, and it would decode differently than
        without the preemption."""
        for req_id, slot in preempted.items():
            self._preempted[req_id] = self.states.save_block(slot)
        for req_id in finished:
            self._preempted.pop(req_id, None)

    def _constraint(self, spec: GrammarSpec, eos: list[int], emitted: list[int]
                    ) -> CanvasConstraint:
        constraint = CanvasConstraint.create(self._grammar_backend(), spec, eos)
        constraint.accept(emitted)
        return constraint

    def _grammar_backend(self) -> GrammarBackend:
        if self._grammar is None:
            self._grammar = make_backend(self.serve.grammar_backend, self.model_config.tokenizer,
                                         vocab_size=self.model_config.get_vocab_size(),
                                         excluded_token_ids=[self.serve.mask_token_id])
        return self._grammar

    def custom_sampler(self, sampler: Any) -> tuple[Any, Any] | None:
        runner_req_states = sampler.req_states
        graphs = self.serve.sampler_graphs
        if graphs is None:
            graphs = self.device.type == "cuda" and not self.model_config.enforce_eager
        return BlockDiffusionSampler(sampler, self.states, runner_req_states,
                                     self.max_model_len, self.serve.canvas_length,
                                     max_logit_rows=self.max_num_tokens,
                                     cuda_graphs=graphs,
                                     shifted_logits=self.serve.shifted_logits,
                                     default_policy=self.serve.policy), None

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, Any]:
        """Take every known query token from the request's token history; place drafts.

        The runner writes prompt tokens and drafts itself; a finished block that is recomputed
        (its emitted tokens) is neither, nor are the known tokens in the copies of the block
        that extra drafts carry, so those are filled here from `all_token_ids`. Extra drafts
        also take the block's rotary positions (`engine/layout.py`; slots are mapped already).
        A window's tokens are decided on the device (`_fill_windows`).
        """
        layout, self._layout = self._layout, None
        windows, self._windows = self._windows, None
        if layout is not None:
            t = len(layout.request)
            slot = input_batch.idx_mapping_np[layout.request]
            at = layout.rope_positions
            rows = [slot, layout.from_history]
            has_windows = bool(windows.any())
            if has_windows:
                rows.append(windows[layout.request])
            staged = self._staging.to_device(np.stack(rows + ([at] if at is not None else [])))
            positions = input_batch.positions[:t]
            if at is not None:
                positions.copy_(staged[-1])
            known = req_states.all_token_ids.gpu[staged[0], positions.long()]
            ids = input_batch.input_ids[:t]
            torch.where(staged[1].bool(), known.to(ids.dtype), ids, out=ids)
            if has_windows:
                self._fill_windows(ids, staged[0], positions.long(), staged[2].bool(), known,
                                   req_states)
            if self.serve.shifted_logits and input_batch.num_draft_tokens_per_req is not None:
                input_batch.logits_indices.sub_(1)  # a canvas position's logits: the one before
        return super().prepare_inputs(input_batch, req_states)

    def _fill_windows(self, ids: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor,
                      window: torch.Tensor, known: torch.Tensor, req_states: RequestState
                      ) -> None:
        """A window's tokens from the state its previous step left on the device: emitted
        tokens from the history, then the current block's canvas, then masks (the block after
        an open one waits, fully masked: the canvas is masked beyond its block length)."""
        states = self.states
        offset = positions - states.block_start[slot]
        canvas = states.canvas[slot, offset.clamp(0, states.max_block_length - 1)]
        in_block = (offset >= 0) & (offset < states.max_block_length)
        fill = torch.where(positions < req_states.total_len.gpu[slot], known,
                           torch.where(in_block, canvas, states.mask_token_id))
        torch.where(window, fill.to(ids.dtype), ids, out=ids)

    def prepare_attn(
        self,
        input_batch: InputBatch,
        cudagraph_mode: CUDAGraphMode,
        block_tables: tuple[torch.Tensor, ...],
        slot_mappings: torch.Tensor,
        attn_groups: list[list[AttentionGroup]],
        kv_cache_config: KVCacheConfig,
        for_capture: bool = False,
    ) -> dict[str, Any]:
        r = input_batch.num_reqs
        drafts = input_batch.num_draft_tokens_per_req
        slots = input_batch.idx_mapping_np[:r]
        states = self.states
        computed = input_batch.num_computed_tokens_np[:r].astype(np.int64)
        query = input_batch.num_scheduled_tokens[:r].astype(np.int64)
        drafts = np.zeros(r, np.int64) if drafts is None else drafts[:r].astype(np.int64)
        # Keys end with the query, but a sub-block run from the cache sees its whole block.
        cached, _, block_end = states.sub_block_steps(slots, computed + query - drafts, drafts)
        # A window is plain block-causal attention over its two blocks: laid out as history.
        self._windows = states.windows(slots, computed)
        drafts = np.where(self._windows, 0, drafts)
        layout = token_layout(computed, query, drafts,
                              states.block_length_np[slots], states.fine_block_length_np[slots],
                              states.switch_at_np[slots],
                              key_end=np.where(cached, block_end, computed + query))
        self._layout = layout
        for groups in attn_groups:
            for group in groups:
                builder = group.get_metadata_builder(0)
                if isinstance(builder, BlockDiffusionAttentionMetadataBuilder):
                    builder.set_key_ranges(*layout[:3])
        return super().prepare_attn(input_batch, cudagraph_mode, block_tables, slot_mappings,
                                    attn_groups, kv_cache_config, for_capture)
