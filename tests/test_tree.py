"""Draft-tree arrays: masks, positions and paths against brute-force Python references; prune-to-budget;
sanitizing malformed drafter output; trace-time shape checks."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specblock_jax import tree as tree_lib
from specblock_jax.tree import Tree

B, N = 3, 10
ancestor_mask_jit = jax.jit(tree_lib.ancestor_mask, static_argnums=1)
verify_mask_jit = jax.jit(tree_lib.verify_mask, static_argnums=(2, 3))
path_to_jit = jax.jit(tree_lib.path_to, static_argnums=2)
leaves_jit = jax.jit(tree_lib.leaves)
sanitize_jit = jax.jit(tree_lib.sanitize)
malformed_jit = jax.jit(tree_lib.malformed)
prune_jit = jax.jit(tree_lib.prune, static_argnums=4)


def random_tree(rng: np.random.Generator, b: int = B, n: int = N, p_valid: float = 0.75) -> dict:
    """A well-formed numpy tree: random parents below each index, a valid subset closed under
    ancestors, cumulative log-prob scores, contract padding (parent 0, depth 0, score -inf)."""
    parents = np.zeros((b, n + 1), np.int32)
    depth = np.zeros((b, n + 1), np.int32)
    valid = np.zeros((b, n + 1), bool)
    scores = np.full((b, n + 1), -np.inf, np.float32)
    parents[:, 0], valid[:, 0], scores[:, 0] = -1, True, 0.0
    for row in range(b):
        for i in range(1, n + 1):
            p = rng.integers(0, i)
            if valid[row, p] and rng.random() < p_valid:
                parents[row, i], depth[row, i], valid[row, i] = p, depth[row, p] + 1, True
                scores[row, i] = scores[row, p] + np.log(rng.uniform(0.01, 1.0))
    tokens = rng.integers(0, 50, (b, n + 1)).astype(np.int32)
    return dict(tokens=tokens, parents=parents, depth=depth, valid=valid, scores=scores)


def as_tree(arrays: dict) -> Tree:
    return Tree(**{k: jnp.asarray(v) for k, v in arrays.items()})


def reference_ancestors(arrays: dict) -> np.ndarray:
    b, n1 = arrays["tokens"].shape
    anc = np.zeros((b, n1, n1), bool)
    for row in range(b):
        for i in range(n1):
            anc[row, i, i] = True
            j = arrays["parents"][row, i]
            while arrays["valid"][row, i] and j >= 0:
                anc[row, i, j] = True
                j = arrays["parents"][row, j]
    return anc


def reference_path(arrays: dict, row: int, node: int) -> list[int]:
    path = [node]
    while path[-1] != 0:
        path.append(int(arrays["parents"][row, path[-1]]))
    return path[::-1]


def test_ancestor_and_verify_masks_match_brute_force():
    rng = np.random.default_rng(0)
    max_len = 24
    for _ in range(50):
        arrays = random_tree(rng)
        tree = as_tree(arrays)
        anc = reference_ancestors(arrays)
        np.testing.assert_array_equal(ancestor_mask_jit(tree, N), anc)
        lengths = rng.integers(0, max_len - N, B).astype(np.int32)
        mask = np.asarray(verify_mask_jit(tree, jnp.asarray(lengths), max_len, N))
        for row in range(B):
            for i in range(N + 1):
                for s in range(max_len):
                    rel = s - lengths[row]
                    expected = s < lengths[row] or (0 <= rel <= N and anc[row, i, rel])
                    assert mask[row, i, s] == expected, (row, i, s)


def test_ancestor_mask_needs_only_max_depth_steps():
    arrays = random_tree(np.random.default_rng(1))
    deepest = int(arrays["depth"].max())
    np.testing.assert_array_equal(ancestor_mask_jit(as_tree(arrays), deepest), reference_ancestors(arrays))


def test_positions_and_slots():
    arrays = random_tree(np.random.default_rng(2))
    lengths = jnp.array([0, 5, 17], jnp.int32)
    np.testing.assert_array_equal(tree_lib.positions(as_tree(arrays), lengths), arrays["depth"] + lengths[:, None])
    np.testing.assert_array_equal(tree_lib.slots(as_tree(arrays), lengths), np.arange(N + 1) + lengths[:, None])


def test_path_to_and_leaves_match_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        arrays = random_tree(rng)
        tree = as_tree(arrays)
        nodes = np.array([rng.choice(np.flatnonzero(arrays["valid"][row])) for row in range(B)], np.int32)
        paths = np.asarray(path_to_jit(tree, jnp.asarray(nodes), N))
        for row in range(B):
            expected = reference_path(arrays, row, nodes[row])
            assert paths[row, :len(expected)].tolist() == expected
            assert not paths[row, len(expected):].any()
        has_valid_child = np.zeros_like(arrays["valid"])
        for row in range(B):
            for i in np.flatnonzero(arrays["valid"][row])[1:]:
                has_valid_child[row, arrays["parents"][row, i]] = True
        np.testing.assert_array_equal(leaves_jit(tree), arrays["valid"] & ~has_valid_child)


def test_root_only():
    tree = tree_lib.root_only(jnp.array([4, 9], jnp.int32), 3)
    tree_lib.check_static(tree, 3)
    np.testing.assert_array_equal(tree.tokens[:, 0], [4, 9])
    np.testing.assert_array_equal(tree.valid, [[True, False, False, False]] * 2)
    np.testing.assert_array_equal(tree.parents, [[-1, 0, 0, 0]] * 2)
    np.testing.assert_array_equal(tree.scores, [[0.0, -np.inf, -np.inf, -np.inf]] * 2)
    assert tree.budget == 3 and tree.batch_size == 2
    assert tree_lib.root_only(jnp.array([4]), 0).tokens.shape == (1, 1)


def reference_prune(arrays: dict, row: int, budget: int) -> list[int]:
    eligible = np.flatnonzero(arrays["valid"][row])[1:]
    ranked = sorted(eligible, key=lambda i: (-arrays["scores"][row, i], i))
    return sorted(ranked[:budget])


@pytest.mark.parametrize("budget", [4, 20])  # 20 > candidates: everything valid is kept, then padding
def test_prune_keeps_best_scores_closed_and_ordered(budget):
    rng = np.random.default_rng(4)
    for _ in range(10):
        arrays = random_tree(rng, n=13, p_valid=0.85)
        arrays["tokens"] = np.broadcast_to(100 + np.arange(14, dtype=np.int32), (B, 14)).copy()  # identify nodes
        out = prune_jit(*(jnp.asarray(arrays[k]) for k in ("tokens", "parents", "scores", "valid")), budget)
        tree_lib.check_static(out, budget)
        out = jax.device_get(out)  # numpy from here: eager slicing of device arrays compiles per shape
        for row in range(B):
            kept = out.valid[row]
            expected = reference_prune(arrays, row, budget)
            num = len(expected) + 1
            assert num - 1 == min(budget, arrays["valid"][row, 1:].sum())
            np.testing.assert_array_equal(kept, np.arange(budget + 1) < num)  # valid first, padding after
            source = out.tokens[row, :num] - 100
            assert source.tolist() == [0] + expected  # the best nodes, in their original order
            np.testing.assert_array_equal(out.scores[row, :num], arrays["scores"][row, source])
            np.testing.assert_array_equal(out.depth[row, :num], arrays["depth"][row, source])
            out_parents = out.parents[row]
            assert out_parents[0] == -1
            assert np.all(out_parents[1:num] < np.arange(1, num))  # topological, and closed:
            np.testing.assert_array_equal(source[out_parents[1:num]], arrays["parents"][row, source[1:]])
            assert not out_parents[num:].any() and np.all(np.isneginf(out.scores[row, num:]))


def test_prune_ties_go_to_lower_index_and_dropped_parents_are_not_backfilled():
    tokens = jnp.array([[0, 1, 2, 3, 4]] * 2, jnp.int32)
    parents = jnp.array([[-1, 0, 0, 0, 1]] * 2, jnp.int32)
    scores = jnp.array([[0.0, -1.0, -1.0, -1.0, -3.0],  # three-way tie for two places
                        [0.0, -3.0, -1.0, -4.0, -0.5]])  # node 4 outscores its parent 1 (inconsistent)
    out = jax.device_get(prune_jit(tokens, parents, scores, jnp.ones((2, 5), bool), 2))
    np.testing.assert_array_equal(out.tokens[0], [0, 1, 2])
    np.testing.assert_array_equal(out.valid[0], [True, True, True])
    # Top-2 is {4, 2}; the closure drops 4 (its parent was not kept) and the freed slot stays empty
    # rather than taking node 1.
    np.testing.assert_array_equal(out.tokens[1, :2], [0, 2])
    np.testing.assert_array_equal(out.valid[1], [True, True, False])


def test_sanitize_invalidates_parent_after_child_and_descendants():
    good = dict(tokens=[7, 1, 2, 3, 4, 5], parents=[-1, 0, 1, 1, 2, 0], depth=[0, 9, 9, 9, 9, 9],
                valid=[True] * 6, scores=[0.0, -1, -2, -2, -3, -1])
    bad = dict(good, parents=[-1, 0, 4, 1, 2, 0])  # node 2's parent comes after it; node 4 descends from 2
    orphan = dict(good, valid=[True, False, True, True, True, True])  # node 1 invalid, 2 and 3 claim it
    negative = dict(good, parents=[-1, 0, 1, -3, 2, 0])
    rows = [good, bad, orphan, negative]
    tree = Tree(**{k: jnp.asarray([r[k] for r in rows], dtype) for k, dtype in
                   (("tokens", jnp.int32), ("parents", jnp.int32), ("depth", jnp.int32), ("valid", bool),
                    ("scores", jnp.float32))})
    np.testing.assert_array_equal(malformed_jit(tree), [False, True, True, True])
    clean = jax.device_get(sanitize_jit(tree))
    np.testing.assert_array_equal(clean.valid, [[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 1],
                                                [1, 0, 0, 0, 0, 1], [1, 1, 1, 0, 1, 1]])
    np.testing.assert_array_equal(clean.depth[0], [0, 1, 2, 2, 3, 1])  # recomputed from parents
    np.testing.assert_array_equal(clean.parents[1], [-1, 0, 0, 1, 0, 0])
    assert np.all(np.isneginf(clean.scores[1, [2, 4]]))
    np.testing.assert_array_equal(malformed_jit(sanitize_jit(tree)), [False] * 4)


def test_sanitize_keeps_well_formed_trees():
    arrays = random_tree(np.random.default_rng(5))
    clean = sanitize_jit(as_tree(arrays))
    for name, value in arrays.items():
        np.testing.assert_array_equal(getattr(clean, name), value)
    assert not malformed_jit(as_tree(arrays)).any()


def test_check_static_names_field_and_shapes():
    tree = as_tree(random_tree(np.random.default_rng(6), b=3, n=5))
    tree_lib.check_static(tree, 5)
    with pytest.raises(ValueError, match=re.escape("tree.parents must have shape (3, 6) and dtype int32, "
                                                   "got shape (3, 5) and dtype int32")):
        tree_lib.check_static(tree.replace(parents=tree.parents[:, :5]), 5)
    with pytest.raises(ValueError, match=re.escape("tree.valid must have shape (3, 6) and dtype bool, "
                                                   "got shape (3, 6) and dtype int32")):
        tree_lib.check_static(tree.replace(valid=tree.valid.astype(jnp.int32)), 5)
    with pytest.raises(ValueError, match=re.escape("tree.tokens must have shape (3, 5)")):
        tree_lib.check_static(tree, 4)
    with pytest.raises(ValueError, match=re.escape("tree budget must be >= 1, got 0")):
        tree_lib.check_static(tree_lib.root_only(jnp.array([1]), 0), 0)
    with pytest.raises(ValueError, match=re.escape("tree.scores must have shape")):  # at trace time too
        jax.jit(functools.partial(tree_lib.check_static, budget=5))(tree.replace(scores=tree.scores[:2]))


def test_verify_forward_logits_equal_causal_forwards_over_each_root_path(peaked_target):
    """The tree attention end to end: after a prefill, the verify forward's logits at every valid node
    equal the last logits of a plain causal forward over the prompt, the root and the node's path, for
    random trees of random depth over rows of different prompt lengths (one past the first attention
    bucket, so the live-prefix choice is exercised) and a 512-slot cache."""
    from specblock_jax import decode, kvcache
    from specblock_jax.config import ModelConfig

    config = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         intermediate_size=64, max_position_embeddings=512)
    target = peaked_target(config)
    rng = np.random.default_rng(5)
    lengths = [150, 23, 1]
    prompt_BxT = np.zeros((B, 256), np.int32)
    for row, n in enumerate(lengths):
        prompt_BxT[row, :n] = rng.integers(0, 50, n)
    cache, _, _ = jax.jit(decode.prefill, static_argnums=(1, 4))(target.params, config, prompt_BxT,
                                                                  np.array(lengths, np.int32), 512)
    fields = random_tree(rng, n=16, p_valid=0.8)
    tree = Tree(**{k: jnp.asarray(v) for k, v in fields.items()})
    max_depth = int(fields["depth"].max())
    verify = jax.jit(decode.verify_forward, static_argnums=1, static_argnames=("max_depth", "read_only"))
    logits_BxN1xV, _, written = verify(target.params, config, cache, tree, max_depth=max_depth)
    # The read-only form (the n-gram loop's, inside its lax.cond): the same logits, and its keys and
    # values, written at the scratch slots, give the same cache (up to rounding past layer 0: the
    # attention sums the same terms in another order).
    read_logits, _, new_kv = verify(target.params, config, cache, tree, max_depth=max_depth, read_only=True)
    np.testing.assert_allclose(read_logits, logits_BxN1xV, atol=1e-5 * np.abs(logits_BxN1xV).max(), rtol=0)
    same = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
    jax.tree.map(same, kvcache.write(cache, new_kv, tree_lib.slots(tree, cache.lengths)), written)
    assert not np.array_equal(kvcache.write(cache, new_kv, tree_lib.slots(tree, cache.lengths)).k[0], cache.k[0])
    for row, n in enumerate(lengths):
        nodes = [i for i in range(17) if fields["valid"][row, i]]
        paths = []
        for i in nodes:
            path = [i]
            while path[-1] != 0:
                path.append(int(fields["parents"][row, path[-1]]))
            paths.append(prompt_BxT[row, :n].tolist() + [int(fields["tokens"][row, j]) for j in path[::-1]])
        width = max(map(len, paths))
        seq = np.zeros((len(paths), width), np.int32)
        for k, path in enumerate(paths):
            seq[k, :len(path)] = path
        reference = np.asarray(target.logits(seq))[np.arange(len(paths)), [len(p) - 1 for p in paths]]
        got = np.asarray(logits_BxN1xV)[row, nodes]
        np.testing.assert_allclose(got, reference, atol=1e-5 * np.abs(reference).max(), rtol=0)
    assert max_depth >= 3
