"""Soak a `vllm serve` with load and faults; print the counts.

Starts the server (CPU-friendly flags unless --gpu, plus --serve-args and --speculative-config),
runs `vllm_blockdiff.bench.soak` with the given request count and clients, prints requests / 2xx
/ 4xx / 5xx / greedy mismatches / hangs / engine deaths, and writes JSON. The AR twin with a
proposer is the second line:

    python benchmarks/soak.py --model examples/models/sdar-testbed --requests 2000 --clients 24
    python benchmarks/soak.py --serve-args=--async-scheduling    # windows (engine/scheduler.py)
    python benchmarks/soak.py --model examples/models/qwen3-testbed --speculative-config \\
        '{"model": "vllm_blockdiff.proposers.aded.ADEDProposer", "num_speculative_tokens": 4}'
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path

from vllm_blockdiff.bench.soak import running_server, soak

CPU_FLAGS = ["--gpu-memory-utilization", "0.3", "--max-model-len", "512", "--enforce-eager"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="examples/models/sdar-testbed")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--gpu", action="store_true", help="serve with vLLM's defaults")
    p.add_argument("--serve-args", default="", help="more `vllm serve` flags (one string)")
    p.add_argument("--speculative-config", default=None, help="passed to `vllm serve` as is")
    p.add_argument("--out", default="benchmarks/results/soak.json")
    a = p.parse_args()
    args = (([] if a.gpu else CPU_FLAGS) + shlex.split(a.serve_args)
            + (["--speculative-config", a.speculative_config] if a.speculative_config else []))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        with running_server(a.model, args, log) as base:
            result = soak(base, a.requests, a.clients)
        # what the server ran with, as it logged it (e.g. --async-scheduling)
        result["serve_args"] = args
        result["async_scheduling"] = "Asynchronous scheduling is enabled" in log.read_text()
    print(" ".join(f"{k}={result[k]}" for k in ("requests", "2xx", "4xx", "5xx",
                                                 "greedy_mismatches", "hangs", "engine_deaths")))
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
