"""Triton driver that is active exactly when the host has no CUDA device."""

import functools
import os

from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase


@functools.cache
def _no_cuda_device() -> bool:
    import torch

    return not torch.cuda.is_available()


# `triton.jit` chooses between compiling and interpreting when a kernel is defined, so the switch
# happens here, while Triton discovers its backends on `import triton`, before any kernel exists.
if _no_cuda_device():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class CpuInterpreterDriver(DriverBase):
    @classmethod
    def is_active(cls) -> bool:
        return _no_cuda_device()

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError("the CPU backend only runs kernels in Triton's interpreter")

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cpu", 0, 0)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        from triton.testing import do_bench

        return do_bench

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0
