"""The EAGLE-3 drafter: its config, parameters, the training-time-test unroll against a slow
per-position reference, causality and gradient flow through every TTT step; then drafting
(`eagle3_draft`): trees that follow the TTT unroll before and after a commit, and greedy
speculative decoding identical to plain decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specblock_jax import config as config_lib
from specblock_jax import decode, losses
from specblock_jax import tree as tree_lib
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.drafter import Drafter
from specblock_jax.eagle3_draft import Eagle3Method, drafter_params
from specblock_jax.models import eagle3
from specblock_jax.models import target as target_lib
from specblock_jax.sharding import LOGICAL_AXIS_RULES
from specblock_jax.verify import Acceptance

CONFIG = eagle3.Eagle3Config(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=32,
                             vocab_size=24, feature_layers=(0, 1, 3), ttt_steps=3)
B, T = 2, 6
_ttt_forward = jax.jit(eagle3.ttt_forward, static_argnums=1)


@pytest.fixture(scope="module")
def setup():
    keys = jax.random.split(jax.random.key(0), 4)
    # Weights x10: the layer's output depends strongly on its inputs, so a leak would show.
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, eagle3.init_params(CONFIG, keys[0]))
    table = jax.random.normal(keys[1], (CONFIG.vocab_size, CONFIG.hidden_size))
    features = jax.random.normal(keys[2], (B, T, 3 * CONFIG.hidden_size))
    tokens = jax.random.randint(keys[3], (B, T), 0, CONFIG.vocab_size)
    return params, table, features, tokens


def test_default_feature_layers():
    assert eagle3.default_feature_layers(32) == (1, 15, 28)  # Llama-3.1-8B, as EAGLE-3
    assert eagle3.default_feature_layers(36) == (1, 17, 32)  # Qwen3-8B
    assert eagle3.default_feature_layers(8) == (1, 3, 4)
    assert eagle3.default_feature_layers(4) == (0, 1, 3)  # the embedded target
    assert eagle3.default_feature_layers(3) == (0, 1, 2)
    with pytest.raises(ConfigError, match="only 2 layer"):
        eagle3.default_feature_layers(2)


def test_config_validation_and_for_target():
    target = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                         intermediate_size=64)
    cfg = eagle3.Eagle3Config.for_target(target, ttt_steps=2)
    assert (cfg.hidden_size, cfg.vocab_size, cfg.feature_layers, cfg.ttt_steps) == (32, 64, (0, 1, 3), 2)
    cfg.check_target(target)
    with pytest.raises(ConfigError, match="feature_layers"):
        eagle3.Eagle3Config.for_target(target, feature_layers=(0, 0, 3))
    with pytest.raises(ConfigError, match="ttt_steps"):
        eagle3.Eagle3Config.for_target(target, ttt_steps=0)
    with pytest.raises(ConfigError, match="hidden_size 16 does not match the target's 32"):
        CONFIG.check_target(target)
    assert config_lib.from_dict(eagle3.Eagle3Config, config_lib.to_dict(cfg)) == cfg  # YAML-ready
    with pytest.raises(ConfigError, match="unknown key"):
        config_lib.from_dict(eagle3.Eagle3Config, {**config_lib.to_dict(cfg), "ttt": 3})


def test_param_count_and_logical_axes():
    params = eagle3.init_params(CONFIG, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == CONFIG.num_params
    h, v = CONFIG.hidden_size, CONFIG.vocab_size
    assert params["fc"]["kernel"].shape == (3 * h, h)
    assert params["self_attn"]["q_proj"]["kernel"].shape == (2 * h, CONFIG.num_heads * CONFIG.head_dim)
    assert params["lm_head"]["kernel"].shape == (h, v)
    assert "embed_tokens" not in params  # the target's table is an input
    axes = eagle3.param_axes(CONFIG)
    specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = jax.tree.leaves(params)
    assert len(specs) == len(shapes)
    for spec, x in zip(specs, shapes):
        assert len(spec) == x.ndim and all(name in LOGICAL_AXIS_RULES for name in spec), (spec, x.shape)


# A slow reference: every (step, position) recomputed from scratch in float64 numpy.

def _rms(x, w, eps=CONFIG.rms_norm_eps):
    return w * x / np.sqrt(np.mean(x * x) + eps)


def _rope(x_NxD, pos):
    d = x_NxD.shape[-1]
    inv = 1.0 / CONFIG.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rot = np.concatenate([-x_NxD[:, d // 2:], x_NxD[:, :d // 2]], axis=-1)
    return x_NxD * np.cos(ang) + rot * np.sin(ang)


def _reference(params, table, features_TxF, tokens_T):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    table, features_TxF, tokens_T = np.asarray(table, np.float64), np.asarray(features_TxF, np.float64), tokens_T
    c, t = CONFIG, len(tokens_T)
    n, kvh, d = c.num_heads, c.num_kv_heads, c.head_dim
    memo = {}

    def row(s, j):  # -> (k [KV, D], v [KV, D], pre-norm hidden [H], logits [V])
        if (s, j) in memo:
            return memo[(s, j)]
        hidden = features_TxF[j] @ p["fc"]["kernel"] if s == 0 else row(s - 1, j)[2]
        token = tokens_T[j + 1 + s] if j + 1 + s < t else 0
        x = np.concatenate([_rms(table[token], p["input_layernorm"]["weight"]),
                            _rms(hidden, p["hidden_norm"]["weight"])])
        a = p["self_attn"]
        q = _rope((x @ a["q_proj"]["kernel"]).reshape(n, d), j + s)
        k = _rope((x @ a["k_proj"]["kernel"]).reshape(kvh, d), j + s)
        v = (x @ a["v_proj"]["kernel"]).reshape(kvh, d)
        seen = [row(0, i) for i in range(j)] + [row(r, j) for r in range(s)] + [(k, v)]
        keys, vals = np.stack([kv[0] for kv in seen]), np.stack([kv[1] for kv in seen])
        out = []
        for head in range(n):
            g = head // (n // kvh)
            scores = keys[:, g] @ q[head] / np.sqrt(d)
            w = np.exp(scores - scores.max())
            out.append((w / w.sum()) @ vals[:, g])
        h = hidden + np.concatenate(out) @ a["o_proj"]["kernel"]
        m = p["mlp"]
        y = _rms(h, p["post_attention_layernorm"]["weight"])
        gate = y @ m["gate_proj"]["kernel"]
        h = h + (gate / (1 + np.exp(-gate)) * (y @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
        logits = _rms(h, p["norm"]["weight"]) @ p["lm_head"]["kernel"]
        memo[(s, j)] = (k, v, h, logits)
        return memo[(s, j)]

    return np.stack([[row(s, j)[3] for j in range(t)] for s in range(c.ttt_steps)])


def test_ttt_forward_matches_slow_reference(setup):
    params, table, features, tokens = setup
    logits_KxBxTxV = np.asarray(_ttt_forward(params, CONFIG, table, features, tokens))
    assert logits_KxBxTxV.shape == (CONFIG.ttt_steps, B, T, CONFIG.vocab_size)
    for b in range(B):
        expected = _reference(params, table, features[b], np.asarray(tokens[b]))
        np.testing.assert_allclose(logits_KxBxTxV[:, b], expected, atol=1e-5, rtol=1e-5)


def test_ttt_rows_never_see_the_future(setup):
    """Row j at step k reads features <= j and tokens <= j + 1 + k only: perturbing features from
    position p on and tokens after p leaves exactly those rows unchanged."""
    params, table, features, tokens = setup
    p = 3
    later_T = jnp.arange(T) >= p
    features2 = jnp.where(later_T[None, :, None], features + 1.0, features)
    tokens2 = jnp.where(jnp.arange(T) > p, (tokens + 5) % CONFIG.vocab_size, tokens)
    a = np.asarray(_ttt_forward(params, CONFIG, table, features, tokens))
    b = np.asarray(_ttt_forward(params, CONFIG, table, features2, tokens2))
    for k in range(CONFIG.ttt_steps):
        for j in range(T):
            same = np.allclose(a[k, :, j], b[k, :, j], atol=1e-6)
            assert same == (j < p and j + 1 + k <= p), (k, j)


def test_gradients_flow_through_every_ttt_step(setup):
    """A loss on the last step alone reaches fc, which only step 0 applies."""
    params, table, features, tokens = setup
    target_logits = jax.random.normal(jax.random.key(7), (B, T, CONFIG.vocab_size))
    last = CONFIG.ttt_steps - 1

    def last_step_loss(p):
        logits = eagle3.ttt_forward(p, CONFIG, table, features, tokens)
        probs, mask = losses.ttt_targets(target_logits, jnp.ones((B, T)), last)
        return losses.soft_cross_entropy(logits[last], probs, mask)

    grads = jax.jit(jax.grad(last_step_loss))(params)
    assert float(jnp.abs(grads["fc"]["kernel"]).max()) > 0
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# Drafting inside the tree core: a randomly initialised drafter on a tiny 4-layer target.

TARGET = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41], [17, 3, 22, 50, 9, 14, 1, 6, 30, 11]]
N_NEW, MAX_LEN = 10, 64


@pytest.fixture(scope="module")
def target():
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, target_lib.init_params(TARGET, jax.random.key(1)))
    return target_lib.Target(TARGET, params)


@pytest.fixture(scope="module")
def plain(target):
    return decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False).token_ids


@pytest.mark.parametrize("rows, budget, max_depth, topk", [([1], 4, 3, 2), ([0, 1, 2], 16, 4, 3)])
def test_eagle3_drafting_greedy_equals_plain(target, plain, rows, budget, max_depth, topk):
    cfg = eagle3.Eagle3Config.for_target(TARGET, ttt_steps=1)
    method = Eagle3Method(cfg, budget=budget, max_depth=max_depth, topk=topk)
    drafter = Drafter(method, drafter_params(eagle3.init_params(cfg, jax.random.key(2)), target.params))
    out = decode.generate(target, [PROMPTS[r] for r in rows], max_new_tokens=N_NEW, max_len=MAX_LEN,
                          stop_on_eos=False, drafter=drafter)
    assert out.token_ids == [plain[r] for r in rows]
    stats = out.stats
    assert stats["malformed_trees"] == 0 and stats["verify_steps"] == stats["iterations"]
    assert stats["drafter_forwards"] == max_depth * stats["verify_steps"]


@jax.jit
def _target_features_1xTxF(params, ids_1xT):
    t = ids_1xT.shape[1]
    return target_lib.forward(params, TARGET, ids_1xT, jnp.arange(t)[None], jnp.tril(jnp.ones((t, t), bool))[None],
                              feature_layers=eagle3.default_feature_layers(TARGET.num_layers)).features


WIDTH = 24  # sequences are padded to one width (causal: padding never changes earlier rows): one compile


def _target_features(target, ids):
    """[T] ids -> [T, F] the drafter's feature layers of a causal target forward."""
    padded = jnp.asarray([list(ids) + [0] * (WIDTH - len(ids))], jnp.int32)
    return _target_features_1xTxF(target.params, padded)[0, :len(ids)]


