"""Drafter training at micro scale: the EAGLE-3 TTT loss falls, a killed run resumes exactly, the
exported drafter directory decodes losslessly through `load_drafter`, bad inputs are clear errors; a
SpecBlock run trains through the same loop, resumes exactly and exports a lossless drafter."""

import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from specblock_jax import decode, hf
from specblock_jax.config import ConfigError, ModelConfig, load_yaml
from specblock_jax.decode import PAD_ID
from specblock_jax.drafter import load_drafter
from specblock_jax.models import target as target_lib
from train import bench_step, feature_cache, learning_curves, train_drafter, vocab_coverage
from train.train_drafter import DrafterTrainConfig

TARGET = ModelConfig(vocab_size=48, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
PROMPT, NEW, ROWS = 6, 18, 24


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A target with weights x10 (so its greedy output is far from uniform), exported as HF, and its
    regenerated continuations of random prompts as one npz part, some rows cut short by PAD_ID."""
    root = tmp_path_factory.mktemp("drafter")
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, target_lib.init_params(TARGET, jax.random.key(1)))
    hf.export_hf(TARGET, jax.device_get(params), root / "target")
    target = hf.load_target(root / "target")
    prompts = np.random.default_rng(0).integers(0, TARGET.vocab_size, (ROWS, PROMPT))
    out = decode.generate(target, prompts.tolist(), max_new_tokens=NEW, stop_on_eos=False)
    tokens = np.concatenate([prompts, np.asarray(out.token_ids)], axis=1).astype(np.int32)
    length = np.full(ROWS, PROMPT + NEW, np.int32)
    length[::3] = PROMPT + NEW // 2
    tokens[np.arange(PROMPT + NEW)[None, :] >= length[:, None]] = PAD_ID
    (root / "regen").mkdir()
    np.savez(root / "regen" / "part-code-greedy-00000.npz", tokens=tokens,
             prompt_len=np.full(ROWS, PROMPT, np.int32), length=length)
    return root, target


def config_dict(root, run: str, **overrides) -> dict:
    cfg = {"target": str(root / "target"), "data_dir": str(root / "regen"),
           "eagle3": {"ttt_steps": 2}, "decoding": {"budget": 6, "max_depth": 3, "topk": 2},
           "optim": {"learning_rate": 1e-2, "total_steps": 8, "warmup_steps": 1},
           "seq_len": 24, "batch_size": 4, "val_batches": 1, "checkpoint_every": 3, "log_every": 4,
           "output_dir": str(root / run), "export_dir": str(root / run / "drafter")}
    cfg.update(overrides)
    return cfg


def load_config(root, cfg: dict) -> DrafterTrainConfig:
    """Through a YAML file, as the CLI reads it."""
    path = root / f"{pathlib.Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_yaml(DrafterTrainConfig, path)


@pytest.fixture(scope="module")
def trained(workdir):
    root, _ = workdir
    cfg = load_config(root, config_dict(root, "full"))
    state = train_drafter.train(cfg, progress=False)
    log = [json.loads(line) for line in (root / "full" / "log.jsonl").read_text().splitlines()]
    return cfg, jax.device_get(state["params"]), log


def test_training_lowers_the_ttt_loss(trained):
    _, _, log = trained
    assert [r["step"] for r in log] == [4, 8]
    assert all(r["seconds"] > 0 and r["eval_seconds"] > 0 for r in log)
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert len(log[-1]["step_loss"]) == len(log[-1]["step_acc"]) == len(log[-1]["val_step_acc"]) == 2
    acc = np.asarray(log[-1]["val_step_acc"])
    assert log[-1]["val_acceptance_length"] == pytest.approx(1 + acc[0] + acc[0] * acc[1])


def test_eval_only_reprints_the_last_log_lines_held_out_figures(trained, workdir, capsys):
    """--eval-only evaluates the newest checkpoint (step 8) with the training loop's eval step and key,
    so its JSON line repeats the log's last held-out figures; it trains and exports nothing."""
    root, _ = workdir
    _, _, log = trained
    log_text = (root / "full" / "log.jsonl").read_text()
    train_drafter.main(["--config", str(root / "full.yaml"), "--eval-only"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["step"] == 8 and (root / "full" / "log.jsonl").read_text() == log_text
    for key in ("val_loss", "val_step_acc", "val_acceptance_length"):
        np.testing.assert_allclose(record[key], log[-1][key], rtol=1e-5)
    with pytest.raises(SystemExit):
        train_drafter.main(["--config", str(root / "full.yaml"), "--eval-only", "--export-only"])


def test_resume_after_interruption_matches_uninterrupted(trained, workdir):
    root, target = workdir
    cfg_full, params_full, _ = trained
    cfg = load_config(root, config_dict(root, "resumed"))
    train_drafter.train(cfg, stop_after=5, progress=False)  # checkpoints at 3 and 5, as a kill after 5
    early = train_drafter.train(cfg, progress=False, export_only=True)  # the step-5 checkpoint, as a drafter
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_drafter(cfg.export_dir, target).params["drafter"]),
                 jax.device_get(early["params"]))
    train_drafter.train(cfg, progress=False, export_only=True, weights_dtype="bfloat16")  # stored narrow, read wide
    assert {str(x.dtype) for x in load_file(f"{cfg.export_dir}/model.safetensors").values()} == {"bfloat16"}
    widened = jax.device_get(load_drafter(cfg.export_dir, target).params["drafter"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(jnp.bfloat16).astype(np.float32)),
                 widened, jax.device_get(early["params"]))
    params = jax.device_get(train_drafter.train(cfg, progress=False)["params"])
    jax.tree.map(np.testing.assert_array_equal, params, params_full)


def test_exported_drafter_decodes_losslessly(trained, workdir):
    root, target = workdir
    cfg, params, _ = trained
    drafter = load_drafter(cfg.export_dir, target)
    assert (drafter.method.budget, drafter.method.max_depth, drafter.method.topk) == (6, 3, 2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(drafter.params["drafter"]), params)
    saved = load_file(f"{cfg.export_dir}/model.safetensors")
    assert sorted(saved) == sorted(".".join(k) for k in traverse_util.flatten_dict(params))  # no target table
    prompts = [[3, 17, 5], [40, 2, 9, 11, 30, 1]]
    plain = decode.generate(target, prompts, max_new_tokens=10, stop_on_eos=False)
    spec = decode.generate(target, prompts, max_new_tokens=10, stop_on_eos=False, drafter=cfg.export_dir)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["drafter_forwards"] == 3 * spec.stats["verify_steps"] > 0


def test_offline_mode_with_the_full_vocabulary_matches_online_training(trained, workdir):
    root, _ = workdir
    _, params_online, log_online = trained
    cache = str(root / "cache_full")
    offline = load_config(root, config_dict(root, "offline", feature_cache=cache, cache_topk=TARGET.vocab_size,
                                            cache_dtype="float32"))
    params = jax.device_get(train_drafter.train(offline, progress=False)["params"])
    log = [json.loads(line) for line in (root / "offline" / "log.jsonl").read_text().splitlines()]
    for record, online in zip(log, log_online):
        assert record["loss"] == pytest.approx(online["loss"], rel=1e-5)
        assert record["val_loss"] == pytest.approx(online["val_loss"], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, params_online)
    files = sorted(p.name for p in (root / "cache_full").iterdir())
    assert "cache.json" in files and "train_features.npy" in files and "val_topk_ids.npy" in files

    # top-k teacher: the renormalised top-k distribution, trained on without the target in the step
    small = load_config(root, config_dict(root, "offline_k4", feature_cache=str(root / "cache_k4"), cache_topk=4))
    train_drafter.train(small, progress=False)
    log = [json.loads(line) for line in (root / "offline_k4" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert np.load(root / "cache_k4" / "train_features.npy", mmap_mode="r").dtype == np.float16

    # a cache built from other inputs is refused, never overwritten
    with pytest.raises(ConfigError, match=r"feature cache .*cache_k4 was built from other inputs \(differs in \['topk'\]\)"):
        train_drafter.train(load_config(root, config_dict(root, "offline_k8", feature_cache=str(root / "cache_k4"),
                                                          cache_topk=8)), progress=False)


def test_a_cut_feature_cache_build_resumes_to_the_uninterrupted_cache(workdir):
    """A build stopped after some batches (as a kill would stop it) leaves its rows in a staging
    directory, and the rerun finishes it: file for file the cache of an uninterrupted build. A
    staging directory of other inputs is discarded, never mixed in."""
    root, target = workdir
    rng = np.random.default_rng(3)
    examples = {split: {"tokens": rng.integers(0, TARGET.vocab_size, (n, 12)).astype(np.int32),
                        "loss_mask": (rng.uniform(size=(n, 12)) < 0.8).astype(np.float32)}
                for split, n in (("train", 9), ("val", 4))}
    build = functools.partial(feature_cache.build, target=target, layers=(0, 2), examples=examples, dtype="float16",
                              batch_size=2, progress=False)
    whole = build(root / "cache_whole", topk=5)
    assert build(root / "cache_cut", topk=5, stop_after=3) is None and not (root / "cache_cut").exists()
    staged = json.loads((root / ".cache_cut.partial" / "progress.json").read_text())["rows_done"]
    assert staged == {"train": 6, "val": 0}
    assert build(root / "cache_cut", topk=5, stop_after=3) is None  # the last 2 train batches, 1 val batch
    assert json.loads((root / ".cache_cut.partial" / "progress.json").read_text())["rows_done"] == {"train": 9, "val": 2}
    cut = build(root / "cache_cut", topk=5)
    assert not (root / ".cache_cut.partial").exists()
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())
    for name in sorted(p.name for p in whole.iterdir() if p.suffix == ".npy"):
        np.testing.assert_array_equal(np.load(cut / name), np.load(whole / name), err_msg=name)
    assert json.loads((cut / "cache.json").read_text()) == json.loads((whole / "cache.json").read_text())

    assert build(root / "cache_other", topk=5, stop_after=1) is None
    other = build(root / "cache_other", topk=3)
    np.testing.assert_array_equal(np.load(other / "train_topk_ids.npy"), np.load(whole / "train_topk_ids.npy")[..., :3])
    assert json.loads((other / "cache.json").read_text())["topk"] == 3


def test_a_cache_build_copies_the_batches_a_finished_cache_holds(workdir):
    """With `reuse`, batches whose rows another cache of the same target holds are copied from it (a
    marked row proves it), the rest computed; the result is the fresh build's. A reused cache of another
    top-k, or an unfinished one, is an error."""
    root, target = workdir
    rng = np.random.default_rng(4)
    rows = lambda n: rng.integers(0, TARGET.vocab_size, (n, 12)).astype(np.int32)
    mask = lambda n: np.ones((n, 12), np.float32)
    donor_examples = {split: {"tokens": rows(n), "loss_mask": mask(n)} for split, n in (("train", 6), ("val", 2))}
    build = functools.partial(feature_cache.build, target=target, layers=(0, 2), dtype="float16", batch_size=2,
                              progress=False)
    donor = build(root / "donor", examples=donor_examples, topk=5)
    marked = np.load(donor / "train_topk_logits.npy", mmap_mode="r+")
    marked[3] = -7.0
    marked.flush()
    del marked
    # the subset's train: donor train rows 2..5, then two new rows; its val: the donor's val rows
    subset = {"train": {"tokens": np.concatenate([donor_examples["train"]["tokens"][2:], rows(2)]),
                        "loss_mask": mask(6)}, "val": donor_examples["val"]}
    fresh = build(root / "subset_fresh", examples=subset, topk=5)
    reused = build(root / "subset_reused", examples=subset, topk=5, reuse=donor)
    logits = np.load(reused / "train_topk_logits.npy")
    assert (logits[1] == -7.0).all()  # donor row 3: copied, not computed
    fresh_logits = np.load(fresh / "train_topk_logits.npy")
    np.testing.assert_array_equal(np.delete(logits, 1, axis=0), np.delete(fresh_logits, 1, axis=0))
    for name in sorted(p.name for p in fresh.iterdir() if p.suffix == ".npy" and p.name != "train_topk_logits.npy"):
        np.testing.assert_array_equal(np.load(reused / name), np.load(fresh / name), err_msg=name)
    assert json.loads((reused / "cache.json").read_text()) == json.loads((fresh / "cache.json").read_text())

    with pytest.raises(ConfigError, match=r"cache_reuse .*donor was built with another topk"):
        build(root / "subset_k3", examples=subset, topk=3, reuse=donor)
    with pytest.raises(ConfigError, match=r"cache_reuse .*missing is not a finished feature cache"):
        build(root / "subset_none", examples=subset, topk=5, reuse=root / "missing")


SPECBLOCK = {"kind": "specblock", "specblock": {"num_ttt_blocks": 2, "block_size": 2, "rank_hidden": 8},
             "decoding": {"budget": 6, "max_blocks": 2, "widths": [1, 2, 2, 1], "slot0_width": 2, "topk": 2,
                          "expand": 2}}


def test_specblock_trains_resumes_and_exports_a_lossless_drafter(workdir):
    root, target = workdir
    full = load_config(root, config_dict(root, "sb", **SPECBLOCK, optim={"learning_rate": 1e-2, "total_steps": 6,
                                                                         "warmup_steps": 1}))
    params_full = jax.device_get(train_drafter.train(full, progress=False)["params"])
    log = [json.loads(line) for line in (root / "sb" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 6] and log[-1]["val_loss"] < log[0]["val_loss"]
    assert {"rank_loss", "rank_acc", "block_acc_NxK"} <= log[-1].keys() and len(log[-1]["step_acc"]) == 2

    cut = load_config(root, config_dict(root, "sb_cut", **SPECBLOCK, optim={"learning_rate": 1e-2, "total_steps": 6,
                                                                            "warmup_steps": 1}))
    train_drafter.train(cut, stop_after=3, progress=False)  # the random inheritance slots depend on the step only
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(train_drafter.train(cut, progress=False)["params"]),
                 params_full)

    drafter = load_drafter(full.export_dir, target)
    assert (drafter.method.budget, drafter.method.max_blocks, drafter.method.expand) == (6, 2, 2)
    prompts = [[3, 17, 5], [40, 2, 9, 11, 30, 1]]
    plain = decode.generate(target, prompts, max_new_tokens=10, stop_on_eos=False)
    spec = decode.generate(target, prompts, max_new_tokens=10, stop_on_eos=False, drafter=drafter)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["drafter_forwards"] == 2 * spec.stats["verify_steps"] > 0


def test_bad_configs_are_errors_before_any_work(workdir):
    root, _ = workdir
    with pytest.raises(ConfigError, match=re.escape("eagle3: unknown key(s) ['ttt']")):
        load_config(root, config_dict(root, "bad", eagle3={"ttt": 2}))
    with pytest.raises(ConfigError, match="kind='medusa' is not one of"):
        load_config(root, config_dict(root, "bad", kind="medusa"))
    with pytest.raises(ConfigError, match="decoding: .*unknown key.*'depth'"):
        train_drafter.train(load_config(root, config_dict(root, "bad", decoding={"depth": 3})), progress=False)
    with pytest.raises(ConfigError, match="seq_len 200 exceeds the target's max_position_embeddings 128"):
        train_drafter.train(load_config(root, config_dict(root, "bad", seq_len=200)), progress=False)


def test_fresh_lm_head_starts_as_the_targets_and_init_from_continues_a_drafter(trained, workdir):
    root, target = workdir
    cfg, params, _ = trained
    config = train_drafter.drafter_config(cfg, target.config)
    rows = {"tokens": np.zeros((4, 24), np.int32), "loss_from": np.zeros(4, np.int32)}
    fresh, mapping = train_drafter.initial_params(load_config(root, config_dict(root, "fresh")), config, target, rows)
    np.testing.assert_array_equal(fresh["lm_head"]["kernel"], target.params["lm_head"]["kernel"])
    assert mapping is None
    random, _ = train_drafter.initial_params(load_config(root, config_dict(root, "rnd", lm_head_from_target=False)),
                                             config, target, rows)
    assert not np.allclose(random["lm_head"]["kernel"], target.params["lm_head"]["kernel"])
    continued, _ = train_drafter.initial_params(load_config(root, config_dict(root, "ft", init_from=cfg.export_dir)),
                                                config, target, rows)
    jax.tree.map(np.testing.assert_array_equal, continued, params)
    deeper = load_config(root, config_dict(root, "ft3", init_from=cfg.export_dir, eagle3={"ttt_steps": 3}))
    continued, _ = train_drafter.initial_params(deeper, train_drafter.drafter_config(deeper, target.config), target,
                                                rows)  # a training-only field (the TTT depth) may change
    jax.tree.map(np.testing.assert_array_equal, continued, params)


def test_a_continuation_reads_the_batches_its_source_run_had_not_reached(trained, workdir):
    """At a negligible learning rate the drafter stays init_from's, so each logged training loss names
    its batch: a continuation from step 3 logs the losses of steps 4-6 of one from step 0."""
    root, _ = workdir
    cfg, _, _ = trained
    losses = {}
    for start, steps in ((0, 6), (3, 3)):
        run = f"cont{start}"
        train_drafter.train(load_config(root, config_dict(
            root, run, init_from=cfg.export_dir, init_from_step=start, log_every=1,
            optim={"learning_rate": 1e-12, "total_steps": steps, "warmup_steps": 0})), progress=False, export=False)
        losses[start] = [json.loads(line)["loss"] for line in (root / run / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses[3], losses[0][3:], rtol=1e-5)
    assert not np.allclose(losses[3], losses[0][:3], rtol=1e-3)
    with pytest.raises(ConfigError, match="init_from_step must be >= 0 and needs init_from"):
        load_config(root, config_dict(root, "bad", init_from_step=3))


@pytest.mark.parametrize("kind", ["eagle3", "specblock"])
def test_reduced_draft_vocabulary_trains_on_the_most_frequent_tokens_and_decodes_losslessly(workdir, kind):
    root, target = workdir
    if kind == "eagle3":
        overrides = {"eagle3": {"ttt_steps": 2, "draft_vocab_size": 24}}
    else:
        overrides = {**SPECBLOCK, "specblock": {**SPECBLOCK["specblock"], "draft_vocab_size": 24}}
    cfg = load_config(root, config_dict(root, f"vocab_{kind}", **overrides))
    train_drafter.train(cfg, progress=False)
    log = [json.loads(line) for line in (root / f"vocab_{kind}" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    drafter = load_drafter(cfg.export_dir, target)
    ids = np.asarray(drafter.params["draft_to_target"])
    assert ids.shape == (24,) and len(set(ids.tolist())) == 24
    train_rows, _ = train_drafter.split_rows(dict(np.load(root / "regen" / "part-code-greedy-00000.npz")), cfg,
                                             TARGET.vocab_size)
    example = train_drafter.to_example(train_rows)
    trained_on = example["tokens"][:, 1:][example["loss_mask"][:, :-1] > 0]  # loss_mask[p] covers x_{p+1}
    counts = np.bincount(trained_on, minlength=TARGET.vocab_size)
    assert counts[ids].min() >= np.delete(counts, ids).max()  # the 24 most frequent trained-on tokens
    np.testing.assert_array_equal(np.asarray(drafter.params["drafter"]["lm_head"]["kernel"]).shape, (32, 24))
    prompts = [[3, 17, 5], [40, 2, 9, 11, 30, 1]]
    plain = decode.generate(target, prompts, max_new_tokens=10, stop_on_eos=False)
    spec = decode.generate(target, prompts, max_new_tokens=10, stop_on_eos=False, drafter=drafter)
    assert spec.token_ids == plain.token_ids


def test_answer_only_rows_keep_their_end_and_train_on_the_answer_alone(workdir):
    """Chat rows (loss_on_prompt: false): a row longer than seq_len keeps its last seq_len tokens, and
    loss_mask[p] is 1 exactly where x_{p+1} is an answer token; with loss_on_prompt every next token
    inside the row counts and a long row is cut at seq_len."""
    root, _ = workdir
    w = 10
    tokens = np.full((3, w), PAD_ID, np.int32)
    prompt_len, length = np.array([3, 6, 2]), np.array([5, 10, 10])
    for row in range(3):
        tokens[row, :length[row]] = 100 * row + np.arange(length[row])
    parts = {"tokens": tokens, "prompt_len": prompt_len, "length": length}
    answer_cfg = load_config(root, config_dict(root, "ans", seq_len=6, loss_on_prompt=False))
    answers = train_drafter.fit_rows(parts, answer_cfg)
    np.testing.assert_array_equal(answers["tokens"], [[0, 1, 2, 3, 4, PAD_ID], [104, 105, 106, 107, 108, 109],
                                                      [204, 205, 206, 207, 208, 209]])
    example = train_drafter.to_example(answers)
    # row 0: answer tokens x_3, x_4 (predicted at p = 2, 3); row 1: kept from x_4, answer from x_6 (p >= 1);
    # row 2: the whole kept window is answer (every p < 5)
    np.testing.assert_array_equal(example["loss_mask"], [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    assert example["tokens"][0, 5] == 0  # PAD_ID fed to the target as a valid id
    whole = train_drafter.to_example(train_drafter.fit_rows(parts, load_config(root, config_dict(root, "all",
                                                                                                 seq_len=6))))
    np.testing.assert_array_equal(whole["tokens"], np.maximum(tokens[:, :6], 0))
    np.testing.assert_array_equal(whole["loss_mask"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])


def test_bfloat16_training_keeps_float32_master_weights_and_exports_a_lossless_drafter(workdir):
    root, target = workdir
    cfg = load_config(root, config_dict(root, "bf16", dtype="bfloat16"))
    state = train_drafter.train(cfg, progress=False)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {np.dtype(np.float32)}
    log = [json.loads(line) for line in (root / "bf16" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    drafter = load_drafter(cfg.export_dir, target)  # a float32 target: the drafter computes in bfloat16
    assert drafter.method.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(drafter.params["drafter"])} == {np.dtype(jnp.bfloat16)}
    prompts = [[3, 17, 5], [40, 2, 9, 11, 30, 1]]
    plain = decode.generate(target, prompts, max_new_tokens=10, stop_on_eos=False)
    assert decode.generate(target, prompts, max_new_tokens=10, stop_on_eos=False,
                           drafter=drafter).token_ids == plain.token_ids
    with pytest.raises(ConfigError, match="dtype must be 'float32' or 'bfloat16'"):
        load_config(root, config_dict(root, "bad", dtype="float16"))


def test_mismatched_init_from_and_unsplittable_batches_fail_before_training(trained, workdir, tmp_path):
    root, _ = workdir
    cfg, _, _ = trained
    other = ModelConfig(**{**TARGET.__dict__, "hidden_size": 48})
    hf.export_hf(other, jax.device_get(target_lib.init_params(other, jax.random.key(0))), tmp_path / "wide")
    with pytest.raises(ConfigError, match=re.escape("hidden_size 32 does not match the target's 48")):
        train_drafter.train(load_config(root, config_dict(root, "bad", target=str(tmp_path / "wide"),
                                                          init_from=cfg.export_dir)), progress=False)
    with pytest.raises(ConfigError, match=re.escape("its drafter config")):
        train_drafter.train(load_config(root, config_dict(root, "bad", init_from=cfg.export_dir,
                                                          eagle3={"ttt_steps": 2, "intermediate_size": 32})),
                            progress=False)
    with pytest.raises(ConfigError, match=re.escape("mesh {'data': 3, 'fsdp': 1, 'tensor': 1} does not fit")):
        train_drafter.train(load_config(root, config_dict(root, "bad", mesh={"data": 3})), progress=False)
    assert not (root / "bad").exists()  # nothing was written


def test_bad_drafter_directories_are_clear_errors(trained, workdir, tmp_path):
    root, target = workdir
    cfg, params, _ = trained
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} is not a trained drafter directory: "
                                                          f"{tmp_path / 'drafter.json'} does not exist")):
        load_drafter(str(tmp_path), target)
    for change, message in (({"hidden_size": 48}, "hidden_size 32 does not match the target's 48"),
                            ({"vocab_size": 50}, "vocab_size 48 does not match the target's 50"),
                            ({"num_layers": 3}, "feature_layers (0, 1, 3) exceed the target's 3 layers")):
        other_cfg = ModelConfig(**{**TARGET.__dict__, **change})
        other = target_lib.Target(other_cfg, target_lib.init_params(other_cfg, jax.random.key(0)))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_drafter(cfg.export_dir, other)

    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((root / "full" / "drafter" / "drafter.json").read_text())
    (bad / "drafter.json").write_text(json.dumps({**meta, "kind": "medusa"}))
    with pytest.raises(ConfigError, match="unknown drafter kind 'medusa'"):
        load_drafter(str(bad), target)
    (bad / "drafter.json").write_text(json.dumps(meta))
    tensors = load_file(f"{cfg.export_dir}/model.safetensors")
    save_file({**tensors, "fc.kernel": np.zeros((3, 3), np.float32)}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape("tensor 'fc.kernel' has shape (3, 3), expected (96, 32)")):
        load_drafter(str(bad), target)
    del tensors["lm_head.kernel"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape("tensors missing: ['lm_head.kernel']")):
        load_drafter(str(bad), target)


def test_gradient_accumulation_averages_the_micro_batches_gradients(workdir):
    """grad_accum 2 splits the batch into rows 0::2 and 1::2 and averages their gradients (SGD at lr 1
    shows the gradient as the update); with equally many trained-on tokens in each micro-batch that is
    the whole batch's gradient. A batch whose micro-batch does not split over the mesh is refused."""
    root, target = workdir
    cfg = load_config(root, config_dict(root, "accum"))
    config = train_drafter.drafter_config(cfg, target.config)
    tokens = np.load(root / "regen" / "part-code-greedy-00000.npz")["tokens"]
    rows = {"tokens": tokens, "loss_from": np.zeros(len(tokens), np.int32)}
    params, _ = train_drafter.initial_params(cfg, config, target, rows)
    sgd = optax.sgd(1.0)

    def gradient(batch_rows, grad_accum=1):
        step = jax.jit(train_drafter.make_train_step(target.config, config, sgd, grad_accum=grad_accum))
        state, _ = step({"params": params, "opt_state": sgd.init(params)}, target.params,
                        train_drafter.to_example({"tokens": batch_rows,
                                                  "loss_from": np.zeros(len(batch_rows), np.int32)}),
                        np.int32(0))
        return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, jax.device_get(state["params"]))

    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    uneven = tokens[[0, 1, 2, 4]]  # row 0 is cut short: the micro-batches differ in trained-on tokens
    accumulated = gradient(uneven, grad_accum=2)
    jax.tree.map(lambda g, a, b: close(g, (a + b) / 2), accumulated, gradient(uneven[0::2]), gradient(uneven[1::2]))
    assert not np.allclose(accumulated["lm_head"]["kernel"], gradient(uneven)["lm_head"]["kernel"], rtol=1e-3)
    even = tokens[[1, 2, 4, 5]]  # full-length rows
    jax.tree.map(close, gradient(even, grad_accum=2), gradient(even))
    with pytest.raises(ConfigError, match="grad_accum 3"):
        train_drafter.train(load_config(root, config_dict(root, "bad", grad_accum=3)), progress=False)


def test_vocab_coverage_counts_the_trained_on_tokens_of_each_split(workdir, capsys):
    """Coverage of the held-out answer tokens by the N most frequent training answer tokens, counted
    independently here; the full vocabulary covers everything; sizes beyond the vocabulary are refused."""
    root, _ = workdir
    cfg = load_config(root, config_dict(root, "coverage", loss_on_prompt=False))
    table = vocab_coverage.coverage_table(cfg, TARGET.vocab_size, [5, 20, TARGET.vocab_size])
    train_rows, val_rows = train_drafter.split_rows(dict(np.load(root / "regen" / "part-code-greedy-00000.npz")),
                                                    cfg, TARGET.vocab_size)

    def answer_counts(rows):
        example = train_drafter.to_example(rows)
        return np.bincount(example["tokens"][:, 1:][example["loss_mask"][:, :-1] > 0], minlength=TARGET.vocab_size)

    train_counts, val_counts = answer_counts(train_rows), answer_counts(val_rows)
    for row in table:
        top = np.argsort(-train_counts, kind="stable")[:row["size"]]
        assert row["train"] == pytest.approx(train_counts[top].sum() / train_counts.sum())
        assert row["val"] == pytest.approx(val_counts[top].sum() / val_counts.sum())
        assert (row["train_tokens"], row["val_tokens"]) == (train_counts.sum(), val_counts.sum())
    assert table[0]["train"] < table[1]["train"] < 1.0 and table[-1]["val"] == 1.0
    path = root / "coverage.yaml"
    vocab_coverage.main(["--config", str(path), "--sizes", "20,48"])
    assert re.search(r"\| 48 \| 1\.0000 \| 1\.0000 \|", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        vocab_coverage.main(["--config", str(path), "--sizes", "49"])


def test_learning_curves_read_a_training_log_in_hours_and_plot_it(trained, workdir, tmp_path, capsys):
    """The curve of a real training log: hours are the summed step seconds (or steps x the median
    seconds per step), the acceptance estimate is the chain of the held-out per-position accuracies;
    a continued run's logs join; the plot and the budget table are written, and a label count that does
    not match the logs is refused."""
    root, _ = workdir
    log = root / "full" / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    curve = learning_curves.read_curve(log)
    np.testing.assert_allclose(curve.hours * 3600, np.cumsum([r["seconds"] for r in records]))
    assert curve.steps.tolist() == sorted(r["step"] for r in records) and curve.step_acc.shape == (len(records), 2)
    np.testing.assert_allclose(curve.acceptance, [train_drafter.chain_acceptance(np.array(a)) for a in curve.step_acc])
    joined = learning_curves.read_run(f"{log}+{log}")  # a run continued by another: steps and hours follow on
    assert joined.steps.tolist() == curve.steps.tolist() + (curve.steps + curve.steps[-1]).tolist()
    np.testing.assert_allclose(joined.hours, np.concatenate([curve.hours, curve.hours + curve.hours[-1]]))
    np.testing.assert_allclose(joined.step_seconds, np.tile(curve.step_seconds, 2))
    # the median clock: a paused interval (here the second, 100x its logged time) moves nothing
    paused = tmp_path / "paused.jsonl"
    paused.write_text("".join(json.dumps({**r, "seconds": r["seconds"] * (100 if i == 1 else 1)}) + "\n"
                              for i, r in enumerate(records)))
    steps = np.array([r["step"] for r in records])
    per_step = np.array([r["seconds"] for r in records]) / np.diff(steps, prepend=0)
    per_step[1] *= 100
    np.testing.assert_allclose(learning_curves.read_curve(paused, "median").hours * 3600, steps * np.median(per_step))
    out = tmp_path / "curves.png"
    learning_curves.main([str(log), str(paused), "--labels", "a,b", "--out", str(out), "--clock", "median"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | steps | logged hours") and table[3].startswith(f"| b | {steps[-1]} |")
    with pytest.raises(SystemExit):
        learning_curves.main([str(log), "--labels", "a,b", "--out", str(out)])


def test_bench_step_reports_each_steps_time_and_its_xla_flop_count(workdir, capsys):
    """The step's FLOP count is the compiled step's (twice the batch, about twice the operations: the
    optimizer's update is the only part that does not grow), and the rate columns are that count over
    the measured time."""
    root, _ = workdir

    def rows(*args):
        bench_step.main(["--target", str(root / "target"), "--kinds", "eagle3", "--seq-len", "16", "--draft-vocab",
                         "0", "--cache-topk", "4", "--ttt-steps", "2", "--repeats", "1", *args])
        lines = capsys.readouterr().out.splitlines()
        peak = float(lines[0].split(" runs at ")[1].split()[0])
        table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[3:]]
        return peak, {(kind, mode): [float(x) for x in rest] for kind, mode, *rest in table}

    small_peak, small = rows("--batch-size", "2", "--modes", "offline")
    large_peak, large = rows("--batch-size", "4", "--modes", "offline")
    assert list(small) == list(large) == [("eagle3", "offline")]
    for peak, table in ((small_peak, small), (large_peak, large)):  # each run's share is of its own peak
        for seconds, per_hour, tflop, gflops, share in table.values():
            assert seconds > 0 and per_hour == pytest.approx(3600 / seconds, rel=0.05, abs=1)
            assert gflops == pytest.approx(tflop * 1e3 / seconds, rel=0.05, abs=1) and share == pytest.approx(
                gflops / peak, abs=0.01)
    assert 1.6 < large["eagle3", "offline"][2] / small["eagle3", "offline"][2] <= 2.0


def test_the_smollm2_recipes_differ_only_where_their_comments_say():
    """The shipped drafters' recipes for the default target, the ablations (and their second seeds) and
    the one-domain drafter: the same data, feature cache, batches, optimizer and seed, apart from what each
    config's header names (its kind and tree, one ablation switch, the budget, the domains, the seed), so
    comparisons between them hold."""
    configs = pathlib.Path(__file__).parent.parent / "configs"
    read = lambda name: train_drafter.to_dict(load_yaml(DrafterTrainConfig, configs / name))

    def common(cfg: dict) -> dict:
        optim = {k: v for k, v in cfg["optim"].items() if k not in ("total_steps", "warmup_steps")}
        dropped = ("kind", "eagle3", "specblock", "decoding", "optim", "output_dir", "export_dir", "domains",
                   "feature_cache", "cache_reuse", "checkpoint_every", "log_every")
        return {**{k: v for k, v in cfg.items() if k not in dropped}, "optim": optim}

    eagle3, specblock = read("eagle3-smollm2.yaml"), read("specblock-smollm2.yaml")
    assert common(eagle3) == common(specblock) and eagle3["feature_cache"] == specblock["feature_cache"]
    assert eagle3["eagle3"]["draft_vocab_size"] == specblock["specblock"]["draft_vocab_size"]
    outputs = {eagle3["output_dir"], specblock["output_dir"]}
    switches = ("shift", "inherit", "rank_head", "valid_prefix")
    for variant in ("full", *(f"no-{s.replace('_', '-')}" for s in switches)):
        ablation = read(f"ablations/smollm2/specblock-{variant}.yaml")
        assert common(ablation) == common(specblock) and ablation["feature_cache"] == specblock["feature_cache"]
        off = [s for s in switches if not ablation["specblock"][s]]
        assert off == ([] if variant == "full" else [variant[3:].replace("-", "_")])
        assert {k: v for k, v in ablation["specblock"].items() if k not in switches} == \
            {k: v for k, v in specblock["specblock"].items() if k not in switches}
        assert ablation["decoding"] == specblock["decoding"]  # decoded side by side with one tree
        assert ablation["optim"]["total_steps"] == 82 and ablation["output_dir"] not in outputs
        outputs.add(ablation["output_dir"])
        if variant == "no-valid-prefix":  # its effect was 5 standard errors on seed 0: no second seed
            continue
        second = read(f"ablations/smollm2/specblock-{variant}-seed1.yaml")  # the same but for the seed and paths
        paths = ("seed", "feature_cache", "cache_reuse", "output_dir", "export_dir")
        same = lambda cfg: {k: v for k, v in cfg.items() if k not in paths}
        assert same(second) == same(ablation)
        assert (second["seed"], second["cache_reuse"]) == (1, ablation["feature_cache"])
        assert second["feature_cache"] != ablation["feature_cache"] and second["output_dir"] not in outputs
        outputs.add(second["output_dir"])
    prose = read("specblock-smollm2-prose.yaml")
    assert common(prose) == common(specblock) and prose["specblock"] == specblock["specblock"]
    assert prose["decoding"] == specblock["decoding"]
    assert prose["cache_reuse"] == specblock["feature_cache"] != prose["feature_cache"]
    assert set(prose["domains"]).isdisjoint({"code", "explain", "math"}) and prose["output_dir"] not in outputs
