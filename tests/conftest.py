"""Shared fixtures: tiny checkpoints built locally, one vLLM engine per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# `make test` runs two pytest-xdist workers (Makefile TEST_WORKERS). vLLM's CPU worker binds its
# OpenMP threads to core 0 whatever else runs ("auto"); each test worker's engines get a core of
# their own instead.
if (worker := os.environ.get("PYTEST_XDIST_WORKER")) is not None:
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                          str(cores[int(worker.removeprefix("gw")) % len(cores)]))

from vllm_blockdiff.tools.make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    """Modules that start engines or servers first, each module's tests together and in order.

    `make test` hands whole modules to two xdist workers in collection order
    (`--no-loadscope-reorder`; xdist's default orders them by test count, which puts the few-test
    engine modules of minutes each last). With the long modules first, the many short ones even
    out the end of both workers' queues.
    """
    def module(item) -> str:  # xdist's unit of work under --dist loadfile
        return item.nodeid.split("::", 1)[0]

    first: dict[str, int] = {}
    engine: set[str] = set()
    for item in items:
        first.setdefault(module(item), len(first))
        if item.get_closest_marker("engine") or item.get_closest_marker("server"):
            engine.add(module(item))
    items.sort(key=lambda item: (module(item) not in engine, first[module(item)]))

ENGINE_ARGS = dict(
    # BLOCKDIFF_TEST_COMPILE=1 (GPU runs): torch.compile and CUDA graphs, as vLLM serves by default.
    enforce_eager=os.environ.get("BLOCKDIFF_TEST_COMPILE") != "1",
    # A fraction of the card per engine, and a GPU run keeps up to three engines alive (module
    # fixtures): 0.3 of an H200 left the third without memory (2026-12-06). Tiny models need
    # little; the CPU backend sizes its KV cache from VLLM_CPU_KVCACHE_SPACE instead.
    gpu_memory_utilization=0.1,
    dtype="float32",
    max_model_len=512,
    max_num_seqs=64,
    # A small token budget makes the scheduler chunk prompts and cut canvases short in busy
    # steps, so the parity tests also cover those paths.
    max_num_batched_tokens=96,
    # 16-token KV pages (vLLM's GPU default; the CPU default is 128) so prompts fill pages and
    # prefix caching, whose hashes the scheduler salts with the block length, is exercised.
    block_size=16,
)


@pytest.fixture(scope="session")
def tiny_sdar(tmp_path_factory) -> str:
    """SDAR layout as in SDAR's training copy of config.json (block_size 4, mask_token_id)."""
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sdar"), block_size=4))


@pytest.fixture(scope="session")
def published_sdar(tmp_path_factory) -> str:
    """Published SDAR layout: no block size or mask id in config.json, auto_map to remote code."""
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("published_sdar"), block_size=None,
                                    seed=1))


@pytest.fixture(scope="session")
def reference(tiny_sdar):
    """The plain-PyTorch network of `tiny_sdar`, float32 (the parity oracle)."""
    import torch

    from vllm_blockdiff.reference.modeling import CausalLM

    return CausalLM.from_pretrained(tiny_sdar, dtype=torch.float32)


@pytest.fixture(scope="session")
def llm(tiny_sdar):
    from vllm import LLM

    engine = LLM(tiny_sdar, **ENGINE_ARGS)
    yield engine
    del engine
