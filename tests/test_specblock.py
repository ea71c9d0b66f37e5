"""The SpecBlock drafter network: config, parameters, the multi-block training unroll against a slow
per-position reference (shift, inheritance and attention spelled out), what each block may see,
gradient flow, the ablation switches and `train_metrics`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specblock_jax import config as config_lib
from specblock_jax import losses
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.models import specblock as sb
from specblock_jax.sharding import LOGICAL_AXIS_RULES

TARGET = ModelConfig(vocab_size=64, hidden_size=16, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=4,
                     intermediate_size=32)
CONFIG = sb.SpecBlockConfig.for_target(TARGET, rank_hidden=8, block_size=3, num_ttt_blocks=3)
B, T = 2, 7
_ttt = jax.jit(sb.ttt_forward, static_argnums=1, static_argnames="chunk_rows")
_metrics = jax.jit(sb.train_metrics, static_argnums=1)


def _scaled(params):
    """Weights x10 (the shift's near-identity excepted): outputs depend strongly on every input."""
    return {name: (p if name.startswith("shift") else jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, p))
            for name, p in params.items()}


@pytest.fixture(scope="module")
def setup():
    keys = jax.random.split(jax.random.key(0), 5)
    params = _scaled(jax.jit(sb.init_params, static_argnums=0)(CONFIG, keys[0]))
    table = jax.random.normal(keys[1], (CONFIG.vocab_size, CONFIG.hidden_size))
    features = jax.random.normal(keys[2], (B, T, CONFIG.feature_size))
    tokens = jax.random.randint(keys[3], (B, T), 0, CONFIG.vocab_size)
    inherit = sb.sample_inherit(CONFIG, keys[4], (B, T))
    return params, table, features, tokens, inherit


