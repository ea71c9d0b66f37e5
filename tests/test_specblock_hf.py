"""The SpecBlock authors' released drafter format (`specblock_hf`) and reduced draft vocabularies in
SpecBlock drafting.

Synthetic checkpoints are written here by hand in the authors' key layout (their `save_pretrained`:
`input_layer.*`, `layers.{i}.*`, `shift_proj.{i}`, `norm`, `lm_head`, `rank_head.{0,2}`, int64 `d2t`,
bool `t2d`, torch [out, in] shapes, bf16 or f32), independently of the module's own layout table. They
must load, decode losslessly with a tiny target, draft target ids through `d2t`, and round-trip through
export; a missing, unexpected or misshapen tensor is an error naming it.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from specblock_jax import decode, drafter_io, losses, specblock_hf
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.drafter import Drafter, load_drafter
from specblock_jax.models import eagle3
from specblock_jax.models import specblock as sb
from specblock_jax.specblock_draft import SpecBlockMethod

TARGET = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
H, F, V, VD, K, LAYERS = 32, 48, 64, 40, 4, 2
N_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41]]
N_NEW, MAX_LEN = 8, 48
KNOBS = dict(budget=12, max_blocks=2, widths=(2, 2, 3, 2), slot0_width=3, expand=2)
# Draft vocabulary: 40 of the 64 target ids, with gaps, so draft id != target id for most of them.
DRAFT_TO_TARGET = np.sort(np.random.default_rng(0).choice(V, VD, replace=False)).astype(np.int32)


def published_tensors(dtype, reduced: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """The state dict the authors' trainer saves (every key holding "embed" left out), by hand."""
    rng = np.random.default_rng(seed)
    vd = VD if reduced else V
    shapes = {
        "input_layer.condition_proj.weight": (H, 3 * H),
        "input_layer.condition_norm.weight": (H,),
        "input_layer.token_norm.weight": (H,),
        "input_layer.position_queries.weight": (K, H),
        "input_layer.query_norm.weight": (H,),
        "input_layer.fuse.weight": (H, 3 * H),
        "norm.weight": (H,),
        "lm_head.weight": (vd, H),
        "rank_head.0.weight": (256, H + 15),
        "rank_head.2.weight": (4, 256),
        "shift_proj.0.weight": (H, 2 * H),
    }
    for i in range(LAYERS):
        shapes.update({
            f"layers.{i}.input_layernorm.weight": (H,),
            f"layers.{i}.self_attn.q_proj.weight": (N_HEADS * HEAD_DIM, H),
            f"layers.{i}.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, H),
            f"layers.{i}.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, H),
            f"layers.{i}.self_attn.o_proj.weight": (H, N_HEADS * HEAD_DIM),
            f"layers.{i}.post_attention_layernorm.weight": (H,),
            f"layers.{i}.mlp.gate_proj.weight": (F, H),
            f"layers.{i}.mlp.up_proj.weight": (F, H),
            f"layers.{i}.mlp.down_proj.weight": (H, F),
        })
    tensors = {name: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.5 * rng.standard_normal(s)).astype(dtype)
               for name, s in shapes.items()}
    # Registered buffers, always saved: the identity for a full vocabulary.
    tensors["d2t"] = (DRAFT_TO_TARGET.astype(np.int64) - np.arange(VD)) if reduced else np.zeros(V, np.int64)
    t2d = np.zeros(V, bool) if reduced else np.ones(V, bool)
    t2d[DRAFT_TO_TARGET] = True
    tensors["t2d"] = t2d
    return tensors


def published_config(reduced: bool, **extra) -> dict:
    """Their config.json: LlamaConfig fields plus SpecBlock's (no head_dim, no rope_theta: as released)."""
    cfg = {"architectures": ["LlamaForCausalLMSpecBlock"], "model_type": "llama", "num_hidden_layers": LAYERS,
           "hidden_size": H, "intermediate_size": F, "num_attention_heads": N_HEADS, "num_key_value_heads": KV_HEADS,
           "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": V, "max_position_embeddings": 2048,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "draft_vocab_size": VD if reduced else V,
           "_comment_specblock": "SpecBlock specific parameters", "diffspec_draft_token_num": K, "rank_classes": 4,
           "num_ttt_blocks": 3}
    return {**cfg, **extra}


