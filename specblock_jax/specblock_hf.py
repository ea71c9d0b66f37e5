"""The SpecBlock authors' released drafter checkpoints <-> the project's SpecBlock drafter (`models.specblock`).

The format is what the authors' code (github.com/shiweijiezero/SpecBlock, `specforge/modeling/draft/
_llama3_specblock_base.py` and `llama3_specblock.py`) saves with `save_pretrained` during training and
what their HF harness and SGLang fork load: the one of `weijiezz/SpecBlock-Llama-3.1-8B-Instruct` and
`weijiezz/SpecBlock-Qwen3-8B`. A directory with

`config.json`: a transformers `LlamaConfig` dict with `architectures: ["LlamaForCausalLMSpecBlock"]`
(the Qwen3 config names `LlamaForCausalLMSpecBlockShift`, the same class), `hidden_size` H,
`intermediate_size` F, `num_attention_heads` N, `num_key_value_heads` G, `num_hidden_layers` L (2 in the
releases), `rms_norm_eps` (absent: LlamaConfig's 1e-6), `rope_theta` (absent: 10000, as the Llama-3.1
drafter has) and `rope_scaling` (none, or llama3), `vocab_size` V (the target's), `draft_vocab_size` Vd
(32000 in the releases; equal to V: full vocabulary. Their trainer always writes it; absent, we read a
full vocabulary where their model class assumes 32000, so a 32000-wide head then fails the shape check
naming `lm_head.weight`), `diffspec_draft_token_num` K (slots per block; absent: their default 7), `rank_classes` (4), `num_ttt_blocks` (training only, written by their
trainer), and optionally `eagle_config.eagle_aux_hidden_state_layer_ids`, read as in `eagle3_hf`
(absent: EAGLE-3's default layers for the target's depth, which is what their harness hard-codes).

`model.safetensors` (or a sharded index): the drafter's state dict minus every key containing "embed"
(the frozen target embedding), in the training dtype (their trainer builds the drafter in bf16; any
float dtype is read).
Torch layout: a Linear weight is [out, in]; our kernels are [in, out].

    checkpoint tensor                              shape            project parameter (drafter tree)
    input_layer.condition_proj.weight              [H, 3H]          condition_proj.kernel [3H, H]
    input_layer.condition_norm.weight              [H]              condition_norm.weight
    input_layer.token_norm.weight                  [H]              token_norm.weight
    input_layer.position_queries.weight            [K, H]           position_queries [K, H] (an embedding)
    input_layer.query_norm.weight                  [H]              query_norm.weight
    input_layer.fuse.weight                        [H, 3H]          fuse.kernel [3H, H]
    layers.{i}.input_layernorm.weight              [H]              layers_{i}.input_layernorm.weight
    layers.{i}.self_attn.q_proj.weight             [N*D, H]         layers_{i}.self_attn.q_proj.kernel [H, N*D]
    layers.{i}.self_attn.k_proj.weight             [G*D, H]         layers_{i}.self_attn.k_proj.kernel [H, G*D]
    layers.{i}.self_attn.v_proj.weight             [G*D, H]         layers_{i}.self_attn.v_proj.kernel [H, G*D]
    layers.{i}.self_attn.o_proj.weight             [H, N*D]         layers_{i}.self_attn.o_proj.kernel [N*D, H]
    layers.{i}.post_attention_layernorm.weight     [H]              layers_{i}.post_attention_layernorm.weight
    layers.{i}.mlp.{gate,up}_proj.weight           [F, H]           layers_{i}.mlp.{gate,up}_proj.kernel [H, F]
    layers.{i}.mlp.down_proj.weight                [H, F]           layers_{i}.mlp.down_proj.kernel [F, H]
    shift_proj.{l-1}.weight  (l = 1 .. L-1)        [H, 2H]          shift_{l}.kernel [2H, H]
    norm.weight                                    [H]              norm.weight
    lm_head.weight                                 [Vd, H]          lm_head.kernel [H, Vd]
    rank_head.0.weight                             [256, H+15]      rank_in.kernel [H+15, 256]
    rank_head.2.weight                             [4, 256]         rank_out.kernel [256, 4]
    d2t                                            [Vd] int64       draft_to_target = arange(Vd) + d2t
    t2d                                            [V] bool         (checked: True exactly at draft_to_target)
    input_layer.embed_tokens.weight (optional)     [V, H]           not imported: the target's table is used

with D = H / N (their attention ignores a config `head_dim`). `d2t` / `t2d` are registered buffers, so
they are always saved: zeros and all-True for a full vocabulary, the 32000-token map otherwise (the
same map their `vocab_mapping.pt` pickle holds; that file is never read here). Every other tensor
name, a missing one or a wrong shape is an error naming it: nothing is dropped silently.

The computation matches (read in their source): the row input is fuse([condition_norm(condition_proj
f) ; token_norm(E x) ; query_norm(P_k)]) in that order, an inherited block skips condition_proj; slot k
of row j sits at RoPE position j + 1 + k; pre-norm Llama layers without biases; before layer l > 0 the
shift replaces the stream by W [x_k ; x_{k-1}] (slot 0 takes itself twice, current slot first), no
residual around it; the inherited hidden is the pre-final-norm output; the rank head reads
[normed hidden ; 15 logit statistics] (top-10 log-probs, gaps 1-2 / 1-3 / 1-5, p_1, entropy, over the
top-20 logits) through Linear -> SiLU -> Linear, no biases. Differences that do not change an import:
their shift starts from PyTorch's random init (ours near identity) — irrelevant once weights are
loaded; they compute the rank features over the top 20 in training but the top 10 in their HF
inference (env RANK_TOPK); imports use 20, what the head was trained on. Their tree policy, drafter
cache refresh and rope quirks (`reference/specblock-method.md` §1.6) are decoding behaviour, not
weights: an imported drafter drafts with `SpecBlockMethod`'s tree. Only safetensors are read.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from specblock_jax import eagle3_hf, hf, losses
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.models import specblock
from specblock_jax.specblock_draft import SpecBlockMethod, drafter_params

ARCHITECTURE = "LlamaForCausalLMSpecBlock"  # what export writes
ARCHITECTURES = (ARCHITECTURE, "LlamaForCausalLMSpecBlockShift")  # what import accepts (the same class)
WEIGHTS = eagle3_hf.WEIGHTS
RANK_HIDDEN = 256  # their rank head: Linear(H + 15, 256) -> SiLU -> Linear(256, rank_classes)
RANK_TOPK = 20  # logits their rank features are computed over in training
DEFAULT_BLOCK_SIZE = 7  # their `diffspec_draft_token_num` default when config.json has none
_EMBED = "input_layer.embed_tokens.weight"  # excluded by their save; accepted (shape-checked) and skipped
_INPUT = ("condition_proj", "condition_norm", "token_norm", "position_queries", "query_norm", "fuse")


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(cfg: dict, target: ModelConfig | None = None, dtype: str = "float32") -> specblock.SpecBlockConfig:
    """A released SpecBlock config.json dict -> SpecBlockConfig (`target` gives the default feature
    layers when the config names none). Variants their model cannot hold are refused, naming the key."""
    if not set(cfg.get("architectures") or ()) & set(ARCHITECTURES):
        raise ValueError(f"architectures={cfg.get('architectures')!r}: not a SpecBlock drafter (expected one of "
                         f"{list(ARCHITECTURES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')")
    h = eagle3_hf.required(cfg, "hidden_size")
    heads = eagle3_hf.required(cfg, "num_attention_heads")
    if h % heads:
        raise ValueError(f"hidden_size={h} is not a multiple of num_attention_heads={heads}")
    if cfg.get("target_hidden_size") not in (None, h):
        raise ValueError(f"target_hidden_size={cfg['target_hidden_size']} differs from hidden_size={h}: a drafter "
                         "narrower than its target is not supported")
    classes = cfg.get("rank_classes", len(losses.RANK_BOUNDS) + 1)
    if classes != len(losses.RANK_BOUNDS) + 1:
        raise ValueError(f"rank_classes={classes}: only {len(losses.RANK_BOUNDS) + 1} rank classes (ranks 1 | 2-4 | "
                         "5-10 | > 10) are supported")
    theta, scaling = hf._rope_from_hf(cfg)
    vocab = eagle3_hf.required(cfg, "vocab_size")
    draft_vocab = cfg.get("draft_vocab_size")
    try:
        return specblock.SpecBlockConfig(
            hidden_size=h, num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=h // heads, intermediate_size=eagle3_hf.required(cfg, "intermediate_size"), vocab_size=vocab,
            feature_layers=eagle3_hf.feature_layers_from_hf(cfg, target),
            num_layers=eagle3_hf.required(cfg, "num_hidden_layers"),
            block_size=cfg.get("diffspec_draft_token_num", DEFAULT_BLOCK_SIZE), rank_classes=classes,
            rank_hidden=RANK_HIDDEN, rank_topk=RANK_TOPK, num_ttt_blocks=cfg.get("num_ttt_blocks", 3),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling, dtype=dtype,
            draft_vocab_size=None if draft_vocab in (None, vocab) else draft_vocab)
    except ConfigError as e:
        raise ValueError(f"config.json: {e}") from None


def check_exportable(config: specblock.SpecBlockConfig) -> None:
    """The released format holds one architecture: refuse a config it cannot express, naming the field."""
    reference = {"rank_hidden": RANK_HIDDEN, "rank_topk": RANK_TOPK, "rank_bounds": losses.RANK_BOUNDS,
                 "rank_head": True, "shift": True, "inherit": True, "head_dim": config.hidden_size // config.num_heads}
    for name, value in reference.items():
        if getattr(config, name) != value:
            raise ValueError(f"SpecBlockConfig {name}={getattr(config, name)!r}: the authors' format holds only "
                             f"{name}={value!r}")


def config_to_hf(config: specblock.SpecBlockConfig, target: ModelConfig | None = None) -> dict:
    """The config.json the authors' loaders (HF harness, SGLang fork, their trainer) read for `config`."""
    check_exportable(config)
    return {"architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": config.num_layers,
            "diffspec_draft_token_num": config.block_size, "rank_classes": config.rank_classes,
            "num_ttt_blocks": config.num_ttt_blocks, **eagle3_hf.drafter_fields_hf(config, target)}