def _check_deepest_chain(method, params, tree, row, context_ids, context_features):
    """The tree's deepest chain scores as the TTT unroll at the root pair's row predicts: drafting and
    training see the same inputs, positions and attention; the root's children are its top-k."""
    d = method.max_depth
    node = jnp.argmax(jnp.where(tree.valid, tree.depth, -1), axis=1)
    path = np.asarray(tree_lib.path_to(tree, node, d))[row]
    assert int(tree.depth[row, path[-1]]) == d
    chain = [int(x) for x in np.asarray(tree.tokens)[row, path]]  # the root, then the chain
    seq = list(context_ids) + chain
    seq += [0] * (WIDTH - len(seq))
    feats = jnp.pad(context_features, ((0, WIDTH - len(context_features)), (0, 0)))
    cfg = dataclasses.replace(method.config, ttt_steps=d)
    logits_KxBxTxV = jnp.stack(_ttt_forward(params["drafter"], cfg, params["embed"], feats[None], jnp.asarray([seq])))
    logits_KxV = logits_KxBxTxV[:, 0, len(context_ids) - 1]
    logp_KxV = np.asarray(jax.nn.log_softmax(logits_KxV, axis=-1))
    expected = np.cumsum([logp_KxV[k, chain[k + 1]] for k in range(d)])
    np.testing.assert_allclose(np.asarray(tree.scores)[row, path[1:]], expected, atol=1e-4, rtol=1e-4)
    children = np.asarray(tree.tokens)[row][(np.asarray(tree.parents)[row] == 0) & np.asarray(tree.valid)[row]]
    assert sorted(children) == sorted(np.argsort(-logp_KxV[0])[:method.topk])


