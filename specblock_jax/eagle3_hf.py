"""Published EAGLE-3 drafter checkpoints <-> the project's EAGLE-3 drafter (`models.eagle3`).

The format is the one of `yuhuili/EAGLE3-LLaMA3.1-Instruct-8B` and of SpecForge's exports, which
SGLang (`--speculative-algorithm EAGLE3`) and vLLM (`"method": "eagle3"`) serve: a directory with

`config.json`: `architectures: ["LlamaForCausalLMEagle3"]`, `model_type: llama`, `num_hidden_layers: 1`,
`hidden_size` H, `intermediate_size` F, `num_attention_heads` N, `num_key_value_heads` KV, `head_dim`
D (absent: H / N), `rms_norm_eps`, `rope_theta` (absent: 10000, which is what the Llama-3.1 drafter
uses) and `rope_scaling` (absent: none), `vocab_size` V (the target's), `draft_vocab_size` Vd
(absent: V), and optionally `eagle_config.eagle_aux_hidden_state_layer_ids`: the target layers whose
outputs are the features, 0-indexed, which is exactly our `feature_layers` (absent: EAGLE-3's
default, `eagle3.default_feature_layers`). That is SpecForge's and SGLang's reading (SGLang captures
the input of layer id + 1). vLLM reads the same key as the layers whose *input* is captured, one
layer earlier, and agrees with SGLang only on the default layers; so export writes the key only
when the layers differ from the default, and a drafter with non-default layers served by vLLM needs
its ids raised by one there.

`model.safetensors` (torch layout: a Linear weight is [out, in]; our kernels are [in, out]):

    checkpoint tensor                         shape          project parameter (drafter tree)
    fc.weight                                 [H, 3H]        fc.kernel [3H, H]
    midlayer.input_layernorm.weight           [H]            input_layernorm.weight   (on the embedding)
    midlayer.hidden_norm.weight               [H]            hidden_norm.weight       (on the hidden)
    midlayer.self_attn.q_proj.weight          [N*D, 2H]      self_attn.q_proj.kernel [2H, N*D]
    midlayer.self_attn.k_proj.weight          [KV*D, 2H]     self_attn.k_proj.kernel [2H, KV*D]
    midlayer.self_attn.v_proj.weight          [KV*D, 2H]     self_attn.v_proj.kernel [2H, KV*D]
    midlayer.self_attn.o_proj.weight          [H, N*D]       self_attn.o_proj.kernel [N*D, H]
    midlayer.post_attention_layernorm.weight  [H]            post_attention_layernorm.weight
    midlayer.mlp.gate_proj.weight             [F, H]         mlp.gate_proj.kernel [H, F]
    midlayer.mlp.up_proj.weight               [F, H]         mlp.up_proj.kernel [H, F]
    midlayer.mlp.down_proj.weight             [H, F]         mlp.down_proj.kernel [F, H]
    norm.weight                               [H]            norm.weight
    lm_head.weight                            [Vd, H]        lm_head.kernel [H, Vd]
    d2t                                       [Vd] int64     draft_to_target = arange(Vd) + d2t
    t2d                                       [V] bool       (checked: True exactly at draft_to_target)
    embed_tokens.weight (optional)            [V, H]         not imported: the target's table is used

`d2t` / `t2d` are present when the draft vocabulary is reduced (Vd < V); a checkpoint without them
has a full-vocabulary head. Export writes `d2t` / `t2d` for a reduced vocabulary only, never
`embed_tokens` (SGLang and vLLM then take the target's embedding) unless asked to.

The math matches: q/k/v read cat(input_layernorm(embedding), hidden_norm(hidden)), embedding first;
the residual is the un-normed hidden; `fc` has no bias. Only safetensors are read (never pickle);
variants the layer does not compute (more than one layer, biases, `norm_before_residual`, a
`target_hidden_size` other than H) are refused with the key named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from specblock_jax import hf
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.eagle3_draft import Eagle3Method, drafter_params
from specblock_jax.models import eagle3

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS = "model.safetensors"
MAP_TENSORS = ("d2t", "t2d")
_OPTIONAL = ("embed_tokens.weight",)


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(cfg: dict, target: ModelConfig | None = None, dtype: str = "float32",
                   ttt_steps: int = 7) -> eagle3.Eagle3Config:
    """An EAGLE-3 config.json dict -> Eagle3Config. The feature layers come from
    `eagle_config.eagle_aux_hidden_state_layer_ids` (0-indexed layer outputs, as SpecForge and SGLang
    read them) or, absent, EAGLE-3's default for `target`'s depth (then `target` is required)."""
    if ARCHITECTURE not in (cfg.get("architectures") or ()):
        raise ValueError(f"architectures={cfg.get('architectures')!r}: not an EAGLE-3 drafter (expected "
                         f"[{ARCHITECTURE!r}])")
    if cfg.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"num_hidden_layers={cfg['num_hidden_layers']}: only one-layer EAGLE-3 drafters are supported")
    for key in ("attention_bias", "mlp_bias", "norm_before_residual", "tie_word_embeddings"):
        if cfg.get(key):
            raise ValueError(f"{key}=true is not supported by the EAGLE-3 drafter layer")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')")
    h = required(cfg, "hidden_size")
    if cfg.get("target_hidden_size") not in (None, h):
        raise ValueError(f"target_hidden_size={cfg['target_hidden_size']} differs from hidden_size={h}: a drafter "
                         "narrower than its target is not supported")
    heads = required(cfg, "num_attention_heads")
    theta, scaling = hf._rope_from_hf(cfg)
    vocab = required(cfg, "vocab_size")
    draft_vocab = cfg.get("draft_vocab_size")
    layers = feature_layers_from_hf(cfg, target)
    try:
        return eagle3.Eagle3Config(
            hidden_size=h, num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or h // heads, intermediate_size=required(cfg, "intermediate_size"),
            vocab_size=vocab, feature_layers=layers, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling, dtype=dtype, ttt_steps=ttt_steps,
            draft_vocab_size=None if draft_vocab in (None, vocab) else int(draft_vocab))
    except ConfigError as e:
        raise ValueError(f"config.json: {e}") from None


def config_to_hf(config: eagle3.Eagle3Config, target: ModelConfig | None = None) -> dict:
    """The config.json SGLang, vLLM and EAGLE's own loader read for `config`."""
    return {"architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
            "attention_bias": False, "mlp_bias": False, **drafter_fields_hf(config, target)}


