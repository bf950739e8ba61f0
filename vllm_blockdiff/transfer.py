"""Per-step host-to-device copies through reused pinned buffers.

Pinning fresh memory every step (`cudaHostAlloc`) stalls the GPU, and copying from pageable
memory blocks the host; buffers pinned once and refilled give asynchronous copies. A copy reads
its pinned buffer when the stream reaches it, which with asynchronous scheduling can be after the
host has planned the next step (the host runs up to a step ahead of the GPU). So each `Staging`
cycles through `DEPTH` buffers, and refills one only once the copy that last read it has run (an
event, recorded after the copy: waiting on it costs nothing unless the GPU is `DEPTH` copies
behind). One buffer, refilled while its copy was still queued, gave the device another step's
plan: garbage slots and key ranges (a device-side index assert at batch 64, wrong tokens after
preemption; H200, 2026-12-07).
"""

from __future__ import annotations

import numpy as np
import torch

DEPTH = 4  # copies a Staging may have in flight


class Staging:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pinned: list[torch.Tensor | None] = [None] * DEPTH
        self._copied: list[torch.cuda.Event | None] = [None] * DEPTH
        self._next = 0

    def to_device(self, array: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """`array` (int64-compatible) on the device; into `out` if given."""
        array = np.ascontiguousarray(array, dtype=np.int64)
        if self.device.type != "cuda":
            host = torch.from_numpy(array)
            return host if out is None else out.copy_(host)
        i, self._next = self._next, (self._next + 1) % DEPTH
        if self._copied[i] is not None:
            self._copied[i].synchronize()  # the copy that last read buffer i has run
        n = array.size
        if self._pinned[i] is None or self._pinned[i].numel() < n:
            self._pinned[i] = torch.empty(max(n, 1 << 14), dtype=torch.int64, pin_memory=True)
        host = self._pinned[i][:n].view(array.shape)
        host.numpy()[...] = array
        result = (host.to(self.device, non_blocking=True) if out is None
                  else out.copy_(host, non_blocking=True))
        if not torch.cuda.is_current_stream_capturing():
            if self._copied[i] is None:
                self._copied[i] = torch.cuda.Event()
            self._copied[i].record()
        return result
