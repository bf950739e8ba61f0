"""Which unmasking policy to pick, per testbed family: accuracy against tokens per forward.

Every policy (by default the thirteen seed policies) at each block length runs on all families in
one batch (`accuracy.run_tasks`; greedy tokens do not depend on the batch, and the shared batch is
what makes the full sweep fit a CPU), so rows have no per-family wall time. Per family this gives a
Pareto table and plot with two yardsticks: the AR twin (one token per forward) as the baseline, and
ParallelBench's oracle per-sample threshold as the upper bound. The oracle takes, for each example,
the run of a threshold sweep that decodes it correctly in the fewest forwards (an example no
threshold gets right counts as wrong, at the sweep's fewest forwards): the best accuracy any
per-example threshold reaches, at the least cost that reaches it. `pick` turns a family's rows into
a recommendation by a fixed rule, so the README's advice can be read off the table.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from vllm_blockdiff.bench.accuracy import (
    Outcome,
    Row,
    engine,
    parse_policy,
    resolve_tokens,
    run_tasks,
    summarize,
)
from vllm_blockdiff.testbed.tasks import TASKS, generate

SEED_POLICIES = ("threshold:0.9", "dynamic:0.9", "static:2", "bacd", "localleap", "entropy",
                 "factor", "ete", "eoser", "freedave", "tccf:marker=|", "adablock:delimiter==",
                 "learn2pd")
REFERENCE = "threshold:0.9"  # what a pick has to beat
AR, ORACLE = "AR", "oracle"  # the rows that are no policy of the block-diffusion model
ACCURACY_SLACK = 0.01  # "equal accuracy": at most 1 point below the reference
TPF_SLACK = 0.02  # "equal tokens per forward": at most 2% below the reference
# What counts as a real gain over the reference (issue 13's targets); a pick weighs its speed-up
# and its accuracy gain each as a fraction of these.
SPEED_TARGET, POINTS_TARGET = 1.3, 5.0


class Options(msgspec.Struct, kw_only=True):
    """One comparison; `QUICK` swaps in a CPU-sized one for flags not given."""

    model: str = "examples/models/sdar-testbed"
    ar_model: str | None = "examples/models/qwen3-testbed"
    tasks: list[str] = msgspec.field(default_factory=lambda: list(TASKS))
    policies: list[str] = msgspec.field(default_factory=lambda: list(SEED_POLICIES))
    block_sizes: list[int] = msgspec.field(default_factory=lambda: [4, 8, 16])
    thresholds: list[float] = msgspec.field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0])
    n: int = 50
    split: str = "test"
    seed: int = 0
    out: str = "benchmarks/results/policy_pareto"


QUICK = {"policies": ["threshold:0.9", "static:2", "localleap"], "block_sizes": [4, 16],
         "thresholds": [0.5, 0.9, 1.0], "n": 3, "out": "benchmarks/results/policy_pareto_quick"}

HELP = {
    "model": "block-diffusion checkpoint (any SDAR-layout directory)",
    "ar_model": "its autoregressive twin, the baseline ('' for none)",
    "tasks": "comma separated families (default: all)",
    "policies": "comma separated policy specs (accuracy.parse_policy)",
    "thresholds": "the oracle's threshold sweep (also reported as threshold:x rows)",
    "n": "examples per family",
    "out": "JSON path without suffix; PNGs are <out>_<family>.png",
}


class Pick(msgspec.Struct):
    """A family's recommendation and the reference row it was measured against.

    rule "speed": the most tokens per forward at accuracy within 1 point of the reference;
    "accuracy": the most accuracy at tokens per forward within 2% of the reference's or more;
    whichever gains more relative to its target (1.3x, 5 points); "reference": nothing beats it;
    "unsolved": no policy gets any example right, so there is nothing to recommend.
    """

    task: str
    rule: str
    policy: str
    block_length: int
    accuracy: float
    tokens_per_forward: float
    reference_block_length: int
    reference_accuracy: float
    reference_tokens_per_forward: float
    oracle_accuracy: float | None  # the oracle at the reference's block length, if it ran
    oracle_tokens_per_forward: float | None

    @property
    def speedup(self) -> float:
        return self.tokens_per_forward / self.reference_tokens_per_forward

    @property
    def points(self) -> float:
        return 100 * (self.accuracy - self.reference_accuracy)

    @property
    def meets_target(self) -> bool:
        return self.speedup >= SPEED_TARGET or self.points >= POINTS_TARGET - 1e-9

    def summary(self) -> str:
        if self.rule == "unsolved":
            return "none (unsolved: no policy gets an example right)"
        if self.rule == "reference":
            return f"{REFERENCE} B={self.block_length} (reference: no policy beats it)"
        return (f"{self.policy} B={self.block_length} ({self.rule}: {self.speedup:.2f}x the "
                f"tokens/forward of {REFERENCE} B={self.reference_block_length}, "
                f"{self.points:+.1f} points)")


def sweep_specs(opts: Options) -> list[str]:
    """The policies, then the oracle's thresholds not already among them (each runs once)."""
    specs = list(opts.policies)
    return specs + [s for s in (f"threshold:{t}" for t in opts.thresholds) if s not in specs]


