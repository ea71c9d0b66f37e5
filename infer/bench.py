"""Side-by-side benchmark of decoding methods on a question suite, interleaved so machine drift cancels.

    python -m infer.bench --methods ar,ngram                # the suite, every category, 128 new tokens
    python -m infer.bench --categories math,code --max-prompts 8 --drafter eagle3=runs/eagle3/drafter
    python -m infer.bench --prompts my_prompts.jsonl --target /models/Llama-3.1-8B --drafter DIR

Prompts: by default the suite shipped in specblock_jax/assets/suite (MT-Bench's layout, 7 categories,
see its README.md), or `--prompts FILE`: questions in that layout, whose turns are user messages
formatted with the target's chat template and answered turn by turn, each method's own answer
appended to its conversation before the next turn (MT-Bench's protocol); or a prompt file, one
`{"prompt"}` (continued as it is) or `{"messages"}` (a conversation) per line. Every figure is
reported overall and per category.

Methods: `ar` (plain decoding, the reference), `ngram` (prompt lookup, no training), `eagle3` and
`specblock` (trained drafters: the ones shipped for the target, `specblock_jax.drafter.shipped_drafters_dir`,
or `--drafter KIND=DIR`; a bare `--drafter DIR` takes its kind
from DIR/drafter.json), and `specblock+adapt` (the SpecBlock drafter adapting as it serves,
specblock_jax.adapt: it starts from the trained drafter at every repeat and serves the batches in
order; its time includes the bandit's steps and updates). The default is every method but
`specblock+adapt` whose drafter is available (infer/adapt_bench.py is adaptation's own benchmark).
Variants of a trained kind run side by side as `KIND:LABEL` methods, each with its own
`--drafter KIND:LABEL=DIR` (say the ablations: `specblock:no-shift=runs/ablation/no_shift/drafter`).

Protocol: every input is checked and every method is compiled and warmed up on the first batch
before timing starts (`generate` also compiles ahead and times execution only). Then, for each repeat
and each batch's turn, every method runs once, in turn. The JSON report is rewritten after every unit
(`"complete": false` until the end, and also after an interruption or an error), then each method's
phases are timed (infer/timing.py) and the final report, a markdown table and PNG plots are written.
Per method: medians of per-run tokens/s (new tokens over prefill + decode seconds) and of the per-run
ratio to `ar` (`speedup_vs_ar`; `speedup_vs_ar_total` is the ratio of all tokens over all seconds, which
weighs long runs more); tau (tokens committed per target forward of the loop, bonus included, from the
acceptance-length histogram; per run in `tau_runs`, in the same run order for every method, so that two
methods' taus pair prompt by prompt) and the acceptance rate (how often a drafted position is accepted once the
ones before it were, pooled and per depth: `acceptance`); ms per loop iteration (`iteration_ms`, from the
timed runs) and, timed apart on the first batch, split into draft / verify / other (infer/timing.py); the ceiling
(`speedup_ceiling`: the speedup if every step committed the tree's deepest path, at the measured ms per
iteration: what no drafter of this cost and tree shape can beat here); for an adapting method, the updates its
bandit tried and kept and its share of time adapting (`adaptation`); and, when
greedy, the answers (question and turn) that differ from `ar`'s: verification is lossless, so any mismatch is a
bug, reported loudly and with exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import traceback
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from specblock_jax import Drafter, adapt, chat, data, generate, hf, load_drafter, load_target
from specblock_jax import decode as decode_lib
from specblock_jax import drafter as drafter_lib

from infer import timing

METHODS = ("ar", "ngram", "eagle3", "specblock", "specblock+adapt")
TRAINED = ("eagle3", "specblock")  # drafter kinds trained into a drafter directory
ADAPTING = {"specblock+adapt": "specblock"}  # method -> the kind of drafter it adapts
SUITE = pathlib.Path(hf.__file__).parent / "assets" / "suite" / "questions.jsonl"  # see its README.md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (argparse exits with status 2 and a message on a bad flag)."""
    p = argparse.ArgumentParser(prog="infer.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} and the KIND:LABEL variants given "
                                     "by --drafter (default: every method whose drafter is shipped or given); ar is "
                                     "always run, as the reference")
    p.add_argument("--prompts", help="questions in MT-Bench's layout ({\"question_id\", \"category\", \"turns\": "
                                     "[...]} per line; turns are user messages, answered in turn) or a prompt file "
                                     "({\"prompt\": ...} or {\"messages\": [...]} per line); default: the "
                                     "suite in specblock_jax/assets/suite")
    p.add_argument("--categories", help="comma-separated categories to run (default: all in the file)")
    p.add_argument("--target", help="Hugging Face directory or .gguf file of the target (default: the embedded "
                                    "SmolLM2-135M-Instruct)")
    p.add_argument("--drafter", action="append", default=[], metavar="[KIND[:LABEL]=]DIR",
                   help="trained drafter directory for method KIND (eagle3, specblock); without KIND=, the kind "
                        "in DIR/drafter.json; KIND:LABEL=DIR adds the variant method KIND:LABEL. Repeat for "
                        "several methods")
    p.add_argument("--tree-budget", type=int, help="override the drafters' tree budget (nodes besides the root)")
    p.add_argument("--max-depth", type=int, help="override the drafters' tree depth")
    p.add_argument("--topk", type=int, help="override the EAGLE-3 drafter's branching per depth")
    p.add_argument("--tree", action="append", default=[], metavar="[METHOD=]JSON",
                   help='override fields of the drafters\' trees, e.g. \'{"max_blocks": 2, "expand": 2, '
                        '"widths": [1, 2, 3, 2]}\' (fields a drafting method lacks are ignored for it, with a '
                        'note); METHOD=JSON for one method only (say eagle3:deep=\'{"max_depth": 7}\'), '
                        "applied after the ones for all. Repeatable")
    p.add_argument("--max-prompts", type=int, help="at most this many questions per category (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the only mode with a mismatch check)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="passes over the questions (default 1)")
    p.add_argument("--timing-calls", type=int, default=16,
                   help="chained calls per dispatch when timing the draft / verify phases (0: skip that timing)")
    p.add_argument("--out", default="results.json", help="where to write the JSON report")
    p.add_argument("--show-answers", action="store_true",
                   help="print every question's turns with ar's answers before the table (the report always "
                        "holds them)")
    p.add_argument("--plots-dir", help="where to write the PNG plots (default: beside --out; 'none': no plots)")
    args = p.parse_args(argv)
    if args.methods is not None:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in METHODS and not is_variant(m)]
        if unknown or not args.methods:
            p.error(f"unknown method(s) {unknown or args.methods}; choose from {', '.join(METHODS)}")
    for name in ("max_prompts", "max_new_tokens", "batch_size", "repeats", "tree_budget", "max_depth", "topk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    trees: dict[str, dict] = {}  # method ("" for every method) -> tree fields
    for spec in args.tree:
        method, _, text = ("", "", spec) if spec.lstrip().startswith("{") else spec.partition("=")
        if method and method not in METHODS and not is_variant(method):
            p.error(f"--tree {spec}: {method!r} is not a method; give JSON or METHOD=JSON")
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            p.error(f"--tree {spec}: not JSON ({e})")
        if not isinstance(fields, dict):
            p.error(f"--tree {spec}: must be a JSON object")
        trees.setdefault(method, {}).update(fields)
    args.tree = trees
    if args.timing_calls < 0:
        p.error(f"--timing-calls must be >= 0, got {args.timing_calls}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


def drafter_kind(path: str | os.PathLike) -> str:
    """The `kind` recorded in a drafter directory's drafter.json."""
    meta = pathlib.Path(path) / "drafter.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a trained drafter directory: {meta} does not exist")
    try:
        kind = json.loads(meta.read_text()).get("kind")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{meta}: not a JSON object with a 'kind' ({e})") from None
    if kind not in TRAINED:
        raise ValueError(f"{meta}: drafter kind {kind!r} is not one of {', '.join(TRAINED)}")
    return kind


def is_variant(method: str) -> bool:
    """`KIND:LABEL`: a trained kind's variant with a drafter directory of its own."""
    kind, sep, label = method.partition(":")
    return bool(sep) and kind in TRAINED and re.fullmatch(r"[A-Za-z0-9_.+-]+", label) is not None


def kind_of(method: str) -> str:
    """The drafter kind a method runs (ar and ngram: themselves)."""
    base = method.partition(":")[0] if is_variant(method) else method
    return ADAPTING.get(base, base)


def parse_drafter_specs(specs: list[str]) -> dict[str, pathlib.Path]:
    """`--drafter` values ("KIND=DIR", "KIND:LABEL=DIR" or "DIR") -> {kind or variant: directory}, each
    checked to hold that kind."""
    dirs: dict[str, pathlib.Path] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if sep and (name in METHODS or ":" in name):
            if ":" in name and not is_variant(name):
                raise ValueError(f"--drafter {spec}: a variant is KIND:LABEL with KIND one of {', '.join(TRAINED)} "
                                 "and a label of letters, digits and _.+-")
            kind = kind_of(name)
            if kind not in TRAINED:
                raise ValueError(f"--drafter {spec}: method {kind!r} takes no drafter directory; "
                                 f"give one for {' or '.join(TRAINED)}")
            path = pathlib.Path(rest)
            found = drafter_kind(path)
            if found != kind:
                raise ValueError(f"--drafter {spec}: {path} holds a {found} drafter, not {kind}")
            name = name if is_variant(name) else kind
        else:
            path = pathlib.Path(spec)
            name = drafter_kind(path)
        if name in dirs:
            raise ValueError(f"--drafter given twice for {name}: {dirs[name]} and {path}")
        dirs[name] = path
    return dirs


def shipped_drafter(kind: str, shipped_dir: pathlib.Path | None) -> pathlib.Path | None:
    path = None if shipped_dir is None else shipped_dir / kind
    return path if path is not None and path.is_dir() else None


def select_methods(requested: list[str] | None, drafter_dirs: dict[str, pathlib.Path],
                   shipped_dir: pathlib.Path | None) -> list[str]:
    """The methods to run, `ar` first: the requested ones (each trained one needs a drafter), or every
    method whose drafter is given or shipped in `shipped_dir` (the target's, `drafter.shipped_drafters_dir`;
    None: no drafter ships for it)."""
    def available(kind: str) -> bool:
        return kind in drafter_dirs or shipped_drafter(kind, shipped_dir) is not None

    variants = [name for name in drafter_dirs if is_variant(name)]
    if requested is None:
        methods = ["ar", "ngram"] + [k for k in TRAINED if available(k)] + variants
    else:
        missing = [k for k in requested if (k not in drafter_dirs if is_variant(k) else
                                            kind_of(k) in TRAINED and not available(kind_of(k)))]
        if missing:
            where = (f"none is shipped at {shipped_dir}/<kind>" if shipped_dir is not None
                     else "drafters ship only for the embedded default target")
            raise ValueError(f"method(s) {', '.join(missing)} need a trained drafter: {where}; "
                             f"give --drafter {missing[0]}=DIR")
        methods = list(dict.fromkeys(["ar"] + requested))  # ar: the reference for speedups and mismatches
    unused = sorted(set(drafter_dirs) - {m if is_variant(m) else kind_of(m) for m in methods})
    if unused:
        raise ValueError(f"--drafter given for {', '.join(unused)}, which is not among --methods {','.join(methods)}")
    return methods


def load_questions(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """The questions to answer (at most --max-prompts per category, of --categories) and where they
    came from. Each is `{"question_id", "category", "turns", "chat"}`: a question file's turns are user
    messages (`chat`); a prompt file's prompt is one turn, taken as it is (category "prompts")."""
    path = pathlib.Path(args.prompts or SUITE)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    if chat.is_question_file(path):
        questions = [{**q, "chat": True} for q in chat.read_questions(path)]
    else:
        questions = [{"question_id": i, "category": "prompts", "turns": [prompt], "chat": False}
                     for i, prompt in enumerate(data.read_prompts_jsonl(path))]
    categories = list(dict.fromkeys(q["category"] for q in questions))
    if args.categories:
        wanted = [c.strip() for c in args.categories.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in categories]
        if unknown:
            raise ValueError(f"--categories: {', '.join(unknown)} not in {path}; it has {', '.join(categories)}")
        categories = wanted
    chosen = [q for c in categories for q in [q for q in questions if q["category"] == c][:args.max_prompts]]
    return chosen, "the suite (specblock_jax/assets/suite)" if args.prompts is None else str(path)


def plan_units(questions: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """One repeat's runs in order: per category, batches of `batch_size` questions, each batch's turns
    in turn. A unit is `{"category", "turn", "rows"}`, `rows` the indices of the batch's questions that
    have that turn."""
    units = []
    for category in dict.fromkeys(q["category"] for q in questions):
        members = [i for i, q in enumerate(questions) if q["category"] == category]
        for start in range(0, len(members), batch_size):
            batch = members[start:start + batch_size]
            for turn in range(max(len(questions[i]["turns"]) for i in batch)):
                units.append({"category": category, "turn": turn,
                              "rows": [i for i in batch if turn < len(questions[i]["turns"])]})
    return units


def turn_prompt(question: dict[str, Any], turn: int, history: list[dict[str, str]]) -> Any:
    """The prompt of a question's turn: the conversation so far and the turn's user message (MT-Bench's
    multi-turn protocol: every earlier answer is in the conversation), or a prompt file's prompt."""
    if not question["chat"]:
        return question["turns"][turn]
    return history + [{"role": "user", "content": question["turns"][turn]}]


def with_tree(drafter: Drafter, args: argparse.Namespace, method: str = "") -> Drafter:
    """The drafter with the command line's tree shape, where given: `--tree` for all methods, then for
    `method`, then `--tree-budget` / `--max-depth` / `--topk`."""
    # a property (say SpecBlock's max_depth) is not settable, and the drafter's config is not a tree field
    fields = {f.name for f in dataclasses.fields(drafter.method)} - {"config"}
    given = {name: tuple(value) if isinstance(value, list) else value
             for name, value in {**args.tree.get("", {}), **args.tree.get(method, {})}.items()}
    given.update({name: value for name, value in (("budget", args.tree_budget), ("max_depth", args.max_depth),
                                                  ("topk", args.topk)) if value is not None})
    for name in sorted(set(given) - fields):
        print(f"note: tree field {name} does not apply to {type(drafter.method).__name__}; ignored for it",
              file=sys.stderr)
    overrides = {name: value for name, value in given.items() if name in fields}
    return dataclasses.replace(drafter, method=dataclasses.replace(drafter.method, **overrides))


def resolve_drafters(methods: list[str], drafter_dirs: dict[str, pathlib.Path], target: Any,
                     args: argparse.Namespace) -> dict[str, Drafter | None]:
    """method -> its drafter (None for ar), loaded against `target`: a drafter that does not match
    the target is an error here, before any compute."""
    unused = sorted(set(args.tree) - {""} - set(methods))
    if unused:
        raise ValueError(f"--tree given for {', '.join(unused)}, which is not among the methods {','.join(methods)}")
    drafters = {}
    for method in methods:
        if method == "ar":
            drafters[method] = None
            continue
        kind = kind_of(method)
        source = str(drafter_dirs[method] if is_variant(method) else drafter_dirs.get(kind, kind))
        try:
            drafters[method] = with_tree(load_drafter(source, target), args, method)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{method} drafter ({source}): {e}") from None
    return drafters


def tree_shape(drafter: Drafter) -> dict[str, Any]:
    """The drafter's static tree settings (budget, depth, branching), for the report."""
    return {"class": type(drafter.method).__name__,
            **{k: v for k, v in vars(drafter.method).items() if isinstance(v, (int, float, str, tuple))},
            "budget": drafter.method.budget, "max_depth": drafter.method.max_depth}


def check_lengths(target: Any, questions: list[dict[str, Any]], drafters: dict[str, Drafter | None],
                  max_new_tokens: int) -> None:
    """Every question fits the target's context: all its turns, an answer of max_new_tokens to each,
    and the largest tree's scratch. A conversation the target cannot format is an error here too."""
    limit = target.config.max_position_embeddings
    scratch = max((d.method.budget + 1 for d in drafters.values() if d is not None), default=0)
    for q in questions:
        where = f"question {q['question_id']}"
        if q["chat"]:
            messages = [m for t in q["turns"] for m in ({"role": "user", "content": t},
                                                          {"role": "assistant", "content": ""})][:-1]
            n = len(chat.encode(target.tokenizer, messages, where))
        else:
            n = len(decode_lib.encode_prompts(target, q["turns"])[0])
        need = n + len(q["turns"]) * max_new_tokens + scratch
        if need > limit:
            raise ValueError(f"{where} has {n} tokens: with {len(q['turns'])} answer(s) of --max-new-tokens "
                             f"{max_new_tokens} and a tree scratch of {scratch} it exceeds the target's {limit} positions")


def versions() -> dict[str, str]:
    import flax
    import jaxlib
    import numpy
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=pathlib.Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": numpy.__version__, "git_commit": commit,
            "device": str(jax.devices()[0]), "platform": platform.platform(), "cpu_count": os.cpu_count()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run(args: argparse.Namespace, target: Any, questions: list[dict[str, Any]], drafters: dict[str, Drafter | None],
        header: dict) -> dict:
    """Warm up, run the interleaved repeats (rewriting the report after every unit: a crash
    inside XLA, which no handler sees, loses one unit at most), time the phases, and return the final
    report. An exception or interrupt writes the partial report and propagates.
    Every method answers each unit (a batch's turn) in turn, each with its own conversations: a turn's
    prompt holds the method's own earlier answers, as MT-Bench has it."""
    methods = list(drafters)
    units = plan_units(questions, args.batch_size)
    runs: dict[str, list] = {m: [] for m in methods}  # method -> [(repeat, unit index, GenerateOutput)]
    phases: dict[str, dict] = {}
    adapters: dict[str, adapt.Adapter] = {}
    histories: dict[str, dict[int, list]] = {}  # method -> question index -> its conversation so far
    prompt_ids: dict[str, list] = {}  # method -> this unit's encoded prompts
    gaps: dict[tuple, dict] = {}  # (method, repeat, unit, row in the batch) -> greedy_mismatch's figures

    def restart():
        adapters.update({m: adapt.Adapter(target, drafters[m]) for m in methods if m in ADAPTING})
        histories.update({m: {i: [] for i in range(len(questions))} for m in methods})

    def decode(method, unit):
        kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
        batch = [turn_prompt(questions[i], unit["turn"], histories[method][i]) for i in unit["rows"]]
        prompt_ids[method] = decode_lib.encode_prompts(target, batch)
        out = (adapters[method].generate(batch, **kwargs) if method in adapters
               else generate(target, batch, drafter=drafters[method], **kwargs))
        for i, prompt, text in zip(unit["rows"], batch, out.texts or [None] * len(batch)):
            if questions[i]["chat"]:
                histories[method][i] = prompt + [{"role": "assistant", "content": text}]
        return out

    def report(complete: bool, interrupted: str | None = None) -> dict:
        out = summarize(args, runs, phases, units, questions, header["config"]["tree"], gaps)
        return {**header, "complete": complete, "interrupted": interrupted, "finished_utc": _now(), **out,
                "answers": ar_answers(runs["ar"], units, questions)}

    try:
        restart()
        for method in tqdm(methods, desc="compile + warm-up", unit="method"):
            decode(method, units[0])
        with tqdm(total=args.repeats * len(units) * len(methods), desc="timed runs", unit="run") as bar:
            for repeat in range(args.repeats):
                restart()  # each repeat adapts from the trained drafter, and starts every conversation anew
                for u, unit in enumerate(units):
                    for method in methods:
                        runs[method].append((repeat, u, decode(method, unit)))
                        bar.update(1)
                        if args.temperature == 0 and method != "ar":
                            ar_out, out = runs["ar"][-1][2], runs[method][-1][2]
                            for j, (x, y) in enumerate(zip(out.token_ids, ar_out.token_ids)):
                                if x != y:
                                    gaps[method, repeat, u, j] = greedy_mismatch(
                                        target, prompt_ids[method][j], prompt_ids["ar"][j], y, x)
                    hf.write_json(report(complete=False), args.out)
        if args.timing_calls:
            first = [turn_prompt(questions[i], 0, []) for i in units[0]["rows"]]
            fns = {method: timing.phase_calls(target, drafters[method], first, max_new_tokens=args.max_new_tokens,
                                              max_len=runs[method][0][2].stats["max_len"],
                                              temperature=args.temperature, calls=args.timing_calls)
                   for method in tqdm([m for m in methods if m not in ADAPTING], desc="phase timing: compile",
                                      unit="method")}
            phases.update(timing.time_phases(fns))
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        try:
            hf.write_json(report(complete=False, interrupted=reason), args.out)
        except Exception as write_error:  # never hide the original failure behind this one
            print(f"could not write the partial report: {write_error!r}", file=sys.stderr)
        raise
    final = report(complete=True)
    hf.write_json(final, args.out)
    return final


def ar_answers(ar_runs: list, units: list[dict], questions: list[dict]) -> list[dict]:
    """The reference answers of the first repeat, one per question and turn: question_id, category,
    turn (1-based), the turn's prompt and ar's answer (the text; token ids when the target has no
    tokenizer). Greedy methods give the same tokens, or the report says where they do not."""
    answers = []
    for r, u, out in ar_runs:
        if r != 0:
            continue
        for j, i in enumerate(units[u]["rows"]):
            answers.append({"question_id": questions[i]["question_id"], "category": questions[i]["category"],
                            "turn": units[u]["turn"] + 1, "prompt": questions[i]["turns"][units[u]["turn"]],
                            "answer": out.texts[j] if out.texts else out.token_ids[j]})
    return answers


def show_answers(report: dict, width: int = 400) -> str:
    """The report's answers as text: each prompt (cut at `width` characters) and ar's answer."""
    lines = []
    for a in report["answers"]:
        prompt = a["prompt"] if isinstance(a["prompt"], str) else json.dumps(a["prompt"])
        cut = prompt if len(prompt) <= width else prompt[:width] + " [...]"
        lines += [f"=== {a['category']}, question {a['question_id']}, turn {a['turn']} ===",
                  textwrap.indent(cut, "  > "), "--- ar's answer ---", textwrap.indent(str(a["answer"]), "  "), ""]
    return "\n".join(lines)


def _seconds(out) -> float:
    """A run's prefill + decode seconds, and an adapting method's bandit step and update."""
    return out.stats["prefill_s"] + out.stats["decode_s"] + out.stats.get("adapt", {}).get("adapt_s", 0.0)


def _rate(out) -> float:
    return sum(out.stats["new_tokens"]) / _seconds(out)


def _total_rate(outs) -> float:
    """All new tokens over all seconds of these runs."""
    outs = list(outs)
    return sum(sum(o.stats["new_tokens"]) for o in outs) / sum(_seconds(o) for o in outs)


def _histogram(out) -> list[int]:
    """Row-steps of the loop by tokens committed (index k: k tokens, k - 1 accepted drafts + the bonus)."""
    if "steps_by_tokens" in out.stats:
        return [sum(col) for col in zip(*out.stats["steps_by_tokens"])]
    return [0, sum(n - 1 for n in out.stats["new_tokens"])]  # plain decoding: one token per step after the first


def _tau(hist: list[int]) -> float | None:
    """Tokens committed per row-step of a histogram (`_histogram`)."""
    return sum(k * n for k, n in enumerate(hist)) / sum(hist) if sum(hist) else None


def acceptance(hist: list[int], depth: int) -> tuple[float | None, list[float | None]]:
    """From a histogram of steps by tokens committed (index k: k - 1 drafts accepted) on a tree of
    `depth`: the rate at which a drafted position is accepted once the positions before it were
    (accepted drafts over positions tried, a step accepting a of them having tried min(a + 1, depth);
    for a chain drafter, its per-token acceptance probability), and that rate at each depth d (steps
    accepting >= d drafts over those accepting >= d - 1). A step without a draft counts as a miss."""
    steps = [sum(hist[k + 1:]) for k in range(depth + 1)]  # steps[d]: steps accepting >= d drafts
    tried = sum(min(k, depth) * n for k, n in enumerate(hist))
    accepted = sum(max(k - 1, 0) * n for k, n in enumerate(hist))
    by_depth = [steps[d] / steps[d - 1] if steps[d - 1] else None for d in range(1, depth + 1)]
    return (accepted / tried if tried else None), by_depth


def _add(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def greedy_mismatch(target: Any, prompt: list[int], ar_prompt: list[int], ar_ids: list[int],
                    ids: list[int]) -> dict[str, Any]:
    """Where a greedy answer first differs from `ar`'s, and the target's logit gap there (a causal
    forward over the prompt and the common prefix): greedy equality is a floating-point claim, since
    a one-token and an (N+1)-token forward may round differently, so a gap near 0 marks a near-tie,
    a large one a bug. Without a common prompt (an earlier turn already differed) there is no gap."""
    k = next((i for i, (a, b) in enumerate(zip(ar_ids, ids)) if a != b), min(len(ar_ids), len(ids)))
    entry: dict[str, Any] = {"first_difference": k}
    if prompt != ar_prompt:
        return {**entry, "note": "the prompts differ: an earlier turn's answers already did"}
    if k >= min(len(ar_ids), len(ids)):
        return entry
    sequence = prompt + ar_ids[:k]
    padded = np.zeros((1, decode_lib.bucket(len(sequence), decode_lib.MIN_WIDTH)), np.int32)
    padded[0, :len(sequence)] = sequence  # causal: the padding after it is invisible; few shapes, few compiles
    logits_V = np.asarray(target.logits(padded)[0, len(sequence) - 1], np.float64)
    top2 = np.sort(logits_V)[-2:]
    return {**entry, "ar_token": ar_ids[k], "token": ids[k], "logit_gap": float(logits_V[ar_ids[k]] - logits_V[ids[k]]),
            "top2_margin": float(top2[1] - top2[0])}


def summarize(args: argparse.Namespace, runs: dict[str, list], phases: dict[str, dict], units: list[dict],
              questions: list[dict], trees: dict[str, dict], gaps: dict[tuple, dict] | None = None) -> dict:
    """The report's per-method figures, overall and per category (`categories`), from whatever runs
    exist (a partial run gives partial figures). Phases are timed once, on the first unit: the
    per-category figures have no phase breakdown.

    `speedup_ceiling`: the speedup over `ar` this method's loop would reach if every step committed its
    most tokens (`max_tokens_per_iter`: the tree's deepest possible path plus the bonus), at its measured
    ms per iteration. Shapes are static, so an iteration costs the same whatever is accepted: no drafter
    of this cost and tree shape can beat it on this machine."""
    overall = method_figures(args, runs, phases, units, questions, trees, gaps or {})
    categories = {}
    for category in dict.fromkeys(unit["category"] for unit in units):
        subset = {m: [(r, u, out) for r, u, out in outs if units[u]["category"] == category] for m, outs in runs.items()}
        if any(subset.values()):
            categories[category] = method_figures(args, subset, {}, units, questions, trees, gaps or {})["methods"]
    return {**overall, "categories": categories}


def method_figures(args: argparse.Namespace, runs: dict[str, list], phases: dict[str, dict], units: list[dict],
                   questions: list[dict], trees: dict[str, dict], gaps: dict[tuple, dict]) -> dict:
    """`summarize`'s figures over these runs: {"methods": {method: figures}, "warnings": [...]}; each
    mismatched answer carries `greedy_mismatch`'s figures."""
    ar = {(r, b): out for r, b, out in runs["ar"]}
    greedy = args.temperature == 0
    methods, warnings = {}, []
    for method, outs in runs.items():
        entry: dict[str, Any] = {"runs": len(outs)}
        methods[method] = entry
        if not outs:
            continue
        first = [(b, out) for r, b, out in outs if r == 0]  # outputs repeat exactly; count one repeat
        hist = [0]
        mismatched = []
        for b, out in first:
            hist = _add(hist, _histogram(out))
            if (0, b) in ar:
                mismatched += [{"question_id": questions[i]["question_id"], "turn": units[b]["turn"] + 1,
                                **gaps.get((method, 0, b, j), {})}
                               for j, (i, x, y) in enumerate(zip(units[b]["rows"], out.token_ids, ar[0, b].token_ids))
                               if x != y]
        iterations = sum(out.stats["iterations"] for _, out in first)
        verify_steps = sum(out.stats.get("verify_steps", out.stats["iterations"]) for _, out in first)
        paired = [(out, ar[r, b]) for r, b, out in outs if (r, b) in ar]
        ratios = [_rate(out) / _rate(ref) for out, ref in paired]
        iteration_ms = statistics.median(out.stats["decode_s"] / max(out.stats["iterations"], 1) * 1e3
                                         for _, _, out in outs)
        entry.update(
            tau=_tau(hist),
            tokens_per_s=statistics.median(_rate(out) for _, _, out in outs),
            speedup_vs_ar=statistics.median(ratios) if ratios else None,
            speedup_vs_ar_total=(_total_rate(o for o, _ in paired) / _total_rate(a for _, a in paired)
                                 if paired else None),
            iterations=iterations,
            verify_steps=verify_steps,
            new_tokens=sum(sum(out.stats["new_tokens"]) for _, out in first),
            prompts=sum(len(out.token_ids) for _, out in first),
            drafter_forwards_per_iter=(sum(out.stats.get("drafter_forwards", 0) for _, out in first)
                                       / max(iterations, 1)),
            acceptance_histogram=hist,
            mismatches_vs_ar=len(mismatched) if greedy else None,
            mismatched_prompts=mismatched if greedy else None,
            tokens_per_s_runs=[_rate(out) for _, _, out in outs],
            tau_runs=[_tau(_histogram(out)) for _, _, out in outs],  # paired by index across methods
        )
        breakdown = (timing.phase_breakdown(phases[method]) if method in phases else dict.fromkeys(
            ("loop_ms_per_iter", "draft_ms_per_iter", "verify_ms_per_iter", "other_ms_per_iter")))
        entry.update(breakdown, iteration_ms=iteration_ms, phase_ms=phases.get(method),
                     max_tokens_per_iter=(min(trees[method]["budget"], trees[method]["max_depth"]) + 1
                                          if method in trees else 1))
        if method in trees:
            entry["acceptance_rate"], entry["acceptance_by_depth"] = acceptance(
                hist, entry["max_tokens_per_iter"] - 1)
        if method in ADAPTING:
            entry["adaptation"] = adaptation([out for _, _, out in outs])
        if greedy and mismatched:
            shown = ", ".join(f"{m['question_id']} turn {m['turn']}"
                              + (f" (logit gap {m['logit_gap']:.2g})" if "logit_gap" in m else "")
                              for m in mismatched[:10])
            warnings.append(f"{method}: {len(mismatched)} of {entry['prompts']} answers differ from ar's greedy output "
                            f"(questions {shown}{' ...' if len(mismatched) > 10 else ''}). Speculative "
                            "decoding is lossless by construction: a logit gap near 0 (far below the logits' scale) is "
                            "a near-tie that float rounding decided differently, a larger one a bug in the decoding "
                            "path.")
    ar_ms = methods.get("ar", {}).get("iteration_ms")
    for entry in methods.values():
        entry["speedup_ceiling"] = (entry["max_tokens_per_iter"] * ar_ms / entry["iteration_ms"]
                                    if ar_ms and "iteration_ms" in entry else None)
    return {"methods": methods, "warnings": warnings}


def adaptation(outs: list) -> dict:
    """An adapting method's windows (runs, every repeat), the updates its bandit tried and kept, the
    probes and reverts, the most shifts one repeat saw, and the share of its time spent adapting (bandit
    steps, updates, probes)."""
    counts = adapt.tally([out.stats["adapt"] for out in outs])
    return {**counts, "adapt_time_share": counts["adapt_s"] / sum(_seconds(out) for out in outs)}


def table(report: dict) -> str:
    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| method | tokens/s | speedup vs ar (median / total) | tau | ms/iter (runs / timed) | draft | verify "
             "| other | drafter fwd/iter | iterations | acceptance | ceiling | mismatches vs ar |", "|---" * 13 + "|"]
    for name, m in report["methods"].items():
        if not m.get("runs"):
            lines.append(f"| {name} | (no runs) |" + " |" * 11)
            continue
        lines.append(f"| {name} | {m['tokens_per_s']:.0f} | {f(m['speedup_vs_ar'], '.3f')} / "
                     f"{f(m['speedup_vs_ar_total'], '.3f')} | {f(m['tau'], '.2f')} | "
                     f"{m['iteration_ms']:.2f} / {f(m['loop_ms_per_iter'], '.2f')} | "
                     f"{f(m['draft_ms_per_iter'], '.2f')} | "
                     f"{f(m['verify_ms_per_iter'], '.2f')} | {f(m['other_ms_per_iter'], '.2f')} | "
                     f"{m['drafter_forwards_per_iter']:.2f} | {m['iterations']} | "
                     f"{f(m.get('acceptance_rate'), '.3f')} | "
                     f"{f(m['speedup_ceiling'], '.2f')} | "
                     f"{f(m['mismatches_vs_ar'], 'd')} |")
    for name, m in report["methods"].items():
        if a := m.get("adaptation"):
            lines.append(f"\n{name}: {a['windows']} windows, {a['updates']} updates tried ({a['kept']} kept), "
                         f"{a['probes']} probes, {a['reverts']} reverts, {100 * a['adapt_time_share']:.1f} % of "
                         "its time adapting")
    methods = [name for name in report["methods"] if name != "ar"]
    if len(report.get("categories", {})) > 1:
        lines += ["", "| category | answers | ar tokens/s | " + " | ".join(f"{m} tokens/s | {m} speedup | {m} tau"
                                                                       for m in methods) + " |",
                  "|---" * (3 + 3 * len(methods)) + "|"]
        for category, figures in report["categories"].items():
            ar = figures.get("ar", {})
            cells = [f"{f(figures.get(m, {}).get('tokens_per_s'), '.0f')} | "
                     f"{f(figures.get(m, {}).get('speedup_vs_ar'), '.3f')} | {f(figures.get(m, {}).get('tau'), '.2f')}"
                     for m in methods]
            lines.append(f"| {category} | {ar.get('prompts', 0)} | {f(ar.get('tokens_per_s'), '.0f')} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_paths(args: argparse.Namespace) -> pathlib.Path | None:
    """The stem plots are written under (None: no plots)."""
    if args.plots_dir == "none":
        return None
    out = pathlib.Path(args.out)
    return (pathlib.Path(args.plots_dir) if args.plots_dir else out.parent) / out.stem


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on command-line arguments (`argv`; None: `sys.argv[1:]`; `--help` lists them).

    Writes the JSON report to `--out` (and, unless `--plots-dir none`, PNG plots beside it) and prints
    the markdown table. Returns the exit status: 0 when done, 1 when a greedy method's output differs
    from ar's (or a run failed: the partial report is kept), 2 on bad input (printed, before any compute),
    130 on an interrupt. Bad input is reported, not raised; `--help` and argparse's own errors exit."""
    args = parse_args(argv)
    try:  # every input checked before any compute
        drafter_dirs = parse_drafter_specs(args.drafter)
        questions, source = load_questions(args)
        target = load_target(args.target)
        shipped_dir = drafter_lib.shipped_drafters_dir(target.path)
        methods = select_methods(args.methods, drafter_dirs, shipped_dir)
        drafters = resolve_drafters(methods, drafter_dirs, target, args)
        check_lengths(target, questions, drafters, args.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:
        print(f"infer.bench: error: {e}", file=sys.stderr)
        return 2
    header = {"started_utc": _now(), "config": {**vars(args), "methods": methods, "prompt_source": source,
                                                "num_questions": len(questions),
                                                "num_turns": sum(len(q["turns"]) for q in questions),
                                                "target": str(target.path),
                                                "drafters": {m: str(drafter_dirs.get(m, shipped_drafter(m, shipped_dir) or m))
                                                             for m in methods if m != "ar"},
                                                "tree": {m: tree_shape(d) for m, d in drafters.items() if d}},
              "versions": versions(), "timing_method": timing.TIMING_METHOD}
    try:
        report = run(args, target, questions, drafters, header)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the partial report (\"complete\": false) is in {args.out}", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"failed: the partial report (\"complete\": false) is in {args.out}", file=sys.stderr)
        return 1
    if args.show_answers:
        print(show_answers(report))
    print(table(report))
    for warning in report["warnings"]:
        print(f"\n{'!' * 100}\nWARNING: {warning}\n{'!' * 100}")
    print(f"\nreport: {args.out}")
    stem = plot_paths(args)
    if stem is not None:
        from infer import plots
        for path in plots.write_plots(report, stem):
            print(f"plot: {path}")
    return 1 if report["warnings"] else 0


if __name__ == "__main__":
    sys.exit(main())
