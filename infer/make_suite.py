"""Build the chat benchmark suite: prompts for an instruct target in MT-Bench's question layout.

The embedded default target is an instruct model (SmolLM2-135M-Instruct), so its speed-ups are
measured on chat prompts, category by category, as MT-Bench reports them. MT-Bench itself is not
reachable here; this suite rebuilds its shape from open data that is (`../shared/data` beside the
repository, the running interpreter's stdlib, the toy target's held-out Shakespeare prompts):

- writing, qa, extraction: hand-picked self-instruct seed tasks (instruction plus instance input),
  with follow-up turns written here;
- math: GSM8K training problems, an evenly spaced line of them;
- code: CPython stdlib functions (signature and docstring, read with `ast`) to write again;
- summarization: stdlib module and class docstrings of 120-300 words, held-out Shakespeare passages
  and two self-instruct summarization tasks;
- translation: the two self-instruct translation tasks, and short English texts taken from
  self-instruct answers, stdlib docstrings and held-out Shakespeare passages, to French, Spanish or
  German.

Every question records its `source`, and no source is used twice, so that drafter training data cut
from the same sources can exclude the suite (`suite_sources`). The build is deterministic: the same
data and Python version give the same file byte for byte.

    python3 -m infer.make_suite [--shared-data DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import pathlib
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "specblock_jax" / "assets" / "suite" / "questions.jsonl"
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PROSE_PROMPTS = REPO_ROOT / "specblock_jax" / "assets" / "toy" / "target" / "prompts" / "prose.jsonl"
# The committed suite was built with this Python; another one has other stdlib docstrings.
PYTHON_VERSION = (3, 11)

CATEGORIES = ("writing", "qa", "math", "code", "summarization", "translation", "extraction")
MAX_PROMPT_CHARS = 1500
LANGUAGES = ("French", "Spanish", "German")

# Self-instruct seed tasks by number (`seed_task_<n>`), each with its follow-up turn or None.
# Left out on purpose: tasks that ask for stereotypes, toxic text or a person's private data.
WRITING_TASKS = {
    4: "Now suggest two more titles: one formal and one playful.",
    6: None,
    8: 'Now write another haiku, this time using the word "winter".',
    17: None,
    18: "Make it more formal.",
    20: "Now rewrite it in fewer than 50 words.",
    23: None,
    24: None,
    29: "Give the story a title and a one-sentence summary.",
    33: None,
    40: "Now shrink the plan to a single weekend.",
    46: None,
    47: None,
    55: None,
    59: "Rewrite the story for a five-year-old.",
    63: None,
    70: None,
    71: None,
    74: None,
    76: "Write a two-sentence advertisement for it.",
    80: None,
    86: None,
    87: None,
    89: "Turn it into three bullet points for an online shop.",
    96: None,
    100: "Make it warmer and less formal.",
    119: None,
    123: None,
    124: "Now write the company's reply to this review.",
    129: None,
}
QA_TASKS = {
    0: None,
    1: None,
    7: "Use the idiom in a short dialogue between two friends.",
    12: None,
    15: None,
    19: "Now explain it in one sentence that a child would understand.",
    25: None,
    32: None,
    38: None,
    48: "Who were the astronauts on that mission?",
    60: None,
    73: None,
    82: None,
    88: None,
    92: None,
    95: "Explain it again for a ten-year-old.",
    102: None,
    103: None,
    107: None,
    110: None,
    111: "How would you explain music to a person born deaf?",
    118: None,
    127: None,
    131: None,
    133: None,
    143: None,
    146: "What criteria did you use for the ranking?",
    155: None,
    161: None,
    163: None,
}
EXTRACTION_TASKS = {
    13: None,
    26: None,
    39: "Now give them as a JSON list of strings.",
    42: None,
    43: None,
    50: None,
    51: None,
    66: None,
    75: None,
    78: None,
    85: "Now group the places by country.",
    97: "Now make it sound casual instead.",
    98: None,
    108: None,
    114: None,
    126: None,
    128: "Now add a column with each country's capital.",
    132: None,
    134: None,
    135: None,
    154: None,
    156: None,
    157: "Which words in the sentence decided it?",
    159: None,
    162: None,
    165: None,
    166: None,
    168: None,
    169: None,
    170: None,
}
SUMMARIZATION_TASKS = {64: None, 137: "Now write a reply to it in two sentences."}
TRANSLATION_TASKS = {101: None, 117: "Now translate it into Japanese."}
# Self-instruct tasks whose answer (first instance output) is short plain English to translate.
TRANSLATION_ANSWERS = (5, 9, 49, 57, 84, 90, 112)

GSM8K_QUESTIONS = 26
MATH_FOLLOW_UPS = ("Explain your steps again, briefly.",
                   "Check your answer by working backwards from it.",
                   "Write the whole solution as a single arithmetic expression.")
# Small pure-Python stdlib modules whose functions make self-contained coding tasks.
CODE_MODULES = ("base64", "bisect", "calendar", "fnmatch", "heapq", "posixpath", "shlex",
                "statistics", "string", "textwrap")
CODE_PER_MODULE = 3
MIN_DOCSTRING_CHARS = 40
MAX_DOCSTRING_CHARS = 1200
CODE_FOLLOW_UPS = ("Now add type hints and a short docstring.", "Write two unit tests for it.",
                   "What is the time complexity of your function?")
SUMMARY_WORDS = (120, 300)
MAX_PASSAGE_CHARS = 1300
SUMMARY_LENGTHS = ("in two sentences", "in one sentence", "in three bullet points")
SUMMARY_SHAKESPEARE = 5
SHAKESPEARE_SUMMARY_WORDS = 40
SUMMARY_FOLLOW_UPS = ("Now summarize it in at most 15 words.",
                      "List three key terms from the passage and explain each in a few words.")
TRANSLATION_STDLIB = 7
TRANSLATION_SHAKESPEARE = 8
TRANSLATION_FOLLOW_UPS = ("Now translate it into Italian.",
                          "Translate your translation back into English, word for word.")
# The code corpus's exclusions in specblock_jax/data.py (copied: importing it loads transformers).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "encodings", "pydoc_data"}
)
_SPEAKER_OR_STAGE = re.compile(r"^\s*(\[.*\]|[A-Z0-9][A-Z0-9 '.]*)\s*$")
_SENTENCE_END = re.compile(r"[.!?]['\"]?(?=\s|$)")
_UNDERLINE = re.compile(r"\s*[-=~*^]{3,}\s*")


def build(shared_data: str | pathlib.Path) -> list[dict]:
    """All questions, category by category, with ids 101.. for the first category, 201.. next."""
    shared_data = pathlib.Path(shared_data)
    tasks = _read_jsonl(shared_data / "self_instruct_seed_tasks.jsonl")
    tasks = {int(t["id"].removeprefix("seed_task_")): t for t in tasks}
    gsm8k = _read_jsonl(shared_data / "gsm8k_train.jsonl")
    prose = _shakespeare_passages(_read_jsonl(PROSE_PROMPTS))
    long_prose = [p for p in prose if len(p[1].split()) >= SHAKESPEARE_SUMMARY_WORDS
                  and p[1][:1].isupper()]
    summary_prose = long_prose[:SUMMARY_SHAKESPEARE]
    translation_prose = [p for p in prose if p not in summary_prose]
    functions = _stdlib_functions(CODE_MODULES)
    code_functions = [f for fs in functions.values() for f in fs[:CODE_PER_MODULE]]
    code_names = {name for name, _, _ in code_functions}
    spare_functions = {m: [f for f in fs if f[0] not in code_names] for m, fs in functions.items()}

    by_category = {
        "writing": _seed_questions(tasks, WRITING_TASKS),
        "qa": _seed_questions(tasks, QA_TASKS),
        "math": _math_questions(gsm8k),
        "code": _code_questions(code_functions),
        "summarization": _summarization_questions(tasks, summary_prose),
        "translation": _translation_questions(tasks, spare_functions, translation_prose),
        "extraction": _seed_questions(tasks, EXTRACTION_TASKS),
    }
    rows = []
    for index, category in enumerate(CATEGORIES, start=1):
        for number, (turns, source) in enumerate(by_category[category], start=1):
            rows.append({"question_id": 100 * index + number, "category": category,
                         "turns": turns, "source": source})
    _check(rows)
    return rows


def suite_sources(path: str | pathlib.Path = DEFAULT_OUT) -> set[str]:
    """The `source` of every question in a suite file: what training data must leave out."""
    return {row["source"] for row in _read_jsonl(pathlib.Path(path))}


# ---------------------------------------------------------------------------------------------
# Categories: each returns [(turns, source)]


def _seed_questions(tasks: dict[int, dict], table: dict[int, str | None]) -> list:
    return [(_turns(_seed_prompt(tasks[n]), follow_up), _seed_source(n))
            for n, follow_up in table.items()]


def _math_questions(gsm8k: Sequence[dict]) -> list:
    stride = len(gsm8k) // GSM8K_QUESTIONS
    questions = []
    for i in range(GSM8K_QUESTIONS):
        questions.append((_turns(gsm8k[i * stride]["question"], _follow_up(i, 3, MATH_FOLLOW_UPS)),
                          f"gsm8k_train:{i * stride}"))
    return questions


def _code_questions(functions: Sequence[tuple[str, str, str]]) -> list:
    questions = []
    for i, (name, signature, doc) in enumerate(functions):
        module, func = name.rsplit(".", 1)
        prompt = (f"Write a Python function `{func}({signature})` that does the following:\n\n"
                  f"{doc}\n\nDo not use the `{module}` module.")
        questions.append((_turns(prompt, _follow_up(i, 4, CODE_FOLLOW_UPS)), f"python-stdlib:{name}"))
    return questions


def _summarization_questions(tasks: dict[int, dict], prose: Sequence[tuple[str, str]]) -> list:
    passages = [(f"this description of a Python {kind}", doc, f"python-stdlib:{name}")
                for kind, name, doc in _stdlib_passages()]
    passages += [("what happens in this passage from a Shakespeare play", text, source)
                 for source, text in prose]
    questions = []
    for i, (what, text, source) in enumerate(passages):
        prompt = f"Summarize {what} {SUMMARY_LENGTHS[i % len(SUMMARY_LENGTHS)]}:\n\n{text}"
        questions.append((_turns(prompt, _follow_up(i, 4, SUMMARY_FOLLOW_UPS)), source))
    return questions + _seed_questions(tasks, SUMMARIZATION_TASKS)


def _translation_questions(tasks: dict[int, dict], spare_functions: dict[str, list],
                           prose: Sequence[tuple[str, str]]) -> list:
    texts = [(tasks[n]["instances"][0]["output"].strip(), _seed_source(n))
             for n in TRANSLATION_ANSWERS]
    sentences = {module: [(summary, f"python-stdlib:{name}") for name, _, doc in fs
                          if (summary := _docstring_sentence(doc)) is not None]
                 for module, fs in spare_functions.items()}
    texts += _round_robin(sentences, TRANSLATION_STDLIB)
    first_sentences = [(sentence, source) for source, text in prose
                       if (sentence := _first_sentence(text)) is not None]
    texts += first_sentences[:TRANSLATION_SHAKESPEARE]
    questions = []
    for i, (text, source) in enumerate(texts):
        prompt = f"Translate into {LANGUAGES[i % len(LANGUAGES)]}:\n\n{text}"
        questions.append((_turns(prompt, _follow_up(i, 4, TRANSLATION_FOLLOW_UPS)), source))
    return _seed_questions(tasks, TRANSLATION_TASKS) + questions


# ---------------------------------------------------------------------------------------------
# Sources


def _seed_prompt(task: dict) -> str:
    """The instruction, then the first instance's input when it has one."""
    text = task["instances"][0]["input"].strip()
    return f"{task['instruction'].strip()}\n\n{text}" if text else task["instruction"].strip()