def oracle(runs: Sequence[Sequence[Outcome]]) -> list[Outcome]:
    """Per example (runs are aligned), a correct run with the fewest forwards, else the fewest."""
    return [min(per_example, key=lambda o: (not o.correct, o.forwards))
            for per_example in zip(*runs, strict=True)]


def dominated(row: Row, rows: Sequence[Row]) -> bool:
    return any(o.accuracy >= row.accuracy and o.tokens_per_forward >= row.tokens_per_forward
               and (o.accuracy, o.tokens_per_forward) != (row.accuracy, row.tokens_per_forward)
               for o in rows)


def pareto_front(rows: Sequence[Row]) -> list[Row]:
    """The rows a user could deploy (not the oracle) that no other such row dominates."""
    deployable = [r for r in rows if r.policy != ORACLE]
    return [r for r in deployable if not dominated(r, deployable)]


def pick(rows: Sequence[Row]) -> Pick | None:
    """The policy to use for one family, by the rule in `Pick`; None without reference rows.

    The reference is threshold 0.9 at its most accurate block length (ties: the faster one).
    """
    policies = [r for r in rows if r.policy not in (AR, ORACLE)]
    refs = [r for r in policies if r.policy == REFERENCE]
    if not refs:
        return None
    ref = max(refs, key=lambda r: (r.accuracy, r.tokens_per_forward))
    as_accurate = [r for r in policies if r.accuracy >= ref.accuracy - ACCURACY_SLACK - 1e-9]
    fastest = max(as_accurate, key=lambda r: (r.tokens_per_forward, r.accuracy))
    as_fast = [r for r in policies
               if r.tokens_per_forward >= ref.tokens_per_forward * (1 - TPF_SLACK)]
    best = max(as_fast, key=lambda r: (r.accuracy, r.tokens_per_forward))
    speed_gain = (fastest.tokens_per_forward / ref.tokens_per_forward - 1) / (SPEED_TARGET - 1)
    accuracy_gain = 100 * (best.accuracy - ref.accuracy) / POINTS_TARGET
    if not any(r.accuracy for r in policies):
        rule, chosen = "unsolved", ref
    elif max(speed_gain, accuracy_gain) <= 0:
        rule, chosen = "reference", ref
    elif speed_gain >= accuracy_gain:
        rule, chosen = "speed", fastest
    else:
        rule, chosen = "accuracy", best
    bound = next((r for r in rows if r.policy == ORACLE and r.block_length == ref.block_length),
                 None)
    return Pick(ref.task, rule, chosen.policy, chosen.block_length, chosen.accuracy,
                chosen.tokens_per_forward, ref.block_length, ref.accuracy,
                ref.tokens_per_forward, None if bound is None else bound.accuracy,
                None if bound is None else bound.tokens_per_forward)


def _code(policy: str) -> str:
    """A policy spec as Markdown code inside a table cell (a `|` would end the cell)."""
    return "`" + policy.replace("|", "\\|") + "`"


def table(rows: Sequence[Row]) -> str:
    """One family's rows as Markdown: baselines first, then by tokens per forward."""
    front = {id(r) for r in pareto_front(rows)}
    order = sorted(rows, key=lambda r: (r.policy != AR, r.policy != ORACLE,
                                        -r.tokens_per_forward, -r.accuracy))
    lines = ["| policy | B | accuracy | tokens/forward | forwards/request | front |",
             "|---|---|---|---|---|---|"]
    for r in order:
        lines.append(f"| {_code(r.policy)} | {r.block_length} | {r.accuracy:.2f} | "
                     f"{r.tokens_per_forward:.2f} | {r.forwards_per_request:.1f} | "
                     f"{'yes' if id(r) in front else ''} |")
    return "\n".join(lines)


