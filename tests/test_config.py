"""Strict config loading: every mistake is an error that names the key."""

import pytest

from specblock_jax.config import ConfigError, ModelConfig, from_dict, load_yaml, to_dict
from specblock_jax.optim import OptimConfig

BASE = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "intermediate_size": 64}


def test_round_trip_through_plain_data():
    cfg = from_dict(ModelConfig, {**BASE, "eos_token_ids": [1, 2],
                                  "rope_scaling": {"factor": 8, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}})
    assert cfg.eos_token_ids == (1, 2) and cfg.rope_scaling.factor == 8.0
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("bad, match", [
    ({"hidden_sise": 32}, r"unknown key\(s\) \['hidden_sise'\]"),
    ({"num_layers": "2"}, "num_layers: expected int, got str"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings: expected bool"),
    ({"eos_token_ids": 3}, "eos_token_ids: expected a list"),
    ({"rope_scaling": {"factor": 8}}, "rope_scaling.*missing required key"),
    ({"architecture": "gpt2"}, "architecture='gpt2' is not one of"),
    ({"num_heads": 3}, r"num_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
    ({"eos_token_ids": [64]}, r"eos token id 64 outside the vocabulary \[0, 64\)"),
    ({"dtype": "float16"}, "dtype='float16' is not one of"),
])
def test_mistakes_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ModelConfig, {**BASE, **bad})


def test_missing_required_key():
    data = dict(BASE)
    del data["head_dim"]
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['head_dim'\]"):
        from_dict(ModelConfig, data)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_yaml(ModelConfig, tmp_path / "none.yaml")
    path = tmp_path / "m.yaml"
    path.write_text("vocab_size: 64\nhidden_size: 32\nnum_layers: two\n")
    with pytest.raises(ConfigError, match="m.yaml: num_layers: expected int"):
        load_yaml(ModelConfig, path)


def test_num_params_counts_every_parameter():
    import jax

    from specblock_jax.models.target import init_params
    for extra in ({}, {"tie_word_embeddings": True}, {"attention_bias": True, "qk_norm": True}):
        cfg = from_dict(ModelConfig, {**BASE, **extra})
        params = init_params(cfg, jax.random.key(0))
        assert cfg.num_params == sum(x.size for x in jax.tree.leaves(params))


def test_optimizer_schedule_validation():
    with pytest.raises(ConfigError, match="warmup_steps"):
        OptimConfig(learning_rate=1e-3, total_steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match="decay='step'"):
        OptimConfig(learning_rate=1e-3, total_steps=10, warmup_steps=1, decay="step")
