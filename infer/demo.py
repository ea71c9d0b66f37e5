"""The main job: the embedded target completes held-out prompts of each domain, with plain decoding
and with n-gram speculative decoding, and shows that both give the same tokens.

    python -m infer.demo [--prompts-per-domain 3] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import pathlib
import textwrap

from tqdm import tqdm

from specblock_jax import data, generate, hf, load_drafter, load_target

DOMAINS = ("code", "prose")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts-per-domain", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args(argv)

    target = load_target()
    ngram = load_drafter("ngram", target)
    prompt_dir = pathlib.Path(hf.EMBEDDED_TARGET_DIR) / "prompts"
    print(f"target: {hf.EMBEDDED_TARGET_DIR} ({target.config.num_params / 1e6:.1f}M parameters)")
    rows = []
    for domain in DOMAINS:
        prompts = data.read_prompts_jsonl(prompt_dir / f"{domain}.jsonl")[:args.prompts_per_domain]
        for prompt in tqdm(prompts, desc=f"{domain} prompts", unit="prompt"):
            ar = generate(target, [prompt], max_new_tokens=args.max_new_tokens)
            spec = generate(target, [prompt], max_new_tokens=args.max_new_tokens, drafter=ngram)
            rows.append((domain, prompt, ar, spec))
    for domain, prompt, ar, spec in rows:
        same = "identical" if ar.token_ids == spec.token_ids else "DIFFERENT (a bug: please report it)"
        print(f"\n=== {domain} prompt (held out) ===\n{textwrap.indent(prompt[-240:], '  ')}")
        print(f"--- greedy completion ---\n{textwrap.indent(ar.texts[0], '  ')}")
        print(f"plain: {ar.stats['tokens_per_s']:.0f} tok/s | n-gram speculative: "
              f"{spec.stats['tokens_per_s']:.0f} tok/s, {spec.stats['tau']:.2f} tokens per target forward | "
              f"output {same}")


if __name__ == "__main__":
    main()
