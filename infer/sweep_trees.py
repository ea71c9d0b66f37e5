"""Tune a drafter's tree on this machine: one interleaved `infer.bench` run over a grid of tree shapes
(each a `KIND:LABEL` variant of the same drafter, beside plain decoding), ranked by median speedup
over plain decoding; `--write-default` makes the winner the drafter's default tree (its drafter.json).

    python -m infer.sweep_trees --drafter runs/specblock-smollm2/drafter --max-prompts 4 --max-new-tokens 96
    python -m infer.sweep_trees --drafter DIR --grid trees.json --categories math,code --write-default

The best tree depends on the machine: verifying a wider tree is almost free where a forward is bound
by reading the weights (an accelerator serving a large target) and costs more per node on a CPU, so
a tree tuned here is this machine's default, not a universal one. The grid is each kind's built-in
one (`GRIDS`: from a chain to the papers' GPU trees) or `--grid FILE`: a JSON object, label -> tree
fields (`{"chain5": {"budget": 5, "max_depth": 5, "topk": 1}}`). Any other option is passed to
`infer.bench` (`--prompts`, `--categories`, `--max-prompts`, `--max-new-tokens`, `--repeats`,
`--target`, `--out`, ...). Exit status: 0 done, 1 a mismatch against plain decoding (nothing
written), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from specblock_jax import drafter_io

from infer import bench

GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    "eagle3": {
        "chain3": {"budget": 3, "max_depth": 3, "topk": 1},
        "chain5": {"budget": 5, "max_depth": 5, "topk": 1},
        "chain7": {"budget": 7, "max_depth": 7, "topk": 1},
        "8-4-2": {"budget": 8, "max_depth": 4, "topk": 2},
        "16-6-3": {"budget": 16, "max_depth": 6, "topk": 3},
        "32-6-4": {"budget": 32, "max_depth": 6, "topk": 4},
        "60-7-10": {"budget": 60, "max_depth": 7, "topk": 10},  # EAGLE-3's GPU tree
    },
    "specblock": {
        "chain4": {"budget": 4, "max_blocks": 1, "widths": [1, 1, 1, 1], "slot0_width": 1, "topk": 1, "expand": 1},
        "rank4": {"budget": 4, "max_blocks": 1, "widths": [1, 2, 2, 1], "slot0_width": 2, "topk": 2, "expand": 1},
        "1x6": {"budget": 6, "max_blocks": 1, "widths": [1, 2, 2, 1], "slot0_width": 2, "topk": 2, "expand": 1},
        "1x12": {"budget": 12, "max_blocks": 1, "widths": [2, 3, 3, 2], "slot0_width": 3, "topk": 3, "expand": 1},
        "chain8": {"budget": 8, "max_blocks": 2, "widths": [1, 1, 1, 1], "slot0_width": 1, "topk": 1, "expand": 1},
        "2x8": {"budget": 8, "max_blocks": 2, "widths": [1, 2, 3, 2], "slot0_width": 2, "topk": 3, "expand": 2},
        "2x16": {"budget": 16, "max_blocks": 2, "widths": [2, 3, 4, 3], "slot0_width": 4, "topk": 4, "expand": 2},
        "2x32": {"budget": 32, "max_blocks": 2, "widths": [2, 4, 6, 4], "slot0_width": 6, "topk": 4, "expand": 4},
        "2x90": {"budget": 90, "max_blocks": 2, "widths": [2, 4, 6, 4], "slot0_width": 10, "topk": 4,
                 "expand": 8},  # the authors' GPU budget
    },
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="infer.sweep_trees", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", required=True, help="the trained drafter directory (drafter.json + model.safetensors)")
    p.add_argument("--grid", help="JSON file: label -> tree fields (default: the drafter kind's built-in grid)")
    p.add_argument("--write-default", action="store_true",
                   help="write the fastest tree into the drafter's drafter.json as its default")
    p.add_argument("--out", default="runs/sweep-trees/results.json", help="the benchmark's JSON report")
    args, rest = p.parse_known_args(argv)
    for flag in ("--methods", "--tree", "--tree-budget", "--max-depth", "--topk"):
        if any(a == flag or a.startswith(f"{flag}=") for a in rest):
            p.error(f"{flag} is set by the sweep: give the trees with --grid")
    return args, rest


def load_grid(args: argparse.Namespace, kind: str) -> dict[str, dict[str, Any]]:
    """label -> tree fields; every tree is checked against the drafter's method before any compute."""
    if args.grid is None:
        return GRIDS[kind]
    try:
        grid = json.loads(pathlib.Path(args.grid).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"grid file {args.grid} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"grid file {args.grid}: not JSON ({e})") from None
    if not isinstance(grid, dict) or not grid or not all(isinstance(t, dict) for t in grid.values()):
        raise ValueError(f"grid file {args.grid}: give a non-empty JSON object, label -> tree fields")
    bad = [label for label in grid if not label or any(c in label for c in ",=:")]
    if bad:
        raise ValueError(f"grid file {args.grid}: labels {bad} must be non-empty, without ',', '=' or ':'")
    return grid


def rank(report: dict[str, Any], labels: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(label, figures) of every variant, fastest first (median speedup over plain decoding)."""
    methods = report["methods"]
    return sorted(((label, methods[method]) for method, label in labels.items()),
                  key=lambda item: -item[1]["speedup_vs_ar"])


def show(ranked: list[tuple[str, dict[str, Any]]], grid: dict[str, dict[str, Any]]) -> str:
    lines = ["| tree | fields | tau | ms/iter | speedup vs ar | ceiling |", "|---|---|---|---|---|---|"]
    for label, m in ranked:
        lines.append(f"| {label} | `{json.dumps(grid[label])}` | {m['tau']:.2f} | {m['iteration_ms']:.2f} | "
                     f"{m['speedup_vs_ar']:.3f} | {m['speedup_ceiling']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, bench_args = parse_args(argv)
    drafter_dir = pathlib.Path(args.drafter)
    try:  # the grid and the directory are checked before any compute; infer.bench checks the rest
        kind = bench.drafter_kind(drafter_dir)
        grid = load_grid(args, kind)
        for tree in grid.values():
            drafter_io.decoding_with(drafter_dir, tree)
    except (FileNotFoundError, ValueError) as e:
        print(f"infer.sweep_trees: error: {e}", file=sys.stderr)
        return 2
    labels = {f"{kind}:{label}": label for label in grid}
    argv_bench = [*bench_args, "--out", args.out, "--methods", ",".join(["ar", *labels])]
    for method, label in labels.items():
        argv_bench += ["--drafter", f"{method}={drafter_dir}", "--tree", f"{method}={json.dumps(grid[label])}"]
    status = bench.main(argv_bench)
    if status != 0:
        print(f"infer.sweep_trees: infer.bench exited {status}; no default written", file=sys.stderr)
        return status
    ranked = rank(json.loads(pathlib.Path(args.out).read_text()), labels)
    print(f"\ntrees of {drafter_dir}, fastest first:\n{show(ranked, grid)}")
    best = ranked[0][0]
    if args.write_default:
        decoding = drafter_io.set_decoding(drafter_dir, grid[best])
        print(f"\n{drafter_dir / drafter_io.DRAFTER_JSON}: default tree is now {best} {json.dumps(decoding)}")
    else:
        print(f"\nfastest: {best}; --write-default makes it the drafter's default tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
