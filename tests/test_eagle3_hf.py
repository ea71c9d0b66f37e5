"""Published EAGLE-3 checkpoints (`eagle3_hf`) and reduced draft vocabularies.

Synthetic checkpoints are written here by hand in the published key layout (torch names and [out, in]
shapes, bf16 or f32 weights, int64 `d2t`, bool `t2d`), independently of the module's own layout
table. They must load into the drafter, decode losslessly with a tiny target, and round-trip through
export; a missing or misshapen tensor is an error naming it. Then the vocabulary map from token
counts, the draft-vocabulary loss, and bfloat16 decoding.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from specblock_jax import decode, drafter_io, eagle3_hf, losses
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.drafter import Drafter
from specblock_jax.eagle3_draft import Eagle3Method
from specblock_jax.models import eagle3
from specblock_jax.models import target as target_lib

TARGET = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
H, F, V, VD = 32, 48, 64, 40
N_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41]]
N_NEW, MAX_LEN = 8, 48
# Draft vocabulary: 40 of the 64 target ids, with gaps, so draft id != target id for most of them.
DRAFT_TO_TARGET = np.sort(np.random.default_rng(0).choice(V, VD, replace=False)).astype(np.int32)


def published_tensors(dtype, reduced: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """The key layout of yuhuili/EAGLE3-LLaMA3.1-Instruct-8B, written out by hand (torch [out, in])."""
    rng = np.random.default_rng(seed)
    vd = VD if reduced else V
    shapes = {
        "fc.weight": (H, 3 * H),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (N_HEADS * HEAD_DIM, 2 * H),
        "midlayer.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, 2 * H),
        "midlayer.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, N_HEADS * HEAD_DIM),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (F, H),
        "midlayer.mlp.up_proj.weight": (F, H),
        "midlayer.mlp.down_proj.weight": (H, F),
        "norm.weight": (H,),
        "lm_head.weight": (vd, H),
    }
    tensors = {name: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.3 * rng.standard_normal(s)).astype(dtype)
               for name, s in shapes.items()}
    if reduced:
        tensors["d2t"] = (DRAFT_TO_TARGET.astype(np.int64) - np.arange(VD, dtype=np.int64))
        t2d = np.zeros(V, bool)
        t2d[DRAFT_TO_TARGET] = True
        tensors["t2d"] = t2d
    return tensors


def published_config(reduced: bool, **extra) -> dict:
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
           "hidden_size": H, "intermediate_size": F, "num_attention_heads": N_HEADS, "num_key_value_heads": KV_HEADS,
           "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": V, "max_position_embeddings": 2048,
           "tie_word_embeddings": False, "torch_dtype": "float16"}  # no head_dim, no rope_theta: as published
    if reduced:
        cfg["draft_vocab_size"] = VD
    return {**cfg, **extra}


def write_checkpoint(path, tensors, config) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def target():
    params = target_lib.init_params(TARGET, jax.random.key(1))
    return target_lib.Target(TARGET, jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, params))


@pytest.fixture(scope="module")
def plain(target):
    return decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False).token_ids


def test_config_reads_the_published_fields():
    cfg = eagle3_hf.config_from_hf(published_config(True), TARGET)
    assert (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (H, H // N_HEADS, F, V)
    assert (cfg.draft_vocab_size, cfg.draft_vocab, cfg.rope_theta, cfg.rope_scaling) == (VD, VD, 10000.0, None)
    assert cfg.feature_layers == eagle3.default_feature_layers(TARGET.num_layers) and cfg.rms_norm_eps == 1e-5
    # SpecForge / SGLang aux layer ids are 0-indexed layer outputs, as our feature_layers.
    aux = eagle3_hf.config_from_hf(published_config(False, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 2, 3]}))
    assert aux.feature_layers == (0, 2, 3) and aux.draft_vocab_size is None and aux.draft_vocab == V
    # Export names the layers only when they are not EAGLE-3's default for the target (vLLM reads the
    # key one layer lower than SGLang; on the default layers both agree without it).
    default = eagle3.Eagle3Config.for_target(TARGET)
    assert "eagle_config" not in eagle3_hf.config_to_hf(default, TARGET)
    assert eagle3_hf.config_to_hf(aux, TARGET)["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
    assert eagle3_hf.config_from_hf(eagle3_hf.config_to_hf(aux, TARGET), TARGET) == aux
    llama3 = published_config(False, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    assert eagle3_hf.config_from_hf(llama3, TARGET).rope_scaling.factor == 8.0
    for bad, match in [({"architectures": ["LlamaForCausalLM"]}, "not an EAGLE-3 drafter"),
                       ({"num_hidden_layers": 2}, "only one-layer"),
                       ({"norm_before_residual": True}, "norm_before_residual"),
                       ({"target_hidden_size": 64}, "target_hidden_size"),
                       ({"draft_vocab_size": 65}, "draft_vocab_size")]:
        with pytest.raises(ValueError, match=match):
            eagle3_hf.config_from_hf(published_config(True, **bad), TARGET)
    with pytest.raises(ValueError, match="give the target's config"):
        eagle3_hf.config_from_hf(published_config(True))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_published_layout_loads_into_the_drafter(tmp_path, dtype):
    tensors = published_tensors(dtype, reduced=True)
    write_checkpoint(tmp_path / "ckpt", tensors, published_config(True))
    config, params, mapping = eagle3_hf.read_eagle3_hf(tmp_path / "ckpt", TARGET)
    np.testing.assert_array_equal(mapping, DRAFT_TO_TARGET)
    assert params["fc"]["kernel"].shape == (3 * H, H) and params["lm_head"]["kernel"].shape == (H, VD)
    np.testing.assert_array_equal(params["self_attn"]["q_proj"]["kernel"],
                                  tensors["midlayer.self_attn.q_proj.weight"].astype(np.float32).T)
    np.testing.assert_array_equal(params["hidden_norm"]["weight"],
                                  tensors["midlayer.hidden_norm.weight"].astype(np.float32))
    np.testing.assert_array_equal(params["mlp"]["down_proj"]["kernel"],
                                  tensors["midlayer.mlp.down_proj.weight"].astype(np.float32).T)
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params
    _, bf = eagle3_hf.read_eagle3_hf(tmp_path / "ckpt", TARGET, dtype="bfloat16")[:2]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf))


def test_missing_or_misshapen_tensors_are_named(tmp_path):
    good = published_tensors(np.float32, reduced=True)
    cases = [
        ({k: v for k, v in good.items() if k != "midlayer.hidden_norm.weight"}, "missing.*midlayer.hidden_norm.weight"),
        ({k: v for k, v in good.items() if k != "d2t"}, r"missing.*'d2t'"),
        ({**good, "midlayer.self_attn.q_proj.weight": np.zeros((32, H), np.float32)},
         r"'midlayer.self_attn.q_proj.weight' has shape \(32, 32\), expected \(32, 64\)"),
        ({**good, "lm_head.weight": np.zeros((V, H), np.float32)}, r"'lm_head.weight' has shape \(64, 32\)"),
        ({**good, "midlayer.extra.weight": np.zeros(3, np.float32)}, "unexpected.*midlayer.extra.weight"),
        ({**good, "t2d": ~good["t2d"]}, "'t2d' and 'd2t' disagree"),
        ({**good, "embed_tokens.weight": np.zeros((V, H + 1), np.float32)}, r"'embed_tokens.weight' has shape \(64, 33\)"),
        ({**good, "d2t": np.zeros(VD, np.int64) + V}, "outside the target vocabulary"),
    ]
    for i, (tensors, match) in enumerate(cases):
        write_checkpoint(tmp_path / str(i), tensors, published_config(True))
        with pytest.raises(ValueError, match=match):
            eagle3_hf.read_eagle3_hf(tmp_path / str(i), TARGET)
    with pytest.raises(FileNotFoundError, match="config.json"):
        eagle3_hf.read_eagle3_hf(tmp_path / "nowhere", TARGET)


def test_imported_drafter_decodes_losslessly(tmp_path, target, plain):
    write_checkpoint(tmp_path / "full", published_tensors(np.float32, False), published_config(False))
    method, params = eagle3_hf.load_eagle3_hf(tmp_path / "full", target)
    assert not method.config.reduced_vocab and "draft_to_target" not in params
    assert (method.budget, method.max_depth, method.topk) == (60, 7, 10)  # EAGLE-3's default tree

    write_checkpoint(tmp_path / "ckpt", published_tensors(np.float32, True, seed=3), published_config(True))
    method, params = eagle3_hf.load_eagle3_hf(tmp_path / "ckpt", target, budget=12, max_depth=3, topk=3)
    assert method.config.reduced_vocab
    via_load, via_params = drafter_io.load(tmp_path / "ckpt", target)  # what load_drafter(path) calls
    assert via_load.config == method.config
    np.testing.assert_array_equal(np.asarray(via_params["draft_to_target"]), DRAFT_TO_TARGET)
    out = decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False,
                          drafter=Drafter(method, params))
    assert out.token_ids == plain
    assert out.stats["malformed_trees"] == 0 and out.stats["verify_steps"] > 0
    # Every drafted node is a mapped target id, not a raw draft id.
    state = jax.jit(method.init, static_argnums=5)(params, jnp.asarray([PROMPTS[0]]), jnp.asarray([3]),
                                                   jnp.zeros((1, 3, 3 * H)), jnp.asarray([7]), MAX_LEN)
    tree, _, _ = jax.jit(method.draft)(params, state, jnp.asarray([7]), jnp.asarray([3]))
    drafted = np.asarray(tree.tokens)[0, 1:][np.asarray(tree.valid)[0, 1:]]
    assert drafted.size and set(drafted.tolist()) <= set(DRAFT_TO_TARGET.tolist())
    assert not set(drafted.tolist()) <= set(range(VD))  # raw draft ids would all be < VD


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_export_import_round_trip(tmp_path, dtype):
    original = published_tensors(dtype, reduced=True)
    write_checkpoint(tmp_path / "ckpt", original, published_config(True))
    name = "bfloat16" if dtype is ml_dtypes.bfloat16 else "float32"
    config, params, mapping = eagle3_hf.read_eagle3_hf(tmp_path / "ckpt", TARGET, dtype=name)
    eagle3_hf.export_eagle3_hf(config, params, tmp_path / "out", mapping, target=TARGET)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(original)
    for key, value in original.items():
        assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    config2, params2, mapping2 = eagle3_hf.read_eagle3_hf(tmp_path / "out", TARGET, dtype=name)
    assert config2 == config
    np.testing.assert_array_equal(mapping2, mapping)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        eagle3_hf.export_eagle3_hf(config, params, tmp_path / "out", mapping)
    with pytest.raises(ValueError, match="draft_to_target map is required"):
        eagle3_hf.export_eagle3_hf(config, params, tmp_path / "out2")


def test_project_drafter_directory_keeps_the_vocab_map(tmp_path, target):
    cfg = eagle3.Eagle3Config.for_target(TARGET, ttt_steps=1, draft_vocab_size=VD)
    params = eagle3.init_params(cfg, jax.random.key(0))
    assert params["lm_head"]["kernel"].shape == (H, VD)
    method = Eagle3Method(cfg, budget=8, max_depth=2, topk=2)
    with pytest.raises(ValueError, match="no 'draft_to_target' map"):
        drafter_io.save(method, params, tmp_path / "d")
    drafter_io.save(method, params, tmp_path / "d", draft_to_target=DRAFT_TO_TARGET)
    loaded, method_params = drafter_io.load(tmp_path / "d", target)
    assert loaded == method
    np.testing.assert_array_equal(np.asarray(method_params["draft_to_target"]), DRAFT_TO_TARGET)
    # ... and that directory exported to the published format, with the target's table when asked.
    eagle3_hf.export_drafter_dir(tmp_path / "d", target, tmp_path / "hf", include_embedding=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["draft_vocab_size"] == VD
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(written["embed_tokens.weight"], np.asarray(target.params["embed_tokens"]["embedding"]))
    np.testing.assert_array_equal(written["lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T)
    np.testing.assert_array_equal(written["d2t"] + np.arange(VD), DRAFT_TO_TARGET)
    reread = eagle3_hf.read_eagle3_hf(tmp_path / "hf", TARGET)  # the optional embedding is accepted and skipped
    assert reread[0] == dataclasses.replace(cfg, ttt_steps=7)  # ttt_steps is training-only: not in the format
    assert "embed_tokens" not in reread[1]


def test_vocab_mapping_from_token_counts():
    tokens = np.array([[3, 5, 5, 7, 7, 7, 9], [9, 9, 9, 9, 1, 2, 2]])
    mask = np.ones_like(tokens)
    mask[1, 3:] = 0  # counts x_{p+1} where mask[p]: row 1 counts tokens 9, 9, 9 only
    counts = eagle3.token_counts(tokens, 12, mask)
    assert counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 3, 0, 4, 0, 0]
    np.testing.assert_array_equal(eagle3.build_vocab_mapping(tokens, 12, 3, mask), [5, 7, 9])
    np.testing.assert_array_equal(eagle3.build_vocab_mapping(tokens, 12, 4, mask), [0, 5, 7, 9])  # fill: lowest id
    np.testing.assert_array_equal(eagle3.build_vocab_mapping(tokens, 12, 2), [7, 9])  # unmasked: 9 x5, 7 x3
    d2t = eagle3.d2t_offsets(np.array([0, 5, 7, 9]))
    assert d2t.dtype == np.int64 and d2t.tolist() == [0, 4, 5, 6]
    assert eagle3.draft_to_target_from_d2t(d2t).tolist() == [0, 5, 7, 9]
    assert np.flatnonzero(eagle3.t2d_mask([0, 5, 7, 9], 12)).tolist() == [0, 5, 7, 9]
    with pytest.raises(ValueError, match="token id 12 outside"):
        eagle3.token_counts(tokens + 3, 12)
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        eagle3.Eagle3Config.for_target(TARGET, draft_vocab_size=V + 1)


def test_loss_restricted_to_the_draft_vocabulary():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, V)), jnp.float32)
    logits = logits.at[0, 2, 0].set(50.0)  # argmax 0 lies outside the draft vocab (if 0 is unmapped)
    ids = DRAFT_TO_TARGET if 0 not in DRAFT_TO_TARGET else DRAFT_TO_TARGET[1:]
    mask = jnp.ones((2, 5))
    sub, sub_mask = losses.restrict_to_draft_vocab(logits, mask, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(sub), np.asarray(logits)[..., ids])
    covered = np.isin(np.asarray(jnp.argmax(logits, -1)), ids)
    np.testing.assert_array_equal(np.asarray(sub_mask), covered.astype(np.float32))
    assert not covered[0, 2]
    # The teacher is the target renormalized over the draft vocabulary; with every id mapped, the
    # restricted loss is the full one.
    draft = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 5, V)), jnp.float32)
    ttt_loss = jax.jit(losses.ttt_loss)
    full = ttt_loss(draft, *losses.dense_teacher(logits, mask))
    same = ttt_loss(draft, *losses.dense_teacher(logits, mask, jnp.arange(V)))
    np.testing.assert_allclose(np.asarray(same.step_loss_K), np.asarray(full.step_loss_K), rtol=1e-6)
    reduced = ttt_loss(draft[..., :len(ids)], *losses.dense_teacher(logits, mask, jnp.asarray(ids)))
    probs = jax.nn.softmax(np.asarray(logits)[..., ids][:, 1:], axis=-1)  # step 0 teacher: position j + 1
    logq = jax.nn.log_softmax(draft[0, :, :-1, :len(ids)], axis=-1)
    m = np.asarray(sub_mask)[:, 1:]
    expected = -np.sum(np.sum(probs * logq, -1) * m) / m.sum()
    np.testing.assert_allclose(float(reduced.step_loss_K[0]), expected, rtol=1e-5)


def test_bfloat16_speculative_decoding_equals_plain_bfloat16(tmp_path, target):
    """Target and drafter in bfloat16 (logits and norms accumulate in float32): greedy speculative
    output equals plain greedy decoding of the same bfloat16 target."""
    config = TARGET.__class__(**{**TARGET.__dict__, "dtype": "bfloat16"})
    bf_target = target_lib.Target(config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), target.params))
    out_plain = decode.generate(bf_target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False)
    logits = bf_target.logits([PROMPTS[1]])
    assert logits.dtype == jnp.float32
    write_checkpoint(tmp_path / "ckpt", published_tensors(ml_dtypes.bfloat16, True, seed=5), published_config(True))
    method, params = eagle3_hf.load_eagle3_hf(tmp_path / "ckpt", bf_target, budget=12, max_depth=3, topk=3)
    assert method.config.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params["drafter"]))
    # The drafter's logits are accumulated in float32, not bf16 values cast up afterwards.
    one_step = dataclasses.replace(method.config, ttt_steps=1)
    features = jnp.ones((1, 4, 3 * H), jnp.bfloat16)
    (logits,) = eagle3.ttt_forward(params["drafter"], one_step, params["embed"], features, jnp.asarray([[1, 2, 3, 4]]))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 4, VD)
    assert bool(jnp.any(logits != logits.astype(jnp.bfloat16).astype(jnp.float32)))
    out = decode.generate(bf_target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False,
                          drafter=Drafter(method, params))
    assert out.token_ids == out_plain.token_ids
    assert out.stats["malformed_trees"] == 0
