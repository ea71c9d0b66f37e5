import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specblock_jax.models import layers


@pytest.mark.parametrize("shape, k", [((3, 4096), 8), ((2, 3, 4096), 20), ((5, 1000), 2), ((4, 32000), 20),
                                      ((2, 300), 1), ((2, 64), 8)])
def test_top_k_matches_lax_top_k(shape, k):
    """Two stages or one, the same values and indices as jax.lax.top_k, also where the vocabulary is not
    a multiple of the group and where ties fall across groups and on the k-th value."""
    x = jax.random.normal(jax.random.key(0), shape)
    ties = jnp.round(x * 2) / 2  # a few distinct values: ties everywhere, also at the k-th
    masked = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.999, shape), -jnp.inf, x)  # fewer than k finite
    for values in (x, ties, masked):
        got_values, got_ids = jax.jit(layers.top_k, static_argnums=1)(values, k)
        want_values, want_ids = jax.lax.top_k(values, k)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_values, want_values)


@pytest.mark.parametrize("t, s", [(1, 1), (1, 37), (5, 37), (3, 200)])
def test_attend_matches_per_head_softmax_attention(t, s):
    """Grouped-query attention over a head-major cache equals the textbook computation, one query head
    at a time (head h reads KV head h // G), including fully masked query rows (a uniform average)."""
    b, n, kv, d = 2, 6, 2, 8
    keys = jax.random.split(jax.random.key(1), 4)
    q = np.asarray(jax.random.normal(keys[0], (b, t, n, d)))
    k, v = (np.asarray(jax.random.normal(key, (b, kv, s, d))) for key in keys[1:3])
    mask = np.array(jax.random.bernoulli(keys[3], 0.6, (b, t, s)))
    mask[0, 0] = False  # a fully masked row
    want = np.zeros((b, t, n, d))
    for row in range(b):
        for h in range(n):
            scores = q[row, :, h] @ k[row, h // (n // kv)].T / np.sqrt(d)
            scores = np.where(mask[row], scores, layers.NEG_INF)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            want[row, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[row, h // (n // kv)]
    np.testing.assert_allclose(jax.jit(layers.attend)(q, k, v, mask), want.reshape(b, t, n * d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s, tail", [(1000, 0), (600, 40), (100, 0)])
def test_attend_live_equals_attend_over_the_whole_cache(s, tail):
    """Attention over the live prefix (and a scratch tail) gives the whole cache's result when every
    other slot is masked: for live lengths in every prefix bucket, at both ends of it, traced or not."""
    b, t, n, kv, d = 2, 3, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, d))
    k, v = jax.random.normal(keys[1], (b, kv, s, d)), jax.random.normal(keys[2], (b, kv, s, d))
    head = s - tail
    live_jit = jax.jit(layers.attend_live, static_argnames="tail")
    static_jit = jax.jit(layers.attend_live, static_argnames=("live", "tail"))
    attend_jit = jax.jit(layers.attend)
    bounds = (128, 192, 256, 384, 512, 768)  # the prefix sizes, and one slot on either side of each
    lives = sorted(({1, 2, head - 1, head} | {n + e for n in bounds for e in (-1, 0, 1)}) & set(range(1, head + 1)))
    for i, live in enumerate(lives):
        slots_S = jnp.arange(s)
        visible_BxTxS = jax.random.bernoulli(keys[3], 0.7, (b, t, s)) & ((slots_S < live) | (slots_S >= head))
        visible_BxTxS = visible_BxTxS.at[:, :, 0].set(True)  # every query sees something
        want = attend_jit(q, k, v, visible_BxTxS)
        np.testing.assert_allclose(live_jit(q, k, v, visible_BxTxS, jnp.int32(live), tail=tail), want,
                                   rtol=1e-5, atol=1e-6)
        if i % 3 == 0 or live == head:  # a static live length is a program per length: a few of them
            np.testing.assert_allclose(static_jit(q, k, v, visible_BxTxS, live=live, tail=tail), want,
                                       rtol=1e-5, atol=1e-6)
