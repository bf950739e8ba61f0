"""Compiler half of the CPU backend: it never compiles, kernels run in Triton's interpreter."""

from triton.backends.compiler import BaseBackend, GPUTarget


class CpuInterpreterBackend(BaseBackend):
    @staticmethod
    def supports_target(target: GPUTarget) -> bool:
        return target.backend == "cpu"

    def hash(self) -> str:
        return "cpu-interpreter"

    def parse_options(self, options: dict) -> dict:
        return dict(options)

    def add_stages(self, stages: dict, options: object, language=None) -> None:
        raise RuntimeError(
            "Triton kernels cannot be compiled for the CPU; set TRITON_INTERPRET=1 "
            "(vllm_blockdiff's CPU driver does this when no CUDA device is present)"
        )

    def load_dialects(self, context) -> None:
        return None

    def get_module_map(self) -> dict:
        return {}