# ---------------------------------------------------------------------------------------------
# tensors


def _hf_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> their state-dict key (see the module docstring's table)."""
    head, *rest = path
    if head in _INPUT:
        return f"input_layer.{head}.weight"
    if head.startswith("layers_"):
        return f"layers.{head[len('layers_'):]}." + ".".join(rest[:-1]) + ".weight"
    if head.startswith("shift_"):
        return f"shift_proj.{int(head[len('shift_'):]) - 1}.weight"
    return {"rank_in": "rank_head.0.weight", "rank_out": "rank_head.2.weight"}.get(head, f"{head}.weight")


def _layout(config: specblock.SpecBlockConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]]:
    """Checkpoint name -> (drafter path, checkpoint shape, our dtype), from the drafter's own init."""
    shapes = jax.eval_shape(lambda: specblock.init_params(config, jax.random.key(0)))
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        out[_hf_name(path)] = (path, leaf.shape[::-1] if path[-1] == "kernel" else leaf.shape, leaf.dtype)
    return out


def params_from_safetensors(config: specblock.SpecBlockConfig, tensors: Any) -> tuple[dict, np.ndarray | None]:
    """Checkpoint tensors -> (drafter params as numpy arrays in the drafter's dtypes, draft_to_target or
    None). A missing, unexpected or misshapen tensor is an error naming it."""
    layout = _layout(config)
    names = eagle3_hf.check_names(tensors, layout, config.reduced_vocab, (_EMBED,), "SpecBlock")
    flat = {}
    for name, (path, shape, dtype) in layout.items():
        array = np.asarray(tensors[name])
        if array.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {shape}")
        flat[path] = np.ascontiguousarray(array.T if path[-1] == "kernel" else array, dtype=dtype)
    if _EMBED in names:  # not imported (the target's table is used): check its shape only
        shape = eagle3_hf.tensor_shape(tensors, _EMBED)
        if shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"tensor {_EMBED!r} has shape {shape}, expected {(config.vocab_size, config.hidden_size)}")
    return traverse_util.unflatten_dict(flat), eagle3_hf.read_vocab_map(config, tensors)


