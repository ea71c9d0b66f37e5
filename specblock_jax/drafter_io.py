"""Trained drafter directories: `drafter.json` (kind, drafter config, decoding defaults) beside
`model.safetensors`, which holds the drafter's own parameters only.

The target's embedding is never saved: a drafter is always loaded against its target and reads the
table from there, so a drafter directory stays small and cannot drift from the target it serves.
Tensors keep the Flax layout (kernels are [in, out]) under dotted paths, e.g. `self_attn.q_proj.kernel`.
A drafter with a reduced vocabulary (`draft_vocab_size`) also stores its draft -> target id map as the
int32 tensor `draft_to_target` [draft_vocab_size]. (`eagle3_hf` reads and writes the published
EAGLE-3 format that SGLang and vLLM serve; `specblock_hf` the SpecBlock authors' released format. `load`
recognises both by their config.json.)
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
from safetensors.numpy import load_file, save_file

from specblock_jax.config import ConfigError, from_dict, to_dict
from specblock_jax.eagle3_draft import Eagle3Method, drafter_params
from specblock_jax.hf import atomic_dir
from specblock_jax.models import eagle3, specblock
from specblock_jax.specblock_draft import SpecBlockMethod
from specblock_jax.specblock_draft import drafter_params as specblock_drafter_params

DRAFTER_JSON = "drafter.json"
WEIGHTS = "model.safetensors"
KINDS = ("eagle3", "specblock")  # kinds a directory can hold


METHODS = {"eagle3": Eagle3Method, "specblock": SpecBlockMethod}  # kind -> drafting method


def make_method(kind: str, config: Any, decoding: dict[str, Any]) -> Any:
    """The drafting method of `kind` for drafter `config`, with the tree knobs in `decoding` (the
    method's own fields, e.g. budget / max_depth / topk for EAGLE-3); a bad knob is a ConfigError."""
    try:
        return from_dict(METHODS[kind], {**decoding, "config": to_dict(config)}, "decoding")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"decoding: {e}") from None


def decoding_of(method: Any) -> dict[str, Any]:
    """The tree knobs of `method` (every field but its config), as plain data for drafter.json."""
    return {f.name: list(v) if isinstance(v := getattr(method, f.name), tuple) else v
            for f in dataclasses.fields(method) if f.name != "config"}


