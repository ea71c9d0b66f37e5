"""Target training at micro scale: learning, exact resume after a kill, export, and bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from specblock_jax import data, hf
from specblock_jax.checkpoint import CheckpointError
from specblock_jax.config import ConfigError, load_yaml
from train import train_target
from train.train_target import TargetTrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = '''def add(a, b):
    """Add two numbers {i}."""
    return a + b


class Counter{i}:
    def __init__(self):
        self.count = {i}

    def step(self):
        self.count += 1
        return self.count
'''
PROSE = "To be, or not to be, that is the question {i}.\nWhether 'tis nobler in the mind to suffer.\n"


def tiny_config(tmp_path, **overrides) -> dict:
    code, prose = tmp_path / "code", tmp_path / "prose"
    code.mkdir(exist_ok=True)
    prose.mkdir(exist_ok=True)
    for i in range(24):
        (code / f"mod{i}.py").write_text(CODE.format(i=i) * 3)
        (prose / f"play{i}_gut.txt").write_text(PROSE.format(i=i) * 12)
    cfg = {
        "model": {"vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "head_dim": 8, "intermediate_size": 64, "max_position_embeddings": 64,
                  "bos_token_id": 0, "eos_token_ids": [0]},
        "optim": {"learning_rate": 1e-2, "total_steps": 12, "warmup_steps": 2},
        "seq_len": 32, "batch_size": 4, "checkpoint_every": 5, "eval_every": 6, "eval_max_batches": 2,
        "code_dir": str(code), "prose_dir": str(prose),
        "output_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "hf"),
    }
    cfg.update(overrides)
    return cfg


def write_config(tmp_path, cfg: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_log(cfg: TargetTrainConfig) -> list[dict]:
    with open(os.path.join(cfg.output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_params_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module", autouse=True)
def few_prompts():
    """The tiny test split holds too few lines for the real number of held-out prompts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_target, "PROMPTS_PER_DOMAIN", 3)
        mp.setattr(train_target, "PROMPT_CHARS", 60)
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    cfg = load_yaml(TargetTrainConfig, write_config(tmp, tiny_config(tmp)))
    state = train_target.train(cfg, progress=False)
    return cfg, state


def test_training_lowers_validation_loss(trained):
    cfg, _ = trained
    log = read_log(cfg)
    assert [r["step"] for r in log] == [10, 12]
    chance = np.log(cfg.model.vocab_size)  # what a freshly initialised model scores
    for domain in ("code", "prose"):
        assert log[-1][f"val_loss_{domain}"] < 0.75 * chance, log[-1]


def test_resume_after_interruption_matches_uninterrupted(trained, tmp_path):
    cfg_full, state_full = trained
    cfg = load_yaml(TargetTrainConfig, write_config(tmp_path, tiny_config(tmp_path)))
    train_target.train(cfg, stop_after=7, export=False, progress=False)
    state = train_target.train(cfg, progress=False)
    assert_params_equal(state_full["params"], state["params"])
    assert [r["step"] for r in read_log(cfg)][-1] == 12


