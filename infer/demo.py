"""The main job (`make demo`): the embedded target completes held-out prompts of each domain with every
decoding method at hand (plain, n-gram, and the EAGLE-3 / SpecBlock drafters when they are shipped),
shows that all give the same tokens, then benchmarks the methods on a small held-out prompt set and
says where the report and plots are.

    python -m infer.demo [--prompts-per-domain 2] [--max-new-tokens 64] [--bench-prompts 8]
                         [--out runs/demo/results.json]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap
import time

from tqdm import tqdm

from specblock_jax import data, generate, hf, load_drafter, load_target

from infer import bench

DOMAINS = ("code", "prose")


def completions(target, methods: list[str], prompts_per_domain: int, max_new_tokens: int) -> bool:
    """Print each prompt's greedy completion and every method's speed; True when all methods agree."""
    drafters = {m: None if m == "ar" else load_drafter(m, target) for m in methods}
    prompt_dir = pathlib.Path(hf.EMBEDDED_TARGET_DIR) / "prompts"
    rows = []
    for domain in DOMAINS:
        prompts = data.read_prompts_jsonl(prompt_dir / f"{domain}.jsonl")[:prompts_per_domain]
        for prompt in tqdm(prompts, desc=f"{domain} completions", unit="prompt"):
            outs = {m: generate(target, [prompt], max_new_tokens=max_new_tokens, drafter=d)
                    for m, d in drafters.items()}
            rows.append((domain, prompt, outs))
    agree = True
    for domain, prompt, outs in rows:
        ar = outs["ar"]
        print(f"\n=== {domain} prompt (held out) ===\n{textwrap.indent(prompt[-240:], '  ')}")
        print(f"--- greedy completion ---\n{textwrap.indent(ar.texts[0], '  ')}")
        for method, out in outs.items():
            same = out.token_ids == ar.token_ids
            agree &= same
            tau = f", {out.stats['tau']:.2f} tokens per target forward" if "tau" in out.stats else ""
            print(f"  {method:>9}: {out.stats['tokens_per_s']:6.0f} tok/s{tau}"
                  f"{'' if same else ' | OUTPUT DIFFERS FROM ar (a bug: please report it)'}")
    return agree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infer.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts-per-domain", type=int, default=2, help="completions shown per domain")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--bench-prompts", type=int, default=8, help="held-out prompts benchmarked (code and prose)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="runs/demo/results.json", help="benchmark report; plots go beside it")
    args = p.parse_args(argv)
    start = time.perf_counter()

    target = load_target()
    methods = bench.select_methods(None, {}, embedded_target=True)
    missing = [m for m in bench.TRAINED if m not in methods]
    print(f"target: {hf.EMBEDDED_TARGET_DIR} ({target.config.num_params / 1e6:.1f}M parameters)")
    print(f"methods: {', '.join(methods)}" + (f" (no {' or '.join(missing)} drafter shipped yet under "
                                               f"specblock_jax/assets/drafters/)" if missing else ""))
    agree = completions(target, methods, args.prompts_per_domain, args.max_new_tokens)

    print(f"\n=== benchmark: {args.bench_prompts} held-out prompts (code and prose), {args.max_new_tokens} new "
          f"tokens, greedy, batch 1, {args.repeats} repeats, methods interleaved ===")
    status = bench.main(["--domain", "all", "--max-prompts", str(args.bench_prompts), "--max-new-tokens",
                         str(args.max_new_tokens), "--repeats", str(args.repeats), "--out", args.out])
    out = pathlib.Path(args.out)
    print(f"\nThe report is {out.resolve()}; plots beside it: {out.stem}_speedup_tau.png, "
          f"{out.stem}_time_breakdown.png, {out.stem}_acceptance.png.")
    print("On this CPU a target forward over a whole tree costs several single-token steps, so tau must be well "
          "above 2 to pay; on a GPU or TPU, verifying tens of tokens costs about one step (README, Benchmark).")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return status or (0 if agree else 1)


if __name__ == "__main__":
    sys.exit(main())