def test_eagle3_tree_follows_the_ttt_unroll_before_and_after_commit(target):
    """Two rows of different lengths: init + draft, then a commit of a fully accepted chain (target
    features as the verify forward gives them) + draft; each tree's deepest chain matches TTT."""
    cfg = eagle3.Eagle3Config.for_target(TARGET, ttt_steps=1)
    d, k = 3, 2
    method = Eagle3Method(cfg, budget=k + (d - 1) * k * k, max_depth=d, topk=k)  # keeps every candidate
    params = drafter_params(jax.tree.map(lambda x: 10 * x if x.ndim == 2 else x,
                                         eagle3.init_params(cfg, jax.random.key(3))), target.params)
    prompts, roots = [PROMPTS[0], PROMPTS[2]], [11, 40]
    lens = [len(p) for p in prompts]
    prompt_BxT = jnp.asarray([p + [0] * (max(lens) - len(p)) for p in prompts], jnp.int32)
    feats_BxTxF = jnp.stack([jnp.pad(_target_features(target, p), ((0, max(lens) - len(p)), (0, 0))) for p in prompts])
    state = jax.jit(method.init, static_argnums=5)(params, prompt_BxT, jnp.asarray(lens), feats_BxTxF,
                                                   jnp.asarray(roots), MAX_LEN)
    draft = jax.jit(method.draft)
    tree, state, forwards = draft(params, state, jnp.asarray(roots), jnp.asarray(lens))
    assert int(forwards) == d and bool(jnp.all(tree.valid))
    for row, p in enumerate(prompts):
        _check_deepest_chain(method, params, tree, row, p, _target_features(target, p))

    # Accept each row's deepest chain, with a bonus token after it.
    node = jnp.argmax(tree.depth, axis=1)
    path_BxD1 = tree_lib.path_to(tree, node, d)
    bonus = [7, 50]
    emitted = np.asarray(jnp.take_along_axis(tree.tokens, path_BxD1, axis=1))
    tokens_BxD1 = jnp.asarray(np.concatenate([emitted[:, 1:], np.asarray(bonus)[:, None]], axis=1), jnp.int32)
    acceptance = Acceptance(path_BxD1, jnp.full((2,), d, jnp.int32), tokens_BxD1, jnp.asarray(bonus, jnp.int32))
    seqs = [p + [int(t) for t in emitted[r]] + [bonus[r]] for r, p in enumerate(prompts)]
    features_BxN1xF = jnp.zeros((2, method.budget + 1, feats_BxTxF.shape[-1]))
    for r, (p, seq) in enumerate(zip(prompts, seqs)):  # the verify forward's features at the path nodes
        features_BxN1xF = features_BxN1xF.at[r, path_BxD1[r]].set(_target_features(target, seq)[len(p):len(p) + d + 1])
    state = jax.jit(method.commit)(params, state, tree, acceptance, features_BxN1xF, jnp.asarray(lens))
    new_lens = jnp.asarray(lens) + d + 1
    tree2, _, _ = draft(params, state, jnp.asarray(bonus), new_lens)
    for row, seq in enumerate(seqs):
        _check_deepest_chain(method, params, tree2, row, seq[:-1], _target_features(target, seq[:-1]))
