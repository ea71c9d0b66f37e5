"""Memory plan of a drafter recipe on a mesh, without weights: what each device holds.

The target's and the drafter's parameters are built as shapes only (`jax.eval_shape`), laid out by
the project's own sharding rules (`sharding.logical_to_sharding` on `sharding.make_mesh`), and each
parameter's per-device shape is read from its real `NamedSharding` (`shard_shape`). On top of the
parameters the plan counts, per device:

    drafter optimizer   AdamW's mu and nu in float32, plus a float32 master copy when the drafter's
                        parameters are bfloat16 (mixed precision), sharded as the parameters
    drafter gradients   one copy of the drafter's parameters (transient, inside the step)
    training logits     the frozen target's [B, T, V] and the TTT unroll's [K, B, T, Vd] float32 logits
                        (B over data * fsdp, vocabulary over tensor): the largest activations of a
                        step; other activations are not counted
    decoding KV cache   target [L, 2, B, S, KV, D] and drafter [2, B, S + scratch, KV, D] in the
                        model dtype (batch over data * fsdp when it divides, KV heads over tensor)

Use it on simulated devices (`--xla_force_host_platform_device_count`), as `train/plan.py` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from specblock_jax import sharding
from specblock_jax.config import ModelConfig
from specblock_jax.models import eagle3
from specblock_jax.models import target as target_lib

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ParamRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec
    device_shape: tuple[int, ...]
    bytes_total: int
    bytes_per_device: int

    @property
    def shards(self) -> int:
        """Distinct pieces the array is cut into (1 when replicated)."""
        return math.prod(self.shape) // max(math.prod(self.device_shape), 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh_shape: dict[str, int]
    devices: int
    target_rows: list[ParamRow]
    drafter_rows: list[ParamRow]
    per_device: dict[str, int]  # component -> bytes on one device
    notes: list[str]

    @property
    def total_per_device(self) -> int:
        return sum(self.per_device.values())


def param_rows(shapes: Any, axes: Any, mesh: Mesh) -> list[ParamRow]:
    """One row per parameter: its shape, dtype, mesh PartitionSpec and bytes in all and per device."""
    shardings = sharding.logical_to_sharding(axes, mesh, shapes)
    flat_shapes = traverse_util.flatten_dict(shapes)
    flat_sh = traverse_util.flatten_dict(shardings)
    rows = []
    for path, leaf in flat_shapes.items():
        sh: NamedSharding = flat_sh[path]
        device_shape = tuple(sh.shard_shape(leaf.shape))
        itemsize = jnp.dtype(leaf.dtype).itemsize
        rows.append(ParamRow("/".join(path), tuple(leaf.shape), str(jnp.dtype(leaf.dtype)), sh.spec, device_shape,
                             math.prod(leaf.shape) * itemsize, math.prod(device_shape) * itemsize))
    return rows


def target_shapes(config: ModelConfig) -> Any:
    return jax.eval_shape(lambda: target_lib.init_params(config, jax.random.key(0)))


def _ways(mesh: Mesh, logical: str) -> int:
    spec = sharding.mesh_axes(PartitionSpec(logical), logical)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(mesh.shape[a] for a in axes)


def _split(size: int, ways: int) -> int:
    """Per-device share of a dimension split `ways` ways when it divides; whole otherwise."""
    return size // ways if size % ways == 0 else size


def kv_cache_bytes(shape: tuple[int, ...], dtype: str, mesh: Mesh, batch_dim: int, heads_dim: int
                   ) -> tuple[int, int, list[str]]:
    """(total, per-device) bytes of a cache array laid out as a real NamedSharding: batch over the
    batch axes and KV heads over `tensor`, each only when it divides (else replicated, with a note)."""
    names: list[str | None] = [None] * len(shape)
    notes = []
    if shape[batch_dim] % _ways(mesh, "batch") == 0:
        names[batch_dim] = "batch"
    else:
        notes.append(f"decode batch {shape[batch_dim]} does not divide the {_ways(mesh, 'batch')} batch shards "
                     "(data * fsdp): the KV cache is replicated over them")
    if shape[heads_dim] % _ways(mesh, "kv_heads") == 0:
        names[heads_dim] = "kv_heads"
    spec = sharding.mesh_axes(PartitionSpec(*names), "kv_cache")
    device_shape = NamedSharding(mesh, spec).shard_shape(shape)
    itemsize = jnp.dtype(dtype).itemsize
    return math.prod(shape) * itemsize, math.prod(device_shape) * itemsize, notes


def logit_copies(drafter: Any) -> tuple[int, str]:
    """How many [B, T, Vd] logit tensors one training step of `drafter` holds, and their name: EAGLE-3's
    `ttt_steps` unroll, or SpecBlock's `num_ttt_blocks` blocks of `block_size` slots."""
    if hasattr(drafter, "block_size"):
        n = drafter.num_ttt_blocks * drafter.block_size
        return n, f"drafter block logits [{drafter.num_ttt_blocks} blocks x K={drafter.block_size},B,T,V]"
    return drafter.ttt_steps, f"drafter TTT logits [K={drafter.ttt_steps},B,T,Vd]"


