"""Per-request block state: grammars compiled off the step, the TCCF switch, which requests
may run windows (asynchronous scheduling), and what a preempted request keeps."""

from concurrent.futures import Future

import numpy as np
import torch

from vllm_blockdiff.engine.block_state import BLOCK_FIELDS, BlockStates, runs_windows
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


def test_a_resumed_request_continues_its_block_as_preemption_left_it():
    """Positions 10 (emitted) and 13 are committed in the block 8..15 when the request is
    preempted; it resumes with 3 known tokens of the block (emitted text is all vLLM returns),
    so without its saved state position 13, the step count and the confidences were lost."""
    states = _states()
    options = resolve_options(None, SERVE)
    states.add_request(2, options, [0])
    states.block_start[2] = 8
    states.canvas[2, [0, 1, 2, 5]] = torch.tensor([4, 5, 6, 7])
    states.committed[2, [0, 1, 2, 5]] = True
    states.committed_confidence[2, [0, 1, 2, 5]] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    states.step[2], states.offset[2] = 3, 3
    saved = states.save_block(2)
    kept = {name: getattr(states, name)[2].clone() for name in BLOCK_FIELDS}
    states.add_request(2, options, [0])  # the slot taken by another request meanwhile
    states.canvas[2, 0] = 9
    for slot in (0, 1):  # resumed in another slot, with 11 known tokens: the same block ...
        states.add_request(slot, options, [0], prompt_len=5, emitted=[1] * 6)
        states.restore_block(slot, saved, 11)
        for name in BLOCK_FIELDS:
            assert torch.equal(getattr(states, name)[slot], kept[name]), name
    states.add_request(3, options, [0], prompt_len=5, emitted=[1] * 11)
    states.restore_block(3, saved, 16)  # ... or another block, which starts afresh
    assert (states.canvas[3] == 3).all() and not states.committed[3].any()
    assert states.step[3] == 0
