"""A Triton backend for machines without a GPU, backed by Triton's interpreter.

vLLM's Model Runner V2 (the only runner that serves diffusion models) is written with Triton kernels
and refuses to start unless exactly one Triton driver is active. On a CPU-only host this backend is
that driver: it activates only when no CUDA device is present, and then switches Triton to its
interpreter (``TRITON_INTERPRET=1``) before any kernel is defined, so every ``@triton.jit`` kernel
runs on the CPU as NumPy code. Triton discovers it through the ``triton.backends`` entry point, so
every process (API server, engine core, workers) gets it without a ``.pth`` or sitecustomize hook.
"""
