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

from specblock_jax.models import eagle3
from specblock_jax.models.layers import NEG_INF

TTT_DECAY = 0.8  # EAGLE-3's weight of step k: 0.8 ** k


class Teacher(NamedTuple):
    """The target's next-token distribution at each position, over the drafter's vocabulary: the
    probabilities of k ids per position (`ids` None: of every id in order, a dense distribution) and its
    most likely id. The offline feature cache keeps the target's top k logits only, so its teacher is
    k ids per position and no loss builds a [.., V] copy of it (`topk_teacher`)."""

    probs_BxTxk: jax.Array  # float32, sums to 1 over k
    ids_BxTxk: jax.Array | None  # int32 drafter-vocabulary ids of the k probabilities; None: k = V, in order
    argmax_BxT: jax.Array  # int32 the most likely id

    def rows(self, index_BxQ: jax.Array) -> Teacher:
        """The teacher at positions `index` [B, Q] of each batch row."""
        gather = lambda x: jnp.take_along_axis(x, index_BxQ.reshape(index_BxQ.shape + (1,) * (x.ndim - 2)), axis=1)
        return jax.tree.map(gather, self)


def dense_teacher(target_logits_BxTxV: jax.Array, loss_mask_BxT: jax.Array,
                  draft_to_target_Vd: jax.Array | None = None) -> tuple[Teacher, jax.Array]:
    """The teacher of full target logits (online training), over the draft vocabulary when reduced
    (`restrict_to_draft_vocab`), and the loss mask that goes with it."""
    if draft_to_target_Vd is not None:
        target_logits_BxTxV, loss_mask_BxT = restrict_to_draft_vocab(target_logits_BxTxV, loss_mask_BxT,
                                                                     draft_to_target_Vd)
    logits = jax.lax.stop_gradient(target_logits_BxTxV).astype(jnp.float32)
    return Teacher(jax.nn.softmax(logits, axis=-1), None, jnp.argmax(logits, axis=-1).astype(jnp.int32)), loss_mask_BxT


def topk_teacher(topk_logits_BxTxk: jax.Array, topk_ids_BxTxk: jax.Array, loss_mask_BxT: jax.Array, vocab_size: int,
                 draft_to_target_Vd: jax.Array | None = None) -> tuple[Teacher, jax.Array]:
    """The teacher of the target's top-k logits (the offline feature cache): the target renormalised
    over them, and over the draft vocabulary when reduced, with the positions dropped from the loss
    mask where the target's most likely token lies outside it. Equal to `dense_teacher` of the logits
    with NEG_INF at every other id, without building them."""
    logits_BxTxk = jax.lax.stop_gradient(topk_logits_BxTxk).astype(jnp.float32)
    ids_BxTxk = topk_ids_BxTxk.astype(jnp.int32)
    if draft_to_target_Vd is not None:
        ids_BxTxk = eagle3.target_to_draft(draft_to_target_Vd, vocab_size)[ids_BxTxk]
        top_BxT = jnp.argmax(logits_BxTxk, axis=-1)  # the target's most likely token, before restricting
        covered_BxT = jnp.take_along_axis(ids_BxTxk, top_BxT[..., None], axis=-1)[..., 0] >= 0
        loss_mask_BxT = loss_mask_BxT * covered_BxT.astype(loss_mask_BxT.dtype)
        logits_BxTxk = jnp.where(ids_BxTxk >= 0, logits_BxTxk, NEG_INF)
        ids_BxTxk = jnp.maximum(ids_BxTxk, 0)
    argmax_BxT = jnp.take_along_axis(ids_BxTxk, jnp.argmax(logits_BxTxk, axis=-1)[..., None], axis=-1)[..., 0]
    return Teacher(jax.nn.softmax(logits_BxTxk, axis=-1), ids_BxTxk, argmax_BxT), loss_mask_BxT


