"""Soft cross-entropy and the EAGLE-3 TTT loss on hand-made logits."""

import math

import jax
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
    out = losses.ttt_loss(jnp.stack([step0, step1]), *losses.dense_teacher(target_logits, loss_mask))
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


def test_ttt_loss_equals_the_shifted_targets_of_every_step():
    """ttt_loss (one teacher softmax, sliced) against ttt_targets + soft_cross_entropy per step, on random
    logits and a random mask, with more steps than the sequence has rows after the first."""
    keys = jax.random.split(jax.random.key(0), 3)
    k, b, t, v = 6, 2, 5, 11
    draft = jax.random.normal(keys[0], (k, b, t, v)) * 3
    target = jax.random.normal(keys[1], (b, t, v)) * 3
    mask = (jax.random.uniform(keys[2], (b, t)) < 0.7).astype(jnp.float32)
    out = losses.ttt_loss(tuple(draft), *losses.dense_teacher(target, mask))
    for step in range(k):
        probs, step_mask = losses.ttt_targets(target, mask, step)
        np.testing.assert_allclose(out.step_loss_K[step], losses.soft_cross_entropy(draft[step], probs, step_mask),
                                   rtol=1e-6, atol=1e-7)
    assert float(out.step_loss_K[-1]) == 0.0 and float(out.step_loss_K[0]) > 0.0


def test_ttt_accuracy_of_a_step_counts_the_rows_whose_earlier_steps_were_right():
    """Step k's accuracy, against a loop over rows: row j counts where the teacher position j + 1 + k is
    in the mask and steps < k hit at row j, as drafting reaches depth k + 1. Two ids make hits common,
    so the conditional figure differs from the fraction of all masked rows that hit."""
    keys = jax.random.split(jax.random.key(1), 3)
    k, b, t, v = 4, 4, 16, 2
    draft = jax.random.normal(keys[0], (k, b, t, v))
    target = jax.random.normal(keys[1], (b, t, v))
    mask = np.asarray(jax.random.uniform(keys[2], (b, t)) < 0.8, np.float32)
    out = losses.ttt_loss(tuple(draft), *losses.dense_teacher(target, jnp.asarray(mask)))
    want = np.asarray(jnp.argmax(target, -1))
    hit = [np.asarray(jnp.argmax(draft[s], -1))[:, :t - 1 - s] == want[:, 1 + s:] for s in range(k)]
    for s in range(k):
        counted = [(r, j) for r in range(b) for j in range(t - 1 - s)
                   if mask[r, j + 1 + s] and all(hit[i][r, j] for i in range(s))]
        expected = sum(hit[s][r, j] for r, j in counted) / max(len(counted), 1)
        np.testing.assert_allclose(out.step_acc_K[s], expected, rtol=1e-6)
        unconditional = (hit[s] * mask[:, 1 + s:]).sum() / mask[:, 1 + s:].sum()
        if s == 2:
            assert len(counted) >= 5 and abs(expected - unconditional) > 0.02


def test_topk_teacher_is_the_dense_teacher_of_its_top_k():
    """The feature cache's teacher (the target's top k logits) equals the dense teacher of logits that
    are those k values and -1e30 elsewhere: the target renormalised over its top k, over the draft
    vocabulary when reduced (positions whose top token it lacks leave the loss mask). Checked on the
    probabilities, the argmax, the mask, and the TTT loss with its gradient."""
    rng = np.random.default_rng(0)
    b, t, v, k, steps = 2, 7, 30, 5, 3
    top_ids = np.argsort(-rng.standard_normal((b, t, v)), axis=-1)[..., :k].astype(np.int32)
    top_logits = np.sort(rng.standard_normal((b, t, k)) * 3, axis=-1)[..., ::-1].astype(np.float32)
    full = np.full((b, t, v), -1e30, np.float32)
    np.put_along_axis(full, top_ids, top_logits, axis=-1)
    mask = (rng.uniform(size=(b, t)) < 0.8).astype(np.float32)
    by_hand = np.exp(top_logits) / np.exp(top_logits).sum(-1, keepdims=True)
    draftable = np.setdiff1d(np.arange(v), top_ids[0, :3, 0])  # positions 0-2 of row 0: top token not draftable
    for draft_to_target in (None, draftable.astype(np.int32)):
        dense, dense_mask = losses.dense_teacher(jnp.asarray(full), jnp.asarray(mask), draft_to_target)
        topk, topk_mask = losses.topk_teacher(jnp.asarray(top_logits), jnp.asarray(top_ids), jnp.asarray(mask), v,
                                              draft_to_target)
        np.testing.assert_array_equal(np.asarray(topk_mask), np.asarray(dense_mask))
        np.testing.assert_array_equal(np.asarray(topk.argmax_BxT), np.asarray(dense.argmax_BxT))
        scattered = np.zeros(dense.probs_BxTxk.shape, np.float32)
        rows, cols = np.indices((b, t))
        np.add.at(scattered, (rows[..., None], cols[..., None], np.asarray(topk.ids_BxTxk)), np.asarray(topk.probs_BxTxk))
        np.testing.assert_allclose(scattered, np.asarray(dense.probs_BxTxk), rtol=1e-6, atol=1e-7)
        width = dense.probs_BxTxk.shape[-1]
        draft = jnp.asarray(rng.standard_normal((steps, b, t, width)) * 2, jnp.float32)
        value_and_grad = jax.jit(jax.value_and_grad(lambda d, teacher, m: losses.ttt_loss(d, teacher, m).loss))
        (a, grad_a), (c, grad_c) = value_and_grad(draft, dense, dense_mask), value_and_grad(draft, topk, topk_mask)
        np.testing.assert_allclose(float(c), float(a), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad_c), np.asarray(grad_a), atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.topk_teacher(jnp.asarray(top_logits), jnp.asarray(top_ids),
                                                              jnp.asarray(mask), v)[0].probs_BxTxk), by_hand, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(dense_mask), mask * np.isin(top_ids[..., 0], draftable))
    assert float(dense_mask[0, :3].sum()) == 0.0 < float(dense_mask.sum())


