"""Drafter training losses: soft cross-entropy against the frozen target's distribution, and the
EAGLE-3 training-time-test (TTT) loss over the unrolled steps.

Offsets follow the data pipeline: the target's logits at input position p are its distribution of
x_{p+1}, and `loss_mask[p]` says whether x_{p+1} is trained on. A drafter row j at TTT step k predicts
x_{j+2+k}, so its teacher is the target at position j+1+k.
"""

from __future__ import annotations

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


def ttt_loss(draft_logits_KxBxTxV: jax.Array, target_logits_BxTxV: jax.Array, loss_mask_BxT: jax.Array,
             decay: float = TTT_DECAY) -> TTTLoss:
    """EAGLE-3's TTT loss: per-step soft cross-entropy to the target's distribution, weighted decay**k."""
    losses, accs = [], []
    for k in range(draft_logits_KxBxTxV.shape[0]):  # static: the number of TTT steps
        probs_BxTxV, mask_BxT = ttt_targets(target_logits_BxTxV, loss_mask_BxT, k)
        logits_BxTxV = draft_logits_KxBxTxV[k]
        losses.append(soft_cross_entropy(logits_BxTxV, probs_BxTxV, mask_BxT))
        hit_BxT = jnp.argmax(logits_BxTxV, axis=-1) == jnp.argmax(probs_BxTxV, axis=-1)
        accs.append(jnp.sum(hit_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0))
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

