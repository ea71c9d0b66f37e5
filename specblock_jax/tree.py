"""A draft tree as fixed-size arrays padded to a static budget N.

Node 0 is the root (the newest sampled token, not yet in the KV cache); nodes 1..N are draft tokens
in topological order (a parent's index is below its child's). Unused slots are padding with
`valid` False. Every function is pure, jittable and vectorised over the batch; walks up the tree are
pointer chasing over a static number of steps (`max_depth`, or log2(N) rounds of pointer doubling),
never a Python loop over nodes.
"""

from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Tree:
    tokens: jax.Array  # [B, N+1] int32; node 0 is the root
    parents: jax.Array  # [B, N+1] int32; root -1, valid nodes < own index, padding 0
    depth: jax.Array  # [B, N+1] int32; root 0, child = parent + 1, padding 0
    valid: jax.Array  # [B, N+1] bool; root True, a valid node's parent is valid
    scores: jax.Array  # [B, N+1] float32 cumulative draft log-prob; root 0, padding -inf

    @property
    def budget(self) -> int:
        return self.tokens.shape[1] - 1

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


_FIELD_DTYPES = (("tokens", jnp.int32), ("parents", jnp.int32), ("depth", jnp.int32), ("valid", jnp.bool_),
                 ("scores", jnp.float32))


def check_budget(budget: int, minimum: int = 1) -> None:
    """A user-facing budget check (drafters need at least one draft node; `root_only` allows 0)."""
    if not isinstance(budget, numbers.Integral) or isinstance(budget, bool):
        raise ValueError(f"tree budget must be an integer, got {budget!r}")
    if budget < minimum:
        raise ValueError(f"tree budget must be >= {minimum}, got {budget}")


def check_static(tree: Tree, budget: int) -> None:
    """Trace-time validation of a drafter's output: all five arrays [B, budget+1] with the right dtypes,
    so a wrong drafter fails with the field's name instead of an opaque broadcasting error."""
    check_budget(budget)
    batch = tree.tokens.shape[0] if jnp.ndim(tree.tokens) == 2 else "B"
    expected = (batch, budget + 1)
    for name, dtype in _FIELD_DTYPES:
        array = getattr(tree, name)
        shape, actual_dtype = tuple(jnp.shape(array)), jnp.result_type(array)
        if shape != expected or actual_dtype != dtype:
            raise ValueError(f"tree.{name} must have shape {expected} and dtype {jnp.dtype(dtype).name}, "
                             f"got shape {shape} and dtype {actual_dtype.name}")


def root_only(root_B: jax.Array, budget: int) -> Tree:
    """A tree whose only valid node is the root: what a step with nothing drafted verifies."""
    check_budget(budget, minimum=0)
    b = root_B.shape[0]
    is_root_N1 = jnp.arange(budget + 1) == 0
    zeros_BxN1 = jnp.zeros((b, budget + 1), jnp.int32)
    return Tree(tokens=zeros_BxN1.at[:, 0].set(root_B.astype(jnp.int32)),
                parents=jnp.broadcast_to(jnp.where(is_root_N1, -1, 0), (b, budget + 1)).astype(jnp.int32),
                depth=zeros_BxN1,
                valid=jnp.broadcast_to(is_root_N1, (b, budget + 1)),
                scores=jnp.broadcast_to(jnp.where(is_root_N1, 0.0, -jnp.inf), (b, budget + 1)).astype(jnp.float32))


def _up(tree: Tree) -> jax.Array:
    """[B, N+1] a safe one-step-up pointer: the parent, clipped into range; the root points to itself,
    so chasing past the root stays there."""
    is_root_N1 = jnp.arange(tree.tokens.shape[1]) == 0
    return jnp.where(is_root_N1, 0, jnp.clip(tree.parents, 0, tree.tokens.shape[1] - 1))


