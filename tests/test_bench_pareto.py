"""The policy comparison's arithmetic: the oracle, the Pareto front, the pick rule, the report."""

import json
import sys
from pathlib import Path

from vllm_blockdiff.bench.accuracy import Outcome, Row, summarize
from vllm_blockdiff.bench.pareto import (
    AR,
    ORACLE,
    Options,
    oracle,
    pareto_front,
    pick,
    report,
    sweep_specs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from policy_pareto import parse_options  # noqa: E402


def row(policy: str, b: int, acc: float, tpf: float, task: str = "t") -> Row:
    return Row(model="m", task=task, policy=policy, block_length=b, n=100, accuracy=acc,
               forwards_per_request=10 / tpf, tokens_per_forward=tpf,
               tokens_per_s=None if policy == ORACLE else 1.0)


def test_oracle_takes_the_cheapest_correct_run_per_example():
    strict = [Outcome(True, 8, 8), Outcome(True, 8, 8), Outcome(False, 8, 8)]
    loose = [Outcome(True, 8, 2), Outcome(False, 8, 2), Outcome(False, 8, 3)]
    assert oracle([strict, loose]) == [loose[0], strict[1], loose[2]]  # wrong: fewest forwards
    r = summarize(oracle([strict, loose]), None, "m", "t", ORACLE, 4)
    assert r.accuracy == 2 / 3 and r.tokens_per_forward == 24 / 13 and r.tokens_per_s is None


def test_pareto_front_leaves_out_dominated_rows_and_the_oracle():
    rows = [row("a", 4, 0.9, 2.0), row("b", 4, 0.8, 3.0), row("c", 4, 0.8, 2.5),
            row("d", 8, 0.9, 2.0), row(AR, 1, 1.0, 1.0), row(ORACLE, 4, 1.0, 5.0)]
    assert [(r.policy, r.block_length) for r in pareto_front(rows)] == [
        ("a", 4), ("b", 4), ("d", 8), (AR, 1)]


def test_pick_rule():
    ref = row("threshold:0.9", 4, 0.90, 2.0)
    base = [ref, row("threshold:0.9", 8, 0.80, 3.0), row(AR, 1, 1.0, 1.0),
            row(ORACLE, 4, 1.0, 9.0)]
    # Speed: most tokens per forward within 1 point of the reference's accuracy.
    p = pick([*base, row("x", 8, 0.895, 2.6), row("y", 8, 0.85, 4.0)])
    assert (p.rule, p.policy, p.block_length, p.reference_block_length) == ("speed", "x", 8, 4)
    assert p.speedup == 1.3 and round(p.points, 6) == -0.5 and p.oracle_tokens_per_forward == 9
    assert p.summary() == ("x B=8 (speed: 1.30x the tokens/forward of threshold:0.9 B=4, "
                           "-0.5 points)")
    # Accuracy: nothing faster at equal accuracy; most accuracy at no fewer tokens per forward.
    p = pick([*base, row("x", 4, 0.95, 2.0), row("y", 4, 0.99, 1.5)])
    assert (p.rule, p.policy) == ("accuracy", "x")
    # Nothing beats the reference.
    p = pick([*base, row("x", 4, 0.5, 2.0), row("y", 4, 0.99, 1.9)])
    assert (p.rule, p.policy, p.block_length) == ("reference", "threshold:0.9", 4)
    assert (p.speedup, p.points, p.oracle_accuracy) == (1.0, 0.0, 1.0)
    assert "reference" in p.summary() and not p.meets_target
    # Both gains: each is weighed against its target (1.3x; 5 points at TPF within 2%).
    hard = [row("threshold:0.9", 4, 0.44, 1.20), row("f", 4, 0.44, 1.35),
            row("e", 4, 0.60, 1.19), row("g", 4, 0.70, 1.15)]
    p = pick(hard)
    assert (p.rule, p.policy, round(p.points, 6)) == ("accuracy", "e", 16.0) and p.meets_target
    p = pick([*hard[:2], row("e", 4, 0.45, 1.19)])
    assert (p.rule, p.policy) == ("speed", "f") and not p.meets_target
    p = pick([row("threshold:0.9", 4, 0.0, 2.0), row("x", 16, 0.0, 5.0), row(AR, 1, 1.0, 1.0)])
    assert (p.rule, p.policy, p.oracle_accuracy) == ("unsolved", "threshold:0.9", None)
    assert pick([row("x", 4, 1.0, 2.0)]) is None


def test_options_and_sweep():
    opts = parse_options(["--quick", "--n", "5", "--ar-model", "", "--thresholds", "0.5,0.9,1"])
    assert (opts.n, opts.ar_model, opts.block_sizes) == (5, None, [4, 16])
    assert sweep_specs(opts) == ["threshold:0.9", "static:2", "localleap", "threshold:0.5",
                                 "threshold:1.0"]
    full = parse_options([])
    assert len(full.policies) == 13 and full.block_sizes == [4, 8, 16] and "latin" in full.tasks


def test_report_writes_json_and_one_plot_per_family(tmp_path, capsys):
    opts = Options(tasks=["t", "u"], out=str(tmp_path / "cmp"))
    rows = [row("threshold:0.9", 4, 0.9, 2.0), row("x", 4, 0.9, 3.0),
            row(ORACLE, 4, 1.0, 4.0), row(AR, 1, 1.0, 1.0), row("x", 4, 0.5, 1.0, task="u")]
    record = report(opts, rows, skipped=["learn2pd B=16: no filter"])
    assert json.loads((tmp_path / "cmp.json").read_text()) == record
    assert record["families"]["t"]["pick"]["policy"] == "x"
    assert record["families"]["u"]["pick"] is None
    assert (tmp_path / "cmp_t.png").stat().st_size > 0 and (tmp_path / "cmp_u.png").is_file()
    out = capsys.readouterr().out
    assert "| `oracle` | 4 | 1.00 | 4.00 | 2.5 |  |" in out
    assert "| t | `x` B=4 | speed | 0.90 / 3.00 | 0.90 / 2.00 (B=4) | 1.50x | +0.0 points | " \
           "met | 1.00 / 4.00 |" in out