def _seed_source(number: int) -> str:
    return f"self_instruct:seed_task_{number}"


def _stdlib_functions(modules: Iterable[str]) -> dict[str, list[tuple[str, str, str]]]:
    """{module: [(module.name, signature, docstring)]} of public top-level functions, by name,
    whose docstrings are long enough to specify them and short enough to quote."""
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    functions = {}
    for module in modules:
        tree = _parse_stdlib(lib / f"{module}.py")
        functions[module] = sorted(
            (f"{module}.{node.name}", ast.unparse(node.args), doc)
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
            and MIN_DOCSTRING_CHARS <= len(doc := ast.get_docstring(node) or "") <= MAX_DOCSTRING_CHARS
            and not _uses_private_name(node.args)
        )
    return functions


@functools.cache
def _parse_stdlib(path: pathlib.Path) -> ast.Module:
    """A stdlib file's syntax tree, parsed once per process (the suite and the training prompts walk
    the same few hundred files several times). Shared: callers must not modify it."""
    return ast.parse(path.read_bytes())


def _uses_private_name(args: ast.arguments) -> bool:
    """Whether a signature's defaults name module internals (``colwidth=_colwidth``)."""
    return any(isinstance(n, ast.Name) and n.id.startswith("_") for n in ast.walk(args))


