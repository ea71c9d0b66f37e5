"""Train a drafter (EAGLE-3 or SpecBlock) for a frozen target on regenerated data (see
train/regenerate.py) and export it as a drafter directory that `load_drafter(path, target)` and
`generate(..., drafter=path)` read.

    python -m train.regenerate --output-dir runs/regen
    python -m train.train_drafter --config configs/eagle3.yaml     # or configs/specblock.yaml

Each step runs the frozen target over the batch (features of the drafter's layers and the target's
logits, no gradient), unrolls the drafter (EAGLE-3: `ttt_steps` training-time-test steps; SpecBlock:
`num_ttt_blocks` blocks of K slots, each inheriting from a random slot of the previous one) and
updates the drafter alone with its loss. Parameters, optimizer state and batches are laid out on the
configured mesh (specblock_jax/sharding.py), so the same command runs on one CPU or a pod slice.

Offline mode (`feature_cache: DIR`): the target's features and top-`cache_topk` logits for every row
are computed once into DIR (train/feature_cache.py) and training reads them instead of running the
target each step. `cache_reuse: DIR2` copies the rows DIR2 already holds (a one-domain run beside a
run on all the data).

Resumable: rerunning the same command after a kill continues from the newest checkpoint with exactly
the batches the uninterrupted run would have seen. log.jsonl gets, every `log_every` steps, the loss,
per-TTT-step losses and accuracies (of each position given the earlier ones right, as drafting reaches
it), and on held-out rows a chain estimate of the acceptance length. `--eval-only` prints those
held-out figures for the newest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from specblock_jax import drafter_io, losses, sharding
from specblock_jax.checkpoint import Checkpointer
from specblock_jax.config import ConfigError, ModelConfig, field_defaults, load_yaml, to_dict
from specblock_jax.decode import PAD_ID
from specblock_jax.hf import load_target
from specblock_jax.models import eagle3, specblock
from specblock_jax.models import target as target_lib
from specblock_jax.optim import OptimConfig, make_optimizer, schedule
from specblock_jax.sharding import MeshConfig
from train import feature_cache
from train.regenerate import read_parts

DRAFTER_KINDS = tuple(drafter_io.METHODS)


@dataclasses.dataclass(frozen=True)
class Eagle3Overrides:
    """Departures from `Eagle3Config.for_target` (None: the target's value / EAGLE-3's default)."""

    ttt_steps: int = 7
    feature_layers: tuple[int, ...] | None = None
    intermediate_size: int | None = None
    draft_vocab_size: int | None = None  # a reduced draft vocabulary: the most frequent trained-on tokens


@dataclasses.dataclass(frozen=True)
class SpecBlockOverrides:
    """Departures from `SpecBlockConfig.for_target` (None: its default); the ablation switches live here."""

    num_layers: int | None = None
    block_size: int | None = None
    num_ttt_blocks: int | None = None
    rank_hidden: int | None = None
    shift: bool | None = None
    inherit: bool | None = None
    rank_head: bool | None = None
    valid_prefix: bool | None = None
    slot_loss_mean: str | None = None  # "reached" (the reference) or "all" (see SpecBlockConfig)
    position_loss_weight: float | None = None
    rank_loss_weight: float | None = None
    feature_layers: tuple[int, ...] | None = None
    intermediate_size: int | None = None
    draft_vocab_size: int | None = None  # a reduced draft vocabulary: the most frequent trained-on tokens


@dataclasses.dataclass(frozen=True)
class DrafterTrainConfig:
    optim: OptimConfig
    kind: str = "eagle3"
    target: str | None = None  # HF directory; None: the embedded target
    data_dir: str = "runs/regen"  # regenerated parts (part-*.npz)
    domains: tuple[str, ...] | None = None  # train on these domains' parts only (part-<domain>-*); None: all
    # False: train on the answer tokens alone (chat data: the prompt is the user's text, never drafted),
    # and a row longer than seq_len keeps its end, all of its answer that fits after as much prompt as fits
    loss_on_prompt: bool = True
    init_from: str | None = None  # a trained drafter directory to start from (fine-tuning); None: fresh
    # The step init_from's run ended at, when this run continues it on the same rows and seed: training
    # batches go on from there in the seed's order (the rows it had not reached come first), the
    # held-out rows stay the seed's.
    init_from_step: int = 0
    lm_head_from_target: bool = True  # a fresh drafter's LM head starts as the target's (untied targets)
    feature_cache: str | None = None  # offline mode: cache of the target's outputs (built on first use)
    cache_topk: int = 64  # offline mode: target logits kept per position (the teacher is renormalised over them)
    cache_dtype: str = "float16"  # offline mode: dtype of the cached features
    cache_reuse: str | None = None  # offline mode: a finished cache whose rows building feature_cache copies
    # The target's and the drafter's parameter and compute dtype ("bfloat16" on TPU / GPU). The optimizer
    # keeps float32 master weights and moments; logits and losses are float32 either way.
    dtype: str = "float32"
    eagle3: Eagle3Overrides = Eagle3Overrides()
    specblock: SpecBlockOverrides = SpecBlockOverrides()
    # The exported drafter's default tree: fields of the kind's drafting method (Eagle3Method:
    # budget, max_depth, topk; SpecBlockMethod: budget, max_blocks, widths, ...), checked before training.
    decoding: dict[str, Any] = dataclasses.field(default_factory=dict)
    mesh: MeshConfig = MeshConfig()
    seq_len: int = 256  # rows are cut or PAD-filled to this width
    batch_size: int = 16  # global batch, split over the mesh's data * fsdp axes
    # Micro-batches per optimizer step: the jitted step splits the global batch into grad_accum parts
    # and sums their gradients in a scan, so activations take 1 / grad_accum of the memory.
    grad_accum: int = 1
    val_batches: int = 4  # held-out batches (of the shuffled rows) for the acceptance estimate
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 20
    output_dir: str = "runs/eagle3"  # checkpoints, log.jsonl
    export_dir: str = "runs/eagle3/drafter"  # the final drafter directory

    def __post_init__(self):
        if self.kind not in DRAFTER_KINDS:
            raise ConfigError(f"kind={self.kind!r} is not one of {DRAFTER_KINDS}")
        if self.cache_dtype not in ("float16", "float32"):
            raise ConfigError(f"cache_dtype must be 'float16' or 'float32', got {self.cache_dtype!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.init_from_step < 0 or (self.init_from_step and self.init_from is None):
            raise ConfigError(f"init_from_step must be >= 0 and needs init_from, got {self.init_from_step}")
        for name in ("seq_len", "batch_size", "grad_accum", "val_batches", "checkpoint_every", "log_every",
                     "cache_topk"):
            if getattr(self, name) < (2 if name == "seq_len" else 1):
                raise ConfigError(f"{name} must be >= {2 if name == 'seq_len' else 1}, got {getattr(self, name)}")


def run_fingerprint(cfg: DrafterTrainConfig) -> dict:
    """What defines a run's math: resuming under a different one is refused. Paths and the logging
    and checkpoint cadence may change between a run and its resume."""
    free = {"output_dir", "export_dir", "data_dir", "checkpoint_every", "log_every", "decoding", "feature_cache",
            "cache_reuse"}
    return {k: v for k, v in to_dict(cfg).items() if k not in free}


def drafter_config(cfg: DrafterTrainConfig, target: ModelConfig) -> Any:
    """The drafter's shape (Eagle3Config or SpecBlockConfig) for `target`, checked against it (and
    `seq_len` against its positions) before any data is read."""
    if cfg.seq_len > target.max_position_embeddings:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the target's max_position_embeddings "
                          f"{target.max_position_embeddings}")
    overrides = {k: v for k, v in dataclasses.asdict(getattr(cfg, cfg.kind)).items() if v is not None}
    if "feature_layers" in overrides:
        overrides["feature_layers"] = tuple(overrides["feature_layers"])
    config_cls = eagle3.Eagle3Config if cfg.kind == "eagle3" else specblock.SpecBlockConfig
    config = config_cls.for_target(target, **overrides)
    config.check_target(target)
    return config


def model_of(config: Any) -> Any:
    """The model module (init_params, param_axes, ...) of a drafter config."""
    return specblock if isinstance(config, specblock.SpecBlockConfig) else eagle3


def drafting_method(cfg: DrafterTrainConfig, config: Any) -> Any:
    """The exported drafter's method: `config` with the `decoding` section's tree shape."""
    return drafter_io.make_method(cfg.kind, config, cfg.decoding)


# ---------------------------------------------------------------------------------------------
# data


def fit_rows(parts: dict[str, np.ndarray], cfg: DrafterTrainConfig) -> dict[str, np.ndarray]:
    """Regenerated rows at `seq_len` wide: `tokens` [N, seq_len] (PAD_ID after a row's end) and
    `loss_from` [N], the first position whose next token is trained on. With `loss_on_prompt` a row is
    cut at seq_len and every next token counts; without, a long row keeps its last seq_len tokens and
    only its answer (the tokens from `prompt_len` on) counts."""
    tokens_NxW, n = parts["tokens"], len(parts["tokens"])
    if cfg.loss_on_prompt:
        start_N = np.zeros(n, np.int64)
        loss_from_N = np.zeros(n, np.int32)
    else:
        start_N = np.maximum(parts["length"] - cfg.seq_len, 0)
        loss_from_N = np.maximum(parts["prompt_len"] - start_N - 1, 0).astype(np.int32)
    columns_NxT = start_N[:, None] + np.arange(cfg.seq_len)
    inside_NxT = columns_NxT < tokens_NxW.shape[1]
    picked = np.take_along_axis(tokens_NxW, np.minimum(columns_NxT, tokens_NxW.shape[1] - 1), axis=1)
    return {"tokens": np.where(inside_NxT, picked, PAD_ID).astype(np.int32), "loss_from": loss_from_N}


def domain_rows(parts: dict[str, np.ndarray], cfg: DrafterTrainConfig) -> dict[str, np.ndarray]:
    """The regenerated parts' rows of `cfg.domains` (all rows when None), told apart by part name."""
    if cfg.domains is None:
        return parts
    domain_N = np.array([name.split("-")[1] for name in parts["part"]])
    if missing := sorted(set(cfg.domains) - set(domain_N)):
        raise ValueError(f"no regenerated parts of domain(s) {missing} in {cfg.data_dir}; it holds "
                         f"{sorted(set(domain_N))}")
    keep_N = np.isin(domain_N, cfg.domains)
    return {k: v[keep_N] for k, v in parts.items()}


def split_rows(parts: dict[str, np.ndarray], cfg: DrafterTrainConfig, vocab_size: int
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train rows, held-out rows) of `fit_rows`: a seeded permutation, its first `val_batches *
    batch_size` held out."""
    rows = fit_rows(parts, cfg)
    tokens = rows["tokens"]
    bad = tokens[(tokens != PAD_ID) & ((tokens < 0) | (tokens >= vocab_size))]
    if bad.size:
        raise ValueError(f"regenerated token id {int(bad[0])} outside the target's vocabulary [0, {vocab_size})")
    n_val = cfg.val_batches * cfg.batch_size
    if len(tokens) < n_val + cfg.batch_size:
        raise ValueError(f"{len(tokens)} regenerated rows in {cfg.data_dir}: need val_batches * batch_size = {n_val} "
                         f"held out plus one training batch of {cfg.batch_size}")
    order = np.random.default_rng(cfg.seed).permutation(len(tokens))
    return ({k: v[order[n_val:]] for k, v in rows.items()}, {k: v[order[:n_val]] for k, v in rows.items()})


def to_example(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """tokens with PAD_ID replaced by 0 (the target must see valid ids) and loss_mask[p] = 1 where the
    predicted token x_{p+1} lies inside the row's real length and p >= the row's `loss_from`."""
    tokens_BxT = rows["tokens"]
    real_BxT = tokens_BxT != PAD_ID
    trained_BxT = np.arange(tokens_BxT.shape[1]) >= rows["loss_from"][:, None]
    return {"tokens": np.where(real_BxT, tokens_BxT, 0).astype(np.int32),
            "loss_mask": (np.pad(real_BxT[:, 1:], ((0, 0), (0, 1))) & trained_BxT).astype(np.float32)}


def batch_of(rows: dict[str, np.ndarray], index_B: np.ndarray) -> dict[str, np.ndarray]:
    """The example of rows `index_B`."""
    return to_example({k: v[index_B] for k, v in rows.items()})


def train_dataset(rows: dict[str, np.ndarray], cfg: DrafterTrainConfig) -> grain.MapDataset:
    """Shuffled batches, reshuffled each epoch; `ds[step]` depends only on (rows, seed, step) so a
    resumed run sees exactly the batches of an uninterrupted one."""
    return (grain.MapDataset.source(np.arange(len(rows["tokens"]))).shuffle(seed=cfg.seed).repeat(None)
            .batch(cfg.batch_size, drop_remainder=True).map(lambda index_B: batch_of(rows, index_B)))


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's slice of a global batch (all of it with one process)."""
    n = len(batch["tokens"]) // jax.process_count()
    return {k: v[jax.process_index() * n:(jax.process_index() + 1) * n] for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# the step


def target_outputs(target_params: Any, target_config: ModelConfig, layers: tuple[int, ...], tokens_BxT: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Frozen target over the batch: features [B, T, 3H] and logits [B, T, V], both without gradient."""
    b, t = tokens_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = target_lib.forward(jax.lax.stop_gradient(target_params), target_config, tokens_BxT, positions_BxT,
                             jnp.tril(jnp.ones((t, t), bool))[None], feature_layers=layers)
    return jax.lax.stop_gradient(out.features), jax.lax.stop_gradient(out.logits)


def drafter_metrics(params: Any, target_params: Any, target_config: ModelConfig, config: Any,
                    batch: dict[str, jax.Array], key: jax.Array, draft_to_target: Any = None) -> Any:
    """The drafter's training loss and metrics on a batch (TTTLoss or SpecBlockLoss; both carry `loss`,
    `step_loss_K` and `step_acc_K`). `key` draws SpecBlock's inheritance slots; EAGLE-3 ignores it.
    With a reduced draft vocabulary (`draft_to_target`), the teacher is the target over that vocabulary."""
    if "features" in batch:  # offline mode: the target's outputs come with the batch
        features_BxTxF = batch["features"]
        teacher, loss_mask_BxT = losses.topk_teacher(batch["topk_logits"], batch["topk_ids"], batch["loss_mask"],
                                                     target_config.vocab_size, draft_to_target)
    else:
        features_BxTxF, logits_BxTxV = target_outputs(target_params, target_config, config.feature_layers,
                                                      batch["tokens"])
        teacher, loss_mask_BxT = losses.dense_teacher(logits_BxTxV, batch["loss_mask"], draft_to_target)
    table_VxH = jax.lax.stop_gradient(target_params["embed_tokens"]["embedding"])
    if isinstance(config, specblock.SpecBlockConfig):
        return specblock.train_metrics(params, config, table_VxH, features_BxTxF, batch["tokens"], teacher,
                                       loss_mask_BxT, key)
    return losses.ttt_loss(eagle3.ttt_forward(params, config, table_VxH, features_BxTxF, batch["tokens"]), teacher,
                           loss_mask_BxT)


def make_train_step(target_config: ModelConfig, config: Any, optimizer: optax.GradientTransformation, seed: int = 0,
                    draft_to_target: Any = None, grad_accum: int = 1):
    """step(state, target_params, batch, step) -> (state, metrics): the optimizer sees the drafter only;
    the step number (an int32 scalar) picks the step's random draws, so a resumed run repeats them.

    With `grad_accum` > 1 the batch's rows i, i + A, i + 2A, ... form micro-batch i (A = grad_accum; a
    strided split keeps every micro-batch on all the batch shards); the step averages their gradients
    and metrics, which equals the whole batch's when the micro-batches hold equally many trained-on
    tokens (the losses are means over them)."""
    def step(state, target_params, batch, step_number):
        key = jax.random.fold_in(jax.random.key(seed), step_number)

        def loss_fn(params, micro_batch, micro_key):
            metrics = drafter_metrics(compute_params(params, config), target_params, target_config, config,
                                      micro_batch, micro_key, draft_to_target)
            return metrics.loss, metrics

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state["params"], batch, key)
        else:
            micro_AxBx = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1), batch)

            def accumulate(total, xs):
                i, micro_batch = xs
                (_, metrics), grads = grad_fn(state["params"], micro_batch, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, total, grads), metrics

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            grads, metrics_A = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro_AxBx))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics_A)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, metrics

    return step


def compute_params(master: Any, config: Any) -> Any:
    """The float32 master weights in the drafter's compute dtype (a no-op in float32); gradients flow
    back through the cast to the master weights."""
    return jax.tree.map(lambda x: x.astype(config.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, master)


def master_params(params: Any) -> Any:
    """Host params as float32 master weights (what the optimizer updates and checkpoints hold)."""
    return jax.tree.map(lambda x: np.asarray(x, np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def jit_steps(target_config: ModelConfig, config: Any, optimizer, state_sh, target_sh, batch_sh, seed: int = 0,
              draft_to_target: Any = None, grad_accum: int = 1):
    """The train and eval steps jitted over the mesh. The target's params are an argument (never a
    traced constant, never in the state): laid out once, read every step, not donated or updated.
    Evaluation draws with one fixed key, so its figures are comparable from log line to log line."""
    replicated = NamedSharding(batch_sh.mesh, PartitionSpec())
    train_step = jax.jit(make_train_step(target_config, config, optimizer, seed, draft_to_target, grad_accum),
                         in_shardings=(state_sh, target_sh, batch_sh, replicated),
                         out_shardings=(state_sh, replicated), donate_argnums=0)
    eval_key = jax.random.key(seed + 1)
    eval_step = jax.jit(lambda p, tp, batch: drafter_metrics(compute_params(p, config), tp, target_config, config,
                                                             batch, eval_key, draft_to_target),
                        in_shardings=(state_sh["params"], target_sh, batch_sh), out_shardings=replicated)
    return train_step, eval_step


def chain_acceptance(step_acc_K: np.ndarray) -> float:
    """Expected tokens per target forward of a single-chain draft of depth K, where step k is accepted
    with probability acc_k given steps < k were (both drafters' `step_acc_K`): 1 + sum_k prod_{j<=k}
    acc_j (a tree does better)."""
    return float(1.0 + np.sum(np.cumprod(step_acc_K)))


def evaluate(eval_step, params, target_params, val_batches: list[dict[str, np.ndarray]], mesh) -> dict:
    """Held-out loss, per-step accuracy and the chain acceptance estimate (batch means)."""
    results = [eval_step(params, target_params, sharding.global_batch(local_rows(batch), mesh))
               for batch in val_batches]
    acc_K = np.mean([np.asarray(r.step_acc_K) for r in results], axis=0)
    return {"val_loss": float(np.mean([float(r.loss) for r in results])), "val_step_acc": acc_K.tolist(),
            "val_acceptance_length": chain_acceptance(acc_K)}


def initial_params(cfg: DrafterTrainConfig, config: Any, target: Any, train_rows: dict[str, np.ndarray]
                   ) -> tuple[Any, np.ndarray | None]:
    """(host params to start from, draft -> target id map or None): a trained drafter directory
    (checked against the target and this run's drafter shape, its map kept), or a fresh init whose LM
    head may copy the target's (its draft-vocabulary columns), with a reduced draft vocabulary's map
    built from the training rows' most frequent trained-on tokens.

    Starting from the target's LM head is a head start, not a tie: the drafter's final hidden learns
    to look like the target's last hidden, which a short run on a small budget reaches far sooner."""
    if cfg.init_from is not None:
        method, params = drafter_io.load(cfg.init_from, target)
        shape = lambda c: {k: v for k, v in to_dict(c).items() if k not in c.TRAINING_FIELDS}
        if type(method.config) is not type(config) or shape(method.config) != shape(config):
            raise ConfigError(f"init_from {cfg.init_from}: its drafter config {to_dict(method.config)} differs "
                              f"from this run's {to_dict(config)} beyond the training-only fields "
                              f"{', '.join(config.TRAINING_FIELDS)}")
        mapping = params.get("draft_to_target")
        return jax.device_get(params["drafter"]), None if mapping is None else np.asarray(mapping)
    mapping = None
    if getattr(config, "draft_vocab_size", None) is not None:
        example = to_example(train_rows)
        mapping = eagle3.build_vocab_mapping(example["tokens"], target.config.vocab_size, config.draft_vocab_size,
                                             example["loss_mask"])
    params = jax.device_get(model_of(config).init_params(config, jax.random.key(cfg.seed)))
    if cfg.lm_head_from_target and "lm_head" in target.params:
        kernel = np.asarray(target.params["lm_head"]["kernel"])
        params = {**params, "lm_head": {"kernel": kernel if mapping is None else kernel[:, mapping]}}
    return params, mapping


def check_batch_split(cfg: DrafterTrainConfig, mesh) -> None:
    """The global batch must split evenly over the processes and, in each of its grad_accum
    micro-batches, over the mesh's batch shards."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % jax.process_count() or cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {jax.process_count()} process(es) and "
                          f"grad_accum {cfg.grad_accum} micro-batches")
    rows = cfg.batch_size // cfg.grad_accum
    if rows % shards:
        micro = "" if cfg.grad_accum == 1 else f" (a micro-batch of grad_accum {cfg.grad_accum}: {rows} rows)"
        raise ConfigError(f"batch_size {cfg.batch_size}{micro} does not split over the mesh's data * fsdp = {shards} "
                          "batch shards")


def init_state(host: Any, config: Any, optimizer, mesh) -> tuple[dict, dict]:
    """Sharded state from host params, and its shardings: drafter params placed by their logical axes,
    the optimizer state initialized in place with matching shardings."""
    param_sh = sharding.logical_to_sharding(model_of(config).param_axes(config), mesh, host)
    params = sharding.shard_params(host, param_sh)
    opt_sh = sharding.opt_state_shardings(optimizer, params, param_sh)
    state = {"params": params, "opt_state": jax.jit(optimizer.init, out_shardings=opt_sh)(params)}
    return state, sharding.train_state_shardings(state, param_sh, optimizer)


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: DrafterTrainConfig, *, stop_after: int | None = None, export: bool = True,
          progress: bool = True, export_only: bool = False, eval_only: bool = False,
          weights_dtype: str | None = None) -> dict:
    """Run (or resume) training. `stop_after` ends this run at that step (as a kill would), for tests;
    `export_only` exports the newest checkpoint as the drafter directory and trains nothing;
    `eval_only` prints the newest checkpoint's held-out figures (a JSON line, as the log's) and trains
    nothing; `weights_dtype` (e.g. "bfloat16") stores the exported weights narrower.

    Returns the final state (drafter params and optimizer state, on the mesh)."""
    if export_only and eval_only:
        raise ValueError("export_only and eval_only are exclusive")
    target = load_target(cfg.target, dtype=cfg.dtype)
    config = drafter_config(cfg, target.config)
    method = drafting_method(cfg, config)
    mesh = sharding.make_mesh(cfg.mesh)
    check_batch_split(cfg, mesh)
    train_rows, val_rows = split_rows(domain_rows(read_parts(cfg.data_dir), cfg), cfg, target.config.vocab_size)
    host_params, draft_to_target = initial_params(cfg, config, target, train_rows)
    host_params = master_params(host_params)
    if cfg.feature_cache is None:
        train_ds = train_dataset(train_rows, cfg)
        val_batches = [batch_of(val_rows, idx) for idx in np.array_split(np.arange(len(val_rows["tokens"])),
                                                                          cfg.val_batches)]
    else:
        cache = feature_cache.Cache(feature_cache.build(
            cfg.feature_cache, target, config.feature_layers,
            {"train": to_example(train_rows), "val": to_example(val_rows)}, topk=cfg.cache_topk,
            dtype=cfg.cache_dtype, batch_size=cfg.batch_size, progress=progress, reuse=cfg.cache_reuse))
        train_ds = cache.dataset(cfg.seed, cfg.batch_size)
        val_batches = [cache.examples("val", idx) for idx in np.split(np.arange(cache.rows("val")), cfg.val_batches)]
    target_sh = sharding.logical_to_sharding(target_lib.param_axes(target.config), mesh, target.params)
    target_params = sharding.shard_params(target.params, target_sh)
    optimizer = make_optimizer(cfg.optim)
    state, state_sh = init_state(host_params, config, optimizer, mesh)
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / "checkpoints", every=cfg.checkpoint_every, fingerprint=run_fingerprint(cfg),
                        defaults=field_defaults(DrafterTrainConfig))
    start, restored = 0, ckpt.restore(state)
    if restored is not None:
        start, state = restored
        print(f"resuming from step {start} in {ckpt.directory}", file=sys.stderr)
    if (export_only or eval_only) and restored is None:
        raise FileNotFoundError(f"--{'export' if export_only else 'eval'}-only: no checkpoint in {ckpt.directory}")
    if export_only:
        ckpt.close()
        path = save_drafter(cfg, method, state, draft_to_target, weights_dtype)
        print(f"exported the drafter of step {start} (of {cfg.optim.total_steps}) to {path}", file=sys.stderr)
        return state
    train_step, eval_step = jit_steps(target.config, config, optimizer, state_sh, target_sh,
                                      sharding.batch_sharding(mesh), cfg.seed, draft_to_target, cfg.grad_accum)
    if eval_only:
        ckpt.close()
        print(json.dumps({"step": start, **evaluate(eval_step, state["params"], target_params, val_batches, mesh)}))
        return state
    last = cfg.optim.total_steps if stop_after is None else min(stop_after, cfg.optim.total_steps)
    lr_schedule = schedule(cfg.optim)
    with open(out / "log.jsonl", "a") as log, tqdm(total=cfg.optim.total_steps, initial=start, disable=not progress,
                                                   desc=f"train {cfg.kind} drafter", unit="step") as bar:
        t_mark = time.perf_counter()
        for step in range(start, last):
            batch = sharding.global_batch(local_rows(train_ds[(cfg.init_from_step + step) % len(train_ds)]), mesh)
            state, metrics = train_step(state, target_params, batch, np.int32(step))
            if (step + 1) % cfg.log_every == 0 or step + 1 == last:
                record = log_record(step + 1, metrics, float(lr_schedule(step)), time.perf_counter() - t_mark)
                t_eval = time.perf_counter()
                record.update(evaluate(eval_step, state["params"], target_params, val_batches, mesh))
                record["eval_seconds"] = time.perf_counter() - t_eval  # outside `seconds` (training only)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc="/".join(f"{a:.2f}" for a in record["step_acc"]),
                                tau=f"{record['val_acceptance_length']:.2f}")
                t_mark = time.perf_counter()
            bar.update(1)
            ckpt.save(step + 1, state, force=step + 1 == last)
    ckpt.close()
    if export and last == cfg.optim.total_steps:
        path = save_drafter(cfg, method, state, draft_to_target, weights_dtype)
        print(f"exported the drafter to {path}", file=sys.stderr)
    return state


def save_drafter(cfg: DrafterTrainConfig, method: Any, state: dict, draft_to_target: Any = None,
                 weights_dtype: str | None = None) -> pathlib.Path:
    params = jax.device_get(state["params"])
    weights_dtype = weights_dtype or method.config.dtype  # the float32 master weights in the drafter's dtype
    return drafter_io.save(method, params, cfg.export_dir, draft_to_target=draft_to_target, weights_dtype=weights_dtype)


def log_record(step: int, metrics: Any, lr: float, seconds: float) -> dict[str, Any]:
    """One JSONL line: every metric of the drafter's loss tuple (arrays as lists), lr and wall time."""
    loss = float(metrics.loss)
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}")
    names = {"step_loss_K": "step_loss", "step_acc_K": "step_acc"}
    record = {names.get(k, k): np.asarray(v).tolist() for k, v in metrics._asdict().items()}
    return {"step": step, **record, "lr": lr, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/eagle3.yaml", help="YAML DrafterTrainConfig")
    parser.add_argument("--output-dir", help="override output_dir (checkpoints, log.jsonl)")
    parser.add_argument("--export-dir", help="override export_dir (the final drafter directory)")
    parser.add_argument("--export-only", action="store_true",
                        help="export the newest checkpoint as the drafter directory (also mid-run) and stop")
    parser.add_argument("--eval-only", action="store_true",
                        help="print the newest checkpoint's held-out loss, accuracy per position and chain "
                             "estimate (one JSON line, as in log.jsonl) and stop")
    parser.add_argument("--weights-dtype", choices=("bfloat16", "float32"),
                        help="dtype the exported weights are stored in (default: the drafter's)")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-process run: call jax.distributed.initialize() first (on TPU pods and SLURM "
                             "it finds its peers itself; elsewhere give --coordinator, --num-processes, --process-id)")
    parser.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    parser.add_argument("--num-processes", type=int, help="number of processes (with --distributed)")
    parser.add_argument("--process-id", type=int, help="this process's index (with --distributed)")
    args = parser.parse_args(argv)
    if args.distributed:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.coordinator or args.num_processes or args.process_id is not None:
        parser.error("--coordinator, --num-processes and --process-id need --distributed")
    cfg = load_yaml(DrafterTrainConfig, args.config)
    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("export_dir", args.export_dir)) if v}
    if args.export_only and args.eval_only:
        parser.error("--export-only and --eval-only are exclusive")
    train(dataclasses.replace(cfg, **overrides), export_only=args.export_only, eval_only=args.eval_only,
          weights_dtype=args.weights_dtype)


if __name__ == "__main__":
    main()
