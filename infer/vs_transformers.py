"""The project's decoding against what a user would run instead: Hugging Face transformers' `generate`
on the same target, same prompts, same machine, interleaved prompt by prompt.

    python -m infer.vs_transformers                      # 2 suite questions per category, 128 new tokens
    python -m infer.vs_transformers --max-prompts 4 --categories code,writing --out runs/vs_hf.json

Four methods, greedy, batch 1, each prompt's first turn in the chat template:
- `ar`: the project's plain decoding (`specblock_jax.generate`);
- `hf`: transformers' `generate` on the same Hugging Face directory (`target.path`: for the embedded
  default, the GGUF's float32 conversion), PyTorch on the CPU with as many threads as cores;
- `ngram`: the project's prompt-lookup drafter;
- `hf_lookup`: transformers' prompt lookup (`prompt_lookup_num_tokens`, default 10).

Every method is warmed up on the first prompt, then for every prompt each runs once, in turn. Tokens/s
is new tokens over the whole call (prefill included) per run; the report gives medians, the median of
per-prompt ratios, and how many answers are token-for-token identical to `ar`'s (float32 on both
sides, but different kernels: a near-tie can round either way). Needs torch (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

from tqdm import tqdm

from specblock_jax import chat, generate, load_drafter, load_target

from infer import bench

METHODS = ("ar", "hf", "ngram", "hf_lookup")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infer.vs_transformers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="Hugging Face directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--categories", help="comma-separated suite categories (default: all)")
    p.add_argument("--max-prompts", type=int, default=2, help="questions per category (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--lookup-tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens (default 10)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--out", default="runs/vs_transformers.json", help="where to write the JSON report")
    args = p.parse_args(argv)
    for name in ("max_prompts", "max_new_tokens", "lookup_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.prompts = None  # bench.load_questions: the suite
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"infer.vs_transformers: error: {e}: install the test extra (`pip install -e '.[test]'`)", file=sys.stderr)
        return 2
    try:
        questions, _ = bench.load_questions(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"infer.vs_transformers: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    target = load_target(args.target)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(target.path), dtype=torch.float32).eval()
    ngram = load_drafter("ngram", target)
    eos = list(target.config.eos_token_ids)
    prompts = [chat.encode(target.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in questions]

    def run(method: str, ids: list[int]) -> tuple[list[int], float]:
        if method in ("ar", "ngram"):
            out = generate(target, [ids], max_new_tokens=args.max_new_tokens, drafter=ngram if method == "ngram" else None)
            return out.token_ids[0], out.stats["tokens_per_s"]
        extra = {"prompt_lookup_num_tokens": args.lookup_tokens} if method == "hf_lookup" else {}
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=eos[0], **extra)
        new = out[0, len(ids):].tolist()
        return new, len(new) / (time.perf_counter() - start)

    for method in tqdm(METHODS, desc="warm-up", unit="method"):
        run(method, prompts[0])
    rates = {m: [] for m in METHODS}
    same = {m: 0 for m in METHODS}
    for ids in tqdm(prompts, desc="interleaved runs", unit="prompt"):
        reference = None
        for method in METHODS:
            tokens, rate = run(method, ids)
            reference = tokens if method == "ar" else reference
            rates[method].append(rate)
            same[method] += tokens == reference
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(rates[a], rates[b]))
    report = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "torch_threads": args.threads,
              "lookup_tokens": args.lookup_tokens, "versions": bench.versions(),
              "tokens_per_s": {m: statistics.median(r) for m, r in rates.items()},
              "identical_to_ar": same, "ar_vs_hf": ratio("ar", "hf"), "ngram_vs_hf_lookup": ratio("ngram", "hf_lookup"),
              "hf_lookup_vs_hf": ratio("hf_lookup", "hf"), "ngram_vs_ar": ratio("ngram", "ar"), "runs": rates}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy, batch 1, torch threads {args.threads}")
    print("| method | tokens/s (median) | answers identical to ar |\n|---|---|---|")
    for m in METHODS:
        print(f"| {m} | {report['tokens_per_s'][m]:.1f} | {same[m]}/{len(prompts)} |")
    print(f"ar / hf: {report['ar_vs_hf']:.2f}x; ngram / hf_lookup: {report['ngram_vs_hf_lookup']:.2f}x; "
          f"hf_lookup / hf: {report['hf_lookup_vs_hf']:.2f}x; ngram / ar: {report['ngram_vs_ar']:.2f}x "
          "(medians of per-prompt ratios)")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
