"""Per-step host-to-device copies through a reused pinned buffer.

Pinning fresh memory every step (`cudaHostAlloc`) stalls the GPU, and copying from pageable
memory blocks the host; a buffer pinned once and refilled each step gives an asynchronous copy.
Each `Staging` must be used at most once per engine step: the next step's refill happens after
the runner has synchronised on the step's outputs, so the previous copy has completed.
"""

from __future__ import annotations

import numpy as np
import torch


class Staging:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pinned: torch.Tensor | None = None

    def to_device(self, array: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """`array` (int64-compatible) on the device; into `out` if given."""
        array = np.ascontiguousarray(array, dtype=np.int64)
        if self.device.type != "cuda":
            host = torch.from_numpy(array)
            return host if out is None else out.copy_(host)
        n = array.size
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 1 << 14), dtype=torch.int64, pin_memory=True)
        host = self._pinned[:n].view(array.shape)
        host.numpy()[...] = array
        if out is None:
            return host.to(self.device, non_blocking=True)
        return out.copy_(host, non_blocking=True)
