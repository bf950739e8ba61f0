"""Per-request block state: grammars compiled off the step, the TCCF switch, and which requests
may run windows (asynchronous scheduling)."""

from concurrent.futures import Future

import numpy as np
import torch

from vllm_blockdiff.engine.block_state import BlockStates, runs_windows
from vllm_blockdiff.options import ServeConfig, resolve_options
from vllm_blockdiff.policies.block_switch import NEVER

SERVE = ServeConfig(block_length=8, max_block_length=16, mask_token_id=3)


def _states() -> BlockStates:
    return BlockStates(4, 16, 3, torch.device("cpu"))


def test_a_request_waits_while_its_grammar_compiles():
    states = _states()
    pending: Future = Future()
    states.add_request(1, resolve_options(None, SERVE), [0], pending)
    states.add_request(2, resolve_options(None, SERVE), [0])
    assert not states.grammar_ready(1) and states.grammar_ready(2)
    compiled = object()
    pending.set_result(compiled)
    assert states.grammar_ready(1) and states.constraints[1] is compiled


def test_the_switch_is_found_in_emitted_and_resumed_output():
    states = _states()
    options = resolve_options({"policy": "tccf", "marker": 9, "fine_block_length": 2}, SERVE)
    states.add_request(0, options, [0], prompt_len=5, emitted=[4, 4])
    assert states.switch_at_np[0] == NEVER
    states.observe(0, 7, [4, 9, 4])  # marker at position 8: the block 8..15 finishes first
    assert states.switch_at_np[0] == 16
    assert states.block_lengths([0, 0], [15, 16]).tolist() == [8, 2]
    states.add_request(1, options, [0], prompt_len=5, emitted=[9])  # resumed after preemption
    assert states.switch_at_np[1] == 8


def test_only_requests_without_host_work_per_step_run_windows():
    def runs(args, constrained=False, serve=SERVE):
        return runs_windows(resolve_options(args, serve), constrained, serve)

    assert runs(None) and runs({"policy": "entropy", "block_length": 4})
    assert not runs(None, constrained=True)  # grammar masks and runs: host work
    assert not runs({"policy": "freedave", "drafts": 1})  # a drafting policy, one draft or more
    assert not runs({"policy": "tccf", "marker": 5})
    assert not runs({"policy": "subblock"})  # the sub-block cache (on by default)
    assert not runs(None, serve=ServeConfig(block_length=8, max_block_length=16,
                                            mask_token_id=3, shifted_logits=True))
    states = BlockStates(4, 16, 3, torch.device("cpu"), ServeConfig(
        block_length=8, max_block_length=16, mask_token_id=3, windows=True), max_model_len=64)
    states.add_request(0, resolve_options(None, SERVE), [0])
    states.add_request(1, resolve_options({"policy": "freedave"}, SERVE), [0])
    slots, computed = np.array([0, 1]), np.array([8, 8])
    assert states.windows(slots, computed).tolist() == [False, False]  # no canvas ran yet
    states.ran_np[:] = True
    assert states.windows(slots, computed).tolist() == [True, False]
    assert states.windows(slots, np.array([56, 8])).tolist() == [False, False]  # past the end
