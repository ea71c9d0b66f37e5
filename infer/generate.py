"""Generate text from the command line with the embedded target (default) or any HF directory, by any method.

    python -m infer.generate --prompt "def fibonacci(n):" --max-new-tokens 64
    python -m infer.generate --prompt-file prompts.jsonl --method ngram --temperature 0.7
    python -m infer.generate --prompt "ROMEO." --method eagle3 --drafter runs/eagle3   # or the shipped one

Methods: ar (plain decoding), ngram (prompt lookup), eagle3 and specblock (a trained drafter: the one
shipped for the embedded target, or --drafter DIR), specblock+adapt (the SpecBlock drafter adapting
as it serves the prompts one by one, specblock_jax.adapt). Every method gives the same greedy text;
the speculative ones only change how fast it comes. Completions go to stdout, statistics to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from specblock_jax import adapt, data, generate, load_drafter, load_target

from infer import bench

METHODS = bench.METHODS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infer.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    src.add_argument("--prompt-file", help='JSONL file with one {"prompt": "..."} per line')
    p.add_argument("--target", default=None, help="Hugging Face directory of the target (default: embedded)")
    p.add_argument("--method", choices=METHODS, default="ar", help="decoding method (default: ar)")
    p.add_argument("--drafter", help="trained drafter directory for --method eagle3 / specblock "
                                     "(default: the drafter shipped for the embedded target)")
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
        kind = bench.kind_of(args.method)
        if args.drafter:
            bench.parse_drafter_specs([f"{kind}={args.drafter}"])  # the directory holds this kind
        elif kind in bench.TRAINED:
            bench.select_methods([args.method], {}, embedded_target=args.target is None)
        target = load_target(args.target)
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
            print(f"{prompt}\033[1m{text}\033[0m\n{'-' * 60}")
    print(json.dumps({"method": args.method, **stats}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
