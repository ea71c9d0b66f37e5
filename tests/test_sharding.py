"""Sharding: mesh config, logical-axis rules, and sharded train steps (the target's, and the EAGLE-3
drafter's with the frozen target inside) that match the single-device ones on 8 simulated devices
(4 mesh shapes) and across two `jax.distributed` processes.

Multi-device runs happen in subprocesses (tests/_distributed_worker.py): XLA_FLAGS must be set before
jax starts, and this process keeps its single device for the other tests. Both kinds are launched together
when first needed and collected by the tests, so their compiles overlap.

Tolerance: sharded and single-device steps agree to float32 rounding, not bitwise, because splitting
a matmul or a loss sum over devices changes the order of its reductions (partial sums, then an
all-reduce). Losses agree to LOSS_RTOL. Params are compared to PARAM_ATOL = 1e-2 * learning rate, not
1e-6: Adam divides each gradient by its own RMS (eps 1e-8), so an element whose gradient is about eps
(seen: 2.6e-8 and 3.6e-9, against a median of 4e-4) turns a last-bit difference in that gradient into
a visible fraction of one step's update (seen: up to 3e-3 * lr, on 1 or 2 of 22k elements).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from specblock_jax import sharding
from specblock_jax.config import ConfigError, ModelConfig, from_dict, to_dict
from specblock_jax.models import eagle3, target
from specblock_jax.optim import OptimConfig, make_optimizer
from train import train_drafter
from train.train_target import make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_distributed_worker.py"
TIMEOUT_S = 420  # a hung collective fails the test instead of hanging CI
MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=64)
OPTIM = OptimConfig(learning_rate=1e-3, total_steps=10, warmup_steps=0, weight_decay=0.1)
STEPS, BATCH, SEQ = 2, 8, 16
LOSS_RTOL = 1e-5
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-2 * OPTIM.learning_rate
MESH_NAMES = ("data8", "data2_fsdp2_tensor2", "data1_fsdp4_tensor2", "fsdp8")
DRAFT_TARGET = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                           intermediate_size=64)  # EAGLE-3 reads 3 distinct layers
DRAFTER = eagle3.Eagle3Config.for_target(DRAFT_TARGET, ttt_steps=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(devices: int, *args) -> subprocess.Popen:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(procs: list[subprocess.Popen]) -> list[dict]:
    """Each worker's JSON line; on a timeout or failure, kill them all and fail with their stderr."""
    outs, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{err[-4000:]}"
            outs.append(json.loads(out.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker hung for more than {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def load_result(path: pathlib.Path):
    arrays = np.load(path)
    params = {k[len("params/"):]: arrays[k] for k in arrays.files if k.startswith("params/")}
    return arrays["losses"], params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Inputs shared by every run: initial params and STEPS batches, written before any worker starts."""
    path = tmp_path_factory.mktemp("sharding")
    params = jax.tree.map(np.asarray, target.init_params(MODEL, jax.random.key(0)))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, MODEL.vocab_size, (STEPS, BATCH, SEQ + 1)).astype(np.int32)
    mask = (rng.random((STEPS, BATCH, SEQ)) < 0.9).astype(np.float32)
    batches = {"input_ids": ids[..., :-1], "target_ids": ids[..., 1:], "loss_mask": mask}
    flat = traverse_util.flatten_dict(params, sep="/")
    np.savez(path / "inputs.npz", **{f"params/{k}": v for k, v in flat.items()},
             **{f"batch/{k}": v for k, v in batches.items()})
    (path / "config.json").write_text(json.dumps({"model": to_dict(MODEL), "optim": to_dict(OPTIM),
                                                  "draft_target": to_dict(DRAFT_TARGET), "drafter": to_dict(DRAFTER)}))
    target_params = jax.tree.map(np.asarray, target.init_params(DRAFT_TARGET, jax.random.key(1)))
    drafter_params = jax.tree.map(np.asarray, eagle3.init_params(DRAFTER, jax.random.key(2)))
    tokens = rng.integers(0, DRAFT_TARGET.vocab_size, (STEPS, BATCH, SEQ)).astype(np.int32)
    drafter_batches = {"tokens": tokens, "loss_mask": mask}
    flat = lambda prefix, tree: {f"{prefix}/{k}": v for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
    np.savez(path / "drafter_inputs.npz", **flat("target", target_params), **flat("drafter", drafter_params),
             **flat("batch", drafter_batches))
    return path, params, batches


@pytest.fixture(scope="module")
def workers(workdir):
    """Start the 8-device run and the two-process run at once; collect them on first use."""
    path = workdir[0]
    port = free_port()
    procs = {"meshes": [spawn(8, "meshes", path)],
             "distributed": [spawn(2, "process", path, port, i, 2) for i in range(2)]}
    results = {}

    def get(kind):
        if kind not in results:
            results[kind] = None  # a failure is reported in full by the first test that collects
            results[kind] = collect(procs[kind])
        if results[kind] is None:
            pytest.fail(f"the {kind} worker failed; see the first test that used it")
        return results[kind]

    yield get
    for p in (p for ps in procs.values() for p in ps if p.poll() is None):
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def reference(workdir):
    """The plain single-device step of train_target: losses and final params, flattened."""
    _, params, batches = workdir
    optimizer = make_optimizer(OPTIM)
    step = make_train_step(MODEL, optimizer)
    state = {"params": params, "opt_state": optimizer.init(params)}
    losses = []
    for i in range(STEPS):
        state, loss = step(state, {k: v[i] for k, v in batches.items()})
        losses.append(float(loss))
    return np.array(losses), traverse_util.flatten_dict(jax.tree.map(np.asarray, state["params"]), sep="/")


def drafter_single_device(workdir, grad_accum: int = 1):
    """train_drafter's step, jitted on one device without shardings: losses and final drafter params."""
    arrays = np.load(workdir[0] / "drafter_inputs.npz")
    tree = lambda prefix: traverse_util.unflatten_dict({k[len(prefix):]: arrays[k] for k in arrays.files
                                                        if k.startswith(prefix)}, sep="/")
    optimizer = make_optimizer(OPTIM)
    step = jax.jit(train_drafter.make_train_step(DRAFT_TARGET, DRAFTER, optimizer, grad_accum=grad_accum))
    params, target_params, batches = tree("drafter/"), tree("target/"), tree("batch/")
    state = {"params": params, "opt_state": optimizer.init(params)}
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, target_params, {k: v[i] for k, v in batches.items()}, np.int32(i))
        losses.append(float(metrics.loss))
    return np.array(losses), traverse_util.flatten_dict(jax.tree.map(np.asarray, state["params"]), sep="/")


@pytest.fixture(scope="module")
def drafter_reference(workdir):
    return drafter_single_device(workdir)


def max_differences(result, reference) -> dict:
    """Largest |result - reference| of the losses and of the params, asserted within tolerance."""
    (losses, params), (ref_losses, ref_params) = result, reference
    assert params.keys() == ref_params.keys()
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    for k in params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=k)
    return {"loss": float(np.max(np.abs(losses - ref_losses))),
            "params": max(float(np.max(np.abs(params[k] - ref_params[k]))) for k in params),
            "params_over_1e-6": sum(int(np.sum(np.abs(params[k] - ref_params[k]) > 1e-6)) for k in params)}


def test_mesh_config_resolves_minus_one_and_rejects_bad_sizes():
    assert sharding.MeshConfig().shape(8) == (8, 1, 1)
    assert sharding.MeshConfig(fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert sharding.MeshConfig(data=1, fsdp=-1).shape(4) == (1, 4, 1)
    assert from_dict(sharding.MeshConfig, {"data": 2, "fsdp": 4}) == sharding.MeshConfig(2, 4, 1)
    with pytest.raises(ConfigError, match=r"'data': 2, 'fsdp': 2, 'tensor': 2.*4 device"):
        sharding.MeshConfig(data=2, fsdp=2, tensor=2).shape(4)
    with pytest.raises(ConfigError, match=r"'fsdp': 3.*8 device"):
        sharding.MeshConfig(fsdp=3).shape(8)
    with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
        sharding.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match=r"'tensor': 0"):
        sharding.MeshConfig(tensor=0)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(sharding.MeshConfig, {"model": 2})


def test_logical_rules_map_names_to_mesh_axes():
    assert sharding.mesh_axes(PartitionSpec("embed", "heads")) == PartitionSpec("fsdp", "tensor")
    assert sharding.mesh_axes(PartitionSpec("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
    assert sharding.mesh_axes(PartitionSpec("norm")) == PartitionSpec(None)
    assert sharding.mesh_axes(PartitionSpec("batch", None)) == PartitionSpec(("data", "fsdp"), None)
    # a mesh axis is used once per array: the second dimension asking for fsdp stays replicated
    assert sharding.mesh_axes(PartitionSpec("features", "embed")) == PartitionSpec("fsdp", None)
    with pytest.raises(ValueError, match=r"fc/kernel: logical axis 'bogus' has no rule"):
        sharding.mesh_axes(PartitionSpec("embed", "bogus"), "fc/kernel")


def test_single_device_mesh_places_params_and_batch(workdir):
    _, params, batches = workdir
    mesh = sharding.make_mesh(sharding.MeshConfig())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    shardings = sharding.logical_to_sharding(target.param_axes(MODEL), mesh, params)
    q_sh = shardings["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q_sh.spec == PartitionSpec("fsdp", "tensor")
    placed = sharding.shard_params(params, shardings)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), placed, params))
    batch = sharding.global_batch({k: v[0] for k, v in batches.items()}, mesh)
    assert batch["input_ids"].shape == (BATCH, SEQ)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), batches["input_ids"][0])


