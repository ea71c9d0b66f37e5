"""Paired differences in tau between methods of one benchmark report (infer/bench.py), with their standard
errors: how an ablation tells a mechanism's effect from prompt-to-prompt spread.

    python -m infer.paired results.json specblock:full specblock:no-shift specblock:no-inherit

Every method of a report ran on the same answers in the same order (`tau_runs`), so a method's tau minus
the base's on each answer removes what the prompts share; the mean of those differences, over its
standard error (sample standard deviation / sqrt(n)), says how many errors apart the two are. Greedy
answers are deterministic, so the figure does not depend on the machine's speed or load. A report cut
short (`"complete": false`) pairs the answers every named method reached.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys


def paired(report: dict, base: str, method: str) -> dict:
    """`method`'s tau minus `base`'s, answer by answer: n, means, mean difference and its standard error."""
    runs = {}
    for name in (base, method):
        if name not in report["methods"]:
            raise ValueError(f"{name!r} is not a method of this report ({', '.join(report['methods'])})")
        if "tau_runs" not in report["methods"][name]:
            raise ValueError(f"{name!r} has no tau_runs: a report from before per-run tau, or a method without runs")
        runs[name] = report["methods"][name]["tau_runs"]
    pairs = [(b, m) for b, m in zip(runs[base], runs[method]) if b is not None and m is not None]
    if len(pairs) < 2:
        raise ValueError(f"{base} and {method} share {len(pairs)} answers with a tau; a standard error needs 2")
    diffs = [m - b for b, m in pairs]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"n": len(pairs), "base_tau": statistics.fmean(b for b, _ in pairs),
            "tau": statistics.fmean(m for _, m in pairs), "diff": mean, "se": se,
            "z": mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infer.paired", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=pathlib.Path, help="results.json written by infer.bench")
    p.add_argument("base", help="the method every other is compared with (say specblock:full)")
    p.add_argument("methods", nargs="+", help="methods to compare with the base")
    args = p.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        rows = [(name, paired(report, args.base, name)) for name in args.methods]
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        p.error(str(e))
    if not report.get("complete", True):
        print(f"note: {args.report} is a partial report (the run did not finish)", file=sys.stderr)
    print("| method | answers | tau (mean per answer) | base tau | difference | standard error | difference / SE |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['n']} | {r['tau']:.3f} | {r['base_tau']:.3f} | {r['diff']:+.3f} | {r['se']:.3f} "
              f"| {r['z']:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
