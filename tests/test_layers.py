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