def test_sharded_step_matches_single_device_on_every_mesh_shape(workers, workdir, reference):
    (report,) = workers("meshes")
    assert report["devices"] == 8
    diffs = {name: max_differences(load_result(workdir[0] / f"{name}.npz"), reference) for name in MESH_NAMES}
    print("max |sharded - single device|:", json.dumps(diffs))
    expected = {  # q_proj kernel [hidden 32, heads 32]: spec and per-device shard
        "data8": (["fsdp", "tensor"], [32, 32]),
        "data2_fsdp2_tensor2": (["fsdp", "tensor"], [16, 16]),
        "data1_fsdp4_tensor2": (["fsdp", "tensor"], [8, 16]),
        "fsdp8": (["fsdp", "tensor"], [4, 32]),
    }
    for name, (spec, shard_shape) in expected.items():
        r = report[name]
        assert (r["q_spec"], r["q_shard_shape"], r["q_shards"]) == (spec, shard_shape, 8), name
        assert r["mu_spec_equals_q"] and r["count_spec"] == [] and r["rows_ok"], name


def test_sharded_drafter_step_matches_single_device_on_every_mesh_shape(workers, workdir, drafter_reference):
    workers("meshes")
    diffs = {name: max_differences(load_result(workdir[0] / f"drafter_{name}.npz"), drafter_reference)
             for name in MESH_NAMES}
    print("drafter: max |sharded - single device|:", json.dumps(diffs))


