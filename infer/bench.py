"""Side-by-side benchmark of decoding methods on held-out prompts, interleaved so machine drift cancels.

    python -m infer.bench --methods ar,ngram --domain code --max-prompts 16 --repeats 3

Every method is compiled and warmed up on the first prompt batch before timing starts. Then, for each
repeat and each prompt batch, every method runs once, in turn. Reported per method: medians of
per-batch tokens/s, the ratio to `ar` per batch (then the median), tau (tokens committed per target
forward, bonus included) and prompts whose greedy output differs from `ar`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import statistics
import sys

import jax
from tqdm import tqdm

from specblock_jax import Drafter, data, generate, hf, load_drafter, load_target

METHODS = ("ar", "ngram", "eagle3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ar,ngram", help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--prompts", help='JSONL prompt file ({"prompt": ...} per line); default: the embedded '
                                     "target's held-out prompts of --domain")
    p.add_argument("--domain", choices=("code", "prose"), default="code",
                   help="which embedded held-out prompt set to use when --prompts is not given")
    p.add_argument("--target", help="Hugging Face target directory (default: the embedded target)")
    p.add_argument("--drafter", help="trained drafter directory, used by the eagle3 method")
    p.add_argument("--tree-budget", type=int, help="override the drafters' tree budget (nodes besides the root)")
    p.add_argument("--max-depth", type=int, help="override the drafters' tree depth")
    p.add_argument("--topk", type=int, help="override the EAGLE-3 drafter's branching per depth")
    p.add_argument("--max-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results.json", help="where to write the JSON report")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "eagle3" in args.methods and not args.drafter:
        p.error("--methods eagle3 needs --drafter DIR (a trained EAGLE-3 drafter directory)")
    if "ar" not in args.methods:
        args.methods.insert(0, "ar")  # the reference for speedups and mismatches
    for name in ("max_prompts", "max_new_tokens", "batch_size", "repeats", "tree_budget", "max_depth", "topk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    target = load_target(args.target)
    prompt_file = args.prompts or pathlib.Path(hf.EMBEDDED_TARGET_DIR) / "prompts" / f"{args.domain}.jsonl"
    prompts = data.read_prompts_jsonl(prompt_file)[:args.max_prompts]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    drafters = {m: None if m == "ar" else with_tree(load_drafter(args.drafter if m == "eagle3" else m, target), args)
                for m in args.methods}

    def decode(method, batch):
        return generate(target, batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=0, drafter=drafters[method])

    for method in args.methods:  # compile and warm up outside the timed region
        decode(method, batches[0])
    runs = {m: [] for m in args.methods}  # (repeat, batch) -> output
    total = args.repeats * len(batches) * len(args.methods)
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for _ in range(args.repeats):
            for batch in batches:
                for method in args.methods:
                    runs[method].append(decode(method, batch))
                    bar.update(1)
    return summarize(args, runs, len(batches))


def with_tree(drafter: Drafter, args: argparse.Namespace) -> Drafter:
    """The drafter with the command line's tree shape, where given."""
    overrides = {name: value for name, value in (("budget", args.tree_budget), ("max_depth", args.max_depth),
                                                 ("topk", args.topk))
                 if value is not None and hasattr(drafter.method, name)}
    return dataclasses.replace(drafter, method=dataclasses.replace(drafter.method, **overrides))


def summarize(args, runs: dict, n_batches: int) -> dict:
    def rate(out):
        return sum(out.stats["new_tokens"]) / (out.stats["prefill_s"] + out.stats["decode_s"])

    ar = runs["ar"]
    methods = {}
    for method, outs in runs.items():
        first = outs[:n_batches]  # outputs are identical across repeats; compare one repeat
        mismatches = sum(sum(a != b for a, b in zip(x.token_ids, y.token_ids)) for x, y in zip(first, ar))
        new_tokens = sum(sum(o.stats["new_tokens"]) for o in first)
        iterations = sum(o.stats["iterations"] for o in first)
        methods[method] = {
            "tokens_per_s": statistics.median(rate(o) for o in outs),
            "speedup_vs_ar": statistics.median(rate(o) / rate(a) for o, a in zip(outs, ar)),
            "tau": statistics.mean(o.stats.get("tau", 1.0) for o in first),  # plain decoding: 1 by definition
            "iterations": iterations,
            "new_tokens": new_tokens,
            "drafter_forwards_per_iter": (sum(o.stats.get("drafter_forwards", 0) for o in first) / iterations),
            "mismatches_vs_ar": mismatches if args.temperature == 0 else None,
        }
    return {"methods": methods, "config": {k: v for k, v in vars(args).items()},
            "versions": {"jax": jax.__version__, "python": platform.python_version(),
                         "device": str(jax.devices()[0])}}


def table(report: dict) -> str:
    lines = ["| method | tokens/s | speedup vs ar | tau | iterations | mismatches vs ar |",
             "|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['speedup_vs_ar']:.3f} | {m['tau']:.3f} | "
                     f"{m['iterations']} | {m['mismatches_vs_ar']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"report written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
