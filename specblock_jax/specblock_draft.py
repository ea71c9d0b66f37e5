"""SpecBlock drafting behind the plug-in interface of `specblock_jax.drafter`: a tree from block 1 and
`max_blocks - 1` rounds of batched block expansions, pruned to a static budget.

The drafter's cache holds K keys/values per committed row (row j: the pair (f_j, x_{j+1}), its K
slots at cache slots j*K .. j*K + K - 1), then scratch for the expansion blocks. After the target has
committed L tokens with root x_L, the newest rows are *pending* (their features came from the last
verify); the last is the query row (f_{L-1}, x_L). `draft`'s first forward caches the pending rows
with block 1's mask, exactly as training sees context rows, and the query row's K slots are block 1:
slot k proposes depth k + 1. Its greedy chain g_0 -> .. -> g_{K-1} hangs from the root; slot k's
alternatives (its top tokens up to the slot's width) are siblings of g_k. Widths come from the rank
head's class per slot (`widths`; block 1's slot 0 uses `slot0_width`) or a fixed `topk`.

Each expansion round picks the `expand` best nodes of the previous round by cumulative log-prob and
runs one batched forward over them: node u at slot m of its block inherits that slot's hidden
state (or the query row's feature without inheritance) with u's token, at the query row's RoPE
positions, attending to the committed rows, its ancestors' blocks up to the inherited slots, and its
own block causally (scratch slots). Its K slots become a chain with alternatives under u. Siblings
with one token are merged (`merge_duplicates`), then the candidates are pruned to the `budget` best
by cumulative log-prob (`tree.prune`, ancestor-closed).
A draft costs `max_blocks` drafter forwards, whatever the budget. With a reduced draft vocabulary the
top tokens of a slot are draft ids, mapped to target ids at once (`draft_to_target` in the params):
the tree, the expansions' token embeddings, duplicate merging and verification see target ids only.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from specblock_jax import tree as tree_lib
from specblock_jax.eagle3_draft import commit_pending, target_ids
from specblock_jax.eagle3_draft import drafter_params as _drafter_params
from specblock_jax.models import layers, specblock
from specblock_jax.tree import Tree
from specblock_jax.verify import Acceptance


class SpecBlockState(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer [B, G, S, D] keys: K slots per committed row, then the expansions' scratch
    v: tuple[jax.Array, ...]
    pending_features_BxPxF: jax.Array  # P = max_depth + 1 rows not yet cached, oldest first
    pending_tokens_BxP: jax.Array  # int32; the last pending row's token is the root
    pending_count_B: jax.Array  # int32 in [1, P]
    query_hidden_BxKxH: jax.Array  # the last draft's block-1 slot hiddens (what `adapt` learns from)


class _Level(NamedTuple):
    """The rows of one block forward and their candidate nodes (R rows of K slots of W candidates)."""

    seen_BxRxS: jax.Array  # bool: cache slots each row's block sees besides its own slots
    slots_BxRxK: jax.Array  # int32 cache slots of each row's K slots
    hidden_BxRxKxH: jax.Array
    tokens_BxRxKxW: jax.Array
    scores_BxRxKxW: jax.Array
    valid_BxRxKxW: jax.Array
    parents_BxRxKxW: jax.Array  # node index of each candidate's parent
    first_index: int  # node index of candidate (0, 0, 0); the others follow row-major


def drafter_params(drafter: Any, target_params: Any, draft_to_target: Any = None) -> dict[str, Any]:
    """The method's params: the trained drafter, a reference (not a copy) to the target's table and,
    for a reduced draft vocabulary, the [Vd] int32 draft -> target id map (EAGLE-3's layout)."""
    return _drafter_params(drafter, target_params, draft_to_target)


def block_scores(top_lp_xKxW: jax.Array, parent_x: jax.Array) -> jax.Array:
    """Cumulative log-probs of a block's candidates below a parent scored `parent_x`, from each slot's
    top-W log-probs: slot k's greedy token extends the chain of the greedy tokens before it, and its
    other top tokens hang beside it (siblings), below the same chain."""
    greedy_xK = parent_x[..., None] + jnp.cumsum(top_lp_xKxW[..., 0], axis=-1)
    above_xK = jnp.concatenate([parent_x[..., None], greedy_xK[..., :-1]], axis=-1)
    return above_xK[..., None] + top_lp_xKxW


def _positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner} {name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SpecBlockMethod:
    """SpecBlock drafting: block 1 plus `max_blocks - 1` expansion rounds of `expand` nodes each, the
    `budget` best candidates kept. `widths[c]` tokens are kept at a slot of rank class c (the
    reference's production table (2, 4, 6, 4)); `slot0_width` at block 1's slot 0; `topk` at every
    slot when the drafter has no rank head."""

    config: specblock.SpecBlockConfig
    budget: int = 32
    max_blocks: int = 2
    widths: tuple[int, ...] = (2, 4, 6, 4)
    slot0_width: int = 6
    topk: int = 4
    expand: int = 4
    can_draft_nothing: ClassVar[bool] = False  # every step drafts a full tree

    def __post_init__(self):
        for name in ("budget", "max_blocks", "slot0_width", "topk", "expand"):
            _positive_int("SpecBlockMethod", name, getattr(self, name))
        if len(self.widths) != self.config.rank_classes:
            raise ValueError(f"SpecBlockMethod widths {self.widths} must give one width per rank class "
                             f"({self.config.rank_classes})")
        for w in self.widths:
            _positive_int("SpecBlockMethod", "widths entry", w)
        if self.width > self.config.draft_vocab:
            raise ValueError(f"SpecBlockMethod width {self.width} exceeds the draft vocabulary {self.config.draft_vocab}")
        if self.expand > self.config.block_size * self.width:
            raise ValueError(f"SpecBlockMethod expand {self.expand} exceeds the {self.config.block_size * self.width} "
                             "candidates of a block")

    @property
    def max_depth(self) -> int:
        return self.config.block_size * self.max_blocks

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.config.feature_layers)

    @property
    def width(self) -> int:
        """W: candidates computed per slot (the widest slot); narrower slots mark the rest invalid."""
        return max(*self.widths, self.slot0_width) if self.config.rank_head else self.topk

    def slot_widths(self, rank_xKxC: jax.Array | None, shape: tuple[int, ...], first_block: bool) -> jax.Array:
        """Tokens kept per slot (`shape`: [..., K]): its rank class's width (block 1's slot 0:
        `slot0_width`), or `topk` without a rank head."""
        if rank_xKxC is None:
            return jnp.full(shape, self.topk)
        width_xK = jnp.asarray(self.widths)[jnp.argmax(rank_xKxC, axis=-1)]
        return width_xK.at[..., 0].set(self.slot0_width) if first_block else width_xK

    @property
    def scratch(self) -> int:
        """Cache slots past the committed rows: K per expanded node of every round."""
        return (self.max_blocks - 1) * self.expand * self.config.block_size

    def init(self, params: Any, prompt_BxT: jax.Array, prompt_lens_B: jax.Array, features_BxTxF: jax.Array,
             root_B: jax.Array, max_len: int) -> SpecBlockState:
        """Cache the prompt's rows (f_j, x_{j+1}) with block 1's mask; the query row (f_{len-1}, root) is
        pending. Rows at j >= len - 1 are junk that later drafts overwrite before anything sees them."""
        c = self.config
        b, t = prompt_BxT.shape
        shape = (b, c.num_kv_heads, max_len * c.block_size + self.scratch, c.head_dim)
        kv = tuple(tuple(jnp.zeros(shape, jnp.dtype(c.dtype)) for _ in range(c.num_layers)) for _ in "kv")
        next_BxT = jnp.pad(prompt_BxT[:, 1:], ((0, 0), (0, 1))).astype(jnp.int32)
        rows_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        kv, _ = self._cache_rows(params, kv, next_BxT, rows_BxT, jnp.ones((b, t), bool), features_BxTxF, max_len,
                                 jnp.zeros((b, 1), jnp.int32), t * c.block_size)
        p = self.max_depth + 1
        last_B = (prompt_lens_B - 1).astype(jnp.int32)
        root_features_BxF = jnp.take_along_axis(features_BxTxF, last_B[:, None, None], axis=1)[:, 0]
        pending_features = jnp.zeros((b, p, features_BxTxF.shape[-1]), features_BxTxF.dtype)
        pending_tokens = jnp.zeros((b, p), jnp.int32).at[:, 0].set(root_B.astype(jnp.int32))
        return SpecBlockState(*kv, pending_features.at[:, 0].set(root_features_BxF), pending_tokens,
                              jnp.ones((b,), jnp.int32), jnp.zeros((b, c.block_size, c.hidden_size), jnp.dtype(c.dtype)))

    def _cache_rows(self, params, kv, tokens_BxR, rows_BxR, valid_BxR, features_BxRxF, max_len, head_rows_BxN, live):
        """Block 1 over committed rows, written at their cache slots (invalid rows dropped): a slot
        sees every slot of earlier rows and its own row's slots up to itself (none at or past `live`).
        Heads at `head_rows`."""
        c = self.config
        k_slots, s = c.block_size, kv[0][0].shape[2]
        b, r = rows_BxR.shape
        slot_BxRxK = rows_BxR[..., None] * k_slots + jnp.arange(k_slots)
        slots_BxQ = jnp.where(valid_BxR[..., None], slot_BxRxK, s).reshape(b, r * k_slots)  # past the end: dropped
        s_S = jnp.arange(s)
        seen_BxQxS = (((s_S // k_slots)[None, None] < rows_BxR.reshape(b, r, 1, 1))
                      | ((s_S[None, None] <= slot_BxRxK[..., None]) & (s_S // k_slots == rows_BxR[..., None, None])))
        mask_BxQxS = (seen_BxQxS & (s_S < max_len * k_slots)).reshape(b, r * k_slots, s)
        out = specblock.forward(params["drafter"], c, params["embed"], tokens_BxR, rows_BxR,
                                _cache_attend(kv, slots_BxQ, mask_BxQxS, live), features_BxRxF=features_BxRxF,
                                head_rows_BxN=head_rows_BxN)
        return _unzip(out.aux), out

    def _cache_pending(self, params, state: SpecBlockState, rows_BxP, max_len):
        """`_cache_rows` over the pending rows, run on the shortest static prefix of them (1, 2, 4, ..,
        P) that holds every row's count: P is sized for the longest accepted path, and each row is K
        slots through every layer, so a step that accepted little should not pay for P rows."""
        count_B = state.pending_count_B
        p = rows_BxP.shape[1]
        sizes = sorted({*(2 ** i for i in range(p.bit_length()) if 2 ** i < p), p})
        live = (jnp.max(rows_BxP[:, 0] + count_B)) * self.config.block_size  # past the newest valid row

        def prefix(n):
            return lambda: self._cache_rows(
                params, (state.k, state.v), state.pending_tokens_BxP[:, :n], rows_BxP[:, :n],
                jnp.arange(n)[None, :] < count_B[:, None], state.pending_features_BxPxF[:, :n], max_len,
                (count_B - 1)[:, None], live)

        index = jnp.searchsorted(jnp.asarray(sizes), jnp.max(count_B))
        return jax.lax.switch(index, [prefix(n) for n in sizes])

    def draft(self, params: Any, state: SpecBlockState, root_B: jax.Array,
              lengths_B: jax.Array) -> tuple[Tree, SpecBlockState, jax.Array]:
        """The tree of block 1 and its expansions, duplicates merged, pruned to the budget; the pending
        rows are now cached."""
        tree, state = self.candidates(params, state, root_B, lengths_B)
        tree = merge_duplicates(tree, self.max_depth)
        pruned = tree_lib.prune(tree.tokens, tree.parents, tree.scores, tree.valid, self.budget)
        return pruned, state, jnp.asarray(self.max_blocks, jnp.int32)

    def candidates(self, params: Any, state: SpecBlockState, root_B: jax.Array,
                   lengths_B: jax.Array) -> tuple[Tree, SpecBlockState]:
        """Every candidate before pruning, as a tree with depth 0 everywhere: the root, block 1's K x W
        (node 1 + k W + j: slot k's j-th token), then each round's expand x K x W (row-major)."""
        c = self.config
        k_slots = c.block_size
        max_len = (state.k[0].shape[2] - self.scratch) // k_slots
        b, p = state.pending_tokens_BxP.shape
        count_B = state.pending_count_B
        rows_BxP = (lengths_B - count_B)[:, None] + jnp.arange(p, dtype=jnp.int32)
        query_Bx1 = (count_B - 1)[:, None]
        kv, out = self._cache_pending(params, state, rows_BxP, max_len)
        query_row_B = lengths_B - 1
        s_S = jnp.arange(kv[0][0].shape[2])
        level = self._level(
            params, seen_BxRxS=(((s_S // k_slots) < query_row_B[:, None]) & (s_S < max_len * k_slots))[:, None],
            slots_BxRxK=(query_row_B[:, None] * k_slots + jnp.arange(k_slots))[:, None],
            logits_BxRxKxV=out.logits, hidden_BxRxKxH=out.hidden, rank_BxRxKxC=out.rank_logits,
            parent_scores_BxR=jnp.zeros((b, 1)), parent_valid_BxR=jnp.ones((b, 1), bool),
            parent_index_BxR=jnp.zeros((b, 1), jnp.int32), first_index=1, first_block=True)
        query_features_BxF = jnp.take_along_axis(state.pending_features_BxPxF, query_Bx1[..., None], axis=1)[:, 0]
        levels = [level]
        for round_index in range(self.max_blocks - 1):  # static
            kv, level = self._expand(params, kv, level, query_row_B, query_features_BxF, round_index, max_len)
            levels.append(level)
        flat = lambda x: x.reshape(b, -1)
        root = lambda value, dtype: jnp.full((b, 1), value, dtype)
        tokens = jnp.concatenate([root_B[:, None].astype(jnp.int32)] + [flat(lv.tokens_BxRxKxW) for lv in levels], 1)
        parents = jnp.concatenate([root(-1, jnp.int32)] + [flat(lv.parents_BxRxKxW) for lv in levels], 1)
        scores = jnp.concatenate([root(0.0, jnp.float32)] + [flat(lv.scores_BxRxKxW) for lv in levels], 1)
        valid = jnp.concatenate([root(True, bool)] + [flat(lv.valid_BxRxKxW) for lv in levels], 1)
        tree = Tree(tokens=tokens, parents=parents, depth=jnp.zeros_like(tokens), valid=valid, scores=scores)
        query_hidden_BxKxH = out.hidden[:, 0].astype(state.query_hidden_BxKxH.dtype)
        return tree, state._replace(k=kv[0], v=kv[1], query_hidden_BxKxH=query_hidden_BxKxH)

    def _level(self, params, *, seen_BxRxS, slots_BxRxK, logits_BxRxKxV, hidden_BxRxKxH, rank_BxRxKxC, parent_scores_BxR,
               parent_valid_BxR, parent_index_BxR, first_index: int, first_block: bool) -> _Level:
        """Candidates of R rows: per slot its top-W tokens (as target ids), the greedy one chaining the
        row's block and the others its siblings; slot k keeps its width's worth; scores are cumulative
        log-probs."""
        c = self.config
        k_slots, w = c.block_size, self.width
        b, r = parent_scores_BxR.shape
        top_lp_BxRxKxW, top_tok_BxRxKxW = layers.top_k(jax.nn.log_softmax(logits_BxRxKxV, axis=-1), w)
        width_BxRxK = self.slot_widths(rank_BxRxKxC, (b, r, k_slots), first_block)
        greedy_index_RxK = first_index + (jnp.arange(r)[:, None] * k_slots + jnp.arange(k_slots)) * w
        greedy_index_BxRxK = jnp.broadcast_to(greedy_index_RxK, (b, r, k_slots))
        parent_BxRxK = jnp.concatenate([parent_index_BxR[..., None], greedy_index_BxRxK[..., :-1]], axis=-1)
        valid = parent_valid_BxR[..., None, None] & (jnp.arange(w) < width_BxRxK[..., None])
        return _Level(seen_BxRxS, slots_BxRxK, hidden_BxRxKxH, target_ids(self.config, params, top_tok_BxRxKxW),
                      jnp.where(valid, block_scores(top_lp_BxRxKxW, parent_scores_BxR), -jnp.inf), valid,
                      jnp.broadcast_to(parent_BxRxK[..., None], valid.shape).astype(jnp.int32), first_index)

    def _expand(self, params, kv, level: _Level, query_row_B, query_features_BxF, round_index: int, max_len: int):
        """One batched forward over the `expand` best candidates of `level`, each starting a block."""
        c = self.config
        k_slots, w, e = c.block_size, self.width, self.expand
        b, r = level.slots_BxRxK.shape[:2]
        flat = lambda x: x.reshape(b, r * k_slots * w)
        score_BxE, pick_BxE = jax.lax.top_k(flat(level.scores_BxRxKxW), e)
        row_BxE, slot_BxE = pick_BxE // (k_slots * w), (pick_BxE // w) % k_slots
        token_BxE = jnp.take_along_axis(flat(level.tokens_BxRxKxW), pick_BxE, axis=1)
        valid_BxE = jnp.take_along_axis(flat(level.valid_BxRxKxW), pick_BxE, axis=1)
        rows = lambda x: jnp.take_along_axis(x, row_BxE.reshape(b, e, *([1] * (x.ndim - 2))), axis=1)
        # What the new block sees: its parent row's view and the parent block's slots <= the chosen one.
        parent_slots_BxExK = jnp.where(jnp.arange(k_slots) <= slot_BxE[..., None], rows(level.slots_BxRxK), -1)
        s_S = jnp.arange(kv[0][0].shape[2])
        seen_BxExS = rows(level.seen_BxRxS) | jnp.any(s_S == parent_slots_BxExK[..., None], axis=2)
        own_BxExK = (max_len * k_slots + round_index * e * k_slots
                     + jnp.arange(e)[:, None] * k_slots + jnp.arange(k_slots))[None].repeat(b, axis=0)
        own_BxExKxS = (s_S >= own_BxExK[:, :, :1, None]) & (s_S <= own_BxExK[..., None])
        mask_BxQxS = (seen_BxExS[:, :, None] | own_BxExKxS).reshape(b, e * k_slots, -1)
        if c.inherit:
            hidden_BxExH = jnp.take_along_axis(rows(level.hidden_BxRxKxH), slot_BxE[:, :, None, None], axis=2)[:, :, 0]
            condition = {"hidden_BxRxH": hidden_BxExH}
        else:
            features_BxExF = jnp.broadcast_to(query_features_BxF[:, None], (b, e, query_features_BxF.shape[-1]))
            condition = {"features_BxRxF": features_BxExF}
        live = (jnp.max(query_row_B) + 1) * k_slots  # the query rows' slots, then the scratch
        out = specblock.forward(params["drafter"], c, params["embed"], token_BxE,
                                jnp.broadcast_to(query_row_B[:, None], (b, e)),
                                _cache_attend(kv, own_BxExK.reshape(b, e * k_slots), mask_BxQxS, live, self.scratch),
                                **condition)
        level = self._level(params, seen_BxRxS=seen_BxExS, slots_BxRxK=own_BxExK, logits_BxRxKxV=out.logits,
                            hidden_BxRxKxH=out.hidden, rank_BxRxKxC=out.rank_logits, parent_scores_BxR=score_BxE,
                            parent_valid_BxR=valid_BxE, parent_index_BxR=level.first_index + pick_BxE,
                            first_index=level.first_index + r * k_slots * w, first_block=False)
        return _unzip(out.aux), level

    def commit(self, params: Any, state: SpecBlockState, tree: Tree, acceptance: Acceptance,
               features_BxN1xF: jax.Array, lengths_B: jax.Array) -> SpecBlockState:
        """The accepted path's rows become pending: (feature of path node i, emitted token i) for
        i = 0 .. length, the last being the new query row (feature of the last accepted node, bonus)."""
        return commit_pending(state, acceptance, features_BxN1xF)


def merge_duplicates(tree: Tree, max_depth: int) -> Tree:
    """Valid siblings with one token become one node (the lowest index), so the budget is not spent twice
    on a path: an expansion from a block-1 node re-predicts depths block 1 already has, mostly with the
    same tokens. The merged node takes the group's best score and adopts every member's children (whose
    own duplicates merge in turn: `max_depth` rounds); cumulative scores still never rise along a path,
    and parents keep preceding children."""
    b, m = tree.tokens.shape
    idx_M = jnp.arange(m)
    is_root_M = idx_M == 0
    up_BxM = jnp.where(is_root_M, 0, jnp.clip(tree.parents, 0, m - 1))
    both_valid_BxMxM = tree.valid[:, :, None] & tree.valid[:, None, :]
    same_token_BxMxM = (tree.tokens[:, :, None] == tree.tokens[:, None, :]) & both_valid_BxMxM

    def merge_round(_, canon_BxM):
        canon_parent_BxM = jnp.where(is_root_M, -1, jnp.take_along_axis(canon_BxM, up_BxM, axis=1))
        same_BxMxM = same_token_BxMxM & (canon_parent_BxM[:, :, None] == canon_parent_BxM[:, None, :])
        return jnp.where(tree.valid & ~is_root_M, jnp.argmax(same_BxMxM, axis=2), idx_M)

    canon_BxM = jax.lax.fori_loop(0, max_depth, merge_round, jnp.broadcast_to(idx_M, (b, m)))
    valid_BxM = tree.valid & (canon_BxM == idx_M)
    best_BxM = jnp.full((b, m), -jnp.inf).at[jnp.arange(b)[:, None], canon_BxM].max(
        jnp.where(tree.valid, tree.scores, -jnp.inf))
    return tree.replace(parents=jnp.where(is_root_M, -1, jnp.take_along_axis(canon_BxM, up_BxM, axis=1)),
                        valid=valid_BxM, scores=jnp.where(is_root_M, 0.0, jnp.where(valid_BxM, best_BxM, -jnp.inf)))


def _cache_attend(kv, slots_BxQ, mask_BxQxS, live, tail: int = 0):
    """Drafting attention: write the new keys/values of layer l at `slots` (in place: each layer's
    cache is its own buffer), attend under `mask` to the slots before `live` and the last `tail`."""
    def attend(layer, q_BxQxNxD, k_BxQxGxD, v_BxQxGxD):
        k_cache = layers.write_kv(kv[0][layer], k_BxQxGxD, slots_BxQ)
        v_cache = layers.write_kv(kv[1][layer], v_BxQxGxD, slots_BxQ)
        return layers.attend_live(q_BxQxNxD, k_cache, v_cache, mask_BxQxS, live, tail), (k_cache, v_cache)
    return attend


def _unzip(aux) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Per-layer (k, v) caches -> (keys per layer, values per layer)."""
    return tuple(k for k, _ in aux), tuple(v for _, v in aux)
