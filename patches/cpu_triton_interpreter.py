"""Triton's interpreter without the integer overflow checks it computes and then drops.

On CPU every Triton kernel of vLLM's Model Runner V2 (slot mappings, block tables, positions)
runs in Triton's interpreter (the plugin's CPU backend), once per program of its grid, every
step. The interpreter's options turn on `sanitize_overflow`, so every 32-bit integer add, sub
and mul is also done in 64 bits and compared with the 32-bit bounds, but the `device_assert`
that would report an overflow returns at once unless `debug` is on, which the interpreter's
options never are (compiled kernels drop the same check as dead code). The checks took about a
third of the interpreter's time, and a tiny model's engine step on CPU is mostly interpreter.
On GPUs the interpreter is not used.
"""

from __future__ import annotations

import dataclasses

VLLM_VERSIONS = ("0.26.",)


def apply() -> None:
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    if not options.debug:
        interpreter.interpreter_builder.options = dataclasses.replace(options,
                                                                      sanitize_overflow=False)