def _expected_shapes(config: eagle3.Eagle3Config | specblock.SpecBlockConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the drafter's own init (the single source of the layout)."""
    init = specblock.init_params if isinstance(config, specblock.SpecBlockConfig) else eagle3.init_params
    shapes = jax.eval_shape(lambda: init(config, jax.random.key(0)))
    return {".".join(path): leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _check_tensors(config: eagle3.Eagle3Config | specblock.SpecBlockConfig, tensors: dict[str, Any], where: str) -> None:
    """Every drafter tensor present with its shape, nothing else (the target's embedding included)."""
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{where}: tensors missing: {missing}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{where}: unexpected tensors {extra} (a drafter holds only its own parameters)")
    for name, shape in expected.items():
        if tuple(np.shape(tensors[name])) != shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(np.shape(tensors[name]))}, expected {shape}")


MAP_TENSOR = "draft_to_target"  # [draft_vocab_size] int32, only for a reduced draft vocabulary


def _check_map(config: eagle3.Eagle3Config | specblock.SpecBlockConfig, draft_to_target: Any, where: str) -> np.ndarray | None:
    """The draft -> target id map is present exactly when the vocabulary is reduced, and fits it."""
    if not config.reduced_vocab:
        if draft_to_target is not None:
            raise ValueError(f"{where}: a {MAP_TENSOR!r} map was given but the drafter's LM head covers the whole "
                             f"target vocabulary (draft_vocab_size is None)")
        return None
    if draft_to_target is None:
        raise ValueError(f"{where}: the drafter has draft_vocab_size {config.draft_vocab_size} but no "
                         f"{MAP_TENSOR!r} map (draft id -> target id)")
    return eagle3.check_vocab_mapping(draft_to_target, config, f"{where}: {MAP_TENSOR}")


def save(method: Eagle3Method | SpecBlockMethod, params: Any, out_dir: str | os.PathLike, *,
         draft_to_target: Any = None, weights_dtype: str | None = None) -> pathlib.Path:
    """Write a drafter's own `params` (not `drafter_params`'s dict) and its `method` (config and tree
    knobs) to `out_dir`, replacing it atomically: files go to a hidden sibling that is renamed into
    place when complete. `draft_to_target` is required exactly when the config's draft vocabulary is
    reduced; `weights_dtype` (e.g. "bfloat16") stores the weights narrower, to be widened to the
    config's dtype on load."""
    kind = "eagle3" if isinstance(method, Eagle3Method) else "specblock"
    tensors = _tensors(params, weights_dtype)
    _check_tensors(method.config, tensors, f"save ({kind})")
    mapping = _check_map(method.config, None if draft_to_target is None else jax.device_get(draft_to_target),
                         f"save ({kind})")
    if mapping is not None:
        tensors[MAP_TENSOR] = mapping
    meta = {"kind": kind, "config": to_dict(method.config), "decoding": decoding_of(method)}
    return _write(tensors, meta, out_dir)


def _tensors(params: Any, weights_dtype: str | None) -> dict[str, np.ndarray]:
    """Flat name -> host array, cast to `weights_dtype` when given."""
    cast = (lambda x: x) if weights_dtype is None else (lambda x: x.astype(jnp.dtype(weights_dtype)))
    return {".".join(path): np.ascontiguousarray(cast(np.asarray(jax.device_get(x))))
            for path, x in traverse_util.flatten_dict(params).items()}


def _write(tensors: dict[str, np.ndarray], meta: dict[str, Any], out_dir: str | os.PathLike) -> pathlib.Path:
    """Weights and drafter.json into a hidden sibling of `out_dir`, renamed into place when complete."""
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "flax"})
        (tmp / DRAFTER_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return pathlib.Path(out_dir)


def _published_architectures(path: pathlib.Path) -> tuple[str, ...]:
    """The `architectures` of a Hugging Face style config.json at `path` (none without one)."""
    config = path / "config.json"
    if not config.is_file():
        return ()
    return tuple(json.loads(config.read_text()).get("architectures") or ())


def _read_meta(meta_path: pathlib.Path) -> dict[str, Any]:
    """drafter.json, with its keys and kind checked."""
    meta = json.loads(meta_path.read_text())
    missing = [k for k in ("kind", "config", "decoding") if k not in meta]
    if missing:
        raise ConfigError(f"{meta_path}: missing key(s) {missing}")
    if meta["kind"] not in KINDS:
        raise ConfigError(f"{meta_path}: unknown drafter kind {meta['kind']!r}; a directory can hold one of {KINDS}")
    return meta


def _config_of(meta: dict[str, Any]) -> eagle3.Eagle3Config | specblock.SpecBlockConfig:
    return from_dict(specblock.SpecBlockConfig if meta["kind"] == "specblock" else eagle3.Eagle3Config,
                     meta["config"], "config")


def decoding_with(path: str | os.PathLike, tree: dict[str, Any]) -> dict[str, Any]:
    """The decoding section of the drafter directory at `path` with the fields of `tree` replaced
    (budget, max_depth, widths, ...), checked: a field its method lacks or a bad value is a ConfigError."""
    meta_path = pathlib.Path(path) / DRAFTER_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a trained drafter directory: {meta_path} does not exist")
    meta = _read_meta(meta_path)
    try:
        return decoding_of(make_method(meta["kind"], _config_of(meta), {**meta["decoding"], **tree}))
    except ConfigError as e:
        raise ConfigError(f"{meta_path}: {e}") from None


def set_decoding(path: str | os.PathLike, tree: dict[str, Any]) -> dict[str, Any]:
    """Make `tree` the default of the drafter directory at `path` (`decoding_with`); drafter.json is
    replaced atomically, the weights are untouched. Returns the new decoding section."""
    decoding = decoding_with(path, tree)
    meta_path = pathlib.Path(path) / DRAFTER_JSON
    meta = {**json.loads(meta_path.read_text()), "decoding": decoding}
    tmp = meta_path.with_name(f".{DRAFTER_JSON}.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)
    return decoding


def load(path: str | os.PathLike, target: Any) -> tuple[Eagle3Method | SpecBlockMethod, dict[str, Any]]:
    """(method, method params) of the drafter directory at `path` for `target` (a `Target`); every
    mismatch with the target is an error naming both values, before any array is placed. A published
    EAGLE-3 checkpoint directory (config.json of `LlamaForCausalLMEagle3`) loads through `eagle3_hf`
    with EAGLE-3's default tree (60 nodes, depth 7, top-10); a released SpecBlock drafter (config.json
    of `LlamaForCausalLMSpecBlock` / `...Shift`) through `specblock_hf` with `SpecBlockMethod`'s
    default tree."""
    path = pathlib.Path(path)
    meta_path = path / DRAFTER_JSON
    if not meta_path.is_file():
        architectures = _published_architectures(path)
        if "LlamaForCausalLMEagle3" in architectures:
            from specblock_jax import eagle3_hf  # a published EAGLE-3 checkpoint (SGLang / vLLM format)

            return eagle3_hf.load_eagle3_hf(path, target)
        from specblock_jax import specblock_hf  # imports this module: keep the cycle out of import time

        if set(architectures) & set(specblock_hf.ARCHITECTURES):
            return specblock_hf.load_specblock_hf(path, target)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a trained drafter directory: {meta_path} does not exist")
    meta = _read_meta(meta_path)
    specblock_kind = meta["kind"] == "specblock"
    try:
        config = _config_of(meta)
        config.check_target(target.config)
        method = make_method(meta["kind"], config, meta["decoding"])
    except ConfigError as e:
        raise ConfigError(f"{meta_path}: {e}") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"drafter directory {path} has no {WEIGHTS}")
    tensors = load_file(str(weights))
    mapping = _check_map(config, tensors.pop(MAP_TENSOR, None), str(weights))
    _check_tensors(config, tensors, str(weights))
    if specblock_kind:
        params = traverse_util.unflatten_dict({tuple(name.split(".")): np.asarray(x).astype(jnp.dtype(config.dtype))
                                               for name, x in tensors.items()})
        return method, specblock_drafter_params(jax.device_put(params), target.params, mapping)
    dtype = jnp.dtype(config.dtype)
    params = traverse_util.unflatten_dict({tuple(name.split(".")): np.asarray(x).astype(dtype)
                                           for name, x in tensors.items()})
    return method, drafter_params(jax.device_put(params), target.params, mapping)