def write_checkpoint(path, tensors, config) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def target(peaked_target):
    return peaked_target(TARGET)


@pytest.fixture(scope="module")
def plain(target):
    return decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False).token_ids


def test_config_reads_the_released_fields():
    cfg = specblock_hf.config_from_hf(published_config(True), TARGET)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (H, N_HEADS, KV_HEADS, H // N_HEADS)
    assert (cfg.num_layers, cfg.block_size, cfg.rank_classes, cfg.rank_hidden, cfg.rank_topk) == (LAYERS, K, 4, 256, 20)
    assert (cfg.draft_vocab_size, cfg.draft_vocab, cfg.reduced_vocab) == (VD, VD, True)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rms_norm_eps, cfg.num_ttt_blocks) == (10000.0, None, 1e-5, 3)
    assert cfg.feature_layers == eagle3.default_feature_layers(TARGET.num_layers) and cfg.shift and cfg.inherit
    full = specblock_hf.config_from_hf(published_config(False, architectures=["LlamaForCausalLMSpecBlockShift"],
                                                        rope_theta=1e6), TARGET)
    assert full.draft_vocab_size is None and full.draft_vocab == V and full.rope_theta == 1e6
    assert specblock_hf.config_from_hf(specblock_hf.config_to_hf(cfg, TARGET), TARGET) == cfg
    for bad, match in [({"architectures": ["LlamaForCausalLMEagle3"]}, "not a SpecBlock drafter"),
                       ({"rank_classes": 3}, "rank_classes=3"),
                       ({"hidden_act": "gelu"}, "hidden_act"),
                       ({"target_hidden_size": 64}, "target_hidden_size"),
                       ({"draft_vocab_size": V + 1}, "draft_vocab_size"),
                       ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn")]:
        with pytest.raises(ValueError, match=match):
            specblock_hf.config_from_hf(published_config(True, **bad), TARGET)
    with pytest.raises(ValueError, match="give the target's config"):
        specblock_hf.config_from_hf(published_config(True))
    with pytest.raises(ValueError, match="rank_hidden=64"):
        specblock_hf.config_to_hf(sb.SpecBlockConfig.for_target(TARGET, rank_hidden=64))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_released_layout_loads_into_the_drafter(tmp_path, dtype):
    tensors = published_tensors(dtype, reduced=True)
    write_checkpoint(tmp_path / "ckpt", tensors, published_config(True))
    config, params, mapping = specblock_hf.read_specblock_hf(tmp_path / "ckpt", TARGET)
    np.testing.assert_array_equal(mapping, DRAFT_TO_TARGET)
    f32 = lambda name: tensors[name].astype(np.float32)
    np.testing.assert_array_equal(params["condition_proj"]["kernel"], f32("input_layer.condition_proj.weight").T)
    np.testing.assert_array_equal(params["position_queries"], f32("input_layer.position_queries.weight"))
    np.testing.assert_array_equal(params["fuse"]["kernel"], f32("input_layer.fuse.weight").T)
    np.testing.assert_array_equal(params["layers_1"]["self_attn"]["k_proj"]["kernel"],
                                  f32("layers.1.self_attn.k_proj.weight").T)
    np.testing.assert_array_equal(params["layers_0"]["mlp"]["down_proj"]["kernel"], f32("layers.0.mlp.down_proj.weight").T)
    np.testing.assert_array_equal(params["layers_1"]["post_attention_layernorm"]["weight"],
                                  f32("layers.1.post_attention_layernorm.weight"))
    np.testing.assert_array_equal(params["shift_1"]["kernel"], f32("shift_proj.0.weight").T)
    np.testing.assert_array_equal(params["rank_in"]["kernel"], f32("rank_head.0.weight").T)
    np.testing.assert_array_equal(params["rank_out"]["kernel"], f32("rank_head.2.weight").T)
    assert params["lm_head"]["kernel"].shape == (H, VD)
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params
    # In bfloat16 the drafter weights are bf16; the rank head stays float32, as the drafter creates it.
    _, bf, _ = specblock_hf.read_specblock_hf(tmp_path / "ckpt", TARGET, dtype="bfloat16")
    assert bf["fuse"]["kernel"].dtype == jnp.bfloat16 and bf["rank_in"]["kernel"].dtype == np.float32


def test_missing_unexpected_or_misshapen_tensors_are_named(tmp_path):
    good = published_tensors(np.float32, reduced=True)
    cases = [
        ({k: v for k, v in good.items() if k != "shift_proj.0.weight"}, r"missing.*'shift_proj.0.weight'"),
        ({k: v for k, v in good.items() if k != "d2t"}, r"missing.*'d2t'"),
        ({**good, "layers.0.self_attn.q_proj.weight": np.zeros((H, 2 * H), np.float32)},
         r"'layers.0.self_attn.q_proj.weight' has shape \(32, 64\), expected \(32, 32\)"),
        ({**good, "lm_head.weight": np.zeros((V, H), np.float32)}, r"'lm_head.weight' has shape \(64, 32\)"),
        ({**good, "input_layer.position_queries.weight": np.zeros((7, H), np.float32)},
         r"'input_layer.position_queries.weight' has shape \(7, 32\), expected \(4, 32\)"),
        ({**good, "layers.0.self_attn.q_proj.bias": np.zeros(H, np.float32)}, "no place for.*q_proj.bias"),
        ({**good, "t2d": ~good["t2d"]}, "'t2d' and 'd2t' disagree"),
        ({**good, "d2t": np.zeros(VD, np.int64) + V}, "outside the target vocabulary"),
        ({**good, "input_layer.embed_tokens.weight": np.zeros((V, H + 1), np.float32)},
         r"'input_layer.embed_tokens.weight' has shape \(64, 33\)"),
    ]
    for i, (tensors, match) in enumerate(cases):
        write_checkpoint(tmp_path / str(i), tensors, published_config(True))
        with pytest.raises(ValueError, match=match):
            specblock_hf.read_specblock_hf(tmp_path / str(i), TARGET)
    # A full-vocabulary checkpoint whose d2t is not the identity is refused too.
    full = {**published_tensors(np.float32, reduced=False), "d2t": np.ones(V, np.int64)}
    write_checkpoint(tmp_path / "full", full, published_config(False))
    with pytest.raises(ValueError, match="'d2t' is not all zeros"):
        specblock_hf.read_specblock_hf(tmp_path / "full", TARGET)
    with pytest.raises(FileNotFoundError, match="config.json"):
        specblock_hf.read_specblock_hf(tmp_path / "nowhere", TARGET)


def test_released_drafters_decode_losslessly(tmp_path, target, plain):
    """Full and reduced vocabulary load through `load_drafter(dir)` (the embedding a full state dict
    may carry is accepted and skipped); the reduced one decodes exactly as plain greedy decoding."""
    full = {**published_tensors(np.float32, False, seed=1), "input_layer.embed_tokens.weight": np.zeros((V, H))}
    write_checkpoint(tmp_path / "full", full, published_config(False))
    write_checkpoint(tmp_path / "reduced", published_tensors(np.float32, True, seed=2), published_config(True))
    method, params = drafter_io.load(tmp_path / "full", target)
    assert isinstance(method, SpecBlockMethod) and not method.config.reduced_vocab and "draft_to_target" not in params
    drafter = load_drafter(str(tmp_path / "reduced"), target)
    assert drafter.method.config.reduced_vocab
    np.testing.assert_array_equal(np.asarray(drafter.params["draft_to_target"]), DRAFT_TO_TARGET)
    method, params = specblock_hf.load_specblock_hf(tmp_path / "reduced", target, **KNOBS)
    out = decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False,
                          drafter=Drafter(method, params))
    assert out.token_ids == plain
    assert out.stats["malformed_trees"] == 0 and out.stats["verify_steps"] > 0
    other = ModelConfig(**{**TARGET.__dict__, "hidden_size": 48, "head_dim": 12})
    with pytest.raises(ConfigError, match="hidden_size 32 does not match the target's 48"):
        specblock_hf.load_specblock_hf(tmp_path / "reduced", type(target)(other, target.params))


