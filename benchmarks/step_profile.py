"""Where one engine step's time goes: AR twin vs block diffusion, per batch size, on the GPU.

Each engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) in its own subprocess. Per batch
size it times one `generate` without the profiler (wall ms per engine step), then profiles another
with the torch profiler, the runner's and scheduler's phases wrapped in `record_function` ranges:

- `schedule` / `update`: the scheduler before and after the step (host);
- `prepare`: the runner's and model state's input and attention preparation (host, H2D copies);
- `forward`: the model (graph replay, or eager/piecewise launches);
- `logits`: `compute_logits`; `sampler`: the rest of `sample` (propose, policy, commit, canvas);
- `postprocess`: the runner's bookkeeping after sampling.

For each phase it reports host time (CPU time of the range) and GPU time (kernels launched from
it) per step, plus the GPU's busy time (union of kernel intervals) and idle time per step, and
the kernels that take the most GPU time (ms and launches per step). The profiler roughly doubles
host times; the unprofiled wall time is the real step cost, and the unprofiled host timeline
(perf_counter around the same calls) is the median over the decode steps, the prompt's step apart.

    python benchmarks/step_profile.py --shape qwen3-1.7b --batch 1 16 64 \
        --out benchmarks/results/step_profile.json

`--scheduling sync,async` profiles the diffusion engine both ways (windows: `--async-scheduling`,
where a step's host work overlaps the previous step's GPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

TOP_KERNELS = 15
PHASES = ("schedule", "prepare", "forward", "logits", "sampler", "postprocess", "update")
RANGES = ("execute", "sample", *PHASES)


def _around(owner, name: str, context: Callable[[], AbstractContextManager]) -> None:
    """Run every call of `owner.name` inside a fresh `context()`."""
    fn = getattr(owner, name)

    def wrapped(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    setattr(owner, name, wrapped)


def _wrap(obj, name: str, label: str) -> None:
    import torch

    _around(obj, name, lambda: torch.profiler.record_function(label))


def _instrument(llm) -> dict:
    """Wrap the phases of the in-process engine; returns a live step counter and the times at
    which steps were scheduled."""
    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    steps = {"n": 0, "t": []}
    schedule = core.scheduler.schedule

    def counted(*args, **kwargs):
        steps["n"] += 1
        steps["t"].append(time.perf_counter())
        return schedule(*args, **kwargs)

    core.scheduler.schedule = counted
    _wrap(core.scheduler, "schedule", "schedule")
    _wrap(core.scheduler, "update_from_output", "update")
    for name in ("prepare_inputs", "prepare_attn"):
        _wrap(runner, name, "prepare")
        _wrap(runner.model_state, name, "prepare")
    _wrap(runner.model, "compute_logits", "logits")
    _wrap(runner, "sample", "sample")
    _wrap(runner, "postprocess_sampled", "postprocess")
    _wrap(runner, "execute_model", "execute")
    return steps


# Host time per step without the profiler (perf_counter around each call, ~1 us each): which
# calls the step's wall time goes to. Nested: prepare_* and forward inside execute, sample inside
# sample_tokens, logits inside sample; graph_replay counts the model's and the sampler's graphs,
# sync is the host waiting for the GPU's results. ms_* are the model state's parts of execute (the
# plugin's input and attention preparation), plan/upload/propose the sampler's host work.
TIMED = ("schedule", "execute", "prepare_inputs", "prepare_attn", "ms_prepare_inputs",
         "ms_prepare_attn", "sample_tokens", "sample", "logits", "plan", "upload", "propose",
         "graph_replay", "tail_replay", "sync", "update")


def _time(owner, name: str, label: str, steps: list[dict[str, float]]) -> None:
    @contextmanager
    def timer():
        if label == "schedule":  # each step starts with the scheduler
            steps.append({})
        t = time.perf_counter()
        try:
            yield
        finally:
            if steps:
                steps[-1][label] = steps[-1].get(label, 0.0) + time.perf_counter() - t

    _around(owner, name, timer)


def _timeline(llm, steps: list[dict[str, float]]) -> None:
    """Host timers on the scheduler's and runner's calls, CUDA graph replays and host syncs,
    summed per step into `steps` (one dict per scheduler call)."""
    import torch

    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    for owner, name, label in ((core.scheduler, "schedule", "schedule"),
                               (core.scheduler, "update_from_output", "update"),
                               (runner, "execute_model", "execute"),
                               (runner, "prepare_inputs", "prepare_inputs"),
                               (runner, "prepare_attn", "prepare_attn"),
                               (runner.model_state, "prepare_inputs", "ms_prepare_inputs"),
                               (runner.model_state, "prepare_attn", "ms_prepare_attn"),
                               (runner, "sample_tokens", "sample_tokens"),
                               (runner, "sample", "sample"),
                               (runner.model, "compute_logits", "logits"),
                               (torch.cuda.CUDAGraph, "replay", "graph_replay"),
                               (torch.cuda.Event, "synchronize", "sync")):
        if hasattr(owner, name):  # off CUDA, torch.cuda's classes are placeholders
            _time(owner, name, label, steps)
    from vllm_blockdiff.engine.sampler import BlockDiffusionSampler, StepPlan, TailGraphs

    for owner, name, label in ((TailGraphs, "replay", "tail_replay"),
                               (StepPlan, "__init__", "plan"),
                               (BlockDiffusionSampler, "_upload", "upload"),
                               (BlockDiffusionSampler, "_propose", "propose")):
        _time(owner, name, label, steps)


def _decode_median(steps: list[dict[str, float]]) -> dict[str, float]:
    """Each timer's median over the decode steps, in ms: the prompt's step (the first) is far
    larger and, averaged in, weighs 4x more in a diffusion run (17 steps) than in an AR run
    (65 steps)."""
    decode = steps[1:] or steps
    return {k: round(statistics.median(s.get(k, 0.0) for s in decode) * 1e3, 3) for k in TIMED}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _breakdown(prof, steps: int) -> dict[str, dict[str, float]]:
    """Per-step host and GPU milliseconds of each phase (nested ranges subtracted)."""
    from torch.autograd import DeviceType

    events = prof.events()
    host: dict[str, float] = {}
    gpu: dict[str, float] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in RANGES:
            host[e.name] = host.get(e.name, 0.0) + e.cpu_time_total / 1e3
            gpu[e.name] = gpu.get(e.name, 0.0) + e.device_time_total / 1e3
    # forward = execute - prepare; sampler = sample - logits (ranges nest that way)
    for outer, inner, name in (("execute", "prepare", "forward"), ("sample", "logits", "sampler")):
        host[name] = host.pop(outer, 0.0) - host.get(inner, 0.0)
        gpu[name] = gpu.pop(outer, 0.0) - gpu.get(inner, 0.0)
    # CUDA events named after the ranges above are the profiler's GPU annotations, not kernels.
    cuda = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in RANGES]
    kernels = [(e.time_range.start, e.time_range.end) for e in cuda]
    span = (max(b for _, b in kernels) - min(a for a, _ in kernels)) / 1e3 if kernels else 0.0
    busy = _union(kernels) / 1e3
    out = {p: {"host_ms": round(host.get(p, 0.0) / steps, 3),
               "gpu_ms": round(gpu.get(p, 0.0) / steps, 3)} for p in PHASES}
    out["gpu"] = {"busy_ms": round(busy / steps, 3), "idle_ms": round((span - busy) / steps, 3),
                  "kernels": round(len(kernels) / steps, 1)}
    # Which kernels the GPU time goes to: the diffusion step's extra work shows up by name.
    by_name: dict[str, list[float]] = {}
    for e in cuda:
        t = by_name.setdefault(e.name[:80], [0.0, 0])
        t[0] += (e.time_range.end - e.time_range.start) / 1e3
        t[1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    out["top_kernels"] = [{"name": n, "gpu_ms": round(ms / steps, 4),
                           "per_step": round(c / steps, 1)} for n, (ms, c) in top]
    return out


def _py_profile(llm, prompts, params, out: Path) -> None:
    """One more `generate` under cProfile: the plugin's and the runner's functions by own and
    cumulative time, written as text."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(50)
    stats.sort_stats("cumulative").print_stats(r"vllm_blockdiff|vllm/v1", 80)
    out.write_text(text.getvalue())


