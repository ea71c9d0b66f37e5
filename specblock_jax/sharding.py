"""The single home of sharding: the device mesh, and the rules from logical axis names to mesh axes.

Models name their parameters' axes logically (`embed`, `heads`, ...; see `models/layers.py`); this
module alone decides how those names map onto the three mesh axes:

    data    pure data parallelism: the batch is split, parameters are replicated
    fsdp    the batch is split *and* parameters are split along `embed` (ZeRO-3 style: XLA gathers
            a weight where it is used and reduce-scatters its gradient)
    tensor  Megatron-style model parallelism over heads, MLP width and vocabulary

One `MeshConfig` serves one device, N simulated CPU devices, several processes and a TPU pod.
A training loop puts it together as:

    mesh = make_mesh(MeshConfig(data=-1, fsdp=2))
    param_sh = logical_to_sharding(target.param_axes(cfg), mesh, host_params)
    params = shard_params(host_params, param_sh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, param_sh))(params)
    state = {"params": params, "opt_state": opt_state}
    step = sharded_train_step(make_train_step(cfg, optimizer),
                              train_state_shardings(state, param_sh, optimizer), batch_sharding(mesh))
    state, loss = step(state, global_batch(this_process_rows, mesh))  # the old state is donated
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from specblock_jax.config import ConfigError

AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis, tuple of mesh axes, or None (replicated). Every logical name a
# model or drafter uses must appear here (a new name is added here, nowhere else); an unknown name is
# an error rather than silently replicated.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # leading axis of batches and activations
    "embed": "fsdp",  # hidden size
    "features": "fsdp",  # drafters' input of concatenated target-layer features [k * hidden]
    "heads": "tensor",  # num_heads * head_dim
    "kv_heads": "tensor",  # num_kv_heads * head_dim
    "mlp": "tensor",  # intermediate size
    "vocab": "tensor",  # embedding rows and LM-head columns (target or draft vocabulary)
    "norm": None,  # norm scales are tiny: replicated
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. -1 (on at most one axis) takes all the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dict(zip(AXES, (self.data, self.fsdp, self.tensor)))
        bad = {k: v for k, v in sizes.items() if v != -1 and v < 1}
        if bad:
            raise ConfigError(f"mesh axis sizes must be >= 1 or -1, got {bad}")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"at most one mesh axis may be -1 (all remaining devices), got {sizes}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for `num_devices` devices, with the -1 axis filled in."""
        sizes = (self.data, self.fsdp, self.tensor)
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes and num_devices % fixed == 0:
            sizes = tuple(num_devices // fixed if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"mesh {dict(zip(AXES, (self.data, self.fsdp, self.tensor)))} does not fit "
                              f"{num_devices} device(s): the axis sizes must multiply to the device count")
        return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    The axes are `Auto`: jit propagates shardings through the (unannotated) model from the inputs'
    and outputs' shardings, instead of jax 0.10's default of explicit sharding in types.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(cfg.shape(len(devices)), AXES, (AxisType.Auto,) * len(AXES), devices=devices)


