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
into a hidden sibling, resumed there after a kill, renamed into place when complete, and refused when
it does not match the run. A build may copy rows from another finished cache of the same target
(`reuse`): a run on a subset of the rows (one domain) then costs only its rows the other lacks.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from specblock_jax.config import ConfigError, ModelConfig, to_dict
from specblock_jax.hf import replace_dir, write_json
from specblock_jax.models import target as target_lib
from specblock_jax.models.layers import top_k

SPLITS = ("train", "val")
FIELDS = ("tokens", "loss_mask")  # what an online example holds
CACHED = ("features", "topk_logits", "topk_ids")  # the target's outputs
CACHE_JSON = "cache.json"
PROGRESS_JSON = "progress.json"  # in the staging directory of a build under way


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
          *, topk: int, dtype: str, batch_size: int, progress: bool = True, stop_after: int | None = None,
          reuse: str | pathlib.Path | None = None) -> pathlib.Path | None:
    """Write the cache of `examples` (split -> the online example fields of all its rows: `tokens` and
    `loss_mask`, [N, T] each) to `path`, unless a matching one is already there; a cache built from
    anything else is an error, never overwritten.

    A build of the real data takes hours, so it resumes: rows go into a hidden staging sibling whose
    `progress.json` counts the rows on disk after each batch, and a rerun after a crash or kill goes
    on from there (a staging directory of other inputs is discarded). `stop_after` ends the call after
    that many batches, as a kill would, and returns None; the finished cache is renamed into place.

    `reuse` names a finished cache of the same target, layers, top-k and dtype: a batch whose rows all
    appear in it (matched by their tokens, which alone decide the target's outputs) is copied from it
    instead of computed."""
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

    donor = None if reuse is None else _Donor(pathlib.Path(reuse), described)
    staging = path.with_name(f".{path.name}.partial")
    done = _staged_rows(staging, described)
    if done is None:
        done = _stage(staging, described, examples, width=len(layers) * target.config.hidden_size, topk=topk,
                      dtype=dtype)
    batches = 0
    for split in SPLITS:
        tokens = examples[split]["tokens"]
        arrays = [np.load(staging / f"{split}_{name}.npy", mmap_mode="r+") for name in CACHED]
        starts = range(done[split], len(tokens), batch_size)
        bar = tqdm(starts, disable=not progress, desc=f"cache target outputs ({split})", unit="batch")
        for start in bar:
            if stop_after is not None and batches == stop_after:
                return None
            rows = tokens[start:start + batch_size]
            results = None if donor is None else donor.outputs(rows)
            if results is None:
                results = outputs(target.params, rows)
            elif progress:
                bar.set_postfix(copied_batches=donor.copied)
            for array, result in zip(arrays, results):
                array[start:start + batch_size] = np.asarray(result)
                array.flush()
            done[split] = min(start + batch_size, len(tokens))
            write_json({"inputs": described, "rows_done": done}, staging / PROGRESS_JSON)
            batches += 1
        del arrays
    (staging / CACHE_JSON).write_text(json.dumps(described, indent=1) + "\n")
    (staging / PROGRESS_JSON).unlink()
    replace_dir(staging, path)
    return path


class _Donor:
    """Rows of a finished cache looked up by their tokens, for `build(reuse=...)`."""

    def __init__(self, path: pathlib.Path, described: dict[str, Any]):
        if not (path / CACHE_JSON).is_file():
            raise ConfigError(f"cache_reuse {path} is not a finished feature cache (no {CACHE_JSON})")
        found = json.loads((path / CACHE_JSON).read_text())
        if changed := sorted(k for k in ("target", "feature_layers", "topk", "dtype") if found[k] != described[k]):
            raise ConfigError(f"cache_reuse {path} was built with another {', '.join(changed)} than this run's cache")
        self.cache = Cache(path)
        self.where = {row.tobytes(): (split, i) for split in SPLITS
                      for i, row in enumerate(np.asarray(self.cache.arrays[split]["tokens"]))}
        self.copied = 0

    def outputs(self, tokens_BxT: np.ndarray) -> list[np.ndarray] | None:
        """The cached outputs (features, top-k logits, top-k ids) of these rows; None unless all are there."""
        found = [self.where.get(np.ascontiguousarray(row).tobytes()) for row in tokens_BxT]
        if any(f is None for f in found):
            return None
        self.copied += 1
        return [np.stack([self.cache.arrays[split][name][i] for split, i in found]) for name in CACHED]


def _staged_rows(staging: pathlib.Path, described: dict[str, Any]) -> dict[str, int] | None:
    """Rows per split already in a staging directory of these inputs; None when there is nothing to
    resume (a staging directory of other inputs, or one cut before its first record, is removed)."""
    record = staging / PROGRESS_JSON
    if record.is_file() and (found := json.loads(record.read_text()))["inputs"] == described:
        return found["rows_done"]
    if staging.exists():
        shutil.rmtree(staging)
    return None


def _stage(staging: pathlib.Path, described: dict[str, Any], examples: dict[str, dict[str, np.ndarray]], *,
           width: int, topk: int, dtype: str) -> dict[str, int]:
    """A fresh staging directory: the example fields, the empty target-output arrays, no rows done."""
    staging.mkdir(parents=True)
    for split in SPLITS:
        example = examples[split]
        n, t = example["tokens"].shape
        for name in FIELDS:
            np.save(staging / f"{split}_{name}.npy", example[name])
        for name, dt, shape in (("features", dtype, (n, t, width)), ("topk_logits", np.float32, (n, t, topk)),
                                ("topk_ids", np.int32, (n, t, topk))):
            np.lib.format.open_memmap(staging / f"{split}_{name}.npy", "w+", dt, shape).flush()
    done = {split: 0 for split in SPLITS}
    write_json({"inputs": described, "rows_done": done}, staging / PROGRESS_JSON)
    return done


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
