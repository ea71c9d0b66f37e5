"""EAGLE-3 drafting behind the plug-in interface of `specblock_jax.drafter`, with EAGLE-2's dynamic tree.

The drafter keeps its own one-layer KV cache. Slot / position j holds EAGLE's pair (target feature
f_j, token x_{j+1}). After the target has committed L tokens with root x_L, the pairs of the newest
accepted tokens are *pending*: their target features came from the last verify, and the last of
them is the root pair (f_{L-1}, x_L). `draft` processes them in its first forward (EAGLE's way of
refreshing the drafter with true features at no extra forward), whose root-pair output proposes the
depth-1 nodes. Each further depth is one forward over the `topk` frontier nodes of best cumulative
log-prob: node (hidden of its parent's forward, own token) at position L - 1 + depth, attending to
the committed pairs, its ancestors' and its own keys/values (in scratch slots past `max_len`). All
children of the frontier are candidates; the `budget` best by cumulative log-prob make the tree.
So a draft costs exactly `max_depth` drafter forwards. With a reduced draft vocabulary the top-k
runs over the drafter's LM head and the chosen ids are mapped to target ids at once, so the tree,
the next depth's embeddings and verification all see target ids.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from specblock_jax import tree as tree_lib
from specblock_jax.models import eagle3, layers
from specblock_jax.tree import Tree
from specblock_jax.verify import Acceptance


def commit_pending(state: Any, acceptance: Acceptance, features_BxN1xF: jax.Array) -> Any:
    """`state` (any drafter state with pending_features_BxPxF / pending_tokens_BxP / pending_count_B)
    with the accepted path as its pending rows: (feature of path node i, emitted token i) for
    i = 0 .. length; the drafter's next forward caches them with their true target features."""
    features_BxD1xF = jnp.take_along_axis(features_BxN1xF, acceptance.path_BxD1[..., None], axis=1)
    return state._replace(pending_features_BxPxF=features_BxD1xF.astype(state.pending_features_BxPxF.dtype),
                          pending_tokens_BxP=jnp.maximum(acceptance.tokens_BxD1, 0),
                          pending_count_B=acceptance.length_B + 1)


def target_ids(config: Any, params: Any, draft_ids: jax.Array) -> jax.Array:
    """Ids from a drafter's LM head -> target ids (trees and embeddings hold target ids only), through
    the method params' `draft_to_target` map when `config` has a reduced vocabulary."""
    if not config.reduced_vocab:
        return draft_ids.astype(jnp.int32)
    if "draft_to_target" not in params:
        raise ValueError(f"the drafter has a reduced vocabulary (draft_vocab_size {config.draft_vocab_size}) but "
                         "its params have no 'draft_to_target' map; pass it to drafter_params")
    return eagle3.to_target_ids(draft_ids, params["draft_to_target"]).astype(jnp.int32)


class Eagle3State(NamedTuple):
    k_BxKxSxD: jax.Array  # drafter keys: slots [0, max_len) pairs by position, then the draft's scratch
    v_BxKxSxD: jax.Array
    pending_features_BxPxF: jax.Array  # P = max_depth + 1 pairs not yet in the cache, oldest first
    pending_tokens_BxP: jax.Array  # int32; the last pending token is the root
    pending_count_B: jax.Array  # int32 in [1, P]


def drafter_params(drafter: Any, target_params: Any, draft_to_target: Any = None) -> dict[str, Any]:
    """The method's params: the trained drafter, a reference (not a copy) to the target's table and,
    for a reduced draft vocabulary, the [Vd] int32 draft -> target id map (not trained)."""
    params = {"drafter": drafter, "embed": target_params["embed_tokens"]["embedding"]}
    if draft_to_target is not None:
        params["draft_to_target"] = jnp.asarray(draft_to_target, jnp.int32)
    return params


