"""Chat prompts for drafter training data, from the benchmark suite's open sources but never its questions.

The suite (infer/make_suite.py) takes a few hundred questions from GSM8K's training split, the
self-instruct seed tasks, the CPython stdlib and Shakespeare. This takes thousands more from the same
sources and leaves out every `source` the suite uses (`make_suite.suite_sources`), so a drafter
trained on the target's answers to these is measured on questions it never saw:

- math: GSM8K training problems;
- code: public stdlib functions (signature and docstring) to write again, from every stdlib module;
- summarization: stdlib module and class docstrings of 120-300 words, and passages of the Shakespeare
  plays of the corpus's training split (the suite's come from its held-out plays);
- translation: one-sentence stdlib docstrings and the first sentences of those passages, into French,
  Spanish or German;
- writing: continue or retell those passages;
- tasks: every self-instruct seed task the suite does not use, with each of its instances;
- explain: public stdlib functions of 5-30 lines, their docstring removed, to explain.

    python -m train.chat_prompts --per-category 1000   # writes train/prompts/chat_prompts.jsonl (committed)

Prompts no drafter was trained on, for serving streams (infer.adapt_bench): passages of the corpus's
held-out plays, and of the other sources only what the training prompts leave out:

    python -m train.chat_prompts --plays test --exclude train/prompts/chat_prompts.jsonl \\
        --per-category 200 --out train/prompts/serving_prompts.jsonl

One JSON line per prompt, `{"messages": [{"role": "user", "content": ...}], "category", "source"}`,
categories interleaved; deterministic for the same data and Python.
"""

from __future__ import annotations

import argparse
import ast
import copy
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from specblock_jax import data

from infer import make_suite

CATEGORIES = ("math", "code", "summarization", "translation", "writing", "tasks", "explain")
PASSAGE_CHARS = 900  # Shakespeare passages cut from the training plays
WRITING_ASKS = ("Continue this scene for a few more lines, in the same style:",
                "Retell what happens in this passage in modern English:",
                "Rewrite this passage as a short story told by one of its characters:")


