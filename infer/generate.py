"""Generate text from the command line with the embedded default target (SmolLM2-135M-Instruct) or any
Hugging Face directory or GGUF file, by any method.

    python -m infer.generate --chat --prompt "Write a haiku about the sea." --max-new-tokens 64
    python -m infer.generate --prompt "def fibonacci(n):" --method ngram       # plain text continued
    python -m infer.generate --prompt-file prompts.jsonl --method ngram --temperature 0.7
    python -m infer.generate --chat --prompt "Hi!" --method eagle3 --drafter runs/eagle3/drafter

`--chat` formats each prompt as a user message with the target's chat template, so an instruct model
answers it; prompt-file lines with `{"messages": [{"role", "content"}, ...]}` are conversations
either way.

Methods: ar (plain decoding), ngram (prompt lookup), eagle3 and specblock (a trained drafter: the one
shipped for the target, or --drafter DIR), specblock+adapt (the SpecBlock drafter adapting
as it serves the prompts one by one, specblock_jax.adapt). Every method gives the same greedy text;
the speculative ones only change how fast it comes. Completions go to stdout, statistics to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from specblock_jax import adapt, data, generate, load_drafter, load_target
from specblock_jax import drafter as drafter_lib

from infer import bench

METHODS = bench.METHODS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infer.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    src.add_argument("--prompt-file", help='JSONL file with one {"prompt": "..."} or {"messages": [...]} per line')
    p.add_argument("--chat", action="store_true",
                   help="format every string prompt as a user message with the target's chat template")
    p.add_argument("--target", default=None, help="Hugging Face directory or .gguf file of the target (default: "
                                                  "the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--method", choices=METHODS, default="ar", help="decoding method (default: ar)")
    p.add_argument("--drafter", help="trained drafter directory for --method eagle3 / specblock "
                                     "(default: the drafter shipped for the target)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    args = p.parse_args(argv)
    if args.drafter and bench.kind_of(args.method) not in bench.TRAINED:
        p.error(f"--drafter is for --method {' or '.join(bench.TRAINED)} (and their +adapt), not {args.method}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # every input checked before any compute
        prompts = args.prompt or data.read_prompts_jsonl(args.prompt_file)
        if args.chat:
            prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        kind = bench.kind_of(args.method)
        if args.drafter:
            bench.parse_drafter_specs([f"{kind}={args.drafter}"])  # the directory holds this kind
        target = load_target(args.target)
        if kind in bench.TRAINED and not args.drafter:
            bench.select_methods([args.method], {}, drafter_lib.shipped_drafters_dir(target.path))
        drafter = None if args.method == "ar" else load_drafter(args.drafter or kind, target)
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed)
        if args.method in bench.ADAPTING:  # one call (window) per prompt, the drafter adapting in between
            adapter = adapt.Adapter(target, drafter)
            outs = [adapter.generate([prompt], **sampling) for prompt in prompts]
            texts = [o.texts[0] if o.texts else None for o in outs]
            token_ids = [o.token_ids[0] for o in outs]
            stats = {"updates": sum(h["updated"] for h in adapter.history),
                     "tau": [round(o.stats["tau"], 3) for o in outs]}
        else:
            out = generate(target, prompts, drafter=drafter, **sampling)
            texts, token_ids = out.texts or [None] * len(prompts), out.token_ids
            stats = {k: out.stats[k] for k in ("iterations", "tokens_per_s", "tau", "compile_s") if k in out.stats}
    except (FileNotFoundError, ValueError) as e:
        print(f"infer.generate: error: {e}", file=sys.stderr)
        return 2
    for prompt, text, ids in zip(prompts, texts, token_ids):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "token_ids": ids}))
        else:
            shown = prompt if isinstance(prompt, str) else "".join(f"[{m['role']}] {m['content']}\n" for m in prompt)
            print(f"{shown}\033[1m{text}\033[0m\n{'-' * 60}")
    print(json.dumps({"method": args.method, **stats}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