def drafter_fields_hf(config: Any, target: ModelConfig | None) -> dict:
    """config.json fields EAGLE-3's and SpecBlock's formats share: the Llama layer shape, RoPE and
    vocabularies of the drafter `config`; from the target, the feature layers when they are not
    EAGLE-3's default, its positions and special tokens."""
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    out = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
           "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
           "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
           "rope_theta": config.rope_theta, "rope_scaling": rope_scaling, "vocab_size": config.vocab_size,
           "draft_vocab_size": config.draft_vocab, "tie_word_embeddings": False, "torch_dtype": config.dtype}
    if target is None or tuple(config.feature_layers) != eagle3.default_feature_layers(target.num_layers):
        out["eagle_config"] = {"use_aux_hidden_state": True,
                               "eagle_aux_hidden_state_layer_ids": list(config.feature_layers)}
    if target is not None:
        out["max_position_embeddings"] = target.max_position_embeddings
        out["bos_token_id"] = target.bos_token_id
        eos = list(target.eos_token_ids)
        out["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    return out


def required(cfg: dict, key: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"config.json has no {key!r}")
    return cfg[key]


def feature_layers_from_hf(cfg: dict, target: ModelConfig | None) -> tuple[int, ...]:
    """The target feature layers of a drafter config.json (EAGLE-3's and SpecBlock's alike):
    `eagle_config.eagle_aux_hidden_state_layer_ids` (0-indexed layer outputs) or, absent, EAGLE-3's
    default for `target`'s depth (then `target` is required)."""
    aux = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if aux is not None:
        return tuple(int(i) for i in aux)
    if target is not None:
        return eagle3.default_feature_layers(target.num_layers)
    raise ValueError("config.json has no eagle_config.eagle_aux_hidden_state_layer_ids: give the target's "
                     "config so EAGLE-3's default feature layers can be derived from its depth")


# ---------------------------------------------------------------------------------------------
# tensors


def _hf_name(path: tuple[str, ...]) -> str:
    """('self_attn', 'q_proj', 'kernel') -> 'midlayer.self_attn.q_proj.weight'; fc, norm and lm_head
    sit outside the layer."""
    *modules, _ = path
    prefix = "" if modules[0] in ("fc", "norm", "lm_head") else "midlayer."
    return prefix + ".".join(modules) + ".weight"


def _layout(config: eagle3.Eagle3Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Checkpoint name -> (drafter path, checkpoint shape), from the drafter's own init."""
    shapes = jax.eval_shape(lambda: eagle3.init_params(config, jax.random.key(0)))
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        out[_hf_name(path)] = (path, leaf.shape[::-1] if path[-1] == "kernel" else leaf.shape)
    return out


def check_names(tensors: Any, layout: dict, reduced_vocab: bool, optional: tuple[str, ...], what: str) -> set[str]:
    """The checkpoint's tensor names, checked against the drafter's `layout`: every one present (and
    the d2t / t2d map for a reduced vocabulary), nothing unknown beyond `optional`; errors name them."""
    names = set(tensors)
    missing = sorted(set(layout) - names) + [n for n in MAP_TENSORS if reduced_vocab and n not in names]
    if missing:
        raise ValueError(f"{what} checkpoint tensors missing: {missing}")
    extra = sorted(names - set(layout) - set(MAP_TENSORS) - set(optional))
    if extra:
        raise ValueError(f"unexpected tensors in the {what} checkpoint (the drafter has no place for them): {extra}")
    return names


def params_from_safetensors(config: eagle3.Eagle3Config, tensors: Any, dtype: str | None = None
                            ) -> tuple[dict, np.ndarray | None]:
    """Checkpoint tensors -> (drafter params as numpy arrays of `dtype`, draft_to_target or None).
    A missing, unexpected or misshapen tensor is an error naming it."""
    dtype = jnp.dtype(dtype or config.dtype)
    layout = _layout(config)
    names = check_names(tensors, layout, config.reduced_vocab, _OPTIONAL, "EAGLE-3")
    flat = {}
    for name, (path, shape) in layout.items():
        array = np.asarray(tensors[name])
        if array.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {shape}")
        flat[path] = np.ascontiguousarray(array.T if path[-1] == "kernel" else array, dtype=dtype)
    if "embed_tokens.weight" in names:  # not imported (the target's table is used): check its shape only
        shape = tensor_shape(tensors, "embed_tokens.weight")
        if shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"tensor 'embed_tokens.weight' has shape {shape}, expected "
                             f"{(config.vocab_size, config.hidden_size)}")
    return traverse_util.unflatten_dict(flat), read_vocab_map(config, tensors)


def tensor_shape(tensors: Any, name: str) -> tuple[int, ...]:
    """A tensor's shape without reading it when the mapping is a lazy safetensors reader."""
    where = getattr(tensors, "_where", None)
    if where is not None:
        return tuple(where[name].get_slice(name).get_shape())
    return tuple(np.shape(tensors[name]))


def read_vocab_map(config: Any, tensors: Any) -> np.ndarray | None:
    """draft_to_target from `d2t`, checked against `t2d`; a full-vocabulary checkpoint may carry an
    identity map (then it is dropped). `config` is any drafter config with `reduced_vocab`,
    `draft_vocab` and `vocab_size` (EAGLE-3's or SpecBlock's)."""
    if not config.reduced_vocab:
        if "d2t" in tensors and np.any(np.asarray(tensors["d2t"]) != 0):
            raise ValueError("tensor 'd2t' is not all zeros, but draft_vocab_size equals vocab_size")
        return None
    d2t = np.asarray(tensors["d2t"])
    if d2t.shape != (config.draft_vocab,) or not np.issubdtype(d2t.dtype, np.integer):
        raise ValueError(f"tensor 'd2t' has shape {d2t.shape} and dtype {d2t.dtype}, expected "
                         f"({config.draft_vocab},) integer offsets")
    ids = eagle3.check_vocab_mapping(eagle3.draft_to_target_from_d2t(d2t), config, "d2t (draft id + offset)")
    t2d = np.asarray(tensors["t2d"])
    if t2d.shape != (config.vocab_size,):
        raise ValueError(f"tensor 't2d' has shape {t2d.shape}, expected ({config.vocab_size},)")
    if not np.array_equal(t2d.astype(bool), eagle3.t2d_mask(ids, config.vocab_size)):
        raise ValueError("tensors 't2d' and 'd2t' disagree: t2d must be True exactly at the target ids d2t maps to")
    return ids


def params_to_safetensors(config: eagle3.Eagle3Config, params: Any, draft_to_target: Any = None,
                          embed_table: Any = None) -> dict[str, np.ndarray]:
    """The inverse of `params_from_safetensors` (dtypes unchanged); `embed_table` [V, H], when
    given, is written as `embed_tokens.weight` for loaders that want the drafter self-contained."""
    layout = _layout(config)
    flat = {_hf_name(path): np.asarray(jax.device_get(x)) for path, x in traverse_util.flatten_dict(params).items()}
    if set(flat) != set(layout):
        raise ValueError(f"params do not match the config: missing {sorted(set(layout) - set(flat))}, "
                         f"unexpected {sorted(set(flat) - set(layout))}")
    tensors = {}
    for name, (path, shape) in layout.items():
        array = flat[name].T if path[-1] == "kernel" else flat[name]
        if array.shape != shape:
            raise ValueError(f"param {'.'.join(path)} gives {name!r} of shape {array.shape}, expected {shape}")
        tensors[name] = np.ascontiguousarray(array)
    map_tensors = vocab_map_tensors(config, draft_to_target)
    if config.reduced_vocab:
        tensors.update(map_tensors)
    if embed_table is not None:
        table = np.asarray(jax.device_get(embed_table))
        if table.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"embed_table has shape {table.shape}, expected {(config.vocab_size, config.hidden_size)}")
        tensors["embed_tokens.weight"] = np.ascontiguousarray(table)
    return tensors


