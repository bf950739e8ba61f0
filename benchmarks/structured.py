"""Structured outputs on the canvas: coverage, validity, speed with and without the grammar.

    python benchmarks/structured.py --model examples/models/sdar-testbed --per-split 20
    python benchmarks/structured.py --model ... --full          # every compiled schema
    python benchmarks/structured.py --model ... --full --splits Github_easy --speed-skip
    python benchmarks/structured.py --model ... --backend xgrammar --speed-skip

1. Declared coverage per JSONSchemaBench split (compiled / total) of the grammar backend
   (`--backend`, "auto" by default, the serve default; the engine serves with the same one), by
   how it resolved each schema: compiler chosen, exact or approximated, rewritten or not.
2. Validity: JSON-schema requests for compiled schemas (a sample per split, or all with --full),
   greedy and at temperature 1: every output must be in its grammar's language (a prefix of it
   if cut by max_tokens; tokens replayed through a fresh matcher of the same backend), and
   finished outputs must be schema-valid where the grammar is exact. Each response's statistics
   say which compiler ran and whether it approximated the schema; outputs are counted by that
   (and checked against the backend's own resolution of the schema).
3. Speed: the testbed's JSON-record prompts at batch 8, unconstrained and constrained by each
   example's schema: tokens per forward, wall time per output token, grammar host time per step
   (p50 / p99) and tokens the grammar filled in without a forward of their own.
Prints tables and writes `<out>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from vllm_blockdiff.grammar import BACKEND_NAMES, GrammarSpec, make_backend

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"


def engine(model: str, grammar_backend: str, gpu_share: float):
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # stats via collective_rpc
    # The coverage pass may have initialised CUDA here (xgrammar's bitmasks): no forking.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    on_gpu = os.path.exists("/dev/nvidia0")
    return LLM(model, dtype="bfloat16" if on_gpu else "float32", max_model_len=1024,
               gpu_memory_utilization=gpu_share if on_gpu else 0.3, enforce_eager=not on_gpu,
               max_num_seqs=256 if on_gpu else 64, seed=0,
               additional_config={"blockdiff": {"grammar_backend": grammar_backend}})


def grammar_stats(llm) -> dict:
    """The workers' GrammarStats (engine/sampler.py), then reset."""
    def take(worker):
        from vllm_blockdiff.engine.sampler import GrammarStats

        sampler = worker.model_runner.sampler
        stats, sampler.grammar_stats = sampler.grammar_stats, GrammarStats()
        return {"steps": list(stats.steps), "committed": stats.committed,
                "forced": stats.forced}

    return llm.collective_rpc(take)[0]


def coverage_and_sample(backend, root: Path, splits: list[str] | None,
                        per_split: int | None, seed: int):
    """Coverage per split, and the schemas to request: every compiled one, or `per_split` of
    each kind (compiler, exact or approximated), so the rare fallbacks are sampled too."""
    from vllm_blockdiff.grammar.coverage import kind_of, split_coverage

    dirs = sorted(p for p in root.iterdir() if p.is_dir() and (not splits or p.name in splits))
    cov = {p.name: split_coverage(backend, p) for p in dirs}  # one thread: warnings read
    rng = random.Random(seed)
    sample = {}
    for split, c in cov.items():
        if per_split is None:
            sample[split] = c.compiled_paths
            continue
        sample[split] = []
        for kind in c.kinds():
            paths = [r.path for r in c.results if r.compiled and kind_of(r) == kind]
            sample[split] += rng.sample(paths, min(per_split, len(paths)))
    return cov, sample


def in_language(backend, schema, token_ids: list[int], finished: bool) -> bool:
    """Whether the output's tokens are in the grammar's language (a prefix of it, if cut short):
    the engine's guarantee, checked by replaying them through a fresh matcher."""
    matcher = backend.matcher(backend.compile(GrammarSpec.from_json(schema)))
    body = token_ids[:-1] if finished else token_ids  # a finished output ends with its EOS
    if not all(matcher.accept(t) for t in body):
        return False
    return not finished or matcher.accept(backend.stop_token_ids[0])