def test_sharded_gradient_accumulation_matches_single_device(workers, workdir):
    """grad_accum 2 on a (2, 2, 2) mesh (micro-batches of 4 rows over 4 batch shards) = on one device."""
    workers("meshes")
    diffs = max_differences(load_result(workdir[0] / "drafter_accum2.npz"), drafter_single_device(workdir, 2))
    print("drafter, grad_accum 2: max |sharded - single device|:", json.dumps(diffs))


def test_misuse_errors_name_the_parameter_and_sizes(workers):
    errors = workers("meshes")[0]["errors"]
    param = errors["indivisible_param"]
    for part in ("layers_0/self_attn/k_proj/kernel", "size 128", "'kv_heads'", "('tensor',)", "size 3"):
        assert part in param, (part, param)
    assert "(12, 4)" in errors["indivisible_batch"] and "multiple of 8" in errors["indivisible_batch"]
    assert "'tensor': 4" in errors["mesh_too_big"] and "8 device" in errors["mesh_too_big"]
    assert errors["drafter_batch"] == "batch_size 12 does not split over the mesh's data * fsdp = 8 batch shards"
    assert errors["drafter_micro_batch"] == ("batch_size 16 (a micro-batch of grad_accum 4: 4 rows) does not split "
                                             "over the mesh's data * fsdp = 8 batch shards")


def test_two_processes_match_one_process(workers, workdir, reference):
    reports = workers("distributed")
    for i, r in enumerate(reports):
        assert (r["process_count"], r["devices"], r["local_devices"]) == (2, 4, 2), i
        assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and r["rows_ok"], i
        assert (r["q_spec"], r["q_shard_shape"], r["q_shards"]) == (["fsdp", "tensor"], [16, 32], 2), i
    diffs = max_differences(load_result(workdir[0] / "distributed.npz"), reference)
    print("max |2 processes - single device|:", json.dumps(diffs))


def test_two_processes_match_one_process_for_the_drafter_step(workers, workdir, drafter_reference):
    workers("distributed")
    diffs = max_differences(load_result(workdir[0] / "drafter_distributed.npz"), drafter_reference)
    print("drafter: max |2 processes - single device|:", json.dumps(diffs))