def vocab_map_tensors(config: Any, draft_to_target: Any) -> dict[str, np.ndarray]:
    """`d2t` [Vd] int64 offsets and `t2d` [V] bool of `draft_to_target`, which is required exactly when
    `config`'s vocabulary is reduced; a full vocabulary gives the identity (zero offsets, all True)."""
    if config.reduced_vocab:
        if draft_to_target is None:
            raise ValueError(f"draft_vocab_size is {config.draft_vocab_size}: the draft_to_target map is required")
        ids = eagle3.check_vocab_mapping(jax.device_get(draft_to_target), config)
        return {"d2t": eagle3.d2t_offsets(ids), "t2d": eagle3.t2d_mask(ids, config.vocab_size)}
    if draft_to_target is not None:
        raise ValueError("a draft_to_target map was given but draft_vocab_size is None (full vocabulary)")
    return {"d2t": np.zeros((config.vocab_size,), np.int64), "t2d": np.ones((config.vocab_size,), bool)}


# ---------------------------------------------------------------------------------------------
# directories


def read_eagle3_hf(path: str | os.PathLike, target: ModelConfig | None = None, dtype: str | None = None
                   ) -> tuple[eagle3.Eagle3Config, dict, np.ndarray | None]:
    """(config, host params, draft_to_target or None) of an EAGLE-3 checkpoint directory. `dtype`
    (default: the target's, else float32) is what the drafter computes in."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not an EAGLE-3 checkpoint directory: {path / 'config.json'} does not exist")
    dtype = dtype or (target.dtype if target is not None else "float32")
    config = config_from_hf(json.loads((path / "config.json").read_text()), target, dtype)
    tensors = hf._SafetensorsFiles(hf._weight_files(path))
    params, mapping = params_from_safetensors(config, tensors, dtype)
    return config, params, mapping


def load_eagle3_hf(path: str | os.PathLike, target: Any, *, budget: int = 60, max_depth: int = 7, topk: int = 10,
                   dtype: str | None = None) -> tuple[Eagle3Method, dict[str, Any]]:
    """(method, method params) ready for `generate(..., drafter=Drafter(method, params))`, for
    `target` (a `Target`), with EAGLE-3's default tree (60 nodes, depth 7, top-10)."""
    config, params, mapping = read_eagle3_hf(path, target.config, dtype)
    try:
        config.check_target(target.config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    method = Eagle3Method(config, budget=budget, max_depth=max_depth, topk=topk)
    return method, drafter_params(jax.device_put(params), target.params, mapping)


def export_eagle3_hf(config: eagle3.Eagle3Config, params: Any, out_dir: str | os.PathLike, draft_to_target: Any = None,
                     *, target: ModelConfig | None = None, embed_table: Any = None,
                     overwrite: bool = False) -> pathlib.Path:
    """Write `params` (the drafter's own tree) as a published-format EAGLE-3 directory, atomically."""
    return write_hf_dir(out_dir, config_to_hf(config, target),
                        lambda: params_to_safetensors(config, params, draft_to_target, embed_table), overwrite)


def write_hf_dir(out_dir: str | os.PathLike, config_json: dict, tensors: Any, overwrite: bool) -> pathlib.Path:
    """config.json and `WEIGHTS` (from `tensors()`, built after the overwrite check), atomically."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    named = tensors()
    with hf.atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        save_file(named, str(tmp / WEIGHTS), metadata={"format": "pt"})
    return out_dir


def export_drafter_dir(drafter_dir: str | os.PathLike, target: Any, out_dir: str | os.PathLike, *,
                       include_embedding: bool = False, overwrite: bool = False) -> pathlib.Path:
    """A trained project drafter directory (`drafter_io`, e.g. train_drafter's export) -> the published
    EAGLE-3 format for `target` (a `Target`), for SGLang / vLLM. `include_embedding` also writes the
    target's table as `embed_tokens.weight` (by default the engines take it from the target)."""
    from specblock_jax import drafter_io  # drafter_io imports this module lazily; keep the cycle out of import time

    method, params = drafter_io.load(drafter_dir, target)
    if not isinstance(method, Eagle3Method):
        raise ValueError(f"{drafter_dir} holds a {type(method).__name__} drafter, not EAGLE-3")
    return export_eagle3_hf(method.config, jax.device_get(params["drafter"]), out_dir, params.get("draft_to_target"),
                            target=target.config, embed_table=params["embed"] if include_embedding else None,
                            overwrite=overwrite)