def build(shared_data: str | pathlib.Path, per_category: int, seed: int = 0,
          plays: Sequence[data.Document] | None = None, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """Up to `per_category` prompts per category (all there are when fewer), none from a suite source
    or from the sources in `exclude`, interleaved category by category. `plays`: the prose documents
    to cut passages from (default: the corpus's training split, fetched on first use)."""
    shared_data = pathlib.Path(shared_data)
    used = make_suite.suite_sources() | exclude
    rng = np.random.default_rng(seed)
    tasks = make_suite._read_jsonl(shared_data / "self_instruct_seed_tasks.jsonl")
    gsm8k = make_suite._read_jsonl(shared_data / "gsm8k_train.jsonl")
    plays = data.corpus_splits()["prose"]["train"] if plays is None else plays
    passages = _play_passages(plays, rng, 3 * per_category)
    pools = {
        "math": [(row["question"], f"gsm8k_train:{i}") for i, row in enumerate(gsm8k)],
        "code": _code_prompts(),
        "summarization": _summary_prompts(passages),
        "translation": _translation_prompts(passages),
        "writing": [(f"{WRITING_ASKS[i % len(WRITING_ASKS)]}\n\n{text}", source)
                    for i, (source, text) in enumerate(passages)],
        "tasks": [(_task_prompt(task, instance), f"self_instruct:{task['id']}")
                  for task in tasks for instance in task["instances"]],
        "explain": _explain_prompts(),
    }
    chosen = {}
    for category, pool in pools.items():
        pool = [(text, source) for text, source in pool if source not in used and len(text) <= make_suite.MAX_PROMPT_CHARS]
        order = rng.permutation(len(pool))[:per_category]
        chosen[category] = [pool[i] for i in order]
    rows = []
    for k in range(max(map(len, chosen.values()))):
        for category in CATEGORIES:
            if k < len(chosen[category]):
                text, source = chosen[category][k]
                rows.append({"messages": [{"role": "user", "content": text}], "category": category, "source": source})
    return rows


def _code_prompts() -> list[tuple[str, str]]:
    modules = [name for name, _ in make_suite._stdlib_modules() if "." not in name]
    prompts = []
    for module, functions in _functions(modules).items():
        for name, signature, doc in functions:
            prompts.append((f"Write a Python function `{name.rsplit('.', 1)[1]}({signature})` that does the following:"
                            f"\n\n{doc}\n\nDo not use the `{module}` module.", f"python-stdlib:{name}"))
    return prompts


def _explain_prompts() -> list[tuple[str, str]]:
    """Public top-level functions of the public stdlib modules, 5-30 lines once their docstring is
    dropped (so the answer has to read the code), to explain."""
    prompts = []
    for module, path in make_suite._stdlib_modules():
        try:
            tree = make_suite._parse_stdlib(path)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            if ast.get_docstring(node) is not None:
                node = copy.copy(node)  # the parsed tree is shared
                node.body = node.body[1:]
            code = ast.unparse(node) if node.body else ""
            if 5 <= len(code.splitlines()) <= 30:
                prompts.append((f"Explain what this Python function does, step by step:\n\n```python\n{code}\n```",
                                f"python-stdlib:{module}.{node.name}"))
    return prompts


def _functions(modules: Sequence[str]) -> dict[str, list]:
    """make_suite's function reader over every module it can parse (a few stdlib files are not
    Python 3.11 syntax-clean on purpose, e.g. bad-syntax fixtures)."""
    found = {}
    for module in modules:
        try:
            found.update(make_suite._stdlib_functions([module]))
        except (SyntaxError, FileNotFoundError, UnicodeDecodeError):
            continue
    return found


def _summary_prompts(passages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    texts = [(f"this description of a Python {kind}", doc, f"python-stdlib:{name}")
             for kind, name, doc in make_suite._stdlib_passages()]
    texts += [("what happens in this passage from a Shakespeare play", text, source) for source, text in passages]
    lengths = make_suite.SUMMARY_LENGTHS
    return [(f"Summarize {what} {lengths[i % len(lengths)]}:\n\n{text}", source)
            for i, (what, text, source) in enumerate(texts)]


def _translation_prompts(passages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    modules = [name for name, _ in make_suite._stdlib_modules() if "." not in name]
    texts = [(sentence, f"python-stdlib:{name}") for functions in _functions(modules).values()
             for name, _, doc in functions if (sentence := make_suite._docstring_sentence(doc)) is not None]
    texts += [(sentence, source) for source, text in passages
              if (sentence := make_suite._first_sentence(text)) is not None]
    languages = make_suite.LANGUAGES
    return [(f"Translate into {languages[i % len(languages)]}:\n\n{text}", source)
            for i, (text, source) in enumerate(texts)]


def _play_passages(plays: Sequence[data.Document], rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """[(source, passage)]: up to `n` cuts of PASSAGE_CHARS from the plays, each ended at its last full
    sentence, no two sharing a line."""
    passages, seen = [], set()
    for _ in range(4 * n):
        if len(passages) == n:
            break
        doc = plays[rng.integers(len(plays))]
        start = int(rng.integers(0, max(1, len(doc.text) - PASSAGE_CHARS)))
        start = doc.text.find("\n", start) + 1  # from a line's start
        text = make_suite._to_last_sentence(doc.text[start:start + PASSAGE_CHARS])
        lines = {line.strip() for line in text.splitlines() if len(line.strip()) > 12}
        if len(text.split()) < make_suite.SHAKESPEARE_SUMMARY_WORDS or lines & seen:
            continue
        seen |= lines
        passages.append((f"shakespeare:{doc.name}:{start}", text))
    return passages


def _task_prompt(task: dict, instance: dict) -> str:
    text = instance["input"].strip()
    return f"{task['instruction'].strip()}\n\n{text}" if text else task["instruction"].strip()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train.chat_prompts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared-data", default=str(make_suite.DEFAULT_SHARED_DATA),
                   help="folder holding self_instruct_seed_tasks.jsonl and gsm8k_train.jsonl")
    p.add_argument("--per-category", type=int, default=1000, help="prompts per category, at most (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plays", choices=("train", "test"), default="train",
                   help="the corpus split whose plays the passages are cut from (default train; test: the "
                        "held-out plays no drafter trains on)")
    p.add_argument("--exclude", action="append", default=[], metavar="JSONL",
                   help="a prompt file whose sources are left out (repeatable), e.g. the training prompts")
    p.add_argument("--out", default="train/prompts/chat_prompts.jsonl")
    args = p.parse_args(argv)
    if args.per_category < 1:
        p.error(f"--per-category must be >= 1, got {args.per_category}")
    try:
        exclude = frozenset(row["source"] for path in args.exclude
                            for row in make_suite._read_jsonl(pathlib.Path(path)))
        plays = data.corpus_splits()["prose"][args.plays]
        rows = build(args.shared_data, args.per_category, args.seed, plays, exclude)
    except FileNotFoundError as e:
        print(f"train.chat_prompts: error: {e}", file=sys.stderr)
        return 2
    data.write_jsonl(rows, args.out)
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    print(f"wrote {len(rows)} prompts to {args.out}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
