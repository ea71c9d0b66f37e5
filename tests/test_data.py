"""Tests for specblock_jax.data on tiny synthetic corpora (no network)."""

import random

import numpy as np
import pytest
import transformers

from specblock_jax import data
from specblock_jax.data import Document

CODE_SAMPLE = (
    "def greet(name: str) -> str:\n"
    "    \"\"\"Say hello — politely, ünïcödé 🐍.\"\"\"\n"
    "\tif not name:\n"
    "        return ''\n"
    "    return f'hello {name}!'  # 世界\n\n\n"
    "class   Spaces :  \n        pass\r\n"
)
PROSE_SAMPLE = (
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"
)


def make_docs(n_code: int = 40, n_prose: int = 25) -> list[Document]:
    code = [Document("code", f"pkg/mod_{i}.py", f"x_{i} = {i}\n" * 3) for i in range(n_code)]
    prose = [Document("prose", f"play_{i}_gut.txt", f"Line {i} of verse.\n")
             for i in range(n_prose)]
    return code + prose


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = [CODE_SAMPLE, PROSE_SAMPLE] * 20
    data.train_tokenizer(texts, vocab_size=320, out_dir=out)
    return data.load_tokenizer(out)


# ---------------------------------------------------------------------------------------------
# Corpus loading


def test_load_documents_prose_and_code_filters(tmp_path):
    (tmp_path / "b_gut.txt").write_text("Second play.\n")
    (tmp_path / "a_gut.txt").write_text("First play.\n")
    (tmp_path / "a_gut_f.txt").write_text("Alternate edition.\n")
    prose = data.load_documents("prose", tmp_path)
    assert [d.name for d in prose] == ["a_gut.txt", "b_gut.txt"]
    assert prose[0] == Document("prose", "a_gut.txt", "First play.\n")

    for rel in ["pkg/mod.py", "top.py", "test/test_x.py", "pkg/tests/t.py", "idlelib/a.py",
                "pkg/__pycache__/c.py", "site-packages/lib.py", "lib2to3/fixer.py"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {rel}\n")
    code = data.load_documents("code", tmp_path)
    assert [d.name for d in code] == ["pkg/mod.py", "top.py"]


def test_load_documents_non_utf8_is_replaced(tmp_path):
    (tmp_path / "latin1.py").write_bytes(b"name = 'caf\xe9'\n")
    (doc,) = data.load_documents("code", tmp_path)
    assert "\ufffd" in doc.text
    assert doc.text.startswith("name = 'caf")


def test_load_documents_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_documents("code", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no prose documents"):
        data.load_documents("prose", tmp_path)
    with pytest.raises(ValueError, match="'poetry'"):
        data.load_documents("poetry", tmp_path)


def test_load_documents_real_stdlib():
    docs = data.load_documents("code", data.stdlib_source_dir())
    names = [d.name for d in docs]
    assert len(docs) > 300 and "os.py" in names and names == sorted(names)
    assert not any(part in {"test", "tests", "idlelib"} for n in names for part in n.split("/"))


# ---------------------------------------------------------------------------------------------
# Splits


def test_split_deterministic_disjoint_order_independent():
    docs = make_docs()
    splits = data.split_documents(docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert data.split_documents(shuffled) == splits

    keys = {s: {(d.domain, d.name) for d in v} for s, v in splits.items()}
    assert sum(len(k) for k in keys.values()) == len(docs)
    assert set.union(*keys.values()) == {(d.domain, d.name) for d in docs}
    for domain in data.DOMAINS:  # both domains have >= 20 docs
        for split in data.SPLITS:
            assert any(d.domain == domain for d in splits[split]), (domain, split)


def test_split_rejects_bad_fractions_and_duplicates():
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_documents(make_docs(), val_fraction=0.6, test_fraction=0.5)
    dup = [Document("code", "a.py", "1"), Document("code", "a.py", "2")]
    with pytest.raises(ValueError, match="'a.py'"):
        data.split_documents(dup)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_specials(tokenizer, tmp_path):
    for text in [CODE_SAMPLE, PROSE_SAMPLE, "    \n\t\t  x\n", "ſ∂ unseen bytes ☃\x00"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.convert_ids_to_tokens(0) == data.EOS_TOKEN
    assert len(tokenizer) == 320
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.load_tokenizer(tmp_path)


def test_tokenizer_loads_with_autotokenizer(tmp_path):
    data.train_tokenizer([PROSE_SAMPLE] * 5, vocab_size=270, out_dir=tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.eos_token_id == 0
    assert tok.decode(tok.encode(PROSE_SAMPLE, add_special_tokens=False)) == PROSE_SAMPLE


def test_tokenize_documents_and_bytes_per_token(tokenizer):
    docs = [Document("code", "a.py", CODE_SAMPLE), Document("prose", "b_gut.txt", PROSE_SAMPLE)]
    arrays = data.tokenize_documents(docs, tokenizer)
    assert [a.dtype for a in arrays] == [np.int32, np.int32]
    assert tokenizer.decode(arrays[0]) == CODE_SAMPLE
    assert 0 not in np.concatenate(arrays)  # no special tokens added
    n_bytes = len(CODE_SAMPLE.encode()) + len(PROSE_SAMPLE.encode())
    expected = n_bytes / (len(arrays[0]) + len(arrays[1]) + 2)
    assert data.corpus_bytes_per_token(docs, tokenizer) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# grain pipelines


def synthetic_arrays() -> list[np.ndarray]:
    """Documents of distinct positive ids so positions in the stream are recoverable."""
    lengths = [37, 5, 120, 64, 1, 90]
    starts = np.cumsum([1] + lengths[:-1])
    return [np.arange(s, s + n, dtype=np.int32) for s, n in zip(starts, lengths)]


def reference_stream(arrays: list[np.ndarray], eos_id: int = 0) -> np.ndarray:
    parts = [[eos_id]]
    for a in arrays:
        parts += [a.tolist(), [eos_id]]
    return np.concatenate(parts).astype(np.int32)


def test_packed_dataset_shapes_and_shift():
    arrays = synthetic_arrays()
    stream = reference_stream(arrays)
    seq_len, batch_size = 16, 4
    ds = data.packed_dataset(arrays, seq_len=seq_len, batch_size=batch_size, eos_id=0, seed=3,
                             num_epochs=1)
    n_windows = (len(stream) - 1) // seq_len
    assert len(ds) == n_windows // batch_size
    starts = []
    for batch in ds:
        assert set(batch) == {"input_ids", "target_ids", "loss_mask"}
        assert batch["input_ids"].shape == batch["target_ids"].shape == (batch_size, seq_len)
        assert batch["input_ids"].dtype == batch["target_ids"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32 and batch["loss_mask"].min() == 1.0
        for inp, tgt in zip(batch["input_ids"], batch["target_ids"]):
            window = np.append(inp, tgt[-1])
            np.testing.assert_array_equal(tgt[:-1], inp[1:])
            # A window is a contiguous slice of the stream starting at a multiple of seq_len.
            start = next(k * seq_len for k in range(n_windows)
                         if np.array_equal(stream[k * seq_len:k * seq_len + seq_len + 1], window))
            starts.append(start)
    assert len(set(starts)) == len(starts)  # no window repeats within an epoch
    assert starts != sorted(starts)  # shuffled


def test_packed_dataset_deterministic_resumable_and_seeded():
    arrays = synthetic_arrays()
    kwargs = dict(seq_len=8, batch_size=2, eos_id=0)
    a = data.packed_dataset(arrays, seed=7, **kwargs)
    b = data.packed_dataset(arrays, seed=7, **kwargs)
    other = data.packed_dataset(arrays, seed=8, **kwargs)
    for i in [0, 1, 5, 40, 1000]:  # beyond one epoch too: repeats forever
        for key in ("input_ids", "target_ids"):
            np.testing.assert_array_equal(a[i][key], b[i][key])
    first = lambda ds: np.stack([ds[i]["input_ids"] for i in range(10)])
    assert not np.array_equal(first(a), first(other))


def test_packed_dataset_reshuffles_each_epoch():
    arrays = synthetic_arrays()
    ds = data.packed_dataset(arrays, seq_len=8, batch_size=1, eos_id=0, seed=0, num_epochs=2)
    per_epoch = len(ds) // 2
    epoch = lambda e: [tuple(ds[i]["input_ids"][0])
                       for i in range(e * per_epoch, (e + 1) * per_epoch)]
    assert sorted(epoch(0)) == sorted(epoch(1))
    assert epoch(0) != epoch(1)


def test_packed_dataset_too_little_data():
    with pytest.raises(ValueError, match="batch_size=4"):
        data.packed_dataset([np.arange(1, 20, dtype=np.int32)], seq_len=8, batch_size=4,
                            eos_id=0, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.packed_dataset(synthetic_arrays(), seq_len=0, batch_size=1, eos_id=0, seed=0)


def test_eval_batches_cover_every_target_once():
    arrays = synthetic_arrays()
    stream = reference_stream(arrays)
    ds = data.eval_batches(arrays, seq_len=16, batch_size=3, eos_id=0)
    batches = list(ds)
    assert all(b["input_ids"].shape == (3, 16) for b in batches)
    masks = np.concatenate([b["loss_mask"].ravel() for b in batches])
    targets = np.concatenate([b["target_ids"].ravel() for b in batches])
    inputs = np.concatenate([b["input_ids"].ravel() for b in batches])
    assert masks.sum() == len(stream) - 1 == sum(len(a) + 1 for a in arrays)
    np.testing.assert_array_equal(targets[masks == 1], stream[1:])
    np.testing.assert_array_equal(inputs[masks == 1], stream[:-1])
    assert masks[: len(stream) - 1].min() == 1  # padding only at the end
    assert len(ds) == -(-(-(-(len(stream) - 1) // 16)) // 3)


# ---------------------------------------------------------------------------------------------
# Held-out prompts


def prompt_docs() -> list[Document]:
    code = "\n".join(f"def f_{i}(x):\n    return x + {i}\n" for i in range(40))
    prose = " ".join(f"word{i}" for i in range(300)).replace("word5", "word5\n")
    return [Document("code", "m.py", code), Document("prose", "p_gut.txt", prose),
            Document("code", "empty.py", "\n\n   \n")]


def test_held_out_prompts_deterministic_substrings():
    docs = prompt_docs()
    prompts = data.held_out_prompts(docs, n=8, prompt_chars=80, seed=1)
    assert prompts == data.held_out_prompts(docs, n=8, prompt_chars=80, seed=1)
    assert prompts != data.held_out_prompts(docs, n=8, prompt_chars=80, seed=2)
    by_name = {d.name: d for d in docs}
    assert len({p["prompt"] for p in prompts}) == 8
    for p in prompts:
        doc = by_name[p["source"]]
        assert p["domain"] == doc.domain and p["prompt"].strip()
        assert p["prompt"] in doc.text and len(p["prompt"]) <= 80
        start = doc.text.index(p["prompt"])
        assert start == 0 or doc.text[start - 1] == "\n"  # starts at a line boundary
        end = start + len(p["prompt"])
        assert end == len(doc.text) or doc.text[end].isspace()  # ends at a line / word boundary
    with pytest.raises(ValueError, match="non-empty"):
        data.held_out_prompts([docs[2]], n=1, prompt_chars=80, seed=0)


def test_spaced_prompts_share_no_text_and_come_shuffled():
    text = "\n".join(f"line {i:04d} of the module" for i in range(400))  # unique lines of 24 chars
    docs = [Document("code", "a.py", text), Document("code", "b.py", text.replace("line", "LINE"))]
    prompts = data.spaced_prompts(docs, n=96, prompt_chars=100, seed=0)  # 9,599 chars / 200: 48 per doc
    assert prompts == data.spaced_prompts(docs, n=96, prompt_chars=100, seed=0)
    reordered = data.spaced_prompts(docs, n=96, prompt_chars=100, seed=1)
    assert reordered != prompts and sorted(map(str, reordered)) == sorted(map(str, prompts))
    assert [p["source"] for p in prompts[:10]] != ["a.py"] * 10  # shuffled across documents
    by_name = {d.name: d.text for d in docs}
    for name in by_name:
        spans = sorted((by_name[name].index(p["prompt"]), len(p["prompt"])) for p in prompts if p["source"] == name)
        assert len(spans) == 48 and all(0 < n <= 100 for _, n in spans)
        assert all(start + n <= next_start for (start, n), (next_start, _) in zip(spans, spans[1:]))
    assert data.spaced_prompts(docs, n=7, prompt_chars=100, seed=0) == prompts[:7]
    with pytest.raises(ValueError, match="only 96 prompts"):
        data.spaced_prompts(docs, n=97, prompt_chars=100, seed=0)


def test_jsonl_round_trip_and_errors(tmp_path):
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    rows = [{"domain": "prose", "source": "a", "prompt": "Hark — ünïcode\nline"},
            {"prompt": "x"}, {"messages": chat}]
    path = tmp_path / "sub" / "prompts.jsonl"
    data.write_jsonl(rows, path)
    assert data.read_prompts_jsonl(path) == ["Hark — ünïcode\nline", "x", chat]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.read_prompts_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        data.read_prompts_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=":2: expected an object with a string 'prompt' or a list of 'messages'"):
        data.read_prompts_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=":1: message 0 must be"):
        data.read_prompts_jsonl(tmp_path / "bad.jsonl")
