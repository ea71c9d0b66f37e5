"""The sampling distribution: validation, exact support of top-k / top-p, and empirical agreement."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from specblock_jax.sampling import SamplingParams, processed_logprobs, sample

PROBS_V = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
PERM = np.array([3, 0, 4, 2, 1])  # the same distribution in a scrambled vocabulary order
logprobs_jit = jax.jit(processed_logprobs, static_argnums=1)  # op-by-op dispatch is slow on this CPU
logprobs_traced = jax.jit(processed_logprobs)  # the params' values traced, as decoding passes them
sample_jit = jax.jit(sample, static_argnums=2)


def support(params: SamplingParams, probs_V=PROBS_V) -> set[int]:
    """The support, checked to be the same (and the same log-probs) with the params traced."""
    logits_V = jnp.log(jnp.asarray(probs_V))
    logprobs_V = np.asarray(logprobs_jit(logits_V, params))
    np.testing.assert_allclose(np.asarray(logprobs_traced(logits_V, params)), logprobs_V, rtol=1e-6)
    return set(np.flatnonzero(np.isfinite(logprobs_V)).tolist())


def test_traced_values_share_one_compiled_program(count_compiles):
    """Only greedy-or-not is static: other temperatures, top-k and top-p values reuse the program."""
    logits_V = jnp.log(jnp.asarray(PROBS_V))
    traced = jax.jit(lambda logits, params: processed_logprobs(logits, params))
    traced(logits_V, SamplingParams(1.0))
    settings = [SamplingParams(0.5, top_k=2), SamplingParams(2.0, top_p=0.7), SamplingParams(0.9, top_k=3, top_p=0.95)]
    expected = [logprobs_jit(logits_V, params) for params in settings]  # static: one program each
    with count_compiles() as compiles:
        for params, want in zip(settings, expected):
            np.testing.assert_allclose(traced(logits_V, params), want, rtol=1e-6)
        assert compiles[0] == 0
        traced(logits_V, SamplingParams())  # greedy: another program
        assert compiles[0] == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be a number >= 0 (0 means greedy), got -0.5"),
    (dict(temperature=float("nan")), "temperature must be a number >= 0 (0 means greedy), got nan"),
    (dict(temperature="1"), "temperature must be a number >= 0 (0 means greedy), got '1'"),
    (dict(top_k=-1), "top_k must be an integer >= 0 (0 means off), got -1"),
    (dict(top_k=2.5), "top_k must be an integer >= 0 (0 means off), got 2.5"),
    (dict(top_p=0.0), "top_p must be a number in (0, 1] (1 means off), got 0.0"),
    (dict(top_p=1.5), "top_p must be a number in (0, 1] (1 means off), got 1.5"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_greedy_is_one_hot_argmax():
    logits_BxV = jnp.array([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]])
    greedy = SamplingParams()
    np.testing.assert_array_equal(logprobs_jit(logits_BxV, greedy), [[-np.inf, 0, -np.inf], [0, -np.inf, -np.inf]])
    np.testing.assert_array_equal(sample_jit(jax.random.key(0), logits_BxV, greedy), [1, 0])


@pytest.mark.parametrize("top_p, kept", [(0.3, {0}), (0.69, {0, 1}), (0.71, {0, 1, 2}), (0.94, {0, 1, 2, 3}),
                                         (0.96, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    params = SamplingParams(temperature=1.0, top_p=top_p)
    assert support(params) == kept
    assert support(params, PROBS_V[PERM]) == {int(np.flatnonzero(PERM == i)[0]) for i in kept}


@pytest.mark.parametrize("top_k, kept", [(1, {0}), (3, {0, 1, 2}), (5, {0, 1, 2, 3, 4}), (99, {0, 1, 2, 3, 4})])
def test_top_k_support(top_k, kept):
    assert support(SamplingParams(temperature=0.7, top_k=top_k)) == kept


def test_top_k_applies_before_top_p():
    # After top-2 the mass is (5/7, 2/7): top_p=0.7 then keeps only the first token. Top-p first
    # would keep {0, 1}.
    assert support(SamplingParams(temperature=1.0, top_k=2, top_p=0.7)) == {0}


def test_ties_at_the_threshold_are_kept_together():
    tied_V = np.array([0.4, 0.25, 0.25, 0.1])
    assert support(SamplingParams(temperature=1.0, top_k=2), tied_V) == {0, 1, 2}
    assert support(SamplingParams(temperature=1.0, top_p=0.5), tied_V) == {0, 1, 2}


def test_logprobs_are_renormalised_tempered_softmax_on_the_support():
    logits_V = jnp.log(jnp.asarray(PROBS_V))
    logprobs_V = np.asarray(logprobs_jit(logits_V, SamplingParams(temperature=2.0, top_k=3)))
    expected_V = np.sqrt(PROBS_V[:3]) / np.sqrt(PROBS_V[:3]).sum()
    np.testing.assert_allclose(np.exp(logprobs_V[:3]), expected_V, rtol=1e-5)
    assert np.all(np.isneginf(logprobs_V[3:]))


def test_vectorised_over_leading_dims():
    logits_AxBxV = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 16)), jnp.float32)
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9)
    logprobs_AxBxV = logprobs_jit(logits_AxBxV, params)
    rows_NxV = jax.vmap(logprobs_jit, in_axes=(0, None))(logits_AxBxV.reshape(6, 16), params)
    np.testing.assert_allclose(logprobs_AxBxV.reshape(6, 16), rows_NxV)
    assert sample_jit(jax.random.key(0), logits_AxBxV, params).shape == (2, 3)


def test_top_k_one_samples_the_argmax():
    logits_BxV = jnp.asarray(np.random.default_rng(2).normal(size=(256, 32)), jnp.float32)
    tokens_B = sample_jit(jax.random.key(3), logits_BxV, SamplingParams(temperature=1.3, top_k=1))
    np.testing.assert_array_equal(tokens_B, jnp.argmax(logits_BxV, axis=-1))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=4, top_p=0.8)])
def test_empirical_distribution_matches(params):
    n = 20000
    logits_V = jnp.log(jnp.asarray([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05]))
    draw = jax.jit(jax.vmap(functools.partial(sample, logits_xV=logits_V, params=params)))
    counts_V = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(4), n))), minlength=7)
    probs_V = np.exp(np.asarray(logprobs_jit(logits_V, params), np.float64))
    kept = probs_V > 0
    assert counts_V[~kept].sum() == 0
    chi2 = (((counts_V - n * probs_V) ** 2)[kept] / (n * probs_V[kept])).sum()
    assert chi2 < scipy.stats.chi2.ppf(0.999, kept.sum() - 1)
    assert 0.5 * np.abs(counts_V / n - probs_V).sum() < 0.02
