"""Synthetic tasks, a trainer and a greedy evaluator for tiny block-diffusion and AR twin models.

The testbed gives the project models whose quality can be measured exactly: arithmetic with a
worked chain, list operations, JSON records, stdlib code continuation, and ParallelBench-style
waiting-line operations and Latin squares where parallel decoding is hard (`tasks`), a trainer that
writes SDAR-layout and Qwen3-layout checkpoints of the same network (`train`), and a plain-PyTorch
greedy decoder to check them before vLLM serves them (`decode`, `evaluate`).
"""

from vllm_blockdiff.testbed.tasks import (
    EXACT_TASKS,
    PARALLEL_TASKS,
    SPLITS,
    TASKS,
    Example,
    generate,
    perplexity,
    score,
)

__all__ = ["EXACT_TASKS", "PARALLEL_TASKS", "SPLITS", "TASKS", "Example", "generate", "perplexity",
           "score"]
