"""The main job (`make demo`): the embedded default target, SmolLM2-135M-Instruct, answers chat questions
from several categories of the benchmark suite with every decoding method at hand (plain, n-gram, and
the EAGLE-3 / SpecBlock drafters once they ship for it), shows that all give the same tokens, then
benchmarks the methods on those questions (every turn) and says where the report and plots are.

    python -m infer.demo [--categories writing,qa,math,code,translation] [--max-new-tokens 128]
                         [--out runs/demo/results.json]

The first run converts the target's GGUF into a cached Hugging Face directory (about 20 s, once).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap
import time

from tqdm import tqdm

from specblock_jax import chat, drafter, generate, load_drafter, load_target

from infer import bench

CATEGORIES = "writing,qa,math,code,translation"


def answers(target, methods: list[str], questions: list[dict], max_new_tokens: int) -> bool:
    """Print each question's greedy answer and every method's speed; True when all methods agree."""
    drafters = {m: None if m == "ar" else load_drafter(m, target) for m in methods}
    rows = []
    for q in tqdm(questions, desc="answers (every method)", unit="question"):
        conversation = [{"role": "user", "content": q["turns"][0]}]
        rows.append((q, {m: generate(target, [conversation], max_new_tokens=max_new_tokens, drafter=d)
                         for m, d in drafters.items()}))
    agree = True
    for q, outs in rows:
        ar = outs["ar"]
        print(f"\n=== {q['category']} (question {q['question_id']}) ===\n{textwrap.indent(q['turns'][0][:400], '  > ')}")
        print(f"--- answer (greedy, at most {max_new_tokens} tokens) ---\n{textwrap.indent(ar.texts[0], '  ')}")
        for method, out in outs.items():
            same = out.token_ids == ar.token_ids
            agree &= same
            tau = f", {out.stats['tau']:.2f} tokens per target forward" if "tau" in out.stats else ""
            print(f"  {method:>9}: {out.stats['tokens_per_s']:6.1f} tok/s{tau}"
                  f"{'' if same else ' | OUTPUT DIFFERS FROM ar (a bug: please report it)'}")
    return agree


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
    agree = answers(target, methods, questions, args.max_new_tokens)

    turns = sum(len(q["turns"]) for q in questions)
    print(f"\n=== benchmark: the same {len(questions)} questions, all {turns} turns (each answer appended before the "
          f"next turn), {args.max_new_tokens} new tokens, greedy, batch 1, methods interleaved ===")
    status = bench.main(selection + ["--max-new-tokens", str(args.max_new_tokens), "--timing-calls", "4",
                                     "--out", args.out])
    out = pathlib.Path(args.out)
    print(f"\nThe report is {out.resolve()}; plots beside it: {out.stem}_speedup_tau.png, "
          f"{out.stem}_time_breakdown.png, {out.stem}_acceptance.png. The whole suite: "
          "`.venv/bin/python -m infer.bench` (README, Benchmark).")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return status or (0 if agree else 1)


if __name__ == "__main__":
    sys.exit(main())