def cross_entropy(logits_xV: jax.Array, probs_xk: jax.Array, ids_xk: jax.Array | None = None) -> jax.Array:
    """-sum_v p(v) log q(v) per row, q = softmax(logits), p given at `ids` (None: at every id): the
    log-probabilities are read at p's ids only, so a k-id teacher never costs a [.., V] product."""
    logits_xV = logits_xV.astype(jnp.float32)
    at_p = logits_xV if ids_xk is None else jnp.take_along_axis(logits_xV, ids_xk, axis=-1)
    logq_at_p = at_p - jax.nn.logsumexp(logits_xV, axis=-1, keepdims=True)
    return -jnp.sum(probs_xk.astype(jnp.float32) * logq_at_p, axis=-1)


def soft_cross_entropy(logits_BxTxV: jax.Array, target_probs_BxTxk: jax.Array, mask_BxT: jax.Array,
                       ids_BxTxk: jax.Array | None = None) -> jax.Array:
    """Mean over masked positions of `cross_entropy`; 0 when nothing is masked in."""
    ce_BxT = cross_entropy(logits_BxTxV, target_probs_BxTxk, ids_BxTxk)
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
    step_acc_K: jax.Array  # [K] accuracy (argmax = the target's) of step k where steps < k were right (conditional)


def ttt_loss(draft_logits_K: Sequence[jax.Array], teacher: Teacher, loss_mask_BxT: jax.Array,
             decay: float = TTT_DECAY) -> TTTLoss:
    """EAGLE-3's TTT loss: per-step soft cross-entropy to the target's distribution, weighted decay**k.
    `draft_logits_K`: each step's [B, T, V] logits (`eagle3.ttt_forward`'s tuple, or a [K, B, T, V] array);
    `teacher` and `loss_mask` as `dense_teacher` or `topk_teacher` give them.

    The same losses as `ttt_targets` per step, computed without its shifted copies: step k compares
    draft rows [0, T - 1 - k) with teacher rows [1 + k, T) (the rows past the end, masked out there,
    are left out here). The accuracy of step k counts a row only where steps < k were right on it
    (`valid_prefix_mask`, as SpecBlock's slots): drafting reaches depth k + 1 only through them, and
    the unconditional figure hides a drafter whose later steps are right only where its earlier ones
    were wrong."""
    t = teacher.argmax_BxT.shape[1]
    r = max(t - 1, 0)  # rows of step 0; step k has r - k of them
    losses, hits, masks = [], [], []
    for k in range(len(draft_logits_K)):  # static: the number of TTT steps
        n = max(t - 1 - k, 0)
        later = jax.tree.map(lambda x: x[:, 1 + k:], teacher)
        logits_BxNxV, mask_BxN = draft_logits_K[k][:, :n], loss_mask_BxT[:, 1 + k:].astype(jnp.float32)
        losses.append(soft_cross_entropy(logits_BxNxV, later.probs_BxTxk, mask_BxN, later.ids_BxTxk))
        pad = lambda x_BxN: jnp.pad(x_BxN, ((0, 0), (0, r - n)))
        hits.append(pad(jnp.argmax(logits_BxNxV, axis=-1) == later.argmax_BxT))
        masks.append(pad(mask_BxN))
    hit_BxRxK = jnp.stack(hits, -1)
    counted_BxRxK = valid_prefix_mask(hit_BxRxK, jnp.stack(masks, -1))
    step_acc_K = jnp.sum(hit_BxRxK * counted_BxRxK, axis=(0, 1)) / jnp.maximum(jnp.sum(counted_BxRxK, axis=(0, 1)), 1.0)
    step_loss_K = jnp.stack(losses)
    weights_K = decay ** jnp.arange(len(losses), dtype=jnp.float32)
    return TTTLoss(jnp.sum(weights_K * step_loss_K), step_loss_K, step_acc_K)


def restrict_to_draft_vocab(target_logits_BxTxV: jax.Array, loss_mask_BxT: jax.Array, draft_to_target_Vd: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
    """A reduced-vocabulary drafter's teacher, as EAGLE-3 trains it: the target's logits gathered at the
    draft vocabulary's target ids ([B, T, Vd]; a softmax of them is the target renormalized over the
    draft vocabulary), and the loss mask with positions dropped where the target's argmax lies outside
    the draft vocabulary (nothing there to learn): what `dense_teacher` builds its teacher from."""
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
