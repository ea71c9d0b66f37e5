"""The main job (`make demo`): the embedded default target, SmolLM2-135M-Instruct, answers one chat
question per category of the benchmark suite (every turn) with every decoding method at hand (plain,
n-gram, and the EAGLE-3 and SpecBlock drafters shipped for it), interleaved as infer.bench runs
them; it prints the answers, checks that every method gave the same tokens, and shows the benchmark
table and where the report and plots are.

    python -m infer.demo [--categories writing,qa,math,code,translation] [--max-new-tokens 128]
                         [--out runs/demo/results.json]

The first run converts the target's GGUF into a cached Hugging Face directory (about 20 s, once).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from specblock_jax import drafter, load_target

from infer import bench

CATEGORIES = "writing,qa,math,code,translation"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infer.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", default=CATEGORIES, help=f"suite categories shown, one question each "
                                                             f"(default {CATEGORIES})")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="runs/demo/results.json", help="benchmark report; plots go beside it")
    args = p.parse_args(argv)
    start = time.perf_counter()
    selection = ["--categories", args.categories, "--max-prompts", "1"]
    try:
        questions, _ = bench.load_questions(bench.parse_args(selection))
    except ValueError as e:
        print(f"infer.demo: error: {e}", file=sys.stderr)
        return 2

    target = load_target()
    shipped = drafter.shipped_drafters_dir(target.path)
    methods = bench.select_methods(None, {}, shipped)
    missing = [m for m in bench.TRAINED if m not in methods]
    print(f"target: SmolLM2-135M-Instruct ({target.config.num_params / 1e6:.1f}M parameters, float32), from {target.path}")
    print(f"methods: {', '.join(methods)}" + (f" (no {' or '.join(missing)} drafter shipped yet under {shipped})"
                                               if missing else ""))
    turns = sum(len(q["turns"]) for q in questions)
    print(f"{len(questions)} questions, {turns} turns (each answer appended before the next turn), "
          f"{args.max_new_tokens} new tokens, greedy, batch 1, every method answering every turn in turn\n")
    status = bench.main(selection + ["--max-new-tokens", str(args.max_new_tokens), "--timing-calls", "4",
                                     "--out", args.out, "--show-answers"])
    out = pathlib.Path(args.out)
    if not out.is_file():  # bad input: infer.bench said why
        return status
    report = json.loads(out.read_text())
    differ = sum(m["mismatches_vs_ar"] or 0 for m in report["methods"].values())
    print(f"\n{'All' if not differ else 'NOT all'} {len(report['answers'])} answers identical across "
          f"{', '.join(methods)}" + (f": {differ} differ (see the warnings above)" if differ else ""))
    print(f"\nThe report is {out.resolve()}; plots beside it: {out.stem}_speedup_tau.png, "
          f"{out.stem}_time_breakdown.png, {out.stem}_acceptance.png. The whole suite: "
          "`.venv/bin/python -m infer.bench` (README, Benchmark).")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
