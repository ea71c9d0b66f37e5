"""Regeneration of drafter training data by the target itself, at micro scale."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from specblock_jax import data, generate, hf, load_target
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.models.target import init_params
from train import regenerate
from train.regenerate import RegenerateConfig

CODE = "def add(a, b):\n    return a + b + {i}\n\n\nclass Box{i}:\n    value = {i}\n"
PROSE = "To be, or not to be, that is the question {i}.\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regen")
    (tmp / "code").mkdir()
    (tmp / "prose").mkdir()
    for i in range(24):
        (tmp / "code" / f"m{i}.py").write_text(CODE.format(i=i) * 4)
        (tmp / "prose" / f"p{i}_gut.txt").write_text(PROSE.format(i=i) * 8)
    splits = data.corpus_splits(code_dir=tmp / "code", prose_dir=tmp / "prose")
    tok = data.train_tokenizer([d.text for s in splits.values() for d in s["train"]], 300, tmp / "tok")
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64, max_position_embeddings=128, eos_token_ids=(0,))
    hf.export_hf(cfg, init_params(cfg, jax.random.key(0)), tmp / "target", tokenizer=tok)
    regen = RegenerateConfig(output_dir=str(tmp / "out"), target=str(tmp / "target"), samples_per_domain=6,
                             prompt_tokens=8, new_tokens=6, greedy_fraction=0.5, batch_size=2,
                             code_dir=str(tmp / "code"), prose_dir=str(tmp / "prose"))
    regenerate.regenerate(regen, progress=False)
    return regen, splits, tok


def test_parts_hold_every_sample_with_the_right_shapes(setup):
    cfg, _, _ = setup
    parts = regenerate.read_parts(cfg.output_dir)
    assert parts["tokens"].shape == (12, 14) and parts["tokens"].dtype == np.int32
    assert sum("greedy" in p for p in parts["part"]) == 6
    for tokens, length in zip(parts["tokens"], parts["length"]):
        assert 8 < length <= 14 and (tokens[:length] >= 0).all() and (tokens[length:] == -1).all()


def test_prompts_come_from_the_training_split_only(setup):
    cfg, splits, tok = setup
    parts = regenerate.read_parts(cfg.output_dir)
    for domain in cfg.domains:
        train_ids = [a.tolist() for a in data.tokenize_documents(splits[domain]["train"], tok)]
        for prompt in parts["tokens"][[domain in p for p in parts["part"]], :8].tolist():
            assert any(_contains(ids, prompt) for ids in train_ids)


def test_greedy_rows_are_the_targets_own_greedy_continuations(setup):
    cfg, _, _ = setup
    parts = regenerate.read_parts(cfg.output_dir)
    greedy = np.array(["greedy" in p for p in parts["part"]])
    target = load_target(cfg.target)
    expected = generate(target, parts["tokens"][greedy, :8].tolist(), max_new_tokens=6).token_ids
    for row, ids in zip(parts["tokens"][greedy], expected):
        assert row[8:8 + len(ids)].tolist() == ids


def test_rerun_skips_finished_parts_and_remakes_a_missing_one(setup):
    cfg, _, _ = setup
    paths = sorted(p for p in os.listdir(cfg.output_dir) if p.startswith("part-"))
    before = {p: os.stat(os.path.join(cfg.output_dir, p)).st_mtime_ns for p in paths}
    removed = os.path.join(cfg.output_dir, paths[-1])
    kept = dict(np.load(removed))
    os.remove(removed)
    regenerate.regenerate(cfg, progress=False)
    assert all(os.stat(os.path.join(cfg.output_dir, p)).st_mtime_ns == before[p] for p in paths[:-1])
    remade = np.load(removed)
    for key, value in kept.items():
        np.testing.assert_array_equal(remade[key], value)


def test_rerun_with_another_config_is_refused_and_a_moved_directory_resumes(setup, tmp_path):
    cfg, _, _ = setup
    with pytest.raises(ConfigError, match="different config"):
        regenerate.regenerate(dataclasses.replace(cfg, new_tokens=7), progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(cfg.output_dir, moved)
    paths = sorted(moved.glob("part-*.npz"))
    before = {p: p.stat().st_mtime_ns for p in paths}
    regenerate.regenerate(dataclasses.replace(cfg, output_dir=str(moved)), progress=False)
    assert {p: p.stat().st_mtime_ns for p in sorted(moved.glob("part-*.npz"))} == before  # nothing made again


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


def test_chat_prompts_are_answered_by_category_with_the_chat_template(setup, tmp_path):
    """A chat prompt file: each conversation formatted with the target's template, answered (greedy
    rows are the target's own greedy answers), parts named by category, prompts longer than
    prompt_tokens left out."""
    regen, _, tok = setup
    tok.chat_template = TEMPLATE
    target_dir = hf.export_hf(*hf.load_hf(regen.target), tmp_path / "chat-target", tokenizer=tok)
    rows = [{"messages": [{"role": "user", "content": text}], "category": category}
            for text, category in [("def add", "code"), ("To be", "writing"), ("class Box", "code"),
                                   ("question " * 40, "writing"), ("or not", "writing")]]
    prompts = tmp_path / "prompts.jsonl"
    data.write_jsonl(rows, prompts)
    cfg = dataclasses.replace(regen, output_dir=str(tmp_path / "out"), target=str(target_dir), prompts=str(prompts),
                              prompt_tokens=24, greedy_fraction=0.5)
    regenerate.regenerate(cfg, progress=False)
    parts = regenerate.read_parts(cfg.output_dir)
    assert sorted({p.split("-")[1] for p in parts["part"]}) == ["code", "writing"]
    assert len(parts["tokens"]) == 4 and parts["tokens"].shape[1] == 24 + regen.new_tokens  # the long one left out
    target = load_target(str(target_dir))
    for tokens, prompt_len, part in zip(parts["tokens"], parts["prompt_len"], parts["part"]):
        prompt = tokens[:prompt_len].tolist()
        assert tok.decode(prompt).startswith("<user>") and tok.decode(prompt).endswith("<assistant>")
        if "greedy" in part:
            answer = generate(target, [prompt], max_new_tokens=regen.new_tokens).token_ids[0]
            assert tokens[prompt_len:prompt_len + len(answer)].tolist() == answer
            assert (tokens[prompt_len + len(answer):] == -1).all()


def test_bad_configs():
    with pytest.raises(ConfigError, match="domains"):
        RegenerateConfig(domains=("poetry",))
    with pytest.raises(ConfigError, match="greedy_fraction"):
        RegenerateConfig(greedy_fraction=1.5)
    with pytest.raises(ValueError, match="no training document has 1000 tokens"):
        regenerate.cut_prompts([np.arange(10)], 2, 1000, np.random.default_rng(0))


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))
