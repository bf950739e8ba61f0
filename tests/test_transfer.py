"""`transfer.Staging`: a copy queued behind GPU work reads the array it was given, even when the
host stages further arrays before the stream reaches it (asynchronous scheduling plans a step
while the previous one runs). Runs on the GPU (`scripts/gpu_run.sh kernels`): on the CPU build
copies are synchronous and cannot race."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_blockdiff.transfer import DEPTH, Staging


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA stream to queue copies")
@pytest.mark.parametrize("into_buffer", [False, True])
def test_queued_copies_read_their_own_array(into_buffer):
    staging = Staging(torch.device("cuda"))
    steps = 3 * DEPTH  # the ring wraps: a refill must wait for the copy that read its buffer
    buffers = torch.empty(steps, 4096, dtype=torch.int64, device="cuda")
    torch.cuda._sleep(200_000_000)  # keep the stream busy: every copy below is still queued
    outs = [staging.to_device(np.full(4096, k), buffers[k] if into_buffer else None)
            for k in range(steps)]
    torch.cuda.synchronize()
    assert [int(o.min()) for o in outs] == list(range(steps))
    assert [int(o.max()) for o in outs] == list(range(steps))