def _as_tuple(axes: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_axes(logical: PartitionSpec, where: str = "") -> PartitionSpec:
    """Logical names -> mesh axes. A mesh axis is used once per array: a later dimension whose rule
    names an axis already taken stays replicated along it (as flax's rules do)."""
    used: set[str] = set()
    out = []
    for name in logical:
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"{where}: logical axis {name!r} has no rule in sharding.LOGICAL_AXIS_RULES "
                             f"(known: {sorted(LOGICAL_AXIS_RULES)})")
        axes = tuple(a for a in _as_tuple(LOGICAL_AXIS_RULES.get(name)) if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _check_divisible(where: str, shape: tuple[int, ...], logical: PartitionSpec, spec: PartitionSpec,
                     mesh: Mesh) -> None:
    """Refuse an uneven split up front, naming the parameter: jax's own error comes later and names
    neither the parameter nor its logical axis."""
    if len(logical) > len(shape):
        raise ValueError(f"{where}: {len(logical)} logical axes {tuple(logical)} for an array of shape {shape}")
    for dim, (size, name, axes) in enumerate(zip(shape, logical, spec)):
        ways = math.prod(mesh.shape[a] for a in _as_tuple(axes))
        if size % ways:
            raise ValueError(f"{where}: dimension {dim} of shape {shape} has size {size}, which logical axis "
                             f"{name!r} splits over mesh axes {_as_tuple(axes)} of total size {ways}; "
                             f"{size} is not divisible by {ways}")


def logical_to_sharding(axes_pytree: Any, mesh: Mesh, shapes: Any) -> Any:
    """Pytree of logical PartitionSpecs (e.g. `target.param_axes(cfg)`) -> pytree of NamedShardings.

    `shapes` is the matching pytree of arrays or `jax.ShapeDtypeStruct`s; it is needed to reject a
    dimension that does not split evenly (e.g. kv_heads 128 over tensor=3) before anything is placed.
    """
    def one(path, logical, x):
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        spec = mesh_axes(logical, where)
        _check_divisible(where, tuple(np.shape(x)), logical, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, axes_pytree, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [B, ...] batch arrays: rows split over data * fsdp, replicated over tensor."""
    return NamedSharding(mesh, mesh_axes(PartitionSpec("batch"), "batch"))


def _process_batch_shards(mesh: Mesh) -> int:
    """How many distinct batch slices this process's devices hold (all of them with one process)."""
    batch_dims = [mesh.axis_names.index(a) for a in _as_tuple(LOGICAL_AXIS_RULES["batch"])]
    return len({tuple(index[i] for i in batch_dims) for index, d in np.ndenumerate(mesh.devices)
                if d.process_index == jax.process_index()})


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays sharded by `batch_sharding`.

    Each process passes only its own slice (with one process, the whole batch); the global batch has
    the local rows times the number of batch shards over the shards this process holds.
    """
    sharding = batch_sharding(mesh)
    total = math.prod(mesh.shape[a] for a in _as_tuple(LOGICAL_AXIS_RULES["batch"]))
    local = _process_batch_shards(mesh)

    def one(key, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local:
            raise ValueError(f"batch[{key!r}] of shape {x.shape}: this process holds {local} of the {total} "
                             f"batch shards (mesh data * fsdp), so its rows must be a multiple of {local}")
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] // local * total, *x.shape[1:]))

    return {k: one(k, v) for k, v in local_batch.items()}


def _place(x, sharding: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_params(params: Any, shardings: Any) -> Any:
    """Host (numpy) parameters -> global arrays laid out by `shardings`.

    Each device receives only its own slice, so a model larger than one device never lands whole on
    device 0, and several processes holding the same host parameters build one global array.
    """
    return jax.tree.map(_place, params, shardings)


def _replicated_like(shardings: Any) -> NamedSharding:
    return NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any, param_shardings: Any) -> Any:
    """Optimizer-state shardings: every copy of the parameter tree (Adam's mu and nu, ...) follows the
    parameters' shardings; everything else (step counts) is replicated."""
    replicated = _replicated_like(param_shardings)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params),
                                 param_shardings, transform_non_params=lambda _: replicated)


def train_state_shardings(state: dict[str, Any], param_shardings: Any, optimizer: optax.GradientTransformation
                          ) -> dict[str, Any]:
    """Shardings of a {"params", "opt_state", ...} train state; other entries (timers) are replicated."""
    replicated = _replicated_like(param_shardings)
    out = {k: jax.tree.map(lambda _: replicated, v) for k, v in state.items()}
    out["params"] = param_shardings
    out["opt_state"] = opt_state_shardings(optimizer, state["params"], param_shardings)
    return out


def sharded_train_step(step_fn: Callable, state_shardings: Any, batch_sh: NamedSharding) -> Callable:
    """Jit `step_fn(state, batch) -> (state, loss)` over the mesh.

    Fixing the state's in and out shardings keeps parameters and optimizer state where they live from
    step to step (no resharding); donating the state lets XLA update it in place.
    """
    loss_sh = NamedSharding(batch_sh.mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, loss_sh),
                   donate_argnums=0)