def picks_table(picks: Sequence[Pick]) -> str:
    """The recommendation per family as Markdown, with the gains the issue's targets ask for."""
    lines = [f"| family | pick | rule | accuracy / TPF | {REFERENCE} (its best B) | TPF ratio | "
             f"accuracy change | target ({SPEED_TARGET}x or +{POINTS_TARGET:.0f}) | "
             "oracle (same B) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in picks:
        bound = ("-" if p.oracle_accuracy is None
                 else f"{p.oracle_accuracy:.2f} / {p.oracle_tokens_per_forward:.2f}")
        lines.append(f"| {p.task} | {_code(p.policy)} B={p.block_length} | {p.rule} | "
                     f"{p.accuracy:.2f} / {p.tokens_per_forward:.2f} | {p.reference_accuracy:.2f}"
                     f" / {p.reference_tokens_per_forward:.2f} (B={p.reference_block_length}) | "
                     f"{p.speedup:.2f}x | {p.points:+.1f} points | "
                     f"{'met' if p.meets_target else '-'} | {bound} |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """One family: a colour per policy, a marker per block length, the front as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    blocks = sorted({r.block_length for r in rows if r.policy != AR})
    markers = dict(zip(blocks, "o^sDvP", strict=False))
    colors = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(8, 4.6))
    front = sorted(pareto_front(rows), key=lambda r: r.tokens_per_forward)
    front_style = {"ls": "--", "color": "0.6", "lw": 1}
    ax.plot([r.tokens_per_forward for r in front], [r.accuracy for r in front], zorder=0,
            **front_style)
    policies = [p for p in dict.fromkeys(r.policy for r in rows) if p not in (AR, ORACLE)]
    styles = {**{p: {"color": colors(i % 20)} for i, p in enumerate(policies)},
              ORACLE: {"color": "crimson", "marker": "*", "markersize": 11},
              AR: {"color": "black", "marker": "X", "markersize": 9}}
    for name, style in styles.items():
        mine = sorted((r for r in rows if r.policy == name), key=lambda r: r.block_length)
        if not mine:
            continue
        ax.plot([r.tokens_per_forward for r in mine], [r.accuracy for r in mine], lw=0.6,
                alpha=0.5, color=style["color"])
        for r in mine:
            ax.plot(r.tokens_per_forward, r.accuracy, ls="none",
                    **{"marker": markers.get(r.block_length, "o"), **style})
    handles = [Line2D([], [], ls="none", label=name, **{"marker": "o", **style})
               for name, style in styles.items() if any(r.policy == name for r in rows)]
    handles += [Line2D([], [], ls="none", marker=m, color="0.3", label=f"B={b}")
                for b, m in markers.items()]
    handles.append(Line2D([], [], label="Pareto front", **front_style))
    ax.legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set(title=title, xlabel="tokens per forward", ylabel="accuracy", ylim=(-0.05, 1.05))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def measure(opts: Options, log: Callable[[str], None] = print) -> tuple[list[Row], list[str]]:
    """All rows (AR twin, every spec at every block length, the oracle), and skipped configs.

    A configuration the engine rejects (e.g. learn2pd on a model without a filter for that block
    length) is skipped with its error, so any SDAR-layout model can be compared.
    """
    examples = {t: generate(t, opts.split, opts.n, opts.seed) for t in opts.tasks}
    rows: list[Row] = []
    if opts.ar_model:
        llm = engine(opts.ar_model)
        results, _ = run_tasks(llm, examples, None)
        rows += [summarize(outs, None, opts.ar_model, t, AR, 1) for t, outs in results.items()]
        del llm
    llm = engine(opts.model, diffusion=True)
    sweep = {f"threshold:{t}" for t in opts.thresholds}
    runs: dict[tuple[str, int], list[list[Outcome]]] = defaultdict(list)
    skipped: list[str] = []
    for spec in sweep_specs(opts):
        for b in opts.block_sizes:
            extra = {**resolve_tokens(parse_policy(spec), llm.get_tokenizer()), "block_length": b}
            try:
                results, seconds = run_tasks(llm, examples, extra)
            except ValueError as e:
                skipped.append(f"{spec} B={b}: {e}")
                log(f"skipped {skipped[-1]}")
                continue
            for task, outcomes in results.items():
                rows.append(summarize(outcomes, None, opts.model, task, spec, b))
                if spec in sweep:
                    runs[task, b].append(outcomes)
            log(f"{spec} B={b}: done in {seconds:.1f} s")
    for (task, b), per_threshold in runs.items():
        rows.append(summarize(oracle(per_threshold), None, opts.model, task, ORACLE, b))
    return rows, skipped


def report(opts: Options, rows: list[Row], skipped: list[str]) -> dict:
    """Print a table and a pick per family, write the JSON and one PNG per family."""
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    families: dict[str, dict] = {}
    picks: list[Pick] = []
    for task in opts.tasks:
        mine = [r for r in rows if r.task == task]
        if not mine:
            continue
        choice = pick(mine)
        picks += [choice] if choice else []
        print(f"\n## {task}\n\n{table(mine)}\n\npick: {choice.summary() if choice else '-'}")
        plot(mine, out.parent / f"{out.name}_{task}.png", f"{task} ({opts.split}, n={opts.n})")
        families[task] = {"front": [[r.policy, r.block_length] for r in pareto_front(mine)],
                          "pick": msgspec.to_builtins(choice)}
    print(f"\n## Picks\n\n{picks_table(picks)}")
    record = {"options": msgspec.to_builtins(opts), "rows": msgspec.to_builtins(rows),
              "families": families, "skipped": skipped}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"\nwrote {out.with_suffix('.json')} and {len(families)} plots {out}_<family>.png")
    return record
