"""Domain-shift benchmark of adaptation: a SpecBlock drafter serving a stream of prompts, static and
adapting (specblock_jax.adapt), interleaved prompt by prompt so machine drift cancels.

    python -m infer.adapt_bench --drafter runs/specblock-prose/drafter            # code (shift), prose (own)
    python -m infer.adapt_bench --drafter DIR --streams prose+code --repeats 3     # a shift mid-stream
    python -m infer.adapt_bench --drafter DIR --source corpus --max-prompts 320   # streams long enough to learn
    python -m infer.adapt_bench --drafter infer/drafters/specblock-smollm2-prose \\
        --source train/prompts/serving_prompts.jsonl --streams math,writing+summarization+translation,writing+math

A stream is held-out prompts of one domain, or of several joined with '+' (prose+code: every prose
prompt, then every code prompt): the toy target's 48 per domain, or (`--source corpus`) prompts
cut apart through the held-out documents of its corpus, as many as asked. On a chat target the
source is a file of chat prompts (`train.chat_prompts` writes them; its categories are the domains),
each formatted with the target's chat template: `train/prompts/serving_prompts.jsonl` holds prompts
no shipped drafter was trained on (GSM8K problems and passages of held-out plays). Per stream and repeat the
adapter starts from the trained drafter. Each prompt is decoded by both methods in turn (alternating
which goes first); an adapting method's time includes its bandit step, updates and probes (`adapt_s`). Reported per
stream: tokens/s (all tokens over all seconds) and its ratio adapt / static (the median over
repeats), tau, the updates tried and kept, the share of time spent adapting, and, greedy,
whether every output matched the static drafter's (adaptation is lossless, so any mismatch is a bug:
exit status 1). The JSON holds every prompt's record; the plots show tau and throughput over the stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
from typing import Any

from tqdm import tqdm

from specblock_jax import adapt, chat, data, generate, hf, load_drafter, load_target
from specblock_jax.config import ConfigError

from infer import make_suite
from infer.bench import _now, versions
from train.train_target import PROMPT_CHARS

DOMAINS = ("code", "prose")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infer.adapt_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", required=True,
                   help="trained SpecBlock drafter directory (or 'specblock': the one shipped for --target)")
    p.add_argument("--target", help="Hugging Face directory or .gguf file of the target (default: the embedded "
                                    "default; the drafters in specblock_jax/assets/toy/drafters are for "
                                    "specblock_jax/assets/toy/target)")
    p.add_argument("--streams", default="code,prose",
                   help="comma-separated streams, each a domain or domains joined with '+' (default: code,prose)")
    p.add_argument("--max-prompts", type=int, default=48, help="prompts per domain")
    p.add_argument("--source", default="embedded",
                   help="embedded: the toy target's 48 held-out prompts per domain; corpus: prompts cut "
                        "apart through the held-out documents of its training corpus (up to 840 code and 383 "
                        "prose), for streams long enough for adaptation to pay; or a JSONL file of chat "
                        "prompts ({\"messages\", \"category\"} per line), whose categories are the domains")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--adapt", default="{}", metavar="JSON",
                   help='AdaptConfig overrides as a JSON object, e.g. \'{"params": "head", "steps": 2}\'; '
                        "horizon_tokens defaults to each stream's token budget (prompts x --max-new-tokens)")
    p.add_argument("--out", default="runs/adapt/results.json")
    p.add_argument("--plots-dir", help="where to write the PNG plots (default: beside --out; 'none': no plots)")
    args = p.parse_args(argv)
    for name in ("max_prompts", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    for stream in (args.streams or [""]) if args.source in ("embedded", "corpus") else ():
        unknown = [d for d in stream.split("+") if d not in DOMAINS]
        if unknown:
            p.error(f"--streams: {stream!r} names unknown domain(s) {unknown}; domains: {', '.join(DOMAINS)}")
    try:
        overrides = json.loads(args.adapt)
        if not isinstance(overrides, dict):
            raise ValueError("not a JSON object")
        args.adapt_config = adapt.AdaptConfig(**overrides)
        args.stream_horizon = "horizon_tokens" not in overrides
    except (ValueError, TypeError, ConfigError) as e:
        p.error(f"--adapt {args.adapt!r}: {e}")
    return args


def stream_prompts(stream: str, max_prompts: int, source: str = "embedded") -> list[str | list[dict]]:
    """The stream's prompts, `max_prompts` per domain, domain after domain: strings, or conversations
    from a chat prompt file (ValueError for a domain that is none of its categories)."""
    if source not in ("embedded", "corpus"):
        by_category: dict[str, list] = {}
        for line, row in enumerate(make_suite._read_jsonl(pathlib.Path(source)), start=1):
            if not isinstance(row, dict) or not {"category", "messages"} <= row.keys():
                raise ValueError(f"{source}:{line}: expected an object with 'category' and 'messages'")
            by_category.setdefault(row["category"], []).append(chat.check_conversation(row["messages"],
                                                                                       f"{source}:{line}"))
        if unknown := [d for d in stream.split("+") if d not in by_category]:
            raise ValueError(f"--streams: {stream!r} names {unknown}, not categories of {source} "
                             f"({', '.join(sorted(by_category))})")
        return [p for domain in stream.split("+") for p in by_category[domain][:max_prompts]]
    if source == "embedded":
        prompt_dir = hf.TOY_TARGET_DIR / "prompts"
        return [p for domain in stream.split("+")
                for p in data.read_prompts_jsonl(prompt_dir / f"{domain}.jsonl")[:max_prompts]]
    splits = data.corpus_splits()  # the split the embedded target was trained with: "test" is held out
    return [p["prompt"] for domain in stream.split("+")
            for p in data.spaced_prompts(splits[domain]["test"], n=max_prompts, prompt_chars=PROMPT_CHARS, seed=0)]


def _record(out, index: int, adapt_record: dict | None) -> dict:
    stats = out.stats
    steps = int(sum(map(sum, stats["steps_by_tokens"])))
    return {"prompt": index, "new_tokens": int(sum(stats["new_tokens"])), "row_steps": steps,
            "seconds": stats["prefill_s"] + stats["decode_s"], "tau": stats["tau"],
            "adapt_s": 0.0 if adapt_record is None else adapt_record["adapt_s"],
            **({} if adapt_record is None else {k: adapt_record[k] for k in (
                "updated", "kept", "probed", "reverted", "measured_gain", "measured_stderr", "predicted_gain", "reason",
                "shifts", "step_s", "cost_slope", "cost_s")})}


def run_stream(target, drafter, prompts: list[str], cfg: adapt.AdaptConfig, max_new_tokens: int,
               bar: tqdm) -> dict[str, Any]:
    """One pass over the stream: static and adapting, interleaved; per-prompt records and outputs."""
    adapter = adapt.Adapter(target, drafter, cfg)
    records = {"static": [], "adapt": []}
    mismatched = []
    for i, prompt in enumerate(prompts):
        order = ("static", "adapt") if i % 2 == 0 else ("adapt", "static")
        outs = {}
        for method in order:
            if method == "static":
                outs[method] = generate(target, [prompt], max_new_tokens=max_new_tokens, drafter=drafter)
                records[method].append(_record(outs[method], i, None))
            else:
                outs[method] = adapter.generate([prompt], max_new_tokens=max_new_tokens)
                records[method].append(_record(outs[method], i, outs[method].stats["adapt"]))
        if outs["static"].token_ids != outs["adapt"].token_ids:
            mismatched.append(i)
        bar.update(1)
    return {"records": records, "mismatched_prompts": mismatched}


def summarize(passes: list[dict]) -> dict[str, Any]:
    """Per method: totals over all passes, and the adapt / static throughput ratio per pass."""
    def totals(records):
        tokens = sum(r["new_tokens"] for r in records)
        seconds = sum(r["seconds"] + r["adapt_s"] for r in records)
        steps = sum(r["row_steps"] for r in records)
        emitted = sum(r["tau"] * r["row_steps"] for r in records)
        return {"tokens_per_s": tokens / seconds, "tau": emitted / steps, "new_tokens": tokens, "seconds": seconds,
                "adapt_s": sum(r["adapt_s"] for r in records)}

    out = {m: totals([r for p in passes for r in p["records"][m]]) for m in ("static", "adapt")}
    counts = adapt.tally([r for p in passes for r in p["records"]["adapt"]])
    out["adapt"].update({k: v for k, v in counts.items() if k not in ("windows", "adapt_s")},
                        adapt_time_share=out["adapt"]["adapt_s"] / out["adapt"]["seconds"])
    ratios = [totals(p["records"]["adapt"])["tokens_per_s"] / totals(p["records"]["static"])["tokens_per_s"]
              for p in passes]
    # The prices the bandit used, as it measured them on this target, at the end of each pass
    out["adapt"]["prices"] = [{k: p["records"]["adapt"][-1][k] for k in ("step_s", "cost_slope", "cost_s")}
                              for p in passes]
    out["speedup_adapt_vs_static"] = statistics.median(ratios)
    out["speedup_per_repeat"] = ratios
    out["tau_ratio"] = out["adapt"]["tau"] / out["static"]["tau"]
    out["mismatches"] = sum(len(p["mismatched_prompts"]) for p in passes)
    return out


def _prices(p: dict) -> str:
    """A pass's last step time (ms per row-step), its growth per accepted token, and update cost (ms)."""
    return f"{1e3 * p['step_s']:.1f}, {1e3 * p['cost_slope']:.2f}, {1e3 * p['cost_s']:.0f}"