KINDS = [f"{b} {e}" for e in ("exact", "approximated") for b in ("llguidance", "xgrammar")]


def validity(llm, backend, sample: dict[str, list[str]], max_tokens: int,
             on_rows=lambda rows: None) -> list[dict]:
    """Per split and temperature: every output must be in its grammar's language; finished
    outputs of schemas compiled exactly must be schema-valid. Outputs are counted by the
    compiler and exactness their response reports (`kv_transfer_params.blockdiff.grammar`),
    which must match the backend's own resolution of the schema."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from vllm_blockdiff.grammar.coverage import UNUSABLE, load_schema, output_errors

    rows = []
    for split, paths in sample.items():
        schemas = [load_schema(p) for p in paths]
        for temperature in (0.0, 1.0):
            params = [SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens,
                                     structured_outputs=StructuredOutputsParams(json=s))
                      for i, s in enumerate(schemas)]
            outs = llm.generate(["JSON:"] * len(schemas), params, use_tqdm=False)
            row = {"finished": 0, "in_language": 0, "schema_unusable_by_validator": 0,
                   "stats_disagree": 0, **{k: {"requests": 0, "finished": 0, "valid": 0}
                                           for k in KINDS}}
            failures = []
            for path, schema, out in zip(paths, schemas, outs, strict=True):
                o = out.outputs[0]
                name = Path(path).name
                ran = out.kv_transfer_params["blockdiff"]["grammar"]
                kind = f"{ran['backend']} {'approximated' if ran['approximated'] else 'exact'}"
                resolved = backend.resolve(GrammarSpec.from_json(schema))
                if (resolved.backend, resolved.approximated) != (ran["backend"],
                                                                 ran["approximated"]):
                    row["stats_disagree"] += 1
                    failures.append({"schema": name, "error": f"engine reports {ran}"})
                row[kind]["requests"] += 1
                finished = o.finish_reason == "stop"
                if in_language(backend, schema, list(o.token_ids), finished):
                    row["in_language"] += 1
                else:
                    failures.append({"schema": name, "error": "not in the grammar's language"})
                if not finished:
                    continue
                row["finished"] += 1
                error = output_errors(o.text, schema)
                if error is not None and error.startswith(UNUSABLE):
                    row["schema_unusable_by_validator"] += 1
                    continue
                row[kind]["finished"] += 1
                if error is None:
                    row[kind]["valid"] += 1
                elif kind.endswith(" exact"):
                    failures.append({"schema": name, "kind": kind, "error": error[:200]})
            rows.append({"split": split, "temperature": temperature, "requests": len(schemas),
                         **row, "failures": failures})
            on_rows(rows)  # results so far survive a run cut short by a time limit
    return rows


def speed(llm, batch: int, rounds: int) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from vllm_blockdiff.testbed.tasks import generate

    examples = generate("json", "test", batch * rounds, seed=1)
    result = {}
    for mode in ("free", "json_schema"):
        tokens = forwards = 0
        seconds = 0.0
        grammar_stats(llm)
        for r in range(rounds):
            chunk = examples[r * batch:(r + 1) * batch]
            params = [SamplingParams(temperature=0.0, max_tokens=96, structured_outputs=(
                StructuredOutputsParams(json=e.meta["schema"]) if mode != "free" else None))
                for e in chunk]
            t = time.perf_counter()
            outs = llm.generate([e.prompt for e in chunk], params, use_tqdm=False)
            seconds += time.perf_counter() - t
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
            forwards += sum(o.kv_transfer_params["blockdiff"]["forwards"] for o in outs)
        stats = grammar_stats(llm)
        steps = np.array(stats["steps"]) * 1e3
        result[mode] = {
            "output_tokens": tokens, "tokens_per_forward": tokens / forwards,
            "ms_per_output_token": 1e3 * seconds / tokens,
            "grammar_ms_per_step_p50": float(np.percentile(steps, 50)) if len(steps) else 0.0,
            "grammar_ms_per_step_p99": float(np.percentile(steps, 99)) if len(steps) else 0.0,
            "tokens_committed_under_grammar": stats["committed"],
            "tokens_filled_in_by_grammar": stats["forced"],
        }
    result["overhead"] = (result["json_schema"]["ms_per_output_token"]
                          / result["free"]["ms_per_output_token"] - 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="examples/models/sdar-testbed")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                   help="grammar backend: coverage, replay and the engine's")
    p.add_argument("--schemas", default=str(SHARED), help="JSONSchemaBench root")
    p.add_argument("--per-split", type=int, default=20,
                   help="schemas per split and kind (compiler, exact or approximated)")
    p.add_argument("--full", action="store_true", help="every compiled schema")
    p.add_argument("--splits", default="", help="comma list of splits (default: all)")
    p.add_argument("--speed-skip", action="store_true", help="skip the speed comparison")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-share", type=float, default=0.5,
                   help="gpu_memory_utilization on a GPU (engines side by side take less)")
    p.add_argument("--speed-only", action="store_true", help="skip coverage and validity")
    p.add_argument("--out", default=None,
                   help="default benchmarks/results/structured_BACKEND")
    a = p.parse_args()
    if a.out is None:
        a.out = f"benchmarks/results/structured_{a.backend}"

    cov, valid_rows, fast = {}, [], {}
    backend = make_backend(a.backend, a.model)
    if not a.speed_only:
        splits = [s for s in a.splits.split(",") if s] or None
        started = time.perf_counter()
        cov, sample = coverage_and_sample(backend, Path(a.schemas), splits,
                                          None if a.full else a.per_split, a.seed)
        print("\n".join(c.summary() for c in cov.values()))
        print(f"coverage in {time.perf_counter() - started:.0f} s")
    llm = engine(a.model, a.backend, a.gpu_share)
    if not a.speed_only:
        started = time.perf_counter()
        valid_rows = validity(llm, backend, sample, a.max_tokens,
                              lambda rows: _write(a, cov, rows, fast))
        print(f"validity in {time.perf_counter() - started:.0f} s")
    print(f"\n{'split':16} {'T':>3} {'requests':>8} {'in grammar':>10} {'finished':>8}  " +
          "  ".join(f"{k:>23}" for k in KINDS) + "   (valid/finished of requests)")
    for r in valid_rows:
        print(f"{r['split']:16} {r['temperature']:3.0f} {r['requests']:8d} "
              f"{r['in_language']:10d} {r['finished']:8d}  " + "  ".join(
                  f"{r[k]['valid']:>7d}/{r[k]['finished']:<5d} of {r[k]['requests']:<6d}"
                  for k in KINDS))
        for f in r["failures"]:
            print(f"    {f['schema']}: {f['error']}")
    if valid_rows:
        print("total: " + ", ".join(
            f"{k} {sum(r[k]['valid'] for r in valid_rows)}/"
            f"{sum(r[k]['finished'] for r in valid_rows)} valid/finished" for k in KINDS))
    if a.speed_skip:
        return _write(a, cov, valid_rows, fast)
    fast = speed(llm, a.batch, a.rounds)
    print(f"\nbatch {a.batch}: {'mode':12} {'TPF':>6} {'ms/token':>9} {'grammar p50/p99 ms':>19} "
          f"{'filled in':>9}")
    for mode in ("free", "json_schema"):
        m = fast[mode]
        print(f"{'':9}{mode:12} {m['tokens_per_forward']:6.2f} {m['ms_per_output_token']:9.2f} "
              f"{m['grammar_ms_per_step_p50']:8.2f} / {m['grammar_ms_per_step_p99']:7.2f} "
              f"{m['tokens_filled_in_by_grammar']:9d}")
    print(f"end-to-end overhead per output token: {fast['overhead']:+.1%}")
    _write(a, cov, valid_rows, fast)


def _write(a, cov, valid_rows, fast) -> None:
    out = Path(a.out + ("_speed" if a.speed_only else "")).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(a),
        "coverage": {s: {"compiled": c.compiled, "total": c.total, "exact": c.exact,
                         "declared_coverage": c.declared_coverage, "kinds": c.kinds()}
                     for s, c in cov.items()},
        "validity": valid_rows, "speed": fast}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