@dataclasses.dataclass(frozen=True)
class Eagle3Method:
    """EAGLE-3 drafting: depth `max_depth` forwards, `topk` children of each of the `topk` best
    frontier nodes per depth, the `budget` best candidates kept (EAGLE-3 baseline: 7, 10, 60)."""

    config: eagle3.Eagle3Config
    budget: int = 60
    max_depth: int = 7
    topk: int = 10
    can_draft_nothing: ClassVar[bool] = False  # every step drafts a full tree

    def __post_init__(self):
        for name in ("budget", "max_depth", "topk"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Eagle3Method {name} must be an integer >= 1, got {value!r}")
        if self.topk > self.config.draft_vocab:
            raise ValueError(f"Eagle3Method topk {self.topk} exceeds the draft vocabulary {self.config.draft_vocab}")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.config.feature_layers)

    @property
    def scratch(self) -> int:
        """Cache slots past max_len for the frontier nodes of depths 1 .. max_depth - 1."""
        return (self.max_depth - 1) * self.topk

    def init(self, params: Any, prompt_BxT: jax.Array, prompt_lens_B: jax.Array, features_BxTxF: jax.Array,
             root_B: jax.Array, max_len: int) -> Eagle3State:
        """Cache the prompt's pairs (f_j, x_{j+1}) causally; the root pair (f_{len-1}, root) is pending.
        Pairs at j >= len - 1 are junk that the first draft overwrites before anything sees them."""
        c = self.config
        b, t = prompt_BxT.shape
        shape = (b, c.num_kv_heads, max_len + self.scratch, c.head_dim)
        kv = (jnp.zeros(shape, jnp.dtype(c.dtype)), jnp.zeros(shape, jnp.dtype(c.dtype)))
        next_BxT = jnp.pad(prompt_BxT[:, 1:], ((0, 0), (0, 1))).astype(jnp.int32)
        positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask_BxTxS = (jnp.arange(shape[2])[None, None, :] <= positions_BxT[..., None])
        out = eagle3.step(params["drafter"], c, eagle3.embed(params["embed"], next_BxT), positions_BxT, mask_BxTxS,
                          kv, positions_BxT, features_BxTxF=features_BxTxF, kv_live=t)
        last_B = (prompt_lens_B - 1).astype(jnp.int32)
        p = self.max_depth + 1
        root_features_BxF = jnp.take_along_axis(features_BxTxF, last_B[:, None, None], axis=1)[:, 0]
        pending_features = jnp.zeros((b, p, features_BxTxF.shape[-1]), features_BxTxF.dtype)
        pending_tokens = jnp.zeros((b, p), jnp.int32).at[:, 0].set(root_B.astype(jnp.int32))
        return Eagle3State(*out.kv, pending_features.at[:, 0].set(root_features_BxF), pending_tokens,
                           jnp.ones((b,), jnp.int32))

    def draft(self, params: Any, state: Eagle3State, root_B: jax.Array,
              lengths_B: jax.Array) -> tuple[Tree, Eagle3State, jax.Array]:
        """EAGLE-2's dynamic tree from the pending pairs; the pending pairs are now cached."""
        k, d = self.topk, self.max_depth
        max_len = state.k_BxKxSxD.shape[2] - self.scratch
        kv, hidden_BxH, logits_BxV = self._cache_pending(params, state, lengths_B, max_len)
        lp1_Bxk, tok1_Bxk = layers.top_k(jax.nn.log_softmax(logits_BxV, axis=-1), k)
        tok1_Bxk = target_ids(self.config, params, tok1_Bxk)
        b = root_B.shape[0]
        frontier = (tok1_Bxk.astype(jnp.int32), jnp.broadcast_to(hidden_BxH[:, None], (b, k, hidden_BxH.shape[-1])),
                    lp1_Bxk, jnp.broadcast_to(1 + jnp.arange(k, dtype=jnp.int32), (b, k)),
                    jnp.zeros((b, k, self.scratch), bool))

        def expand(carry, depth):
            """One forward over the depth-`depth` frontier: its k * k children and the next frontier."""
            kv, (tokens_Bxk, hidden_BxkxH, scores_Bxk, index_Bxk, anc_BxkxA) = carry
            own_k = (depth - 1) * k + jnp.arange(k)  # this frontier's scratch slots
            own_BxkxA = anc_BxkxA | (jnp.arange(self.scratch)[None, None, :] == own_k[None, :, None])
            committed_BxkxS = jnp.broadcast_to((jnp.arange(max_len)[None, :] < lengths_B[:, None])[:, None],
                                               (b, k, max_len))
            mask_BxkxS = jnp.concatenate([committed_BxkxS, own_BxkxA], axis=-1)
            out = eagle3.step(params["drafter"], self.config, eagle3.embed(params["embed"], tokens_Bxk),
                              jnp.broadcast_to(lengths_B[:, None] - 1 + depth, (b, k)), mask_BxkxS, kv,
                              jnp.broadcast_to(max_len + own_k, (b, k)), hidden_BxTxH=hidden_BxkxH,
                              kv_live=jnp.max(lengths_B), kv_tail=self.scratch)
            child_lp_Bxkxk, child_tok_Bxkxk = layers.top_k(jax.nn.log_softmax(out.logits, axis=-1), k)
            child_scores_BxKK = (scores_Bxk[:, :, None] + child_lp_Bxkxk).reshape(b, k * k)
            child_tok_BxKK = target_ids(self.config, params, child_tok_Bxkxk.reshape(b, k * k))
            child_parent_BxKK = jnp.repeat(index_Bxk, k, axis=1)
            # The next frontier: the k best children; candidate indices continue depth by depth.
            next_scores_Bxk, pick_Bxk = jax.lax.top_k(child_scores_BxKK, k)
            parent_Bxk = pick_Bxk // k
            take = lambda x: jnp.take_along_axis(x, parent_Bxk.reshape(b, k, *([1] * (x.ndim - 2))), axis=1)
            frontier = (jnp.take_along_axis(child_tok_BxKK, pick_Bxk, axis=1), take(out.hidden), next_scores_Bxk,
                        (1 + k + (depth - 1) * k * k + pick_Bxk).astype(jnp.int32), take(own_BxkxA))
            return (out.kv, frontier), (child_tok_BxKK, child_parent_BxKK, child_scores_BxKK)

        depths = jnp.arange(1, d, dtype=jnp.int32)
        (kv, _), (tok_LxBxKK, parent_LxBxKK, score_LxBxKK) = jax.lax.scan(expand, (kv, frontier), depths)
        flat = lambda x_LxBxKK: jnp.moveaxis(x_LxBxKK, 0, 1).reshape(b, -1)
        root_tok = root_B[:, None].astype(jnp.int32)
        tokens = jnp.concatenate([root_tok, tok1_Bxk.astype(jnp.int32), flat(tok_LxBxKK)], axis=1)
        parents = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), jnp.zeros((b, k), jnp.int32),
                                   flat(parent_LxBxKK)], axis=1)
        scores = jnp.concatenate([jnp.zeros((b, 1)), lp1_Bxk, flat(score_LxBxKK)], axis=1)
        tree = tree_lib.prune(tokens, parents, scores, jnp.ones(tokens.shape, bool), self.budget)
        new_state = state._replace(k_BxKxSxD=kv[0], v_BxKxSxD=kv[1])
        return tree, new_state, jnp.asarray(d, jnp.int32)

    def _cache_pending(self, params: Any, state: Eagle3State, lengths_B: jax.Array, max_len: int):
        """Write the pending pairs at their positions (lengths - count ..), attending causally to the
        committed pairs; returns the cache and the root pair's hidden [B, H] and logits [B, V]."""
        p = self.max_depth + 1
        count_B = state.pending_count_B
        positions_BxP = (lengths_B - count_B)[:, None] + jnp.arange(p, dtype=jnp.int32)
        valid_BxP = jnp.arange(p)[None, :] < count_B[:, None]
        slots_BxP = jnp.where(valid_BxP, positions_BxP, state.k_BxKxSxD.shape[2])  # past the end: dropped
        s_S = jnp.arange(state.k_BxKxSxD.shape[2])
        mask_BxPxS = (s_S[None, None, :] <= positions_BxP[..., None]) & (s_S < max_len)
        out = eagle3.step(params["drafter"], self.config, eagle3.embed(params["embed"], state.pending_tokens_BxP),
                          positions_BxP, mask_BxPxS, (state.k_BxKxSxD, state.v_BxKxSxD), slots_BxP,
                          features_BxTxF=state.pending_features_BxPxF, kv_live=jnp.max(lengths_B))
        root_row = (count_B - 1)[:, None, None]
        return (out.kv, jnp.take_along_axis(out.hidden, root_row, axis=1)[:, 0],
                jnp.take_along_axis(out.logits, root_row, axis=1)[:, 0])

    def commit(self, params: Any, state: Eagle3State, tree: Tree, acceptance: Acceptance,
               features_BxN1xF: jax.Array, lengths_B: jax.Array) -> Eagle3State:
        """The accepted path's pairs become pending: (feature of path node i, emitted token i) for
        i = 0 .. length, the last being the new root pair (feature of the last accepted node, bonus)."""
        return commit_pending(state, acceptance, features_BxN1xF)
