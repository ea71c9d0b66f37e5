"""Soft cross-entropy and the EAGLE-3 TTT loss on hand-made logits."""

import math

import jax.numpy as jnp
import numpy as np

from specblock_jax import losses


def test_soft_cross_entropy_by_hand():
    logits = jnp.array([[[0.0, math.log(3.0)], [5.0, -5.0]]])  # q = (1/4, 3/4), then anything
    probs = jnp.array([[[0.5, 0.5], [1.0, 0.0]]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    np.testing.assert_allclose(losses.soft_cross_entropy(logits, probs, jnp.array([[1, 0]])), expected, rtol=1e-6)
    both = (expected - math.log(1 / (1 + math.exp(-10.0)))) / 2
    np.testing.assert_allclose(losses.soft_cross_entropy(logits, probs, jnp.array([[1, 1]])), both, rtol=1e-6)
    assert float(losses.soft_cross_entropy(logits, probs, jnp.zeros((1, 2)))) == 0.0  # empty mask: no NaN


def test_shift_left():
    x = jnp.arange(1, 5)[None]
    np.testing.assert_array_equal(losses.shift_left(x, 1), [[2, 3, 4, 0]])
    np.testing.assert_array_equal(losses.shift_left(x, 6), [[0, 0, 0, 0]])


def test_ttt_loss_offsets_masks_weights_and_accuracy():
    """T = 4, V = 3, two steps. The target at position p is one-hot-ish on token p % 3; step k, row j
    is taught by position j + 1 + k, so step 0 has rows 0..2 and step 1 rows 0..1; loss_mask drops
    position 2 (row 1 of step 0, row 0 of step 1)."""
    t, v = 4, 3
    target_logits = 20.0 * jnp.eye(v)[jnp.arange(t) % v][None]  # [1, T, V]
    loss_mask = jnp.array([[1.0, 1.0, 0.0, 1.0]])
    # Step 0: rows 0 and 2 right (positions 1 and 3 -> tokens 1 and 0), row 1 and 3 wrong (masked anyway).
    step0 = 20.0 * jnp.eye(v)[jnp.array([1, 0, 0, 2])][None]
    # Step 1: row 0 (position 2, masked) and row 1 (position 3 -> token 0): wrong on row 1.
    step1 = 20.0 * jnp.eye(v)[jnp.array([2, 1, 0, 0])][None]
    out = losses.ttt_loss(jnp.stack([step0, step1]), target_logits, loss_mask)
    np.testing.assert_allclose(out.step_acc_K, [1.0, 0.0])
    probs = np.exp(np.asarray(target_logits[0]) - np.log(np.exp(np.asarray(target_logits[0])).sum(-1, keepdims=True)))

    def ce(logits_row, pos):
        logq = logits_row - np.log(np.exp(logits_row).sum())
        return -(probs[pos] * logq).sum()

    s0 = (ce(np.asarray(step0[0, 0]), 1) + ce(np.asarray(step0[0, 2]), 3)) / 2
    s1 = ce(np.asarray(step1[0, 1]), 3)
    np.testing.assert_allclose(out.step_loss_K, [s0, s1], rtol=1e-5)
    np.testing.assert_allclose(out.loss, s0 + 0.8 * s1, rtol=1e-5)
    assert s1 > 10 and s0 < 1e-3  # the wrong step is the expensive one


def test_ttt_targets_mask_rows_past_the_sequence():
    probs, mask = losses.ttt_targets(jnp.zeros((2, 5, 7)), jnp.ones((2, 5)), step=2)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0]] * 2)
    np.testing.assert_allclose(probs[:, :2].sum(-1), 1.0, rtol=1e-6)
