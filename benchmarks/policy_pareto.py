"""Every policy at B = 4, 8, 16 on every testbed family: one Pareto table, plot and pick each.

    python benchmarks/policy_pareto.py                       # the full comparison (GPU)
    python benchmarks/policy_pareto.py --quick               # CPU smoke: 3 examples, 3 policies
    python benchmarks/policy_pareto.py --model DIR --ar-model DIR --tasks line_shuffle,latin

Defaults: the bundled testbed models, the thirteen seed policies, the oracle's threshold sweep
(0.5 to 1.0) and 50 test examples per family (`vllm_blockdiff.bench.pareto.Options`). Prints a
Markdown table per family (AR twin, oracle, every policy and block length, the Pareto front
marked) and which policy to pick by the rule in `pareto.Pick`; writes `<out>.json` and
`<out>_<family>.png` (default out: benchmarks/results/policy_pareto).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import msgspec

from vllm_blockdiff.bench.pareto import HELP, QUICK, Options, measure, report

SCALARS = {msgspec.inspect.IntType: int, msgspec.inspect.FloatType: float}


def _list_of(kind: Callable[[str], object]) -> Callable[[str], list]:
    return lambda text: [kind(x) for x in text.split(",")]


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Flags map 1:1 onto Options (lists comma separated); --quick fills in QUICK where unset."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few examples and policies, on CPU")
    for f in msgspec.inspect.type_info(Options).fields:
        item = getattr(f.type, "item_type", None)
        if item is None:
            parse = SCALARS.get(type(f.type), str)
        else:
            parse = _list_of(SCALARS.get(type(item), str))
        parser.add_argument("--" + f.name.replace("_", "-"), type=parse, default=None,
                            help=HELP.get(f.name))
    ns = vars(parser.parse_args(argv))
    given = {k: v for k, v in ns.items() if k != "quick" and v is not None}
    if given.get("ar_model") == "":
        given["ar_model"] = None
    return Options(**{**(QUICK if ns["quick"] else {}), **given})


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_options(argv)
    rows, skipped = measure(opts)
    report(opts, rows, skipped)


if __name__ == "__main__":
    main()