def table(report: dict) -> str:
    lines = ["| stream | static tok/s | adapt tok/s | speedup | static tau | adapt tau | updates tried (kept), reverts "
             "| adapting time | step ms, slope, update ms (measured) | mismatches |", "|---" * 10 + "|"]
    for name, s in report["streams"].items():
        st, ad = s["summary"]["static"], s["summary"]["adapt"]
        lines.append(f"| {name} | {st['tokens_per_s']:.0f} | {ad['tokens_per_s']:.0f} | "
                     f"{s['summary']['speedup_adapt_vs_static']:.3f}x | {st['tau']:.2f} | {ad['tau']:.2f} | "
                     f"{ad['updates']} ({ad['kept']}), {ad['reverts']} | {100 * ad['adapt_time_share']:.1f} % | "
                     f"{_prices(ad['prices'][-1])} | {s['summary']['mismatches']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """0 when done, 1 when an adapting output differed from the static one, 2 on bad input."""
    args = parse_args(argv)
    try:
        target = load_target(args.target)
        drafter = load_drafter(args.drafter, target)
        if type(drafter.method).__name__ != "SpecBlockMethod":
            raise ValueError(f"{args.drafter} is not a SpecBlock drafter")
        streams = {s: stream_prompts(s, args.max_prompts, args.source) for s in args.streams}
    except (FileNotFoundError, ValueError) as e:
        print(f"infer.adapt_bench: error: {e}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "started_utc": _now(), "complete": False, "versions": versions(),
        "config": {**{k: v for k, v in vars(args).items() if k != "adapt_config"},
                   "adapt_config": dataclasses.asdict(args.adapt_config),
                   "tree": {k: v for k, v in vars(drafter.method).items() if k != "config"}},
        "streams": {}}
    # Compile everything before timing: both loops, the update and the gain measurement.
    warm = adapt.Adapter(target, drafter, dataclasses.replace(args.adapt_config, min_records=1))
    first = next(iter(streams.values()))[:2]
    for prompt in tqdm(first, desc="compile + warm-up", unit="prompt"):
        generate(target, [prompt], max_new_tokens=args.max_new_tokens, drafter=drafter)
        warm.generate([prompt], max_new_tokens=args.max_new_tokens)
    total = args.repeats * sum(map(len, streams.values()))
    with tqdm(total=total, desc="timed streams", unit="prompt") as bar:
        for name, prompts in streams.items():
            passes = []
            # Unless set, the horizon is the stream's token budget: here the stream is all the drafter serves.
            cfg = (dataclasses.replace(args.adapt_config, horizon_tokens=len(prompts) * args.max_new_tokens)
                   if args.stream_horizon else args.adapt_config)
            for _ in range(args.repeats):
                passes.append(run_stream(target, drafter, prompts, cfg, args.max_new_tokens, bar))
                report["streams"][name] = {"prompts": len(prompts), "horizon_tokens": cfg.horizon_tokens,
                                           "passes": passes, "summary": summarize(passes)}
                hf.write_json({**report, "finished_utc": _now()}, args.out)
    report.update(complete=True, finished_utc=_now())
    hf.write_json(report, args.out)
    print(table(report))
    print(f"\nreport: {args.out}")
    if args.plots_dir != "none":
        from infer import plots
        out = pathlib.Path(args.out)
        stem = (pathlib.Path(args.plots_dir) if args.plots_dir else out.parent) / out.stem
        for path in plots.write_adaptation_plots(report, stem):
            print(f"plot: {path}")
    bad = {n: s["summary"]["mismatches"] for n, s in report["streams"].items() if s["summary"]["mismatches"]}
    if bad:
        print(f"\nWARNING: adapting outputs differ from static ones in {bad}: adaptation is lossless by "
              "construction, so this is a bug.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