_init = jax.jit(lambda method, *args: method.init(*args), static_argnums=(0, 6))
_candidates = jax.jit(lambda method, *args: method.candidates(*args), static_argnums=0)


def test_reduced_vocab_drafts_mapped_target_ids(tmp_path, target):
    """Block 1's candidates are the drafter's top draft ids sent through the map (compared with the same
    drafter and an identity map), and no drafted node anywhere is a raw draft id."""
    write_checkpoint(tmp_path / "ckpt", published_tensors(np.float32, True, seed=4), published_config(True))
    method, params = specblock_hf.load_specblock_hf(tmp_path / "ckpt", target, **KNOBS)
    identity = {**params, "draft_to_target": jnp.arange(VD, dtype=jnp.int32)}
    prompt = jnp.asarray([PROMPTS[1]])
    features = jax.random.normal(jax.random.key(0), (1, prompt.shape[1], 3 * H))
    root, lengths = jnp.asarray([7]), jnp.asarray([prompt.shape[1]])
    trees = []
    for p in (params, identity):
        state = _init(method, p, prompt, lengths, features, root, MAX_LEN)
        trees.append(_candidates(method, p, state, root, lengths)[0])
    mapped, raw = trees
    block1 = slice(1, 1 + K * method.width)
    np.testing.assert_array_equal(np.asarray(mapped.valid[:, block1]), np.asarray(raw.valid[:, block1]))
    np.testing.assert_array_equal(np.asarray(mapped.tokens[:, block1]), DRAFT_TO_TARGET[np.asarray(raw.tokens[:, block1])])
    drafted = np.asarray(mapped.tokens)[0, 1:][np.asarray(mapped.valid)[0, 1:]]
    assert drafted.size > K * method.width // 2 and set(drafted.tolist()) <= set(DRAFT_TO_TARGET.tolist())
    assert not set(drafted.tolist()) <= set(range(VD))  # raw draft ids would all be < VD
    with pytest.raises(ValueError, match="no 'draft_to_target' map"):
        method.candidates({k: v for k, v in params.items() if k != "draft_to_target"}, state, root, lengths)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_export_import_round_trip(tmp_path, dtype):
    name = "bfloat16" if dtype is ml_dtypes.bfloat16 else "float32"
    for reduced in (True, False):
        original = published_tensors(dtype, reduced=reduced)
        ckpt, out = tmp_path / f"ckpt{reduced}", tmp_path / f"out{reduced}"
        write_checkpoint(ckpt, original, published_config(reduced))
        config, params, mapping = specblock_hf.read_specblock_hf(ckpt, TARGET, dtype=name)
        assert (mapping is not None) == reduced
        specblock_hf.export_specblock_hf(config, params, out, mapping, target=TARGET)
        written = load_file(str(out / "model.safetensors"))
        assert set(written) == set(original)
        for key, value in original.items():
            assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
            np.testing.assert_array_equal(written[key], value, err_msg=key)
        config2, params2, mapping2 = specblock_hf.read_specblock_hf(out, TARGET, dtype=name)
        assert config2 == config
        if reduced:
            np.testing.assert_array_equal(mapping2, mapping)
            with pytest.raises(ValueError, match="draft_to_target map is required"):
                specblock_hf.export_specblock_hf(config, params, tmp_path / "nomap")
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        specblock_hf.export_specblock_hf(config, params, out)


