"""Load and faults against a running `vllm serve` of a block-diffusion model, with counts.

Clients send, concurrently and for a bounded count, greedy completions (streamed and not, whose
texts must be byte-identical to a reference taken alone), sampled requests, `json_schema`
outputs (which must hold their schema), streams cancelled after the first chunk, and bad requests
of every kind the plugin refuses. Afterwards `/health`
must answer. Used by `tests/test_server.py` (short) and `benchmarks/soak.py` (long).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai

GREEDY = dict(prompt="Q: 12+7=", max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True, "vllm_xargs": {"policy": "entropy",
                                                           "block_length": 8}})
BAD_XARGS = [{"policy": "static", "steps": 2**63}, {"policy": "nonsense"}, {"threshold": 2.0},
             {"_blockdiff_grammar": "{}"}, {"policy": "tccf", "marker": 2**64}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
          "required": ["a", "b"], "additionalProperties": False}
# Each bad request: its extra arguments (plugin options, then vLLM sampling fields).
BAD = [{"extra_body": {"vllm_xargs": x}} for x in BAD_XARGS] + [
    {"seed": 2**63}, {"seed": 2**64}, {"extra_body": {"top_k": 2**63}}]


@contextlib.contextmanager
def running_server(model: str, flags: list[str], log: Path, timeout: float = 600.0
                   ) -> Iterator[str]:
    """`vllm serve model` on a free loopback port until the block ends; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", model, "--port", str(port)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + flags, stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("vllm serve did not start:\n"
                                       + log.read_text()[-4000:]) from None
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _one(client: openai.OpenAI, model: str, kind: str, reference: str, rng: random.Random
         ) -> str:
    """Send one request of `kind`; returns its outcome ("2xx", "4xx", "5xx", "mismatch")."""
    try:
        if kind == "greedy":
            text = client.completions.create(model=model, **GREEDY).choices[0].text
        elif kind == "greedy_stream":
            text = "".join(c.choices[0].text for c in
                           client.completions.create(model=model, stream=True, **GREEDY))
        elif kind == "sampled":
            client.completions.create(model=model, prompt="x = ", max_tokens=16,
                                      temperature=1.0, seed=rng.randrange(1000),
                                      extra_body={"vllm_xargs": {"block_length": 4}})
            return "2xx"
        elif kind == "structured":  # a json_schema output must parse and hold its schema
            out = client.completions.create(
                model=model, prompt="JSON:", max_tokens=48, temperature=rng.choice([0, 1.0]),
                seed=rng.randrange(1000), extra_body={"structured_outputs": {"json": SCHEMA}})
            value = json.loads(out.choices[0].text) if out.choices[0].finish_reason == "stop" \
                else {"a": 0, "b": True}  # cut by max_tokens: nothing to check
            return "2xx" if set(value) == {"a", "b"} and isinstance(value["b"], bool) \
                else "mismatch"
        elif kind == "cancel":
            stream = client.completions.create(model=model, prompt="def f(", max_tokens=64,
                                               stream=True, extra_body={"ignore_eos": True})
            next(iter(stream))
            stream.close()
            return "2xx"
        else:  # bad
            client.completions.create(model=model, prompt="x", max_tokens=4,
                                      stream=rng.random() < 0.5, **rng.choice(BAD))
            return "2xx"  # a bad request that was accepted
        return "2xx" if text == reference else "mismatch"
    except openai.APIStatusError as e:
        return "4xx" if e.status_code < 500 else "5xx"
    except (openai.APIConnectionError, openai.APITimeoutError):
        return "hang"


def soak(base: str, requests: int, clients: int, seed: int = 0,
         timeout: float = 120.0) -> dict[str, Any]:
    """Run the mix; counts of outcomes per kind, whether the engine still serves, and wall s."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=timeout,
                           max_retries=0)
    model = client.models.list().data[0].id
    reference = client.completions.create(model=model, **GREEDY).choices[0].text
    rng = random.Random(seed)
    kinds = [rng.choice(["greedy", "greedy_stream", "sampled", "structured", "cancel", "bad"])
             for _ in range(requests)]
    started = time.time()
    counts: Counter = Counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = {pool.submit(_one, client, model, k, reference, random.Random(i)): k
                   for i, k in enumerate(kinds)}
        for future in concurrent.futures.as_completed(futures):
            counts[(futures[future], future.result())] += 1
    try:
        alive = urllib.request.urlopen(f"{base}/health", timeout=10).status == 200
    except OSError:
        alive = False
    totals = Counter()
    for (_, outcome), n in counts.items():
        totals[outcome] += n
    return {"requests": requests, "clients": clients, "seconds": round(time.time() - started, 1),
            "2xx": totals["2xx"], "4xx": totals["4xx"], "5xx": totals["5xx"],
            "greedy_mismatches": totals["mismatch"], "hangs": totals["hang"],
            "engine_deaths": 0 if alive else 1,
            "by_kind": {f"{k}:{o}": n for (k, o), n in sorted(counts.items())}}
