r"""Regenerate drafter training data: the target answers chat prompts (with its chat template) or
continues prompts cut from the corpus's training split, with the project's own jitted generation,
greedy and sampled, so a drafter learns the target's own distribution (as EAGLE-3 and SpecBlock train
on target-regenerated answers). Generation is continuously batched (`specblock_jax.continuous`):
`--concurrent-rows` rows decode at once and a finished row takes the next prompt, so parts are only
the unit of output, not of compute. A sampled answer's key comes from its part's seed and its row,
so it never depends on the prompts it was decoded beside.

    python -m train.regenerate --prompts train/prompts/chat_prompts.jsonl --output-dir runs/regen-chat \\
        --prompt-tokens 448 --new-tokens 256 --batch-size 32           # chat answers, by category
    python -m train.regenerate --target specblock_jax/assets/toy/target --output-dir runs/regen  # corpus

Output: `part-<category or domain>-<mode>-<index>.npz` files, each the answers to `--batch-size`
prompts: `tokens` [b, prompt tokens + new tokens] (PAD_ID after a row's end), `prompt_len` [b] and
`length` [b]. Each part is written atomically and an existing part is skipped, so rerunning after a
kill only makes what is missing (the same command resumes; the rows in flight are decoded again).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

from specblock_jax import chat, continuous, data, load_target
from specblock_jax.config import ConfigError, from_dict, to_dict
from specblock_jax.decode import PAD_ID


def _option(default, help: str):
    """A config field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class RegenerateConfig:
    output_dir: str = _option("runs/regen", "where the parts go; rerunning into it makes only the missing ones")
    target: str | None = _option(None, "Hugging Face directory or .gguf file (default: the embedded "
                                       "SmolLM2-135M-Instruct)")
    prompts: str | None = _option(None, "chat prompt file ({'messages', 'category'} per line, train/chat_prompts.py): "
                                        "every prompt is answered, parts named by category; unset: prompts cut "
                                        "from the corpus (--domains)")
    domains: tuple[str, ...] = _option(data.DOMAINS, "corpus domains to cut prompts from, comma-separated")
    samples_per_domain: int = _option(512, "corpus prompts per domain")
    prompt_tokens: int = _option(64, "corpus: each prompt's length; chat: the longest prompt kept (longer ones "
                                     "are left out)")
    new_tokens: int = _option(192, "new tokens per answer at most")
    greedy_fraction: float = _option(0.4, "share of each category's prompts answered greedily; the rest is "
                                          "sampled at --temperature / --top-p")
    temperature: float = _option(1.0, "sampling temperature of the sampled share")
    top_p: float = _option(1.0, "nucleus top-p of the sampled share (1: off)")
    batch_size: int = _option(16, "prompts per part (the unit of output and of resuming)")
    concurrent_rows: int = _option(32, "rows decoding at once (continuous batching): how fast, not what, so not "
                                       "part of the data's identity")
    seed: int = _option(0, "seeds the sampled answers and the corpus prompts")
    # The corpus and its split: keep these equal to the target's training config so no held-out
    # document is ever used.
    data_dir: str = _option("data/corpus", "where the prose corpus is kept (fetched on first use)")
    code_dir: str | None = _option(None, "code documents folder (default: the Python standard library's source)")
    prose_dir: str | None = _option(None, "prose documents folder (default: Shakespeare's plays in --data-dir)")
    val_fraction: float = _option(0.05, "the corpus's held-out share, as the target's training split it")
    test_fraction: float = _option(0.05, "the corpus's test share, as the target's training split it")

    def __post_init__(self):
        unknown = [d for d in self.domains if d not in data.DOMAINS]
        if unknown or not self.domains:
            raise ConfigError(f"domains {list(self.domains)} must be a non-empty subset of {data.DOMAINS}")
        for name in ("samples_per_domain", "prompt_tokens", "new_tokens", "batch_size", "concurrent_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.greedy_fraction <= 1.0:
            raise ConfigError(f"greedy_fraction must be in [0, 1], got {self.greedy_fraction}")
        if self.temperature <= 0 and self.greedy_fraction < 1:
            raise ConfigError("temperature must be > 0 for the sampled share (or set greedy_fraction: 1.0)")


def cut_prompts(token_arrays: list[np.ndarray], n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """[n, length] windows at uniformly random token offsets of the documents long enough to hold one."""
    long_enough = [a for a in token_arrays if len(a) >= length]
    if not long_enough:
        raise ValueError(f"no training document has {length} tokens; lower prompt_tokens")
    starts = np.cumsum([0] + [len(a) - length + 1 for a in long_enough])
    picks = rng.integers(0, starts[-1], size=n)
    docs = np.searchsorted(starts, picks, side="right") - 1
    return np.stack([long_enough[d][p - starts[d]:p - starts[d] + length] for d, p in zip(docs, picks)])


def plan(cfg: RegenerateConfig, tokenizer) -> list[tuple[str, list[list[int]], bool, int]]:
    """(part name, prompt ids, greedy?, seed) for every batch, in a fixed order: per category (chat) or
    domain (corpus), the greedy share first, then the sampled."""
    groups = {}
    if cfg.prompts is not None:
        rows = [json.loads(line) for line in pathlib.Path(cfg.prompts).read_text().splitlines() if line.strip()]
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "messages" not in row or "category" not in row:
                raise ValueError(f"{cfg.prompts}:{i + 1}: a line needs 'messages' and 'category'")
            ids = chat.encode(tokenizer, row["messages"], f"{cfg.prompts}:{i + 1}")
            if len(ids) <= cfg.prompt_tokens:
                groups.setdefault(str(row["category"]).replace("-", "_"), []).append(ids)
    else:
        splits = data.corpus_splits(code_dir=cfg.code_dir, prose_dir=cfg.prose_dir, data_dir=cfg.data_dir,
                                    val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
        for i, domain in enumerate(cfg.domains):
            arrays = data.tokenize_documents(splits[domain]["train"], tokenizer)
            groups[domain] = cut_prompts(arrays, cfg.samples_per_domain, cfg.prompt_tokens,
                                         np.random.default_rng([cfg.seed, i])).tolist()
    parts = []
    for group, prompts in groups.items():
        n_greedy = round(cfg.greedy_fraction * len(prompts))
        for mode, rows in (("greedy", prompts[:n_greedy]), ("sampled", prompts[n_greedy:])):
            for j in range(0, len(rows), cfg.batch_size):
                parts.append((f"part-{group}-{mode}-{j // cfg.batch_size:05d}", rows[j:j + cfg.batch_size],
                              mode == "greedy", cfg.seed * 1_000_003 + len(parts)))
    return parts


def regenerate(cfg: RegenerateConfig, progress: bool = True) -> pathlib.Path:
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_run(out / "regenerate.json", cfg)
    target = load_target(cfg.target)
    if target.tokenizer is None:
        raise ValueError(f"target {cfg.target or 'embedded'} has no tokenizer; regeneration reads its prompts as text")
    parts = plan(cfg, target.tokenizer)
    todo = [part for part in parts if not (out / f"{part[0]}.npz").exists()]
    bar = tqdm(total=len(parts), initial=len(parts) - len(todo), desc="regenerate", unit="part", disable=not progress)
    start, new_tokens = time.perf_counter(), 0
    for greedy, run in itertools.groupby(todo, key=lambda part: part[2]):  # one stream per sampling mode
        run = list(run)
        owners = [(p, row) for p, (_, prompts, _, _) in enumerate(run) for row in range(len(prompts))]
        keys = [jax.random.fold_in(jax.random.key(run[p][3]), row) for p, row in owners]
        answers = [{} for _ in run]
        for i, ids in continuous.stream(target, [run[p][1][row] for p, row in owners], keys,
                                        max_new_tokens=cfg.new_tokens, temperature=0.0 if greedy else cfg.temperature,
                                        top_p=1.0 if greedy else cfg.top_p, rows=cfg.concurrent_rows,
                                        max_len=cfg.prompt_tokens + cfg.new_tokens):
            p, row = owners[i]
            answers[p][row] = ids
            new_tokens += len(ids)
            bar.set_postfix(answer_tokens_per_s=f"{new_tokens / (time.perf_counter() - start):.1f}", refresh=False)
            name, prompts, _, _ = run[p]
            if len(answers[p]) == len(prompts):
                _write_part(out / f"{name}.npz", prompts, [answers[p][r] for r in range(len(prompts))],
                            cfg.prompt_tokens + cfg.new_tokens)
                bar.update()
    bar.close()
    return out


def _write_part(path: pathlib.Path, prompts: list[list[int]], answers: list[list[int]], width: int) -> None:
    """One part, written atomically: tokens [rows, width] (prompt then answer, PAD_ID after), prompt_len, length."""
    tokens = np.full((len(prompts), width), PAD_ID, np.int32)
    for row, (prompt, ids) in enumerate(zip(prompts, answers)):
        tokens[row, :len(prompt) + len(ids)] = prompt + ids
    prompt_len = np.array([len(prompt) for prompt in prompts], np.int32)
    lengths = prompt_len + np.array([len(ids) for ids in answers], np.int32)
    tmp = path.parent / f".{path.stem}.tmp.npz"
    np.savez_compressed(tmp, tokens=tokens, prompt_len=prompt_len, length=lengths)
    os.replace(tmp, path)


def _check_same_run(path: pathlib.Path, cfg: RegenerateConfig) -> None:
    """Parts are skipped by name on a rerun, so a rerun with another config would mix two datasets.
    Where the parts live and how many rows decode at once are not part of it: a directory may be moved
    (or committed) and resumed at another speed."""
    text = json.dumps({k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "concurrent_rows")},
                      sort_keys=True, indent=1)
    if path.exists() and json.loads(path.read_text()) != json.loads(text):
        raise ConfigError(f"{path.parent} holds parts made with a different config ({path}); "
                          "use a new --output-dir")
    path.write_text(text)


def read_parts(output_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All parts concatenated, in name order: tokens, prompt_len, length, and each row's part name."""
    paths = sorted(pathlib.Path(output_dir).glob("part-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no regenerated parts (part-*.npz) in {output_dir}")
    loaded = [np.load(p) for p in paths]
    merged = {k: np.concatenate([f[k] for f in loaded]) for k in ("tokens", "prompt_len", "length")}
    merged["part"] = np.concatenate([[p.stem] * len(f["length"]) for p, f in zip(paths, loaded)])
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = RegenerateConfig()
    for field in dataclasses.fields(RegenerateConfig):
        if field.name == "domains":
            parser.add_argument("--domains", default=",".join(defaults.domains),
                                help=f"{field.metadata['help']} (default: {','.join(defaults.domains)})")
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=getattr(defaults, field.name),
                                help=field.metadata["help"] + ("" if getattr(defaults, field.name) is None
                                                              else f" (default: {getattr(defaults, field.name)})"))
    args = vars(parser.parse_args(argv))
    args["domains"] = [d for d in args["domains"].split(",") if d]
    print(f"wrote {regenerate(from_dict(RegenerateConfig, args))}")


if __name__ == "__main__":
    main()
