"""specblock_jax.hf against transformers' own PyTorch models: tiny random Llama / Qwen2 / Qwen3
checkpoints written with save_pretrained, loaded into JAX, compared logit for logit."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from specblock_jax import hf, kvcache  # noqa: E402
from specblock_jax.models import target  # noqa: E402

SIZES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)  # small, so the 12-token test sees scaled frequencies
CASES = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama3-rope-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "qwen2-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=16,
                                             rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}


def _randomize(model):
    """transformers initialises biases at zero and norms at one; random values make them matter."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "norm" in name else 0.0))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """A saved tiny HF model: (directory, torch model, ids [2, 12], torch logits)."""
    config_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**SIZES, **extra)).eval()
    _randomize(model)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12))
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    return path, model, ids, logits


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    config = transformers.LlamaConfig(**SIZES)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("llama_plain")
    model.save_pretrained(path)
    return path


_forward = jax.jit(target.forward, static_argnums=1, static_argnames="feature_layers")


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _copy_with_tensors(src, dst, edit):
    """Copy an HF directory, rewriting model.safetensors through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    tensors = edit(safetensors.numpy.load_file(dst / "model.safetensors"))
    safetensors.numpy.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_logits_match_torch(case):
    path, _, ids, torch_logits = case
    model = hf.load_target(path)
    assert model.tokenizer is None
    assert _max_diff(model.logits(ids.numpy()), torch_logits) < 1e-4


def test_cached_decode_matches_full_forward(case):
    path, _, ids, _ = case
    config, params = hf.load_hf(path)
    ids = jnp.asarray(ids.numpy())
    b, t, s, prefill = ids.shape[0], ids.shape[1], 16, 8
    full = target.Target(config, params).logits(ids)  # jitted, compiled by test_logits_match_torch already

    cache = kvcache.init_cache(config, b, s)
    positions = jnp.broadcast_to(jnp.arange(prefill), (b, prefill))
    out = _forward(params, config, ids[:, :prefill], positions, kvcache.causal_mask(prefill, s),
                         cache, slots_BxT=positions)
    steps = [out.logits]
    cache = out.cache.replace(lengths=jnp.full((b,), prefill, jnp.int32))
    for i in range(prefill, t):
        slot = jnp.full((b, 1), i, jnp.int32)
        out = _forward(params, config, ids[:, i:i + 1], slot, kvcache.decode_mask(cache.lengths, s),
                             cache, slots_BxT=slot)
        steps.append(out.logits)
        cache = out.cache.replace(lengths=cache.lengths + 1)
    assert _max_diff(jnp.concatenate(steps, axis=1), full) < 1e-5


def test_features_match_torch_hidden_states(case):
    path, model, ids, _ = case
    config, params = hf.load_hf(path)
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    out = _forward(params, config, jnp.asarray(ids.numpy()), positions, jnp.tril(jnp.ones((t, t), bool))[None],
                         feature_layers=(0, 1))
    layer0, layer1 = np.split(np.asarray(out.features), 2, axis=-1)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        # transformers' last hidden_states entry is the final decoder layer's output *after* the final norm.
        layer1_normed = model.model.norm(torch.tensor(layer1)).numpy()
    assert len(hidden) == config.num_layers + 1
    assert _max_diff(layer0, hidden[1]) < 1e-4
    assert _max_diff(layer1_normed, hidden[2]) < 1e-4


def test_sharded_checkpoint_loads(case, tmp_path):
    path, model, ids, torch_logits = case
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert _max_diff(hf.load_target(tmp_path).logits(ids.numpy()), torch_logits) < 1e-4


def test_export_round_trip(case, tmp_path):
    path, _, ids, torch_logits = case
    config, params = hf.load_hf(path)
    out = hf.export_hf(config, params, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(reloaded).__name__ == json.loads((path / "config.json").read_text())["architectures"][0]
    with torch.no_grad():
        assert _max_diff(reloaded(ids).logits, torch_logits) < 1e-5
    config2, params2 = hf.load_hf(out)
    assert config2 == config
    flat, flat2 = (dict(traverse_util.flatten_dict(p)) for p in (params, params2))
    assert flat.keys() == flat2.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], flat2[key])