def _stdlib_passages() -> list[tuple[str, str, str]]:
    """[(kind, dotted name, docstring)] of public stdlib modules and their public top-level classes
    whose docstring is a prose passage of 120-300 words: no doctest, import line or underlined
    heading, at most a quarter of its lines indented."""
    passages = []
    for module, path in _stdlib_modules():
        tree = _parse_stdlib(path)
        nodes = [("module", module, tree)] + [
            ("class", f"{module}.{node.name}", node) for node in tree.body
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_")]
        for kind, name, node in nodes:
            doc = ast.get_docstring(node)
            if doc and _is_prose_passage(doc):
                passages.append((kind, name, doc))
    return passages


def _stdlib_modules() -> list[tuple[str, pathlib.Path]]:
    """[(dotted name, path)] of the public stdlib modules, by name, without the code corpus's
    excluded folders (nor site-packages: the walk never enters them)."""
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = [d for d in dirs if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith("_")]
        package = pathlib.Path(root).relative_to(lib).parts
        for name in files:
            stem = name.removesuffix(".py")
            if name.endswith(".py") and (stem == "__init__" or not stem.startswith("_")):
                parts = package if stem == "__init__" else (*package, stem)
                modules.append((".".join(parts), pathlib.Path(root, name)))
    return sorted(modules)


def _is_prose_passage(doc: str) -> bool:
    lines = doc.splitlines()
    if not SUMMARY_WORDS[0] <= len(doc.split()) <= SUMMARY_WORDS[1] or len(doc) > MAX_PASSAGE_CHARS:
        return False
    if any(line.lstrip().startswith((">>>", "import ", "from ")) or _UNDERLINE.fullmatch(line)
           for line in lines):
        return False
    return sum(line.startswith((" ", "\t")) for line in lines) <= len(lines) / 4


def _shakespeare_passages(prompts: Sequence[dict]) -> list[tuple[str, str]]:
    """[(source, passage)] of held-out prompts cut back to their last full sentence, skipping any
    that shares a line with an earlier one (random cuts from one play can overlap)."""
    seen: set[str] = set()
    passages = []
    for line_no, row in enumerate(prompts):
        lines = {line.strip() for line in row["prompt"].splitlines() if len(line.strip()) > 12}
        if lines & seen:
            continue
        seen |= lines
        passages.append((f"shakespeare:{row['source']}:prose.jsonl:{line_no}",
                         _to_last_sentence(row["prompt"])))
    return passages


def _to_last_sentence(text: str) -> str:
    """``text`` up to its last sentence end, without trailing speaker names or stage directions."""
    ends = list(_SENTENCE_END.finditer(text))
    lines = text[:ends[-1].end()].splitlines() if ends else text.splitlines()
    while lines and (not lines[-1].strip() or _SPEAKER_OR_STAGE.match(lines[-1])):
        lines.pop()
    return "\n".join(lines).strip("\n")


def _first_sentence(passage: str) -> str | None:
    """The first sentence of the first speech in a passage, verse lines kept, if it has 6-40
    words and starts with a capital; None otherwise."""
    lines = passage.splitlines()
    while lines and (not lines[0].strip() or _SPEAKER_OR_STAGE.match(lines[0])):
        lines.pop(0)
    speech = []
    for line in lines:
        if not line.strip() or _SPEAKER_OR_STAGE.match(line):
            break
        speech.append(line.strip())
    text = "\n".join(speech)
    end = _SENTENCE_END.search(text)
    if end is None or not text[:1].isupper():
        return None
    sentence = text[:end.end()]
    return sentence if 6 <= len(sentence.split()) <= 40 else None


def _docstring_sentence(doc: str) -> str | None:
    """A docstring's first paragraph when it is one plain sentence of 6-30 words."""
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    words = summary.split()
    if not 6 <= len(words) <= 30 or not summary.endswith(".") or ". " in summary:
        return None
    return None if any(c in summary for c in "`*=>[") else summary


# ---------------------------------------------------------------------------------------------
# Helpers


def _turns(first: str, follow_up: str | None) -> list[str]:
    return [first] if follow_up is None else [first, follow_up]


def _follow_up(i: int, every: int, follow_ups: Sequence[str]) -> str | None:
    """A second turn for every ``every``-th question, cycling through ``follow_ups``."""
    return follow_ups[i // every % len(follow_ups)] if i % every == every - 1 else None


def _round_robin(groups: dict[str, list], n: int) -> list:
    """The first ``n`` items taking each group's first item in turn, then each one's second..."""
    depth = max(map(len, groups.values()), default=0)
    items = [g[rank] for rank in range(depth) for g in groups.values() if rank < len(g)]
    return items[:n]


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check(rows: Sequence[dict]) -> None:
    """Refuse a suite with a reused source, a repeated prompt or an over-long first turn."""
    for key, values in (("source", [r["source"] for r in rows]),
                        ("first turn", [r["turns"][0] for r in rows])):
        dups = sorted({v for v in values if values.count(v) > 1})
        if dups:
            raise ValueError(f"{key} used more than once: {dups[0][:200]!r}")
    for row in rows:
        if len(row["turns"][0]) > MAX_PROMPT_CHARS:
            raise ValueError(f"question {row['question_id']} ({row['source']}): first turn of "
                             f"{len(row['turns'][0])} chars is over {MAX_PROMPT_CHARS}")


def write(rows: Iterable[dict], path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m infer.make_suite",
        description="Build the chat benchmark suite (MT-Bench question layout: question_id, "
                    "category, turns, source) from self-instruct seed tasks, GSM8K, CPython "
                    "stdlib docstrings and held-out Shakespeare prompts. Deterministic: the same "
                    f"data and Python {'.'.join(map(str, PYTHON_VERSION))} rebuild the committed "
                    "file byte for byte.")
    p.add_argument("--shared-data", metavar="DIR", default=str(DEFAULT_SHARED_DATA),
                   help="folder holding self_instruct_seed_tasks.jsonl and gsm8k_train.jsonl "
                        "(default: ../shared/data beside the repository, %(default)s)")
    p.add_argument("--out", metavar="FILE", default=str(DEFAULT_OUT),
                   help="output JSONL (default: %(default)s)")
    args = p.parse_args(argv)
    if sys.version_info[:2] != PYTHON_VERSION:
        print(f"warning: the committed suite was built with Python "
              f"{'.'.join(map(str, PYTHON_VERSION))}; this is {sys.version.split()[0]}, whose "
              "stdlib docstrings differ, so the code, summarization and translation questions will "
              "too", file=sys.stderr)
    rows = build(args.shared_data)
    write(rows, args.out)
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    print(f"wrote {len(rows)} questions to {args.out}: "
          + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
