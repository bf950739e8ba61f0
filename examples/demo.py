"""Serve the bundled block-diffusion model with plain `vllm serve` and send it one request.

    python examples/demo.py [--model examples/models/sdar-testbed] [--port 8011]

Prints the completion and the request's decoding statistics (tokens per forward etc.).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

HERE = Path(__file__).resolve().parent
# Held-out test prompts of two of the tasks the bundled model was trained on.
PROMPTS = ["Q: 3900+7984=", "Line: Kai, Hal, Sue, Dee, Amy. Do: sort. Result:"]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit("vllm serve did not become healthy in time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE / "models" / "sdar-testbed"))
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--prompt", action="append", help="prompt(s) to send (default: two tasks)")
    a = p.parse_args()

    vllm_cli = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_cli), "serve", a.model, "--port", str(a.port), "--served-model-name", "demo"]
    if not os.path.exists("/dev/nvidia0"):  # CPU host: vLLM's GPU memory defaults do not fit
        cmd += ["--gpu-memory-utilization", "0.3", "--max-model-len", "1024", "--enforce-eager"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    print("$", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{a.port}"
    try:
        wait_healthy(url, server)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        for prompt in a.prompt or PROMPTS:
            for block_length in (4, 16):
                xargs = {"policy": "threshold", "threshold": 0.9, "block_length": block_length}
                out = client.completions.create(model="demo", prompt=prompt, max_tokens=64,
                                                temperature=0, extra_body={"vllm_xargs": xargs})
                stats = out.model_extra["kv_transfer_params"]["blockdiff"]
                print(f"\nprompt:     {prompt!r}\nvllm_xargs: {xargs}")
                print(f"completion: {out.choices[0].text!r}")
                print(f"tokens per forward: {stats['tokens_per_forward']:.2f} "
                      f"({stats['output_tokens']} tokens in {stats['forwards']} forwards)")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
