"""Acceptance over a verified draft tree: which drafted path the target agrees with, and its bonus token.

Greedy acceptance reproduces plain greedy decoding token for token. Sampling acceptance is lossless
recursive rejection sampling with deterministic drafts (q = a point mass, as in EAGLE's
`evaluate_posterior`): the emitted tokens are distributed exactly as plain decoding from
`processed_logprobs` would draw them. Both sanitize the tree first, so malformed drafter nodes and
nodes deeper than `max_depth` are never accepted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from specblock_jax.sampling import SamplingParams, processed_logprobs
from specblock_jax.tree import Tree, path_to, sanitize

NO_TOKEN = -1  # fills `tokens_BxD1` past the bonus token


class Acceptance(NamedTuple):
    path_BxD1: jax.Array  # [B, D+1] int32 accepted node indices, root first; 0 past length
    length_B: jax.Array  # [B] int32 accepted draft tokens (0..D), root not counted
    tokens_BxD1: jax.Array  # [B, D+1] int32 emitted: accepted draft tokens, then the bonus; -1 after
    bonus_B: jax.Array  # [B] int32 the target's token after the accepted path (next step's root)


def _check_logits(tree: Tree, logits_BxN1xV: jax.Array) -> None:
    if logits_BxN1xV.ndim != 3 or logits_BxN1xV.shape[:2] != tree.tokens.shape:
        raise ValueError(f"logits must have shape [B, N+1, V] with [B, N+1] = {tree.tokens.shape}, "
                         f"got {logits_BxN1xV.shape}")


def _node_rows(x_BxN1xV: jax.Array, node_B: jax.Array) -> jax.Array:
    """[B, N+1, V], [B] -> [B, V]: each row's entry at its node."""
    return jnp.take_along_axis(x_BxN1xV, node_B[:, None, None], axis=1)[:, 0]


def _acceptance(tree: Tree, chosen_B: jax.Array, bonus_B: jax.Array, max_depth: int) -> Acceptance:
    """Pack the accepted node (a sanitized tree's node of depth <= max_depth) and bonus token."""
    path_BxD1 = path_to(tree, chosen_B, max_depth)
    length_B = jnp.take_along_axis(tree.depth, chosen_B[:, None], axis=1)[:, 0]
    next_node_BxD1 = jnp.pad(path_BxD1[:, 1:], ((0, 0), (0, 1)))  # emitted token d is node path[d + 1]
    draft_BxD1 = jnp.take_along_axis(tree.tokens, next_node_BxD1, axis=1)
    level_D1 = jnp.arange(max_depth + 1)
    tokens_BxD1 = jnp.where(level_D1 < length_B[:, None], draft_BxD1,
                            jnp.where(level_D1 == length_B[:, None], bonus_B[:, None], NO_TOKEN))
    return Acceptance(path_BxD1, length_B.astype(jnp.int32), tokens_BxD1.astype(jnp.int32),
                      bonus_B.astype(jnp.int32))


def accept_greedy(tree: Tree, logits_BxN1xV: jax.Array, max_depth: int) -> Acceptance:
    """A draft node is correct iff its token is the argmax of its parent's logits; accept the deepest
    node whose whole path is correct (ties -> lowest index), then the argmax at it. Every accepted
    token is the argmax of these logits, so the output is plain greedy decoding's wherever the verify
    forward's logits round as the single-token forward's do (a near-tie may round either way)."""
    _check_logits(tree, logits_BxN1xV)
    tree = sanitize(tree)
    argmax_BxN1 = jnp.argmax(logits_BxN1xV, axis=-1).astype(jnp.int32)
    parent_argmax_BxN1 = jnp.take_along_axis(argmax_BxN1, jnp.maximum(tree.parents, 0), axis=1)
    correct_BxN1 = tree.valid & (tree.tokens == parent_argmax_BxN1) & (tree.depth <= max_depth)
    accepted_BxN1 = sanitize(tree.replace(valid=correct_BxN1)).valid  # correct with all its ancestors
    chosen_B = jnp.argmax(jnp.where(accepted_BxN1, tree.depth, -1), axis=1).astype(jnp.int32)
    bonus_B = jnp.take_along_axis(argmax_BxN1, chosen_B[:, None], axis=1)[:, 0]
    return _acceptance(tree, chosen_B, bonus_B, max_depth)