def params_to_safetensors(config: specblock.SpecBlockConfig, params: Any, draft_to_target: Any = None,
                          weights_dtype: str | None = None) -> dict[str, np.ndarray]:
    """The inverse of `params_from_safetensors`: their key layout, floats in `weights_dtype` (default
    the config's dtype, so a bf16 drafter writes bf16 throughout, as their trainer does), and the
    `d2t` / `t2d` buffers (identity for a full vocabulary)."""
    check_exportable(config)
    layout = _layout(config)
    flat = {_hf_name(path): np.asarray(jax.device_get(x)) for path, x in traverse_util.flatten_dict(params).items()}
    if set(flat) != set(layout):
        raise ValueError(f"params do not match the config: missing {sorted(set(layout) - set(flat))}, "
                         f"unexpected {sorted(set(flat) - set(layout))}")
    dtype = jnp.dtype(weights_dtype or config.dtype)
    tensors = {}
    for name, (path, shape, _) in layout.items():
        array = flat[name].T if path[-1] == "kernel" else flat[name]
        if array.shape != shape:
            raise ValueError(f"param {'.'.join(path)} gives {name!r} of shape {array.shape}, expected {shape}")
        tensors[name] = np.ascontiguousarray(array, dtype=dtype)
    return {**tensors, **eagle3_hf.vocab_map_tensors(config, draft_to_target)}


