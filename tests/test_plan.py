"""The 8B recipes and the memory planner (`train.plan`, `specblock_jax.plan`).

Every recipe loads with the strict loader; the two 8B target configs read as the published models
(parameter counts 8,030,261,248 and 8,190,735,360). The planner runs in subprocesses on 8 simulated
CPU devices (XLA_FLAGS must be set before jax starts), all launched at once; its numbers must add up:
total bytes = parameter count x dtype size, per-device bytes x shards = total for every parameter,
optimizer = 3 float32 copies of the bf16 drafter's per-device share, and a mesh that does not fit
the devices is a clear error.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from specblock_jax import hf
from specblock_jax.config import load_yaml
from specblock_jax.models import eagle3
from train.train_drafter import DrafterTrainConfig, drafter_config

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("eagle3-*8b*.yaml"))
TARGETS = {"Llama-3.1-8B-Instruct": 8_030_261_248, "Qwen3-8B": 8_190_735_360}
SINGLE_HOST = {"eagle3-llama3.1-8b.yaml": "Llama-3.1-8B-Instruct", "eagle3-qwen3-8b.yaml": "Qwen3-8B"}
TIMEOUT_S = 300


def target_config(name: str, dtype: str = "bfloat16"):
    return hf.config_from_hf(json.loads((REPO / "configs" / "targets" / name / "config.json").read_text()), dtype)


def test_target_configs_are_the_published_models():
    for name, count in TARGETS.items():
        assert target_config(name).num_params == count
    llama, qwen = target_config("Llama-3.1-8B-Instruct"), target_config("Qwen3-8B")
    assert (llama.rope_theta, llama.rope_scaling.factor, llama.rope_scaling.original_max_position_embeddings) == (
        500000.0, 8.0, 8192)
    assert (llama.architecture, llama.num_layers, llama.tie_word_embeddings, llama.rms_norm_eps) == (
        "llama", 32, False, 1e-5)
    assert (qwen.architecture, qwen.qk_norm, qwen.num_layers, qwen.rope_theta, qwen.rope_scaling) == (
        "qwen3", True, 36, 1e6, None)
    assert (qwen.max_position_embeddings, qwen.rms_norm_eps, qwen.head_dim) == (40960, 1e-6, 128)


def test_every_recipe_loads_and_fits_its_target():
    assert len(RECIPES) >= 4, RECIPES
    for path in RECIPES:
        cfg = load_yaml(DrafterTrainConfig, path)
        name = pathlib.Path(cfg.target).name
        assert name in TARGETS, (path, cfg.target)
        drafter = drafter_config(cfg, target_config(name))  # seq_len and shapes checked against the target
        assert drafter.feature_layers == eagle3.default_feature_layers(target_config(name).num_layers)
        assert drafter.draft_vocab == 32000, path
        assert (drafter.ttt_steps, cfg.optim.learning_rate, cfg.seq_len) == (7, 5e-5, 1024), path
        decoding = cfg.decoding if isinstance(cfg.decoding, dict) else dataclasses.asdict(cfg.decoding)
        assert (decoding["budget"], decoding["max_depth"], decoding["topk"]) == (60, 7, 10), path
        shards = cfg.mesh.data * cfg.mesh.fsdp
        assert cfg.batch_size % shards == 0, path


def test_every_specblock_recipe_loads_and_fits_its_target():
    from train.train_drafter import drafting_method

    recipes = sorted((REPO / "configs").glob("specblock-*8b*.yaml"))
    assert len(recipes) >= 2, recipes
    for path in recipes:
        cfg = load_yaml(DrafterTrainConfig, path)
        drafter = drafter_config(cfg, target_config(pathlib.Path(cfg.target).name))
        assert (cfg.kind, drafter.num_layers, drafter.block_size, drafter.num_ttt_blocks, drafter.draft_vocab) == (
            "specblock", 2, 4, 3, 32000)
        method = drafting_method(cfg, drafter)
        assert (method.budget, method.max_blocks, tuple(method.widths)) == (90, 2, (2, 4, 6, 4)), path
        assert (cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.optim.decay, cfg.seq_len) == (
            5e-5, 500, "linear", 1024), path
        assert cfg.batch_size % (cfg.mesh.data * cfg.mesh.fsdp) == 0, path


def run_plan(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "train.plan", "--devices", "8", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Both 8B single-host recipes in bf16, one in f32, and a mesh that does not fit: all at once."""
    bad = tmp_path_factory.mktemp("plan") / "bad.yaml"
    bad.write_text((REPO / "configs" / "eagle3-llama3.1-8b.yaml").read_text()
                   .replace("  data: 1\n", "  data: 3\n"))
    procs = {name: run_plan("--config", REPO / "configs" / name, "--dtype", "bfloat16", "--json", "--batch", 8)
             for name in SINGLE_HOST}
    procs["f32"] = run_plan("--config", REPO / "configs" / "eagle3-qwen3-8b.yaml", "--dtype", "float32", "--json")
    procs["bad"] = run_plan("--config", bad)
    accum = bad.with_name("accum.yaml")
    accum.write_text((REPO / "configs" / "eagle3-llama3.1-8b.yaml").read_text() + "grad_accum: 3\n")
    procs["accum"] = run_plan("--config", accum, "--json")
    procs["specblock"] = run_plan("--config", REPO / "configs" / "specblock-qwen3-8b.yaml", "--json")  # its dtype
    out = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
            out[name] = (p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.parametrize("recipe", sorted(SINGLE_HOST))
def test_plan_numbers_add_up(plans, recipe):
    rc, stdout, stderr = plans[recipe]
    assert rc == 0, stderr[-3000:]
    plan = json.loads(stdout)
    assert plan["devices"] == 8 and plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    target = target_config(SINGLE_HOST[recipe])
    drafter = drafter_config(load_yaml(DrafterTrainConfig, REPO / "configs" / recipe), target)
    assert drafter.draft_vocab == 32000  # the published drafters' reduced vocabulary
    assert sum(r["bytes_total"] for r in plan["target"]) == TARGETS[SINGLE_HOST[recipe]] * 2  # bf16
    assert sum(r["bytes_total"] for r in plan["drafter"]) == drafter.num_params * 2
    for row in plan["target"] + plan["drafter"]:
        assert row["bytes_per_device"] * row["shards"] == row["bytes_total"], row
        assert row["shards"] == (8 if "fsdp" in json.dumps(row["spec"]) else 1), row
        assert row["dtype"] == "bfloat16"
    embed = next(r for r in plan["target"] if r["name"] == "embed_tokens/embedding")
    assert embed["shape"] == [target.vocab_size, 4096] and embed["device_shape"] == [target.vocab_size, 512]
    per_device = plan["per_device"]
    assert per_device["target params"] == sum(r["bytes_per_device"] for r in plan["target"])
    drafter_dev = sum(r["bytes_per_device"] for r in plan["drafter"])
    assert per_device["drafter params"] == drafter_dev
    assert per_device["drafter AdamW mu+nu (f32) + f32 master"] == drafter_dev // 2 * 4 * 3
    # Decoding KV cache: [L, 2, B=8, S=4096, KV=8, D=128] bf16, batch split 8 ways (data * fsdp).
    kv_key = next(k for k in per_device if k.startswith("target KV cache"))
    assert per_device[kv_key] == target.num_layers * 2 * 8 * 4096 * 8 * 128 * 2 // 8
    # Training logits: batch 24 over 8 shards = 3 rows of 1024, the full vocabulary (tensor = 1), f32.
    assert per_device["target logits [B,T,V] f32 (training)"] == 3 * 1024 * target.vocab_size * 4
    assert plan["training_bytes"] == sum(v for k, v in per_device.items() if "KV cache" not in k)


def test_plan_with_gradient_accumulation_counts_a_micro_batch(plans):
    """batch 24 in 3 micro-batches over 8 shards: 1 row of logits per device, plus the summed gradients."""
    (rc, stdout, stderr), (_, whole, _) = plans["accum"], plans["eagle3-llama3.1-8b.yaml"]
    assert rc == 0, stderr[-3000:]
    per_device, reference = json.loads(stdout)["per_device"], json.loads(whole)["per_device"]
    vocab = target_config("Llama-3.1-8B-Instruct").vocab_size
    assert per_device["target logits [B,T,V] f32 (training)"] == 1 * 1024 * vocab * 4
    assert reference["target logits [B,T,V] f32 (training)"] == 3 * 1024 * vocab * 4
    assert per_device["drafter gradient accumulator (f32)"] == per_device["drafter params"] // 2 * 4  # bf16 params


def test_plan_in_float32_doubles_the_parameters(plans):
    rc, stdout, stderr = plans["f32"]
    assert rc == 0, stderr[-3000:]
    plan = json.loads(stdout)
    assert sum(r["bytes_total"] for r in plan["target"]) == TARGETS["Qwen3-8B"] * 4
    assert "drafter AdamW mu+nu (f32)" in plan["per_device"]  # no master copy for f32 params
    assert all(r["dtype"] == "float32" for r in plan["target"])


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error(plans):
    rc, stdout, stderr = plans["bad"]
    assert rc == 2 and not stdout
    assert "does not fit 8 device(s)" in stderr and "'data': 3" in stderr, stderr[-2000:]


def test_plan_of_a_specblock_recipe(plans):
    from specblock_jax.models import specblock

    rc, stdout, stderr = plans["specblock"]
    assert rc == 0, stderr[-3000:]
    plan = json.loads(stdout)
    cfg = load_yaml(DrafterTrainConfig, REPO / "configs" / "specblock-qwen3-8b.yaml")
    drafter = drafter_config(cfg, target_config("Qwen3-8B"))
    assert isinstance(drafter, specblock.SpecBlockConfig)
    assert cfg.dtype == "bfloat16" and {r["dtype"] for r in plan["target"]} == {"bfloat16"}  # the recipe's dtype
    elements = sum(r["bytes_total"] // (2 if r["dtype"] == "bfloat16" else 4) for r in plan["drafter"])
    assert elements == drafter.num_params
    for row in plan["drafter"]:
        assert row["bytes_per_device"] * row["shards"] == row["bytes_total"], row
    assert any(k.startswith("drafter block logits [3 blocks x K=4") for k in plan["per_device"])