def test_ttt_targets_mask_rows_past_the_sequence():
    probs, mask = losses.ttt_targets(jnp.zeros((2, 5, 7)), jnp.ones((2, 5)), step=2)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0]] * 2)
    np.testing.assert_allclose(probs[:, :2].sum(-1), 1.0, rtol=1e-6)


# SpecBlock: valid-prefix mask, rank labels, soft targets and the rank loss.

def test_valid_prefix_mask_by_hand():
    hit = jnp.array([[[1, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]]], bool)
    mask = jnp.array([[[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]]])
    np.testing.assert_array_equal(losses.valid_prefix_mask(hit, mask),
                                  [[[1, 1, 0, 0], [1, 1, 0, 1], [1, 0, 0, 0]]])


def test_rank_labels_by_hand():
    logits = jnp.arange(12.0)[::-1]  # token i has rank i + 1
    tokens = jnp.array([0, 1, 3, 4, 9, 10, 11])  # ranks 1, 2, 4, 5, 10, 11, 12
    np.testing.assert_array_equal(losses.rank_labels(jnp.broadcast_to(logits, (7, 12)), tokens),
                                  [0, 1, 1, 2, 2, 3, 3])
    tied = jnp.array([[1.0, 1.0, 0.0]])  # ties count in the target's favour
    np.testing.assert_array_equal(losses.rank_labels(tied, jnp.array([1])), [0])
    np.testing.assert_array_equal(losses.rank_labels(tied, jnp.array([2]), bounds=(1, 2)), [2])


def test_rank_soft_targets_match_the_reference_table():
    expected = [[.702, .176, .078, .044], [.076, .679, .170, .076], [.029, .079, .714, .178],
                [.017, .034, .095, .854]]
    np.testing.assert_allclose(losses.rank_soft_targets(jnp.arange(4), 4), expected, atol=1.5e-3)


def test_rank_loss_by_hand():
    """One row, K = 3 slots, two batch rows; budget 1 so a class seen twice in a slot weighs 1/2."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 1, 3, 4)) * 2
    labels = np.array([[[0, 2, 3]], [[0, 1, 1]]])
    mask = np.array([[[1, 1, 1]], [[1, 0, 1]]], np.float64)
    pred = logits.argmax(-1)
    soft = np.array([[1 / (1 + abs(c - t) + max(t - c, 0)) ** 2 for c in range(4)] for t in range(4)])
    soft /= soft.sum(-1, keepdims=True)
    samples = []  # (ce * distance, slot, label) of the samples that count
    for b in range(2):
        for k in range(3):
            if mask[b, 0, k] and all(pred[b, 0, i] == labels[b, 0, i] for i in range(k)):
                t, p = labels[b, 0, k], pred[b, 0, k]
                logq = logits[b, 0, k] - np.log(np.exp(logits[b, 0, k]).sum())
                samples.append((-(soft[t] * logq).sum() * (1 + abs(t - p) + max(t - p, 0)), k, t))
    assert samples, "the case must count something"
    count = {}
    for _, k, t in samples:
        count[(k, t)] = count.get((k, t), 0) + 1
    w = [min(1.0, 1.0 / count[(k, t)]) for _, k, t in samples]
    expected = sum(x * wi for (x, _, _), wi in zip(samples, w)) / sum(w)
    got = losses.rank_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask), 1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(losses.rank_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.zeros((2, 1, 3)))) == 0
