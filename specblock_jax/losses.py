"""Drafter training losses: soft cross-entropy against the frozen target's distribution, and the
EAGLE-3 training-time-test (TTT) loss over the unrolled steps.

Offsets follow the data pipeline: the target's logits at input position p are its distribution of
x_{p+1}, and `loss_mask[p]` says whether x_{p+1} is trained on. A drafter row j at TTT step k predicts
x_{j+2+k}, so its teacher is the target at position j+1+k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

TTT_DECAY = 0.8  # EAGLE-3's weight of step k: 0.8 ** k


def soft_cross_entropy(logits_BxTxV: jax.Array, target_probs_BxTxV: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean over masked positions of -sum_v p(v) log q(v); 0 when nothing is masked in."""
    logq = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    ce_BxT = -jnp.sum(target_probs_BxTxV.astype(jnp.float32) * logq, axis=-1)
    mask_BxT = mask_BxT.astype(jnp.float32)
    return jnp.sum(ce_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def shift_left(x_BxT: jax.Array, n: int) -> jax.Array:
    """x[:, p + n] at p, zeros past the end (n static). Works on any trailing shape."""
    t = x_BxT.shape[1]
    pad = [(0, 0), (0, min(n, t))] + [(0, 0)] * (x_BxT.ndim - 2)
    return jnp.pad(x_BxT[:, n:], pad)[:, :t]


def ttt_targets(target_logits_BxTxV: jax.Array, loss_mask_BxT: jax.Array, step: int
                ) -> tuple[jax.Array, jax.Array]:
    """Teacher probabilities [B, T, V] and mask [B, T] of TTT step `step`: row j learns the target at
    position j + 1 + step; rows whose target lies past the sequence are masked out."""
    probs_BxTxV = jax.nn.softmax(shift_left(target_logits_BxTxV.astype(jnp.float32), 1 + step), axis=-1)
    return probs_BxTxV, shift_left(loss_mask_BxT.astype(jnp.float32), 1 + step)


class TTTLoss(NamedTuple):
    loss: jax.Array  # [] sum over steps of 0.8**k * step loss
    step_loss_K: jax.Array  # [K] soft cross-entropy of each step
    step_acc_K: jax.Array  # [K] fraction of masked rows whose drafter argmax equals the target's argmax


def ttt_loss(draft_logits_K: Sequence[jax.Array], target_logits_BxTxV: jax.Array, loss_mask_BxT: jax.Array,
             decay: float = TTT_DECAY) -> TTTLoss:
    """EAGLE-3's TTT loss: per-step soft cross-entropy to the target's distribution, weighted decay**k.
    `draft_logits_K`: each step's [B, T, V] logits (`eagle3.ttt_forward`'s tuple, or a [K, B, T, V] array).

    The same figures as `ttt_targets` per step, computed without its shifted copies: the teacher is
    softmaxed once, and step k compares draft rows [0, T - 1 - k) with teacher rows [1 + k, T) (the rows
    past the end, masked out there, are left out here)."""
    t = target_logits_BxTxV.shape[1]
    probs_BxTxV = jax.nn.softmax(target_logits_BxTxV.astype(jnp.float32), axis=-1)
    teacher_BxT = jnp.argmax(target_logits_BxTxV, axis=-1)
    losses, accs = [], []
    for k in range(len(draft_logits_K)):  # static: the number of TTT steps
        n = max(t - 1 - k, 0)
        logits_BxNxV, mask_BxN = draft_logits_K[k][:, :n], loss_mask_BxT[:, 1 + k:].astype(jnp.float32)
        losses.append(soft_cross_entropy(logits_BxNxV, probs_BxTxV[:, 1 + k:], mask_BxN))
        hit_BxN = jnp.argmax(logits_BxNxV, axis=-1) == teacher_BxT[:, 1 + k:]
        accs.append(jnp.sum(hit_BxN * mask_BxN) / jnp.maximum(jnp.sum(mask_BxN), 1.0))
    step_loss_K = jnp.stack(losses)
    weights_K = decay ** jnp.arange(len(losses), dtype=jnp.float32)
    return TTTLoss(jnp.sum(weights_K * step_loss_K), step_loss_K, jnp.stack(accs))


def restrict_to_draft_vocab(target_logits_BxTxV: jax.Array, loss_mask_BxT: jax.Array, draft_to_target_Vd: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
    """A reduced-vocabulary drafter's teacher, as EAGLE-3 trains it: the target's logits gathered at the
    draft vocabulary's target ids ([B, T, Vd]; a softmax of them is the target renormalized over the
    draft vocabulary), and the loss mask with positions dropped where the target's argmax lies outside
    the draft vocabulary (nothing there to learn). Pass both on to `ttt_loss` / `ttt_targets` in place
    of the full logits and mask: the TTT shift applies to them unchanged."""
    draft_to_target_Vd = jnp.asarray(draft_to_target_Vd, jnp.int32)
    logits_BxTxVd = jnp.take(target_logits_BxTxV, draft_to_target_Vd, axis=-1)
    covered_V = jnp.zeros((target_logits_BxTxV.shape[-1],), bool).at[draft_to_target_Vd].set(True)
    covered_BxT = covered_V[jnp.argmax(target_logits_BxTxV, axis=-1)]
    return logits_BxTxVd, loss_mask_BxT * covered_BxT.astype(loss_mask_BxT.dtype)


# ---------------------------------------------------------------------------------------------------
# SpecBlock: valid-prefix mask, rank labels and the rank loss (specblock_jax/models/specblock.py).

RANK_BOUNDS = (1, 4, 10)  # the target's token ranks 1 | 2-4 | 5-10 | > 10 in a slot's draft distribution
RANK_BUDGET_PER_CLASS = 10.0  # per-slot class reweighting: w_c = min(1, budget / count_c)


class SpecBlockLoss(NamedTuple):
    loss: jax.Array  # [] sum_k w**k sum_b L_{b,k} + rank weight * sum_b R_b: what the optimizer minimises
    step_loss_K: jax.Array  # [K] block-1 soft cross-entropy of each slot (under the training mask)
    step_acc_K: jax.Array  # [K] block-1 accuracy of slot k where slots < k were right (conditional)
    rank_loss: jax.Array  # [] sum over blocks of the rank loss
    rank_acc: jax.Array  # [] block-1 rank-head accuracy over loss-masked slots
    block_loss_NxK: jax.Array  # [num_ttt_blocks, K] soft cross-entropy of every block and slot
    block_acc_NxK: jax.Array  # [num_ttt_blocks, K] conditional accuracy of every block and slot


def valid_prefix_mask(hit_BxTxK: jax.Array, mask_BxTxK: jax.Array) -> jax.Array:
    """float [.., K]: slot k counts where it is masked in and every earlier slot of its block was right
    (`hit`), since at inference a block's later slots only matter after its earlier ones were accepted."""
    hit = hit_BxTxK.astype(jnp.float32)
    before_all_right = jnp.cumprod(jnp.concatenate([jnp.ones_like(hit[..., :1]), hit[..., :-1]], axis=-1), axis=-1)
    return mask_BxTxK.astype(jnp.float32) * before_all_right


def rank_labels(draft_logits_xV: jax.Array, target_token_x: jax.Array,
                bounds: tuple[int, ...] = RANK_BOUNDS) -> jax.Array:
    """int32 rank class of the target's token in each draft distribution: its 1-based rank r (ties
    counted in its favour) falls in class c when bounds[c-1] < r <= bounds[c]; past the last bound
    is the last class (len(bounds))."""
    own_x = jnp.take_along_axis(draft_logits_xV, target_token_x[..., None], axis=-1)
    rank_x = 1 + jnp.sum(draft_logits_xV > own_x, axis=-1)
    return jnp.sum(rank_x[..., None] > jnp.asarray(bounds), axis=-1).astype(jnp.int32)


def rank_soft_targets(labels_x: jax.Array, num_classes: int) -> jax.Array:
    """[.., C] asymmetric ordinal label smoothing: s(c) ∝ 1 / (1 + |c - t| + max(t - c, 0))**2, so a
    class below the label (predicting too good a rank) gets less mass than one above."""
    c_C = jnp.arange(num_classes)
    t = labels_x[..., None]
    s = 1.0 / (1.0 + jnp.abs(c_C - t) + jnp.maximum(t - c_C, 0)) ** 2
    return s / jnp.sum(s, axis=-1, keepdims=True)


def rank_loss(rank_logits_BxTxKxC: jax.Array, labels_BxTxK: jax.Array, mask_BxTxK: jax.Array,
              budget_per_class: float = RANK_BUDGET_PER_CLASS) -> jax.Array:
    """The rank head's loss for one block: soft cross-entropy to `rank_soft_targets`, times the distance
    weight 1 + |t - p| + max(t - p, 0) (p = predicted class; under-estimating costs twice), with
    per-slot class weights min(1, budget / count) over the batch, over the samples whose earlier slots
    the head classified right (the rank chain mask): sum(ce d w m) / sum(w m). 0 when nothing counts."""
    num_classes = rank_logits_BxTxKxC.shape[-1]
    logp = jax.nn.log_softmax(rank_logits_BxTxKxC.astype(jnp.float32), axis=-1)
    ce_BxTxK = -jnp.sum(rank_soft_targets(labels_BxTxK, num_classes) * logp, axis=-1)
    pred_BxTxK = jnp.argmax(rank_logits_BxTxKxC, axis=-1)
    distance = 1.0 + jnp.abs(labels_BxTxK - pred_BxTxK) + jnp.maximum(labels_BxTxK - pred_BxTxK, 0)
    mask = valid_prefix_mask(pred_BxTxK == labels_BxTxK, mask_BxTxK)
    onehot_BxTxKxC = jax.nn.one_hot(labels_BxTxK, num_classes) * mask[..., None]
    count_KxC = jnp.sum(onehot_BxTxKxC.reshape(-1, *onehot_BxTxKxC.shape[-2:]), axis=0)
    weight_KxC = jnp.minimum(1.0, budget_per_class / jnp.maximum(count_KxC, 1.0))
    w_BxTxK = jnp.sum(onehot_BxTxKxC * weight_KxC, axis=-1)  # 0 where masked out
    return jnp.sum(ce_BxTxK * distance * w_BxTxK) / jnp.maximum(jnp.sum(w_BxTxK), 1e-9)