def _ordered(tree: Tree) -> jax.Array:
    """[B, N+1] bool: the root, or a node whose parent index is in [0, own index)."""
    idx_N1 = jnp.arange(tree.tokens.shape[1])
    return (idx_N1 == 0) | ((tree.parents >= 0) & (tree.parents < idx_N1))


def _climb(ok_BxN1: jax.Array, up_BxN1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pointer doubling over pointers that strictly decrease to the root (0 -> 0):
    returns (ok at the node and all its ancestors, distance to the root), in ceil(log2(N+1)) rounds.
    Invariant: after r rounds `ok` is the AND over the first 2^r nodes of the path up, and `dist` is
    the number of edges between a node and its current `up`."""
    is_root_N1 = jnp.arange(ok_BxN1.shape[1]) == 0
    dist_BxN1 = jnp.broadcast_to(jnp.where(is_root_N1, 0, 1), ok_BxN1.shape).astype(jnp.int32)

    def double(_, carry):
        ok_BxN1, dist_BxN1, up_BxN1 = carry
        return (ok_BxN1 & jnp.take_along_axis(ok_BxN1, up_BxN1, axis=1),
                dist_BxN1 + jnp.take_along_axis(dist_BxN1, up_BxN1, axis=1),
                jnp.take_along_axis(up_BxN1, up_BxN1, axis=1))

    rounds = (ok_BxN1.shape[1] - 1).bit_length()
    ok_BxN1, dist_BxN1, _ = jax.lax.fori_loop(0, rounds, double, (ok_BxN1, dist_BxN1, up_BxN1))
    return ok_BxN1, dist_BxN1


def sanitize(tree: Tree) -> Tree:
    """Make any drafter output a well-formed tree, at run time: a node stays valid only if it is valid,
    its parent index is in [0, own index), and its parent stays valid (transitively). Depth is
    recomputed from the parents. So a malformed node (e.g. parent after child) and its descendants
    are simply never accepted. Invalid nodes get parent 0, depth 0, score -inf; the root is always
    valid with parent -1."""
    is_root_N1 = jnp.arange(tree.tokens.shape[1]) == 0
    ok_BxN1 = is_root_N1 | (tree.valid & _ordered(tree))
    valid_BxN1, depth_BxN1 = _climb(ok_BxN1, jnp.where(ok_BxN1, _up(tree), 0))
    return Tree(tokens=tree.tokens,
                parents=jnp.where(is_root_N1, -1, jnp.where(valid_BxN1, tree.parents, 0)).astype(jnp.int32),
                depth=jnp.where(valid_BxN1, depth_BxN1, 0).astype(jnp.int32),
                valid=valid_BxN1,
                scores=jnp.where(valid_BxN1, tree.scores, -jnp.inf).astype(jnp.float32))


def malformed(tree: Tree) -> jax.Array:
    """[B] bool: the row breaks the tree invariants (root not valid, or a valid node whose parent
    index is >= its own or < 0, or whose parent is invalid). `sanitize` makes such rows harmless;
    this lets the caller report them."""
    parent_valid_BxN1 = jnp.take_along_axis(tree.valid, _up(tree), axis=1)
    is_root_N1 = jnp.arange(tree.tokens.shape[1]) == 0
    bad_BxN1 = tree.valid & ~is_root_N1 & ~(_ordered(tree) & parent_valid_BxN1)
    return ~tree.valid[:, 0] | jnp.any(bad_BxN1, axis=1)


def ancestor_mask(tree: Tree, max_depth: int) -> jax.Array:
    """[B, N+1, N+1] bool: anc[b, i, j] iff j == i or j is an ancestor of valid node i (the tree
    attention pattern). Chases every node's pointer up `max_depth` steps at once; nodes deeper than
    `max_depth` get an incomplete row and must not be accepted (verify never accepts them)."""
    n1 = tree.tokens.shape[1]
    idx_N1 = jnp.arange(n1)
    up_BxN1 = _up(tree)
    eye_N1xN1 = idx_N1[:, None] == idx_N1[None, :]

    def step(_, carry):
        cur_BxN1, anc_BxN1xN1 = carry
        cur_BxN1 = jnp.take_along_axis(up_BxN1, cur_BxN1, axis=1)
        return cur_BxN1, anc_BxN1xN1 | (cur_BxN1[..., None] == idx_N1)

    start = (jnp.broadcast_to(idx_N1, up_BxN1.shape), jnp.broadcast_to(eye_N1xN1, (up_BxN1.shape[0], n1, n1)))
    _, anc_BxN1xN1 = jax.lax.fori_loop(0, max_depth, step, start)
    return (anc_BxN1xN1 & tree.valid[..., None]) | eye_N1xN1


def positions(tree: Tree, lengths_B: jax.Array) -> jax.Array:
    """[B, N+1] int32 RoPE positions: a node sits at its depth past the committed prefix."""
    return (lengths_B[:, None] + tree.depth).astype(jnp.int32)


def slots(tree: Tree, lengths_B: jax.Array) -> jax.Array:
    """[B, N+1] int32 scratch cache slots of the verify forward: node i is written at lengths[b] + i."""
    return (lengths_B[:, None] + jnp.arange(tree.tokens.shape[1])).astype(jnp.int32)


def verify_mask(tree: Tree, lengths_B: jax.Array, max_len: int, max_depth: int) -> jax.Array:
    """[B, N+1, S] bool attention mask of the tree-verify forward (node i written at slot lengths[b]+i):
    node i sees the committed prefix (s < lengths[b]) and the slots of itself and its ancestors.
    Invalid nodes see the prefix and themselves only."""
    n1 = tree.tokens.shape[1]
    anc_BxN1xN1 = ancestor_mask(tree, max_depth)
    rel_BxS = jnp.arange(max_len)[None, :] - lengths_B[:, None]
    in_tree_BxS = (rel_BxS >= 0) & (rel_BxS < n1)
    idx_BxN1xS = jnp.broadcast_to(jnp.clip(rel_BxS, 0, n1 - 1)[:, None, :], (rel_BxS.shape[0], n1, max_len))
    tree_BxN1xS = jnp.take_along_axis(anc_BxN1xN1, idx_BxN1xS, axis=2) & in_tree_BxS[:, None, :]
    return (rel_BxS < 0)[:, None, :] | tree_BxN1xS


def path_to(tree: Tree, node_B: jax.Array, max_depth: int) -> jax.Array:
    """[B, max_depth+1] int32 node indices from the root (column 0) down to node_B (column depth).
    Columns past the node's depth are 0: callers use the depth as the length. The node's depth must
    be <= max_depth."""
    up_BxN1 = _up(tree)

    def step(cur_B, _):
        return jnp.take_along_axis(up_BxN1, cur_B[:, None], axis=1)[:, 0], cur_B

    _, chain_D1xB = jax.lax.scan(step, node_B.astype(jnp.int32), None, length=max_depth + 1)
    chain_BxD1 = chain_D1xB.T  # chain[:, k] = the k-th ancestor of the node
    depth_B = jnp.take_along_axis(tree.depth, node_B[:, None], axis=1)[:, 0]
    level_D1 = jnp.arange(max_depth + 1)
    up_steps_BxD1 = jnp.clip(depth_B[:, None] - level_D1, 0, max_depth)
    path_BxD1 = jnp.take_along_axis(chain_BxD1, up_steps_BxD1, axis=1)
    return jnp.where(level_D1 <= depth_B[:, None], path_BxD1, 0).astype(jnp.int32)


def leaves(tree: Tree) -> jax.Array:
    """[B, N+1] bool: valid nodes with no valid child."""
    b, n1 = tree.tokens.shape
    is_child_BxN1 = tree.valid & (jnp.arange(n1) > 0)
    target_BxN1 = jnp.where(is_child_BxN1, _up(tree), n1)  # out of range: dropped
    has_child_BxN1 = jnp.zeros((b, n1), bool).at[jnp.arange(b)[:, None], target_BxN1].set(True, mode="drop")
    return tree.valid & ~has_child_BxN1


def best(scores_BxM: jax.Array, eligible_BxM: jax.Array, budget: int) -> jax.Array:
    """bool [B, M]: the `budget` best eligible candidates by score, ties toward the lower index."""
    b, m = scores_BxM.shape
    idx_BxM = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
    # Sort keys: eligible first, then score descending, then index ascending (deterministic ties).
    *_, order_BxM = jax.lax.sort((~eligible_BxM, -scores_BxM.astype(jnp.float32), idx_BxM), dimension=1,
                                 num_keys=3)
    chosen_BxM = jnp.zeros((b, m), bool).at[jnp.arange(b)[:, None], order_BxM[:, :budget]].set(True)
    return chosen_BxM & eligible_BxM


def prune(cand_tokens_BxM: jax.Array, cand_parents_BxM: jax.Array, cand_scores_BxM: jax.Array,
          cand_valid_BxM: jax.Array, budget: int) -> Tree:
    """Keep the `budget` best non-root valid candidates by cumulative score (ties toward the lower
    index) as a `budget`-node tree.

    The kept set is then closed under ancestors by dropping, not adding: a kept node whose parent was
    not kept is dropped with its descendants, and no lower-scored node backfills the freed slot. With
    cumulative log-probs (never increasing along a path) top-k is already closed, so this only guards
    inconsistent scores. Output nodes keep the candidates' (topological) order, parents remapped to
    output indices, padded with invalid nodes to the budget.
    """
    check_budget(budget, minimum=0)
    b, m = cand_tokens_BxM.shape
    if m < budget + 1:  # static: pad so the output gather always has budget + 1 sources
        pad = ((0, 0), (0, budget + 1 - m))
        cand_tokens_BxM = jnp.pad(cand_tokens_BxM, pad)
        cand_parents_BxM = jnp.pad(cand_parents_BxM, pad)
        cand_scores_BxM = jnp.pad(cand_scores_BxM, pad, constant_values=-jnp.inf)
        cand_valid_BxM = jnp.pad(cand_valid_BxM, pad)
        m = budget + 1
    chosen_BxM = best(cand_scores_BxM, cand_valid_BxM & (jnp.arange(m) > 0), budget).at[:, 0].set(True)
    candidates = Tree(tokens=cand_tokens_BxM.astype(jnp.int32), parents=cand_parents_BxM.astype(jnp.int32),
                      depth=jnp.zeros((b, m), jnp.int32), valid=chosen_BxM,
                      scores=cand_scores_BxM.astype(jnp.float32))
    kept_BxM = sanitize(candidates).valid  # closure under ancestors, by dropping
    src_BxN1 = jnp.argsort(~kept_BxM, axis=1, stable=True)[:, :budget + 1]  # kept nodes, in order
    out_index_BxM = jnp.cumsum(kept_BxM, axis=1, dtype=jnp.int32) - 1
    valid_BxN1 = jnp.take_along_axis(kept_BxM, src_BxN1, axis=1)
    src_parent_BxN1 = jnp.clip(jnp.take_along_axis(cand_parents_BxM, src_BxN1, axis=1), 0, m - 1)
    pruned = Tree(tokens=jnp.take_along_axis(candidates.tokens, src_BxN1, axis=1),
                  parents=jnp.take_along_axis(out_index_BxM, src_parent_BxN1, axis=1),
                  depth=jnp.zeros((b, budget + 1), jnp.int32),
                  valid=valid_BxN1,
                  scores=jnp.take_along_axis(candidates.scores, src_BxN1, axis=1))
    return sanitize(pruned)  # root parent -1, padding fields, depths