def test_project_drafter_directory_keeps_the_vocab_map(tmp_path, target):
    """A reduced-vocabulary drafter in the project's own directory format, then exported to the
    authors' format; full-vocabulary configs (the shipped drafters') are unchanged."""
    assert sb.SpecBlockConfig.for_target(TARGET).draft_vocab_size is None
    cfg = sb.SpecBlockConfig.for_target(TARGET, rank_hidden=256, draft_vocab_size=VD)
    params = jax.jit(sb.init_params, static_argnums=0)(cfg, jax.random.key(0))
    assert params["lm_head"]["kernel"].shape == (H, VD)
    method = SpecBlockMethod(cfg, **KNOBS)
    with pytest.raises(ValueError, match="no 'draft_to_target' map"):
        drafter_io.save(method, params, tmp_path / "d")
    drafter_io.save(method, params, tmp_path / "d", draft_to_target=DRAFT_TO_TARGET)
    loaded, method_params = drafter_io.load(tmp_path / "d", target)
    assert loaded == method
    np.testing.assert_array_equal(np.asarray(method_params["draft_to_target"]), DRAFT_TO_TARGET)
    specblock_hf.export_drafter_dir(tmp_path / "d", target, tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["draft_vocab_size"], hf_config["diffspec_draft_token_num"]) == (VD, K)
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(written["rank_head.0.weight"], np.asarray(params["rank_in"]["kernel"]).T)
    np.testing.assert_array_equal(written["d2t"] + np.arange(VD), DRAFT_TO_TARGET)
    reread, _, mapping = specblock_hf.read_specblock_hf(tmp_path / "hf", TARGET)
    assert reread == cfg and np.array_equal(mapping, DRAFT_TO_TARGET)
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        sb.SpecBlockConfig.for_target(TARGET, draft_vocab_size=V + 1)
    with pytest.raises(ConfigError, match="rank_topk"):
        sb.SpecBlockConfig.for_target(TARGET, draft_vocab_size=12)  # rank features read the top 20


