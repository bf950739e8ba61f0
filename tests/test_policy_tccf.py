"""TCCF: the block-length switch rule shared by the scheduler, the workers and the reference.

The engine test is `tests/test_engine_parity.py::test_tccf_switches_block_length_after_the_marker`.
"""

import numpy as np
import pytest

from vllm_blockdiff.engine.layout import token_layout
from vllm_blockdiff.options import OptionsError, ServeConfig, resolve_options
from vllm_blockdiff.policies.block_switch import NEVER, block_length_at, switch_position

SERVE = ServeConfig(block_length=8, max_block_length=16, mask_token_id=3)


def test_switch_is_at_the_end_of_the_block_holding_the_first_marker():
    assert switch_position([5, 9, 7, 9], 10, marker=9, block_length=8) == 16  # marker at 11
    assert switch_position([5, 9], 15, marker=9, block_length=8) == 24  # at 16: next block
    assert switch_position([5, 7], 10, marker=9, block_length=8) == NEVER
    assert block_length_at(np.array([15, 16, 17]), 8, 1, 16).tolist() == [8, 1, 1]


def test_layout_recomputes_the_last_coarse_block_beside_the_first_fine_one():
    """Switch at 16 (B=8, then 2): the finished block 8..15 keeps B=8, the new block is 16..17."""
    layout = token_layout([8], [10], [2], [8], [2], [16])
    assert layout.kv_limit.tolist() == [16] * 8 + [18, 18]


def test_options():
    opts = resolve_options({"policy": "tccf", "marker": 7, "fine_block_length": 4}, SERVE)
    assert (opts.params.marker, opts.params.fine_block_length) == (7, 4)
    with pytest.raises(OptionsError, match=r"vllm_xargs\.marker"):
        resolve_options({"policy": "tccf"}, SERVE)
    with pytest.raises(OptionsError, match=r"vllm_xargs\.fine_block_length: must divide"):
        resolve_options({"policy": "tccf", "marker": 7, "fine_block_length": 3}, SERVE)
