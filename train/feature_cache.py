"""Offline mode of drafter training: the frozen target's outputs computed once and read from disk.

Online, every training step runs the target over its batch. Offline, `build` runs it once over every
training and held-out row and stores, per row and position, the drafter's input features and the
target's `topk` largest logits with their token ids; training then reads batches from these files
(memory-mapped .npy) and skips the target. Worth it when the same rows are read for many epochs and
the target is much dearer than the drafter (an 8B target under a 1-layer drafter); here on the
embedded target it mostly shows the mode works.

The teacher becomes the target's distribution restricted to its top-k tokens and renormalised
(`losses.topk_teacher`), as HASS-style top-k distillation does; with `topk` equal to the
vocabulary and float32 features it is exactly the online teacher, which the tests check.

A cache directory holds `cache.json` (what it was built from: target, rows, layers, top-k, dtype),
and per split (`train`, `val`): the online example fields `<split>_tokens.npy` [N, T] and
`<split>_loss_mask.npy` [N, T], then `<split>_features.npy` [N, T, F],
`<split>_topk_logits.npy` [N, T, k] float32 and `<split>_topk_ids.npy` [N, T, k] int32. It is written
into a hidden sibling and renamed into place when complete, and refused when it does not match the run.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from specblock_jax.config import ConfigError, ModelConfig, to_dict
from specblock_jax.hf import atomic_dir
from specblock_jax.models import target as target_lib
from specblock_jax.models.layers import top_k

SPLITS = ("train", "val")
FIELDS = ("tokens", "loss_mask")  # what an online example holds
CACHED = ("features", "topk_logits", "topk_ids")  # the target's outputs
CACHE_JSON = "cache.json"


def _describe(target_config: ModelConfig, layers: tuple[int, ...], topk: int, dtype: str,
              examples: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """What a cache depends on; a run reads a cache only when this matches exactly."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for name in FIELDS:
            digest.update(np.ascontiguousarray(examples[split][name]).tobytes())
    return {"target": to_dict(target_config), "feature_layers": list(layers), "topk": topk, "dtype": dtype,
            "rows": {split: list(examples[split]["tokens"].shape) for split in SPLITS},
            "rows_sha256": digest.hexdigest()}


def build(path: str | pathlib.Path, target: Any, layers: tuple[int, ...], examples: dict[str, dict[str, np.ndarray]],
          *, topk: int, dtype: str, batch_size: int, progress: bool = True) -> pathlib.Path:
    """Write the cache of `examples` (split -> the online example fields of all its rows: `tokens` and
    `loss_mask`, [N, T] each) to `path`, unless a matching one is already there; a cache built from
    anything else is an error, never overwritten."""
    path = pathlib.Path(path)
    described = _describe(target.config, layers, topk, dtype, examples)
    if (path / CACHE_JSON).is_file():
        found = json.loads((path / CACHE_JSON).read_text())
        if found != described:
            changed = sorted(k for k in described if found.get(k) != described[k])
            raise ConfigError(f"feature cache {path} was built from other inputs (differs in {changed}); "
                              "point feature_cache at a new directory")
        return path
    if path.exists():
        raise ConfigError(f"feature cache {path} exists but has no {CACHE_JSON}: remove it or pick another directory")
    if not 1 <= topk <= target.config.vocab_size:
        raise ConfigError(f"cache_topk must be in [1, vocab_size {target.config.vocab_size}], got {topk}")

    @jax.jit
    def outputs(params, tokens_BxT):
        b, t = tokens_BxT.shape
        out = target_lib.forward(params, target.config, tokens_BxT, jnp.broadcast_to(jnp.arange(t), (b, t)),
                                 jnp.tril(jnp.ones((t, t), bool))[None], feature_layers=layers)
        top_logits, top_ids = top_k(out.logits, topk)
        return out.features.astype(dtype), top_logits, top_ids

    with atomic_dir(path) as tmp:
        for split in SPLITS:
            example = examples[split]
            n, t = example["tokens"].shape
            for name in FIELDS:
                np.save(tmp / f"{split}_{name}.npy", example[name])
            tokens = example["tokens"]
            arrays = {name: np.lib.format.open_memmap(tmp / f"{split}_{name}.npy", "w+", dt, shape)
                      for name, dt, shape in (("features", dtype, (n, t, len(layers) * target.config.hidden_size)),
                                              ("topk_logits", np.float32, (n, t, topk)),
                                              ("topk_ids", np.int32, (n, t, topk)))}
            for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"cache target outputs ({split})",
                              unit="batch"):
                results = outputs(target.params, tokens[start:start + batch_size])
                for (name, array), result in zip(arrays.items(), results):
                    array[start:start + batch_size] = np.asarray(result)
            for array in arrays.values():
                array.flush()
            del arrays
        (tmp / CACHE_JSON).write_text(json.dumps(described, indent=1) + "\n")
    return path


class Cache:
    """Read side: examples of cached rows by index, with the same fields online batches have plus the
    target's outputs (`features`, `topk_logits`, `topk_ids`)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.arrays = {split: {name: np.load(self.path / f"{split}_{name}.npy", mmap_mode="r")
                               for name in FIELDS + CACHED} for split in SPLITS}

    def rows(self, split: str) -> int:
        return len(self.arrays[split]["tokens"])

    def examples(self, split: str, index_B: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `index_B` of `split` as a batch (features widened to float32)."""
        batch = {name: np.asarray(array[np.asarray(index_B)]) for name, array in self.arrays[split].items()}
        batch["features"] = batch["features"].astype(np.float32)
        return batch

    def dataset(self, seed: int, batch_size: int) -> grain.MapDataset:
        """Training batches in the order the online dataset would give them (same shuffle of row
        indices, same seed), so offline and online runs see the same rows at every step."""
        return (grain.MapDataset.source(np.arange(self.rows("train"))).shuffle(seed=seed).repeat(None)
                .batch(batch_size, drop_remainder=True).map(lambda idx: self.examples("train", idx)))