# ---------------------------------------------------------------------------------------------
# directories


def read_specblock_hf(path: str | os.PathLike, target: ModelConfig | None = None, dtype: str | None = None
                      ) -> tuple[specblock.SpecBlockConfig, dict, np.ndarray | None]:
    """(config, host params, draft_to_target or None) of a released SpecBlock checkpoint directory.
    `dtype` (default: the target's, else float32) is what the drafter computes in."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a SpecBlock checkpoint directory: {path / 'config.json'} does not exist")
    dtype = dtype or (target.dtype if target is not None else "float32")
    config = config_from_hf(json.loads((path / "config.json").read_text()), target, dtype)
    params, mapping = params_from_safetensors(config, hf._SafetensorsFiles(hf._weight_files(path)))
    return config, params, mapping


def load_specblock_hf(path: str | os.PathLike, target: Any, *, dtype: str | None = None,
                      **decoding: Any) -> tuple[SpecBlockMethod, dict[str, Any]]:
    """(method, method params) ready for `generate(..., drafter=Drafter(method, params))`, for `target`
    (a `Target`); `decoding` sets `SpecBlockMethod`'s tree knobs (budget, max_blocks, widths, ..)."""
    config, params, mapping = read_specblock_hf(path, target.config, dtype)
    try:
        config.check_target(target.config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    method = SpecBlockMethod(config, **decoding)
    return method, drafter_params(jax.device_put(params), target.params, mapping)


def export_specblock_hf(config: specblock.SpecBlockConfig, params: Any, out_dir: str | os.PathLike,
                        draft_to_target: Any = None, *, target: ModelConfig | None = None,
                        weights_dtype: str | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write `params` (the drafter's own tree) as a directory in the authors' format, atomically."""
    return eagle3_hf.write_hf_dir(out_dir, config_to_hf(config, target),
                                  lambda: params_to_safetensors(config, params, draft_to_target, weights_dtype),
                                  overwrite)


def export_drafter_dir(drafter_dir: str | os.PathLike, target: Any, out_dir: str | os.PathLike, *,
                       weights_dtype: str | None = None, overwrite: bool = False) -> pathlib.Path:
    """A project SpecBlock drafter directory (`drafter_io`) -> the authors' format for `target`."""
    from specblock_jax import drafter_io  # drafter_io imports this module lazily; keep the cycle out of import time

    method, params = drafter_io.load(drafter_dir, target)
    if not isinstance(method, SpecBlockMethod):
        raise ValueError(f"{drafter_dir} holds a {type(method).__name__} drafter, not SpecBlock")
    return export_specblock_hf(method.config, jax.device_get(params["drafter"]), out_dir,
                               params.get("draft_to_target"), target=target.config, weights_dtype=weights_dtype,
                               overwrite=overwrite)
