"""Subprocess half of tests/test_sharding.py: the sharded train steps (target, and EAGLE-3 drafter with
the frozen target inside) where jax sees several devices.

    python _distributed_worker.py meshes WORKDIR                 # 8 simulated devices, every mesh shape
    python _distributed_worker.py process WORKDIR PORT ID COUNT  # one of COUNT jax.distributed processes

The caller sets XLA_FLAGS (the device count), which must happen before jax starts. Inputs come from
WORKDIR/config.json and WORKDIR/inputs.npz (written by the test); each run writes its losses and
final (gathered) params to WORKDIR/<name>.npz and WORKDIR/drafter_<name>.npz and prints one JSON line of facts about the layout.
"""

import json
import pathlib
import sys

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from specblock_jax import sharding
from specblock_jax.config import ModelConfig, from_dict
from specblock_jax.models import eagle3, target
from specblock_jax.optim import OptimConfig, make_optimizer
from train import train_drafter
from train.train_target import make_train_step

MESHES = {  # name -> MeshConfig, for 8 devices
    "data8": sharding.MeshConfig(data=8),
    "data2_fsdp2_tensor2": sharding.MeshConfig(data=2, fsdp=2, tensor=2),
    "data1_fsdp4_tensor2": sharding.MeshConfig(data=1, fsdp=4, tensor=2),
    "fsdp8": sharding.MeshConfig(data=1, fsdp=8),
}


def load_inputs(workdir: pathlib.Path):
    cfg = json.loads((workdir / "config.json").read_text())
    arrays = dict(np.load(workdir / "inputs.npz"))
    params = traverse_util.unflatten_dict({k[len("params/"):]: v for k, v in arrays.items()
                                           if k.startswith("params/")}, sep="/")
    batches = {k[len("batch/"):]: v for k, v in arrays.items() if k.startswith("batch/")}  # [steps, B, T]
    return from_dict(ModelConfig, cfg["model"]), from_dict(OptimConfig, cfg["optim"]), params, batches


def load_drafter_inputs(workdir: pathlib.Path):
    """(frozen target config, its params, drafter config, initial drafter params, batches [steps, B, T])."""
    cfg = json.loads((workdir / "config.json").read_text())
    arrays = dict(np.load(workdir / "drafter_inputs.npz"))
    tree = lambda prefix: traverse_util.unflatten_dict({k[len(prefix):]: v for k, v in arrays.items()
                                                        if k.startswith(prefix)}, sep="/")
    return (from_dict(ModelConfig, cfg["draft_target"]), tree("target/"),
            from_dict(eagle3.Eagle3Config, cfg["drafter"]), tree("drafter/"), tree("batch/"))


def train_drafter_sharded(mesh, workdir: pathlib.Path, optimizer, rows: slice, grad_accum: int = 1):
    """train_drafter's jitted step on `mesh`: the target's params laid out once, the drafter's state sharded."""
    target_cfg, target_params, config, params, batches = load_drafter_inputs(workdir)
    target_sh = sharding.logical_to_sharding(target.param_axes(target_cfg), mesh, target_params)
    target_params = sharding.shard_params(target_params, target_sh)
    state, state_sh = train_drafter.init_state(params, config, optimizer, mesh)
    step, _ = train_drafter.jit_steps(target_cfg, config, optimizer, state_sh, target_sh,
                                      sharding.batch_sharding(mesh), grad_accum=grad_accum)
    losses = []
    for i in range(len(batches["tokens"])):
        batch = sharding.global_batch({k: v[i, rows] for k, v in batches.items()}, mesh)
        state, metrics = step(state, target_params, batch, np.int32(i))
        losses.append(metrics.loss)
    return state, losses


def train_sharded(mesh, model_cfg, optimizer, params, batches, rows: slice):
    """Run every step in `batches` on `mesh`, this process feeding `rows` of each global batch."""
    param_sh = sharding.logical_to_sharding(target.param_axes(model_cfg), mesh, params)
    params = sharding.shard_params(params, param_sh)
    opt_state = jax.jit(optimizer.init,
                        out_shardings=sharding.opt_state_shardings(optimizer, params, param_sh))(params)
    state = {"params": params, "opt_state": opt_state}
    step = sharding.sharded_train_step(make_train_step(model_cfg, optimizer),
                                       sharding.train_state_shardings(state, param_sh, optimizer),
                                       sharding.batch_sharding(mesh))
    losses, rows_ok = [], True
    for i in range(len(batches["input_ids"])):
        batch = sharding.global_batch({k: v[i, rows] for k, v in batches.items()}, mesh)
        rows_ok &= all(np.array_equal(np.asarray(s.data), batches["input_ids"][i][s.index])
                       for s in batch["input_ids"].addressable_shards)
        state, loss = step(state, batch)
        losses.append(loss)
    return state, losses, rows_ok