def test_sigkill_then_rerun_matches_uninterrupted(trained, tmp_path):
    """A real kill -9 mid-run; the same command afterwards continues from the newest complete checkpoint."""
    _, state_full = trained
    raw = tiny_config(tmp_path, optim={"learning_rate": 1e-2, "total_steps": 12, "warmup_steps": 2},
                      checkpoint_every=2)
    path = write_config(tmp_path, raw)
    cfg = load_yaml(TargetTrainConfig, path)
    # Make steps slow enough to kill mid-run by running the real CLI in a subprocess.
    cmd = [sys.executable, "-m", "train.train_target", "--config", str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(ckpt_dir, "4")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Mixed checkpoints differ from the uninterrupted run only in checkpoint_every, which does not change math.
    state = train_target.train(cfg, progress=False)
    assert_params_equal(state_full["params"], state["params"])


def test_export_loads_in_transformers_with_matching_logits(trained):
    torch = pytest.importorskip("torch")
    import transformers

    cfg, state = trained
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.export_dir)
    tok = transformers.AutoTokenizer.from_pretrained(cfg.export_dir)
    ids = tok("def add(a, b):\n    return a", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    target = hf.load_target(cfg.export_dir)
    ours = np.asarray(target.logits([ids]))
    assert np.abs(ours - ref).max() < 1e-4
    summary = json.loads(open(os.path.join(cfg.export_dir, "training.json")).read())
    assert set(summary["domains"]) == {"code", "prose"}
    for domain in summary["domains"].values():
        assert domain["test"]["bits_per_byte"] > 0 and domain["validation"]["documents"] >= 1


def test_export_ships_held_out_prompts_from_the_test_split(trained):
    cfg, _ = trained
    splits = train_target.corpus_splits(cfg)
    for domain in ("code", "prose"):
        path = os.path.join(cfg.export_dir, "prompts", f"{domain}.jsonl")
        assert len(data.read_prompts_jsonl(path)) == 3
        test_docs = {d.name: d.text for d in splits[domain]["test"]}
        for row in map(json.loads, open(path)):
            assert row["domain"] == domain and row["prompt"] in test_docs[row["source"]]


def test_unknown_key_and_wrong_type_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*learning_rat"):
        load_yaml(TargetTrainConfig, write_config(tmp_path, tiny_config(
            tmp_path, optim={"learning_rat": 1e-3, "total_steps": 10})))
    with pytest.raises(ConfigError, match="batch_size: expected int"):
        load_yaml(TargetTrainConfig, write_config(tmp_path, tiny_config(tmp_path, batch_size="8")))


def test_missing_and_empty_corpus_are_errors(tmp_path):
    cfg = load_yaml(TargetTrainConfig, write_config(tmp_path, tiny_config(tmp_path)))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_target.train(dataclasses.replace(cfg, code_dir=str(tmp_path / "nowhere")), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .*documents|empty"):
        train_target.train(dataclasses.replace(cfg, prose_dir=str(tmp_path / "empty")), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    cfg = load_yaml(TargetTrainConfig, write_config(tmp_path, tiny_config(tmp_path)))
    train_target.train(cfg, stop_after=5, export=False, progress=False)
    step_dir = os.path.join(cfg.output_dir, "checkpoints", "5")
    for root, _, files in os.walk(step_dir):
        for name in files:
            if name != "_CHECKPOINT_METADATA":
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore checkpoint step 5"):
        train_target.train(cfg, progress=False)


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = load_yaml(TargetTrainConfig, write_config(tmp_path, tiny_config(tmp_path)))
    train_target.train(cfg, stop_after=5, export=False, progress=False)
    with pytest.raises(CheckpointError, match="different config"):
        train_target.train(dataclasses.replace(cfg, seed=1), progress=False)


def test_a_config_field_added_after_a_run_started_does_not_block_its_resume(tmp_path):
    """A key the stored fingerprint lacks matches while the resume leaves it at its default; any
    other difference is refused."""
    from specblock_jax.checkpoint import Checkpointer
    from specblock_jax.config import field_defaults
    from train.train_drafter import DrafterTrainConfig

    Checkpointer(tmp_path, every=1, fingerprint={"lr": 1, "opt": {"b1": 0.9}}).close()  # the run's first start
    defaults = {"added": 1, "opt": {"eps": None}}
    Checkpointer(tmp_path, every=1, fingerprint={"lr": 1, "opt": {"b1": 0.9, "eps": None}, "added": 1},
                 defaults=defaults).close()
    for changed in ({"lr": 1, "opt": {"b1": 0.9}, "added": 2}, {"lr": 1, "opt": {"b1": 0.9, "eps": 1e-8}},
                    {"lr": 1, "opt": {"b1": 0.9}, "unknown": 0}, {"lr": 2, "opt": {"b1": 0.9}}):
        with pytest.raises(CheckpointError, match="different config"):
            Checkpointer(tmp_path, every=1, fingerprint=changed, defaults=defaults)
    drafter = field_defaults(DrafterTrainConfig)
    assert drafter["grad_accum"] == 1 and drafter["domains"] is None and drafter["decoding"] == {}
    assert drafter["eagle3"]["draft_vocab_size"] is None and "optim" not in drafter  # required: no default