def test_reduced_vocab_training_loss_reads_the_teacher_over_the_draft_vocabulary():
    """A reduced-vocabulary drafter trains on the target restricted to its map: the teacher from full
    logits and the one from their top k (the feature cache's) give the same loss, and a teacher over
    the whole vocabulary is refused."""
    ids = DRAFT_TO_TARGET
    cfg = sb.SpecBlockConfig.for_target(TARGET, rank_hidden=8, num_ttt_blocks=2, draft_vocab_size=len(ids))
    params = jax.jit(sb.init_params, static_argnums=0)(cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    t, k = 8, 6
    top_ids = np.argsort(-rng.standard_normal((1, t, V)), axis=-1)[..., :k].astype(np.int32)
    top_ids[0, 2, 0] = next(i for i in range(V) if i not in ids and i not in top_ids[0, 2])
    top_logits = np.sort(rng.standard_normal((1, t, k)) * 3, axis=-1)[..., ::-1].astype(np.float32)
    logits = np.full((1, t, V), -1e30, np.float32)
    np.put_along_axis(logits, top_ids, top_logits, axis=-1)
    mask = jnp.ones((1, t))
    inputs = (jnp.asarray(rng.standard_normal((V, H)), jnp.float32), jnp.asarray(rng.standard_normal((1, t, 3 * H))),
              jnp.asarray(rng.integers(0, V, (1, t))))
    metrics = jax.jit(sb.train_metrics, static_argnums=1)
    dense, dense_mask = losses.dense_teacher(logits, mask, ids)
    topk, topk_mask = losses.topk_teacher(top_logits, top_ids, mask, V, ids)
    assert float(dense_mask[0, 2]) == float(topk_mask[0, 2]) == 0.0  # its top token is not draftable
    a = metrics(params, cfg, *inputs, dense, dense_mask, jax.random.key(0))
    b = metrics(params, cfg, *inputs, topk, topk_mask, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(b.block_loss_NxK), np.asarray(a.block_loss_NxK), rtol=1e-5)
    np.testing.assert_allclose(float(b.loss), float(a.loss), rtol=1e-5)
    with pytest.raises(ValueError, match=f"the teacher covers {V} ids, the drafter's vocabulary {len(ids)}"):
        sb.train_metrics(params, cfg, *inputs, *losses.dense_teacher(logits, mask), jax.random.key(0))