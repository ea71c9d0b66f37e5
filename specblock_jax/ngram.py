"""A training-free n-gram (prompt-lookup) drafter: propose what followed earlier occurrences of the
current suffix. It needs no parameters and no target features, costs no forward passes, and is the
simplest drafter behind the plug-in interface of `specblock_jax.drafter`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from specblock_jax import tree as tree_lib
from specblock_jax.tree import Tree
from specblock_jax.verify import Acceptance


class NgramState(NamedTuple):
    history_BxS: jax.Array  # [B, max_len] int32: committed tokens, then the root; junk from length on
    length_B: jax.Array  # [B] int32: tokens in the history, root included


@dataclasses.dataclass(frozen=True)
class NgramMethod:
    """Draft up to `branches` chains of up to `max_depth` tokens: the continuations of the most recent
    earlier occurrences of the history's last n tokens (n from `max_ngram` down to `min_ngram`; a
    longer match ranks first, then a more recent one). Chains sharing a prefix are merged into one
    tree. Of the `branches * max_depth` candidate nodes the `budget` shallowest are kept (earlier
    chains first within a depth); a larger budget leaves the extra nodes invalid."""

    # Defaults sized for a CPU, where verifying N + 1 tokens costs about 2-3x a single-token step: one
    # chain, drafted only from matches of 2+ tokens (1-token matches rarely predict far). On an
    # accelerator, where a wider tree verifies at nearly the cost of one token, raise budget/branches.
    budget: int = 6
    max_depth: int = 6
    max_ngram: int = 4
    min_ngram: int = 2
    branches: int = 1
    feature_layers: ClassVar[tuple[int, ...]] = ()
    can_draft_nothing: ClassVar[bool] = True  # no match, no draft: the step decodes the root alone

    def __post_init__(self):
        for name in ("budget", "max_depth", "max_ngram", "min_ngram", "branches"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NgramMethod {name} must be an integer >= 1, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"NgramMethod min_ngram {self.min_ngram} exceeds max_ngram {self.max_ngram}")

    def init(self, params: Any, prompt_BxT: jax.Array, prompt_lens_B: jax.Array, features_BxTxF: Any,
             root_B: jax.Array, max_len: int) -> NgramState:
        """History = the prompt, then the root."""
        b, t = prompt_BxT.shape
        history_BxS = jnp.zeros((b, max_len), jnp.int32).at[:, :t].set(prompt_BxT.astype(jnp.int32))
        history_BxS = history_BxS.at[jnp.arange(b), prompt_lens_B].set(root_B, mode="drop")
        return NgramState(history_BxS, prompt_lens_B.astype(jnp.int32) + 1)

    def draft(self, params: Any, state: NgramState, root_B: jax.Array,
              lengths_B: jax.Array) -> tuple[Tree, NgramState, jax.Array]:
        """The merged chains as a `budget`-node tree; scores are -depth (there are no probabilities).
        Drafting only reads the history; `commit` extends it."""
        tokens_BxCxD, valid_BxCxD = self._chains(state)
        parents_BxCxD, valid_BxCxD = _merge_prefixes(tokens_BxCxD, valid_BxCxD)
        b = root_B.shape[0]
        depth_BxCxD = jnp.broadcast_to(jnp.arange(1, self.max_depth + 1), tokens_BxCxD.shape)
        scores_BxCxD = jnp.where(valid_BxCxD, -depth_BxCxD.astype(jnp.float32), -jnp.inf)

        def with_root(root, x_BxCxD):  # candidate 0 is the root, then chain-major c * D + d + 1
            return jnp.concatenate([jnp.broadcast_to(root, (b, 1)).astype(x_BxCxD.dtype), x_BxCxD.reshape(b, -1)],
                                   axis=1)

        tree = tree_lib.prune(with_root(root_B[:, None], tokens_BxCxD), with_root(-1, parents_BxCxD),
                              with_root(0.0, scores_BxCxD), with_root(True, valid_BxCxD), self.budget)
        return tree, state, jnp.zeros((), jnp.int32)

    def _chains(self, state: NgramState) -> tuple[jax.Array, jax.Array]:
        """[B, branches, max_depth] continuation tokens of the best matches, and which are real."""
        history_BxS, length_B = state.history_BxS, state.length_B
        s = history_BxS.shape[1]
        ends_S = jnp.arange(s)
        # longest_BxS[b, e]: the longest n whose n tokens ending at e equal the history's last n tokens.
        # Only earlier occurrences count (e < length - 1), so every window lies inside the history.
        longest_BxS = jnp.zeros(history_BxS.shape, jnp.int32)
        match_BxS = jnp.ones(history_BxS.shape, bool)
        for k in range(self.max_ngram):  # grow the window one token back at a time
            suffix_B = jnp.take_along_axis(history_BxS, (length_B - 1 - k)[:, None], axis=1, mode="clip")
            shifted_BxS = jnp.pad(history_BxS, ((0, 0), (k, 0)))[:, :s]  # [b, e] = history[b, e - k]
            match_BxS = match_BxS & (shifted_BxS == suffix_B) & (ends_S >= k)
            if k + 1 >= self.min_ngram:
                longest_BxS = jnp.where(match_BxS, k + 1, longest_BxS)
        earlier_BxS = ends_S[None, :] < (length_B - 1)[:, None]
        rank_BxS = jnp.where(earlier_BxS & (longest_BxS > 0), longest_BxS * s + ends_S, -1)
        rank_BxC, ends_BxC = jax.lax.top_k(rank_BxS, self.branches)
        # Chain c continues after its match: history positions end + 1 .. end + max_depth, up to the root.
        positions_BxCxD = ends_BxC[:, :, None] + 1 + jnp.arange(self.max_depth)
        tokens_BxCxD = jnp.take_along_axis(history_BxS, positions_BxCxD.reshape(len(length_B), -1), axis=1,
                                           mode="clip").reshape(positions_BxCxD.shape)
        valid_BxCxD = (rank_BxC >= 0)[:, :, None] & (positions_BxCxD < length_B[:, None, None])
        return tokens_BxCxD, valid_BxCxD

    def commit(self, params: Any, state: NgramState, tree: Tree, acceptance: Acceptance, features_BxN1xF: Any,
               lengths_B: jax.Array) -> NgramState:
        """Append the accepted drafts and the bonus (the next root) after the current root."""
        d1 = acceptance.tokens_BxD1.shape[1]
        offsets_BxD1 = jnp.arange(d1)[None, :]
        keep_BxD1 = offsets_BxD1 <= acceptance.length_B[:, None]
        s = state.history_BxS.shape[1]
        slots_BxD1 = jnp.where(keep_BxD1, state.length_B[:, None] + offsets_BxD1, s)  # past the end: dropped
        history_BxS = state.history_BxS.at[jnp.arange(len(slots_BxD1))[:, None], slots_BxD1].set(
            acceptance.tokens_BxD1, mode="drop")
        return NgramState(history_BxS, state.length_B + acceptance.length_B + 1)


def _merge_prefixes(tokens_BxCxD: jax.Array, valid_BxCxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Chains -> each node's parent as a candidate index (0: the root; node (c, d) is candidate
    c * D + d + 1) and which nodes survive.

    A node whose chain prefix (tokens 0..d) equals an earlier chain's is dropped; its children hang
    from the earliest chain with that prefix instead, whose node has a smaller index, so parents
    still come before children."""
    c, d = tokens_BxCxD.shape[1:]
    equal_BxCxCxD = ((tokens_BxCxD[:, :, None, :] == tokens_BxCxD[:, None, :, :])
                     & valid_BxCxD[:, :, None, :] & valid_BxCxD[:, None, :, :])
    same_prefix_BxCxCxD = jnp.cumsum(~equal_BxCxCxD, axis=-1) == 0
    earlier_or_self_CxC = jnp.arange(c)[None, :] <= jnp.arange(c)[:, None]
    first_BxCxD = jnp.argmax(same_prefix_BxCxCxD & earlier_or_self_CxC[None, :, :, None], axis=2)
    survivor_BxCxD = first_BxCxD * d + jnp.arange(d) + 1  # the kept node with this node's prefix
    parents_BxCxD = jnp.concatenate([jnp.zeros(survivor_BxCxD.shape[:2] + (1,), survivor_BxCxD.dtype),
                                     survivor_BxCxD[:, :, :-1]], axis=-1)
    keep_BxCxD = valid_BxCxD & (first_BxCxD == jnp.arange(c)[:, None])
    return parents_BxCxD.astype(jnp.int32), keep_BxCxD