def test_bfloat16_load(case):
    path, _, ids, torch_logits = case
    model = hf.load_target(path, dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    leaves = traverse_util.flatten_dict(model.params).values()
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    logits = model.logits(ids.numpy())
    assert _max_diff(logits, torch_logits) < 0.05 * float(np.max(np.abs(torch_logits)))


def test_export_refuses_to_clobber_and_can_overwrite(llama_dir, tmp_path):
    config, params = hf.load_hf(llama_dir)
    out = tmp_path / "model"
    hf.export_hf(config, params, out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.export_hf(config, params, out)
    hf.export_hf(config, params, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_with_tokenizer_and_load_target(llama_dir, tmp_path):
    import tokenizers

    words = ["<unk>", "<s>", "</s>", "hello", "world"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                     eos_token="</s>")
    config, params = hf.load_hf(llama_dir)
    model = hf.load_target(hf.export_hf(config, params, tmp_path / "model", tokenizer=tokenizer))
    assert model.config == config
    assert model.tokenizer("hello world").input_ids == [3, 4]


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf.load_target(tmp_path / "nowhere")


def test_unsupported_architecture(llama_dir, tmp_path):
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        hf.load_hf(tmp_path)


def test_missing_tensor_is_named(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = _copy_with_tensors(llama_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        hf.load_hf(path)


def test_misshapen_tensor_names_both_shapes(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = _copy_with_tensors(llama_dir, tmp_path / "m", lambda t: {**t, name: np.zeros((8, 32), np.float32)})
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(8, 32\).*\(16, 32\)"):
        hf.load_hf(path)


def test_unexpected_tensor_is_listed(llama_dir, tmp_path):
    buffers = {"model.rotary_emb.inv_freq": np.ones(4, np.float32)}
    path = _copy_with_tensors(llama_dir, tmp_path / "ok", lambda t: {**t, **buffers})
    hf.load_hf(path)  # rotary buffers are harmless
    path = _copy_with_tensors(llama_dir, tmp_path / "bad", lambda t: {**t, "model.extra.weight": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="model.extra.weight"):
        hf.load_hf(path)


def test_tied_checkpoint_may_repeat_the_embedding_as_lm_head(tmp_path):
    tied = tmp_path / "tied"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, tie_word_embeddings=True)).save_pretrained(tied)
    embed = "model.embed_tokens.weight"
    hf.load_hf(_copy_with_tensors(tied, tmp_path / "same", lambda t: {**t, "lm_head.weight": t[embed]}))
    path = _copy_with_tensors(tied, tmp_path / "differs", lambda t: {**t, "lm_head.weight": t[embed] + 1})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf.load_hf(path)


def test_pickle_only_directory_is_refused(llama_dir, tmp_path):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*only safetensors"):
        hf.load_hf(tmp_path)


def _v5_llama3():
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "rope_parameters": dict(LLAMA3_ROPE, rope_theta=5e5),
            "eos_token_id": [1, 2]}


def test_config_legacy_rope_keys_match_v5():
    legacy = {k: v for k, v in _v5_llama3().items() if k != "rope_parameters"}
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    legacy.update(rope_theta=5e5, rope_scaling={"type": "llama3", **scaling})
    config = hf.config_from_hf(_v5_llama3())
    assert hf.config_from_hf(legacy) == config
    assert config.rope_theta == 5e5 and config.rope_scaling.factor == 8.0
    assert config.head_dim == 8 and config.num_kv_heads == 4 and config.eos_token_ids == (1, 2)
    assert hf.config_from_hf(hf.config_to_hf(config)) == config


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "use_sliding_window"),
    (dict(attention_bias=True), "o_proj"),
    (dict(architectures=None), "supported"),
])
def test_config_rejects_what_the_model_cannot_compute(change, message):
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf({**_v5_llama3(), **change})


def test_toy_target_loads_with_its_tokenizer_and_matches_transformers():
    """The 5M toy target (the tests' fixture), checked against transformers' own loading."""
    torch = pytest.importorskip("torch")
    import transformers

    target = hf.load_target(hf.TOY_TARGET_DIR)
    assert target.config.num_params == 5_245_184 and target.tokenizer is not None
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = target.tokenizer.encode(text, add_special_tokens=False)
    assert target.tokenizer.decode(ids) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(hf.TOY_TARGET_DIR)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    assert np.abs(np.asarray(target.logits([ids])) - ref).max() < 1e-4