def test_config_validation_and_for_target():
    cfg = sb.SpecBlockConfig.for_target(TARGET)
    assert (cfg.num_layers, cfg.block_size, cfg.rank_classes, cfg.num_ttt_blocks) == (2, 4, 4, 3)
    assert (cfg.shift, cfg.inherit, cfg.rank_head, cfg.valid_prefix) == (True,) * 4
    assert cfg.feature_layers == (0, 1, 3) and cfg.feature_size == 48
    cfg.check_target(TARGET)
    assert config_lib.from_dict(sb.SpecBlockConfig, config_lib.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        config_lib.from_dict(sb.SpecBlockConfig, {**config_lib.to_dict(cfg), "blocks": 3})
    with pytest.raises(ConfigError, match="block_size must be an integer >= 1"):
        sb.SpecBlockConfig.for_target(TARGET, block_size=0)
    with pytest.raises(ConfigError, match="rank_bounds"):
        sb.SpecBlockConfig.for_target(TARGET, rank_classes=3)
    assert cfg.slot_loss_mean == "reached"  # the reference's
    with pytest.raises(ConfigError, match="slot_loss_mean='reach' is not one of"):
        sb.SpecBlockConfig.for_target(TARGET, slot_loss_mean="reach")
    with pytest.raises(ConfigError, match="vocab_size 64 does not match the target's 65"):
        cfg.check_target(dataclasses.replace(TARGET, vocab_size=65))
    with pytest.raises(ConfigError, match="exceed the target's 2 layers"):
        cfg.check_target(dataclasses.replace(TARGET, num_layers=2))


@pytest.mark.parametrize("switches", [{}, {"shift": False, "rank_head": False}, {"num_layers": 3}])
def test_param_count_and_logical_axes(switches):
    cfg = dataclasses.replace(CONFIG, **switches)
    params = jax.eval_shape(lambda: sb.init_params(cfg, jax.random.key(0)))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params
    assert ("shift_1" in params) == cfg.shift and ("rank_in" in params) == cfg.rank_head
    assert "embed_tokens" not in params  # the target's table is an input
    specs = jax.tree.leaves(sb.param_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = jax.tree.leaves(params)
    assert len(specs) == len(shapes)
    for spec, x in zip(specs, shapes):
        assert len(spec) == x.ndim and all(n is None or n in LOGICAL_AXIS_RULES for n in spec), (spec, x.shape)


# A slow reference: every (block, row) recomputed from scratch in float64 numpy, straight from the
# method's description.

def _rms(x, w, eps=CONFIG.rms_norm_eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x_NxD, pos):
    d = x_NxD.shape[-1]
    inv = 1.0 / CONFIG.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rot = np.concatenate([-x_NxD[:, d // 2:], x_NxD[:, :d // 2]], axis=-1)
    return x_NxD * np.cos(ang) + rot * np.sin(ang)


def _silu(x):
    return x / (1 + np.exp(-x))


def _rank_features(logits_V, topk):
    top = np.sort(logits_V)[::-1][:topk]
    logp = top - np.log(np.exp(top - top[0]).sum()) - top[0]
    return np.concatenate([logp[:10], [top[0] - top[1], top[0] - top[2], top[0] - top[4]], [np.exp(logp[0])],
                           [-(np.exp(logp) * logp).sum()]])


def reference(cfg, params, table, features_TxF, tokens_T, inherit_TxN1):
    """Per block: (logits [T, K, V], hidden [T, K, H], rank logits [T, K, C]) of one sequence."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    table, features_TxF = np.asarray(table, np.float64), np.asarray(features_TxF, np.float64)
    t, k_slots, n, g, d = len(tokens_T), cfg.block_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    memo = {}

    def block_row(s, j):  # -> (per-layer keys/values [K, G, D], hidden [K, H], logits [K, V], rank [K, C])
        if (s, j) in memo:
            return memo[(s, j)]
        offset = int(sum(inherit_TxN1[j, :s]))
        if s == 0 or not cfg.inherit:
            cond = features_TxF[j] @ p["condition_proj"]["kernel"]
        else:
            cond = block_row(s - 1, j)[1][inherit_TxN1[j, s - 1] - 1]
        token = tokens_T[min(j + 1 + offset, t - 1)]
        x = np.stack([np.concatenate([_rms(cond, p["condition_norm"]["weight"]),
                                      _rms(table[token], p["token_norm"]["weight"]),
                                      _rms(p["position_queries"][k], p["query_norm"]["weight"])])
                      for k in range(k_slots)]) @ p["fuse"]["kernel"]
        kvs = []
        for layer in range(cfg.num_layers):
            if layer > 0 and cfg.shift:
                prev = np.stack([x[max(k - 1, 0)] for k in range(k_slots)])
                x = np.concatenate([x, prev], axis=-1) @ p[f"shift_{layer}"]["kernel"]
            lp = p[f"layers_{layer}"]
            a = lp["self_attn"]
            y = _rms(x, lp["input_layernorm"]["weight"])
            q = [_rope((y[k] @ a["q_proj"]["kernel"]).reshape(n, d), j + 1 + k) for k in range(k_slots)]
            keys = np.stack([_rope((y[k] @ a["k_proj"]["kernel"]).reshape(g, d), j + 1 + k) for k in range(k_slots)])
            vals = (y @ a["v_proj"]["kernel"]).reshape(k_slots, g, d)
            kvs.append((keys, vals))
            # What slot k may see: block 1's slots of earlier rows, its own row's slots < M of every
            # earlier block, and its own block's slots <= k.
            seen = [block_row(0, i)[0][layer] for i in range(j)]
            seen += [tuple(z[:inherit_TxN1[j, e]] for z in block_row(e, j)[0][layer]) for e in range(s)]
            out = []
            for k in range(k_slots):
                ks = np.concatenate([z[0] for z in seen] + [keys[:k + 1]])
                vs = np.concatenate([z[1] for z in seen] + [vals[:k + 1]])
                heads = []
                for head in range(n):
                    scores = ks[:, head // (n // g)] @ q[k][head] / np.sqrt(d)
                    w = np.exp(scores - scores.max())
                    heads.append((w / w.sum()) @ vs[:, head // (n // g)])
                out.append(np.concatenate(heads))
            x = x + np.stack(out) @ a["o_proj"]["kernel"]
            m = lp["mlp"]
            y = _rms(x, lp["post_attention_layernorm"]["weight"])
            x = x + (_silu(y @ m["gate_proj"]["kernel"]) * (y @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
        normed = _rms(x, p["norm"]["weight"])
        logits = normed @ p["lm_head"]["kernel"]
        rank = None
        if cfg.rank_head:
            rank_in = np.concatenate([normed, np.stack([_rank_features(lg, cfg.rank_topk) for lg in logits])], -1)
            rank = _silu(rank_in @ p["rank_in"]["kernel"]) @ p["rank_out"]["kernel"]
        memo[(s, j)] = (kvs, x, logits, rank)
        return memo[(s, j)]

    blocks = []
    for s in range(cfg.num_ttt_blocks):
        rows = [block_row(s, j) for j in range(t)]
        rank = np.stack([r[3] for r in rows]) if cfg.rank_head else None
        blocks.append((np.stack([r[2] for r in rows]), np.stack([r[1] for r in rows]), rank))
    return blocks


@pytest.mark.parametrize("switches, chunk_rows", [({}, 2), ({"shift": False, "inherit": False, "rank_head": False},
                                                             sb.CHUNK_ROWS)])
def test_ttt_forward_matches_slow_reference(setup, switches, chunk_rows):
    """Chunks of 2 of the 7 query rows (the last one short), or all of them in one."""
    params, table, features, tokens, inherit = setup
    cfg = dataclasses.replace(CONFIG, **switches)
    if not cfg.shift or not cfg.rank_head:
        params = {k: v for k, v in params.items() if not k.startswith(("shift", "rank"))}
    blocks = _ttt(params, cfg, table, features, tokens, inherit, chunk_rows=chunk_rows)
    assert len(blocks.outputs) == cfg.num_ttt_blocks
    np.testing.assert_array_equal(blocks.offsets_NxBxT[0], 0)
    np.testing.assert_array_equal(blocks.offsets_NxBxT[2], inherit[..., 0] + inherit[..., 1])
    for b in range(B):
        expected = reference(cfg, params, table, features[b], np.asarray(tokens[b]), np.asarray(inherit[b]))
        for out, (logits, hidden, rank) in zip(blocks.outputs, expected):
            np.testing.assert_allclose(out.logits[b], logits, atol=2e-4, rtol=2e-4)
            np.testing.assert_allclose(out.hidden[b], hidden, atol=2e-4, rtol=2e-4)
            if cfg.rank_head:
                np.testing.assert_allclose(out.rank_logits[b], rank, atol=2e-4, rtol=2e-4)
            else:
                assert out.rank_logits is None


def test_shift_carries_the_previous_slot(setup):
    """The shift carries slot k - 1 into slot k: zeroing its previous-slot half changes block 1's slots."""
    params, table, features, tokens, inherit = setup
    h = CONFIG.hidden_size
    cut = dict(params, shift_1={"kernel": params["shift_1"]["kernel"].at[h:].set(0.0)})
    a = _ttt(params, CONFIG, table, features, tokens, inherit).outputs[0].logits
    b = _ttt(cut, CONFIG, table, features, tokens, inherit).outputs[0].logits
    assert not np.allclose(a[:, :, 1:], b[:, :, 1:], atol=1e-3)


def test_rows_never_see_the_future_or_other_rows_later_blocks(setup):
    """Block s, row j reads features <= j and tokens <= j + 1 + offset(s, j) only: perturbing the
    features from row p on and the tokens after p leaves exactly those (block, row) outputs unchanged."""
    params, table, features, tokens, inherit = setup
    p = 3
    features2 = jnp.where((jnp.arange(T) >= p)[None, :, None], features + 1.0, features)
    tokens2 = jnp.where(jnp.arange(T) > p, (tokens + 5) % CONFIG.vocab_size, tokens)
    a = _ttt(params, CONFIG, table, features, tokens, inherit)
    b = _ttt(params, CONFIG, table, features2, tokens2, inherit)
    for s in range(CONFIG.num_ttt_blocks):
        for row in range(B):
            for j in range(T):
                offset = int(a.offsets_NxBxT[s, row, j])
                reads_only_past = j < p and min(j + 1 + offset, T - 1) <= p
                same = np.allclose(a.outputs[s].logits[row, j], b.outputs[s].logits[row, j], atol=1e-6)
                assert same == reads_only_past, (s, row, j)


def test_later_blocks_see_only_the_parent_slots_up_to_the_inherited_one(setup):
    """Block 2 inheriting M slots sees block 1's slots < M of its row: change block 1's slots >= 1 (their
    position queries) and block 2's slot 0 of row 0 (no earlier rows to see) is unchanged for M = 1,
    changed for M = 2. Block 1's slot 0 never sees its later slots (causal, and the shift only looks back)."""
    params, table, features, tokens, _ = setup
    cfg = dataclasses.replace(CONFIG, num_ttt_blocks=2)
    changed = dict(params, position_queries=params["position_queries"].at[1:].add(3.0))
    for m, unchanged in ((1, True), (2, False)):
        inherit = jnp.full((B, T, 1), m, jnp.int32)
        a = _ttt(params, cfg, table, features, tokens, inherit).outputs
        b = _ttt(changed, cfg, table, features, tokens, inherit).outputs
        np.testing.assert_allclose(a[0].logits[:, 0, 0], b[0].logits[:, 0, 0], atol=1e-5)
        assert np.allclose(a[1].logits[:, 0, 0], b[1].logits[:, 0, 0], atol=1e-5) == unchanged, m


@pytest.fixture(scope="module")
def two_blocks(setup):
    """Inputs of a 2-block `train_metrics`: config, inheritance slots, target logits, loss mask."""
    *_, inherit = setup
    target_logits = 3.0 * jax.random.normal(jax.random.key(8), (B, T, CONFIG.vocab_size))
    return dataclasses.replace(CONFIG, num_ttt_blocks=2), inherit[..., :1], target_logits, jnp.ones((B, T)).at[0, 2].set(0)


@pytest.fixture(scope="module")
def without_valid_prefix(setup, two_blocks):
    """One compile: the metrics without the valid-prefix mask, and the Jacobian of (block 2's slot-0
    loss, rank loss) with respect to every parameter."""
    params, table, features, tokens, _ = setup
    cfg, inherit, target_logits, loss_mask = two_blocks
    cfg = dataclasses.replace(cfg, valid_prefix=False)

    def two_losses(p):
        out = sb.train_metrics(p, cfg, table, features, tokens, *losses.dense_teacher(target_logits, loss_mask),
                               None, inherit)
        return jnp.stack([out.block_loss_NxK[-1, 0], out.rank_loss]), out

    return jax.jit(jax.jacrev(two_losses, has_aux=True))(params)


def test_gradients_flow_through_every_block_and_rank_loss_stays_in_the_rank_head(without_valid_prefix):
    """Block 2's draft loss reaches condition_proj (only block 1 applies it) but not the rank head;
    the rank loss reaches the rank head only."""
    jac, _ = without_valid_prefix
    moved = lambda name, i: any(float(jnp.abs(x[i]).max()) > 0 for x in jax.tree.leaves(jac[name]))
    assert moved("condition_proj", 0) and not moved("rank_in", 0)
    for name in jac:
        assert moved(name, 1) == name.startswith("rank"), name


def test_sample_inherit_draws_every_slot_count_per_row():
    m = sb.sample_inherit(CONFIG, jax.random.key(0), (4, 50))
    assert m.shape == (4, 50, CONFIG.num_ttt_blocks - 1) and m.dtype == jnp.int32
    assert set(np.unique(m)) == set(range(1, CONFIG.block_size + 1))
    assert len({tuple(np.asarray(m[b, :, 0])) for b in range(4)}) == 4  # rows differ


def _block1_by_hand(logits, target_logits, loss_mask):
    """Block 1's per-slot sums under the valid-prefix mask, by loops: cross-entropy and hits over the
    rows that reach each slot (num, hits), their count (den) and the count of trained-on rows (rows)."""
    k = logits.shape[2]
    tlogp = np.asarray(jax.nn.log_softmax(target_logits), np.float64)
    dlogp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    num, den, hits, rows = np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k)
    for b in range(B):
        for j in range(T):
            all_right = True
            for s in range(k):
                pos = j + 1 + s
                if pos >= T or not loss_mask[b, pos]:
                    all_right = all_right and (pos < T and logits[b, j, s].argmax() == tlogp[b, pos].argmax())
                    continue
                rows[s] += 1
                hit = logits[b, j, s].argmax() == tlogp[b, pos].argmax()
                if all_right:
                    num[s] += -(np.exp(tlogp[b, pos]) * dlogp[b, j, s]).sum()
                    den[s] += 1
                    hits[s] += hit
                all_right = all_right and hit
    return num, den, hits, rows


def test_train_metrics_composes_the_block_losses(setup, two_blocks, without_valid_prefix):
    """The total is sum_k 0.8**k sum_b L_{b,k} + sum_b R_b; block-1 slot losses follow the teacher at
    position j + 1 + k under the valid-prefix mask; without the mask slot k > 0 trains everywhere."""
    params, table, features, tokens, _ = setup
    cfg, inherit, target_logits, loss_mask = two_blocks
    out = _metrics(params, cfg, table, features, tokens, *losses.dense_teacher(target_logits, loss_mask), None,
                   inherit)
    k = cfg.block_size
    assert out.step_loss_K.shape == out.step_acc_K.shape == (k,)
    assert out.block_loss_NxK.shape == (2, k)
    weights = 0.8 ** np.arange(k)
    expected = (weights * np.asarray(out.block_loss_NxK).sum(0)).sum() + float(out.rank_loss)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)

    # Block 1 by hand, with the teacher as given and with one that agrees with slot 0 on every other row
    # (so that later slots are reached): slot_loss_mean "all" sums the same and divides by every
    # trained-on row, so a rarely reached slot weighs less.
    logits = np.asarray(_ttt(params, cfg, table, features, tokens, inherit).outputs[0].logits, np.float64)
    num, den, hits, _ = _block1_by_hand(logits, target_logits, loss_mask)
    np.testing.assert_allclose(out.step_loss_K, num / np.maximum(den, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.step_acc_K, hits / np.maximum(den, 1), rtol=1e-6)
    assert out.step_loss_K[0] > 0
    agree = np.zeros(target_logits.shape, np.float32)
    for j in range(0, T - 1, 2):
        agree[np.arange(B), j + 1, logits[:, j, 0].argmax(-1)] = 30.0
    agreeing = jnp.asarray(target_logits) + agree
    num, den, hits, rows = _block1_by_hand(logits, agreeing, loss_mask)
    for mean, divisor in (("reached", den), ("all", rows)):
        got = _metrics(params, dataclasses.replace(cfg, slot_loss_mean=mean), table, features, tokens,
                       *losses.dense_teacher(agreeing, loss_mask), None, inherit)
        np.testing.assert_allclose(got.step_loss_K, num / np.maximum(divisor, 1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.step_acc_K, hits / np.maximum(den, 1), rtol=1e-6)
    assert 0 < den[1] < rows[1]

    free = without_valid_prefix[1]
    np.testing.assert_allclose(free.step_loss_K[0], out.step_loss_K[0], rtol=1e-6)
    assert np.all(np.asarray(free.step_loss_K) > 0)