def layout(state) -> dict:
    """Where the q_proj kernel and its Adam moment live: spec, shard count, shard shape."""
    q = state["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    mu = state["opt_state"][1][0].mu["layers_0"]["self_attn"]["q_proj"]["kernel"]
    return {"q_spec": [a if a is None or isinstance(a, str) else list(a) for a in q.sharding.spec],
            "q_shards": len(q.addressable_shards), "q_shard_shape": list(q.addressable_shards[0].data.shape),
            "mu_spec_equals_q": mu.sharding.spec == q.sharding.spec,
            "count_spec": list(state["opt_state"][1][0].count.sharding.spec)}


def save(workdir: pathlib.Path, name: str, state, losses) -> None:
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    losses = [float(x.addressable_data(0)) for x in losses]  # replicated: every device has it
    if jax.process_index() == 0:
        flat = traverse_util.flatten_dict(params, sep="/")
        np.savez(workdir / f"{name}.npz", losses=np.array(losses), **{f"params/{k}": v for k, v in flat.items()})


def error_of(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def misuse_errors(model_cfg) -> dict:
    """Messages for a dimension that does not split (kv_heads 128 over tensor=3) and a batch that does not."""
    wide = ModelConfig(vocab_size=96, hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64,
                       intermediate_size=96)
    shapes = jax.eval_shape(lambda: target.init_params(wide, jax.random.key(0)))
    mesh6 = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=3), jax.devices()[:6])
    mesh8 = sharding.make_mesh(sharding.MeshConfig(data=8))
    return {
        "indivisible_param": error_of(lambda: sharding.logical_to_sharding(target.param_axes(wide), mesh6, shapes)),
        "indivisible_batch": error_of(lambda: sharding.global_batch({"input_ids": np.zeros((12, 4), np.int32)},
                                                                    mesh8)),
        "mesh_too_big": error_of(lambda: sharding.make_mesh(sharding.MeshConfig(data=4, tensor=4))),
        "drafter_batch": error_of(lambda: train_drafter.check_batch_split(train_drafter.DrafterTrainConfig(
            OptimConfig(learning_rate=1e-3, total_steps=2, warmup_steps=0), batch_size=12),
            sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4)))),
        "drafter_micro_batch": error_of(lambda: train_drafter.check_batch_split(train_drafter.DrafterTrainConfig(
            OptimConfig(learning_rate=1e-3, total_steps=2, warmup_steps=0), batch_size=16, grad_accum=4),
            sharding.make_mesh(sharding.MeshConfig(data=8)))),
    }


def run_meshes(workdir: pathlib.Path) -> dict:
    model_cfg, optim_cfg, params, batches = load_inputs(workdir)
    optimizer = make_optimizer(optim_cfg)
    report = {"devices": jax.device_count()}
    for name, cfg in MESHES.items():
        state, losses, rows_ok = train_sharded(sharding.make_mesh(cfg), model_cfg, optimizer, params, batches,
                                               slice(None))
        save(workdir, name, state, losses)
        report[name] = {**layout(state), "rows_ok": rows_ok}
        save(workdir, f"drafter_{name}", *train_drafter_sharded(sharding.make_mesh(cfg), workdir, optimizer,
                                                                slice(None)))
    save(workdir, "drafter_accum2", *train_drafter_sharded(sharding.make_mesh(MESHES["data2_fsdp2_tensor2"]), workdir,
                                                           optimizer, slice(None), grad_accum=2))
    report["errors"] = misuse_errors(model_cfg)
    return report


def run_process(workdir: pathlib.Path, port: int, process_id: int, count: int) -> dict:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                               process_id=process_id)
    model_cfg, optim_cfg, params, batches = load_inputs(workdir)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1))
    rows_per_process = batches["input_ids"].shape[1] // count
    rows = slice(process_id * rows_per_process, (process_id + 1) * rows_per_process)
    state, losses, rows_ok = train_sharded(mesh, model_cfg, make_optimizer(optim_cfg), params, batches, rows)
    save(workdir, "distributed", state, losses)
    save(workdir, "drafter_distributed", *train_drafter_sharded(mesh, workdir, make_optimizer(optim_cfg), rows))
    report = {"process_count": jax.process_count(), "devices": jax.device_count(),
              "local_devices": jax.local_device_count(), "mesh": dict(mesh.shape), "rows_ok": rows_ok,
              **layout(state)}
    jax.distributed.shutdown()
    return report


if __name__ == "__main__":
    mode, workdir = sys.argv[1], pathlib.Path(sys.argv[2])
    if mode == "meshes":
        result = run_meshes(workdir)
    else:
        result = run_process(workdir, *map(int, sys.argv[3:6]))
    print(json.dumps(result))