def _sync_sites(llm, prompts, params, steps: int) -> list[dict]:
    """One more `generate` with CUDA's sync debug mode: every call that makes the host wait for
    the GPU (`.item()`, `.tolist()`, copies to pageable memory, boolean indexing) warns, and the
    distinct call stacks (vLLM's and the plugin's frames) are counted per step. A sync inside a
    step that should overlap the previous one is what keeps the host from running ahead."""
    import traceback
    import warnings
    from collections import Counter

    import torch

    sites: Counter[str] = Counter()

    def record(*_args, **_kwargs) -> None:
        frames = [f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno} {f.name}"
                  for f in traceback.extract_stack()[:-1] if "vllm" in f.filename]
        sites[" <- ".join(reversed(frames[-6:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            llm.generate(prompts, params, use_tqdm=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [{"per_step": round(n / steps, 2), "stack": s} for s, n in sites.most_common(12)]


def run_engine(path: str, arch: str, configs: list[str], batches: list[int], prompt_len: int,
               max_tokens: int, cudagraph_mode: str | None, pyprofile: str | None = None,
               async_scheduling: bool = False, sync_debug: bool = False) -> list[dict]:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cuda = torch.cuda.is_available()
    compilation = {"cudagraph_mode": cudagraph_mode} if cudagraph_mode else None
    llm = LLM(path, load_format="dummy", dtype="bfloat16" if cuda else "float32",
              max_model_len=prompt_len + max_tokens + 64, gpu_memory_utilization=0.5 if cuda
              else 0.3, max_num_seqs=max(batches), seed=0, enforce_eager=not cuda,
              compilation_config=compilation,
              # the AR twin keeps vLLM's default (asynchronous); windows are asked explicitly
              async_scheduling=True if async_scheduling else None)
    timed: list[dict[str, float]] = []
    _timeline(llm, timed)  # innermost: the profiler's ranges stay outside the timers
    steps = _instrument(llm)
    rows = []
    for config, batch in ((c, b) for c in configs for b in batches):
        block_length, n_steps = (int(x) for x in config.split(":"))
        extra = {"policy": "static", "block_length": block_length, "steps": n_steps}
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=False, extra_args=extra if arch == "sdar" else None)
        prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 300 + 10
                                                  for j in range(prompt_len)])
                   for i in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        steps["n"], steps["t"] = 0, []
        timed.clear()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        n = steps["n"]
        timeline = _decode_median(timed)
        prompt_step = {k: round(timed[0].get(k, 0.0) * 1e3, 3) for k in TIMED}
        # The first step is the prompt's; the decode steps' median leaves it out of the average.
        gaps = sorted(b - a for a, b in zip(steps["t"][1:], steps["t"][2:], strict=False))
        decode_ms = round(gaps[len(gaps) // 2] * 1e3, 3) if gaps else None
        steps["n"] = 0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            llm.generate(prompts, params, use_tqdm=False)
        breakdown = _breakdown(prof, steps["n"])
        if pyprofile:  # host time by Python function (cProfile inflates call-heavy code)
            _py_profile(llm, prompts, params, Path(pyprofile)
                        / f"pyprofile_{arch}_{config.replace(':', 'x')}_b{batch}.txt")
        sync_sites = _sync_sites(llm, prompts, params, n) if sync_debug and cuda else None
        rows.append({"engine": "ar" if arch == "qwen3" else
                     "diffusion-async" if async_scheduling else "diffusion",
                     "config": config if arch == "sdar" else "-", "batch": batch,
                     "cudagraph_mode": cudagraph_mode or "default",
                     "card": torch.cuda.get_device_name() if cuda else "cpu", "steps": n,
                     "wall_ms_per_step": round(wall * 1e3 / n, 3),
                     "decode_step_median_ms": decode_ms, "host_timeline_ms": timeline,
                     "host_prompt_step_ms": prompt_step,
                     **({"sync_sites": sync_sites} if sync_sites is not None else {}),
                     **breakdown})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen3-1.7b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--configs", default="4:4,4:1", help="block_length:steps of the diffusion runs")
    p.add_argument("--cudagraph-modes", default="default",
                   help="diffusion runs per mode, e.g. 'PIECEWISE,default' (default: the plugin's)")
    p.add_argument("--out", default="step_profile.json")
    p.add_argument("--scheduling", default="sync",
                   help="diffusion runs per scheduling: 'sync,async' adds windows "
                        "(--async-scheduling, rows 'diffusion-async')")
    p.add_argument("--no-ar", dest="ar", action="store_false", help="skip the AR twin's run")
    p.add_argument("--pyprofile", default=None,
                   help="a folder: also write each run's host time by Python function there")
    p.add_argument("--sync-debug", action="store_true",
                   help="also count the calls that make the host wait for the GPU, by call stack")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:  # one engine in this process
        path, arch, configs, mode, out = a.worker
        rows = run_engine(path, arch, configs.split(","), a.batch, a.prompt_len, a.max_tokens,
                          None if mode == "default" else mode, a.pyprofile,
                          a.scheduling == "async", a.sync_debug)
        Path(out).write_text(json.dumps(rows))
        return
    from throughput import write_shape

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = ([(write_shape(root, a.shape, "qwen3"), "qwen3", "1:1", "default", "sync")]
                if a.ar else [])
        sdar = write_shape(root, a.shape, "sdar")
        runs += [(sdar, "sdar", a.configs, m, sched) for m in a.cudagraph_modes.split(",")
                 for sched in a.scheduling.split(",")]
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        for i, (path, arch, config, mode, sched) in enumerate(runs):
            out = root / f"rows{i}.json"
            cmd = [sys.executable, __file__, "--worker", path, arch, config, mode, str(out),
                   "--batch", *map(str, a.batch), "--prompt-len", str(a.prompt_len),
                   "--max-tokens", str(a.max_tokens), "--scheduling", sched]
            if a.pyprofile:
                cmd += ["--pyprofile", str(Path(a.pyprofile).resolve())]
            if a.sync_debug:
                cmd.append("--sync-debug")
            subprocess.run(cmd, env=env, check=True)
            rows += json.loads(out.read_text())
    print(f"\n{'engine':15} {'B:steps':7} {'graphs':10} {'batch':>5} {'wall ms':>8} {'decode':>7} "
          + " ".join(f"{p[:8]:>8}" for p in PHASES) + f" {'GPU busy':>8} {'idle':>7}")
    for r in rows:
        phases = " ".join(f"{r[p]['host_ms']:4.1f}/{r[p]['gpu_ms']:3.1f}" for p in PHASES)
        print(f"{r['engine']:15} {r['config']:7} {r['cudagraph_mode']:10} {r['batch']:5d} "
              f"{r['wall_ms_per_step']:8.2f} {r['decode_step_median_ms']:7.2f} {phases} "
              f"{r['gpu']['busy_ms']:8.2f} "
              f"{r['gpu']['idle_ms']:7.2f}")
    print("\nhost ms per decode step (median), unprofiled (nested: prepare_* in execute, sample "
          "in sample_tokens, logits in sample)")
    print(f"{'engine':15} {'B:steps':7} {'batch':>5} " + " ".join(f"{k[-9:]:>9}" for k in TIMED))
    for r in rows:
        print(f"{r['engine']:15} {r['config']:7} {r['batch']:5d} "
              + " ".join(f"{r['host_timeline_ms'][k]:9.3f}" for k in TIMED))
    for r in rows:
        print(f"\n{r['engine']} {r['config']} batch {r['batch']}: top kernels, GPU ms per step")
        for k in r["top_kernels"]:
            print(f"  {k['gpu_ms']:7.3f} ms {k['per_step']:6.1f}x  {k['name']}")
    for r in rows:
        for site in r.get("sync_sites", []):
            print(f"sync {r['engine']} {r['config']} b{r['batch']}: {site['per_step']:5.2f}/step "
                  f"{site['stack']}")
    print("(wall: mean per step, prompt step included; decode: median gap between the schedule "
          "calls of decode steps; phases: profiled host ms / GPU ms per step)")
    Path(a.out).write_text(json.dumps({"shape": a.shape, "prompt_len": a.prompt_len,
                                       "max_tokens": a.max_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