def plan(target: ModelConfig, drafter: Any, mesh: Mesh, *, train_batch: int, seq_len: int, decode_batch: int,
         kv_len: int, drafter_model: Any = eagle3, drafter_scratch: int = 0, grad_accum: int = 1) -> Plan:
    """The per-device memory of training `drafter` (an Eagle3Config, or any drafter config whose model
    module `drafter_model` has `init_params` and `param_axes`) against the frozen `target`, and of
    decoding with caches of `kv_len` slots (+ `drafter_scratch` slots of the drafter's own). With
    `grad_accum` > 1 the logits are a micro-batch's (train_batch / grad_accum rows) and the summed
    gradients take another f32 copy of the drafter."""
    notes = []
    t_rows = param_rows(target_shapes(target), target_lib.param_axes(target), mesh)
    d_shapes = jax.eval_shape(lambda: drafter_model.init_params(drafter, jax.random.key(0)))
    d_rows = param_rows(d_shapes, drafter_model.param_axes(drafter), mesh)
    d_elems_dev = sum(r.bytes_per_device // jnp.dtype(r.dtype).itemsize for r in d_rows)
    master = drafter.dtype != "float32"
    per_device = {
        "target params": sum(r.bytes_per_device for r in t_rows),
        "drafter params": sum(r.bytes_per_device for r in d_rows),
        "drafter AdamW mu+nu (f32)" + (" + f32 master" if master else ""): d_elems_dev * 4 * (3 if master else 2),
        "drafter gradients": sum(r.bytes_per_device for r in d_rows),
    }
    if grad_accum > 1:
        per_device["drafter gradient accumulator (f32)"] = d_elems_dev * 4
    batch_ways, vocab_ways = _ways(mesh, "batch"), _ways(mesh, "vocab")
    micro = "" if grad_accum == 1 else f" (a micro-batch of grad_accum {grad_accum})"
    if train_batch % grad_accum or (train_batch // grad_accum) % batch_ways:
        raise ValueError(f"training batch {train_batch}{micro} does not split over the mesh's {batch_ways} batch "
                         f"shards (data * fsdp = {mesh.shape['data']} * {mesh.shape['fsdp']})")
    rows = train_batch // grad_accum // batch_ways
    per_device["target logits [B,T,V] f32 (training)"] = rows * seq_len * _split(target.vocab_size, vocab_ways) * 4
    copies, name = logit_copies(drafter)
    draft_vocab = getattr(drafter, "draft_vocab", drafter.vocab_size)
    per_device[f"{name} f32 (training)"] = copies * rows * seq_len * _split(draft_vocab, vocab_ways) * 4
    kv = (target.num_layers * 2, decode_batch, target.num_kv_heads, kv_len, target.head_dim)
    _, kv_dev, kv_notes = kv_cache_bytes(kv, target.dtype, mesh, 1, 2)
    dkv = (getattr(drafter, "num_layers", 1) * 2, decode_batch, drafter.num_kv_heads, kv_len + drafter_scratch,
           drafter.head_dim)
    _, dkv_dev, _ = kv_cache_bytes(dkv, drafter.dtype, mesh, 1, 2)
    per_device[f"target KV cache (decode, B={decode_batch}, S={kv_len})"] = kv_dev
    per_device["drafter KV cache (decode)"] = dkv_dev
    notes += kv_notes
    notes.append("training and decoding do not run at once: the training total counts params, optimizer, "
                 "gradients and logits; the decoding total counts params and KV caches")
    notes.append("not counted: other activations (the frozen target's forward, the drafter's saved TTT "
                 "activations), XLA scratch and fragmentation; keep headroom")
    return Plan(dict(mesh.shape), mesh.devices.size, t_rows, d_rows, per_device, notes)


def training_bytes(p: Plan) -> int:
    return sum(v for k, v in p.per_device.items() if "KV cache" not in k)


def decoding_bytes(p: Plan) -> int:
    return sum(v for k, v in p.per_device.items() if "params" in k or "KV cache" in k)


def _gib(n: int) -> str:
    return f"{n / GIB:9.3f} GiB"


def _collapse_layers(rows: list[ParamRow]) -> list[tuple[str, ParamRow, int]]:
    """Rows of `layers_<i>/...` that agree in shape, dtype and spec across all layers become one
    `layers_*/...` row with a count; everything else stays as it is, in natural order."""
    groups: dict[tuple, list[ParamRow]] = {}
    for r in rows:
        head, _, rest = r.name.partition("/")
        key = (("layers_*/" + rest) if head.startswith("layers_") and head[7:].isdigit() else r.name,
               r.shape, r.dtype, r.spec)
        groups.setdefault(key, []).append(r)
    return [(key[0], members[0], len(members)) for key, members in groups.items()]


def _table(rows: list[ParamRow]) -> list[str]:
    out = [f"  {'parameter':44s} {'count':>5s} {'shape':>16s} {'dtype':>8s} {'spec':26s} {'per device':>16s} "
           f"{'MiB/dev each':>12s}"]
    for name, r, count in _collapse_layers(rows):
        out.append(f"  {name:44s} {count:5d} {str(r.shape):>16s} {r.dtype:>8s} {str(tuple(r.spec)):26s} "
                   f"{str(r.device_shape):>16s} {r.bytes_per_device / 1024 ** 2:12.2f}")
    return out


# Usable memory per device (GiB) of common accelerators, for the "fits" line.
HARDWARE = {"TPU v5e (16 GiB)": 16, "TPU v4 (32 GiB)": 32, "TPU v5p (95 GiB)": 95, "A100/H100 (80 GiB)": 80,
            "H200 (141 GiB)": 141}


def format_plan(p: Plan, title: str, *, table: bool = True) -> str:
    """Human-readable plan: totals per device, then the per-parameter tables."""
    lines = [f"# {title}", f"mesh {p.mesh_shape} over {p.devices} device(s)", "", "per-device memory:"]
    for k, v in p.per_device.items():
        lines.append(f"  {k:58s} {_gib(v)}")
    train, dec = training_bytes(p), decoding_bytes(p)
    lines.append(f"  {'TRAINING total (params + optimizer + grads + logits)':58s} {_gib(train)}")
    lines.append(f"  {'DECODING total (params + KV caches)':58s} {_gib(dec)}")
    fits = lambda need: ", ".join(name for name, gib in HARDWARE.items() if need <= 0.9 * gib * GIB) or "none listed"
    lines.append(f"fits (<= 90% of device memory), training: {fits(train)}")
    lines.append(f"fits (<= 90% of device memory), decoding: {fits(dec)}")
    t_total = sum(r.bytes_total for r in p.target_rows)
    d_total = sum(r.bytes_total for r in p.drafter_rows)
    lines.append(f"target params: {sum(math.prod(r.shape) for r in p.target_rows):,} ({_gib(t_total).strip()} total); "
                 f"drafter params: {sum(math.prod(r.shape) for r in p.drafter_rows):,} ({_gib(d_total).strip()} total)")
    lines += [f"note: {n}" for n in p.notes]
    if table:
        lines += ["", "target parameters:"] + _table(p.target_rows) + ["", "drafter parameters:"] + _table(p.drafter_rows)
    return "\n".join(lines)


def to_json(p: Plan) -> dict:
    row = lambda r: {"name": r.name, "shape": list(r.shape), "dtype": r.dtype,
                     "spec": [None if a is None else a if isinstance(a, str) else list(a) for a in r.spec],
                     "device_shape": list(r.device_shape), "bytes_total": r.bytes_total,
                     "bytes_per_device": r.bytes_per_device, "shards": r.shards}
    return {"mesh": p.mesh_shape, "devices": p.devices, "per_device": p.per_device,
            "training_bytes": training_bytes(p), "decoding_bytes": decoding_bytes(p),
            "target": [row(r) for r in p.target_rows], "drafter": [row(r) for r in p.drafter_rows],
            "notes": p.notes}


def shard_check(rows: list[ParamRow]) -> None:
    """Per-device bytes times shards is the whole array for every row (a self-check of the plan)."""
    for r in rows:
        assert r.bytes_per_device * r.shards == r.bytes_total, r