def accept_sampling(tree: Tree, logits_BxN1xV: jax.Array, sampling: SamplingParams, rng: jax.Array,
                    max_depth: int) -> Acceptance:
    """Lossless recursive rejection sampling over siblings.

    At the current node (the root first) with target distribution p, visit its valid children in
    index order and accept child c with probability p_res(c) / sum(p_res), where p_res is p with the
    tokens of already rejected siblings zeroed: the draft is a point mass, so this is speculative
    sampling's min(1, p/q) on the residual. A duplicate of a rejected token has p_res 0 and is never
    accepted. On acceptance move to c, one level deeper; when every child is rejected (or there are
    none) the bonus is drawn from the residual.

    The sibling visit needs no loop: child j is reached only if every earlier sibling was rejected,
    and then its residual mass is fixed (p minus the distinct earlier siblings' tokens), so each
    child's test is computed at once and the first child that passes is the one accepted. Only the
    depth is a lax loop (static max_depth + 1 levels); everything is vectorised over the batch.
    """
    _check_logits(tree, logits_BxN1xV)
    tree = sanitize(tree)
    b, n1, v = logits_BxN1xV.shape
    idx_N1 = jnp.arange(n1)
    earlier_N1xN1 = idx_N1[None, :] < idx_N1[:, None]  # [j, k]: k comes before j
    same_token_BxN1xN1 = tree.tokens[:, :, None] == tree.tokens[:, None, :]
    # One uniform per node (each node is tested at most once) and a Gumbel vector per row (each row
    # draws one bonus: argmax(logp + gumbel) ~ p), from a single draw.
    uniform_BxN1V = jax.random.uniform(rng, (b, n1 + v), minval=jnp.finfo(jnp.float32).tiny)
    u_BxN1, gumbel_BxV = uniform_BxN1V[:, :n1], -jnp.log(-jnp.log(uniform_BxN1V[:, n1:]))

    def level(_, carry):
        cur_B, done_B, bonus_B = carry
        logp_BxV = processed_logprobs(_node_rows(logits_BxN1xV, cur_B), sampling)
        p_token_BxN1 = jnp.exp(jnp.take_along_axis(logp_BxV, jnp.clip(tree.tokens, 0, v - 1), axis=1))
        child_BxN1 = (tree.valid & (tree.parents == cur_B[:, None]) & (tree.depth <= max_depth)
                      & ~done_B[:, None])
        before_BxN1xN1 = earlier_N1xN1 & child_BxN1[:, None, :]  # [b, j, k]: sibling k precedes j
        duplicate_BxN1 = jnp.any(before_BxN1xN1 & same_token_BxN1xN1, axis=2)
        p_res_BxN1 = jnp.where(duplicate_BxN1, 0.0, p_token_BxN1)  # a rejected token has residual 0
        rejected_mass_BxN1 = jnp.sum(jnp.where(before_BxN1xN1, p_res_BxN1[:, None, :], 0.0), axis=2)
        # P(accept j | earlier siblings rejected) = p_res(j) / (1 - their mass); strict '<' never
        # accepts p_res == 0.
        passes_BxN1 = child_BxN1 & (u_BxN1 * (1.0 - rejected_mass_BxN1) < p_res_BxN1)
        accepted_B = jnp.any(passes_BxN1, axis=1)
        first_B = jnp.argmax(passes_BxN1, axis=1).astype(jnp.int32)
        rejected_BxN1 = child_BxN1 & (~accepted_B[:, None] | (idx_N1 < first_B[:, None]))
        stop_B = ~done_B & ~accepted_B
        rejected_tokens_BxN1 = jnp.where(rejected_BxN1, tree.tokens, v)  # v: dropped by the scatter
        residual_BxV = logp_BxV.at[jnp.arange(b)[:, None], rejected_tokens_BxN1].set(-jnp.inf, mode="drop")
        # Rounding could reject the last bit of mass; then fall back to p rather than sample from nothing.
        residual_BxV = jnp.where(jnp.any(jnp.isfinite(residual_BxV), axis=1, keepdims=True), residual_BxV, logp_BxV)
        drawn_B = jnp.argmax(residual_BxV + gumbel_BxV, axis=1).astype(jnp.int32)
        return jnp.where(accepted_B, first_B, cur_B), done_B | stop_B, jnp.where(stop_B, drawn_B, bonus_B)

    start = (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    chosen_B, _, bonus_B = jax.lax.fori_loop(0, max_depth + 1, level, start)
    return _acceptance(tree, chosen_B, bonus_B, max_depth)


def accept(tree: Tree, logits_BxN1xV: jax.Array, sampling: SamplingParams, rng: jax.Array,
           max_depth: int) -> Acceptance:
    """Greedy or sampling acceptance, chosen statically by `sampling.greedy` (the rng is then unused)."""
    if sampling.greedy:
        return accept_greedy(tree, logits_BxN1xV, max_depth)
    return accept_sampling(tree, logits_BxN1xV, sampling, rng, max_depth)
