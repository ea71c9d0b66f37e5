"""Acceptance: greedy against hand-made trees and a brute-force reference; sampling against the exact
target distribution with a chi-square test that is shown to catch biased acceptance rules."""

import functools
import inspect
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from specblock_jax import verify
from specblock_jax.sampling import SamplingParams, processed_logprobs, sample
from specblock_jax.tree import Tree

accept_greedy_jit = jax.jit(verify.accept_greedy, static_argnums=2)
accept_jit = jax.jit(verify.accept, static_argnums=(2, 4))


HAND_N1 = 8  # hand-made trees are padded to one size (one compile)


def make_tree(tokens, parents, valid=None) -> Tree:
    """One-row tree from lists, padded with invalid nodes that copy the last token (padding must never
    be accepted, whatever its token); depth is left at 0 on purpose: acceptance recomputes it."""
    pad = HAND_N1 - len(tokens)
    valid = ([True] * len(tokens) if valid is None else valid) + [False] * pad
    return Tree(tokens=jnp.array([tokens + tokens[-1:] * pad], jnp.int32),
                parents=jnp.array([parents + [0] * pad], jnp.int32),
                depth=jnp.zeros((1, HAND_N1), jnp.int32), valid=jnp.array([valid], bool),
                scores=jnp.zeros((1, HAND_N1), jnp.float32))


def logits_with_argmax(argmax_per_node, vocab=8, seed=0) -> jax.Array:
    """[1, HAND_N1, V] random logits whose argmax at node i is argmax_per_node[i] (0 past the list)."""
    argmax = np.zeros(HAND_N1, int)
    argmax[:len(argmax_per_node)] = argmax_per_node
    noise = np.random.default_rng(seed).normal(size=(HAND_N1, vocab))
    noise[np.arange(HAND_N1), argmax] += 10.0
    return jnp.asarray(noise[None], jnp.float32)


def test_greedy_takes_deepest_correct_path_and_ignores_padding():
    #        node:  0  1  2  3  4  5  6  7
    tokens = [7, 1, 2, 3, 4, 5, 6, 3]
    parents = [-1, 0, 0, 1, 2, 4, 4, 6]
    valid = [True, True, True, True, True, True, False, True]  # 6 is padding; 7 hangs under it
    # argmax: root -> 2 (node 2 right, node 1 wrong), node 2 -> 4, node 4 -> 6 (padded node 6 would
    # match and so would its child 7), node 6 -> 3.
    logits = logits_with_argmax([2, 3, 4, 0, 6, 0, 3, 0])
    out = accept_greedy_jit(make_tree(tokens, parents, valid), logits, 3)
    np.testing.assert_array_equal(out.path_BxD1, [[0, 2, 4, 0]])
    np.testing.assert_array_equal(out.length_B, [2])
    np.testing.assert_array_equal(out.tokens_BxD1, [[2, 4, 6, -1]])
    np.testing.assert_array_equal(out.bonus_B, [6])
    dispatched = accept_jit(make_tree(tokens, parents, valid), logits, SamplingParams(), jax.random.key(0), 3)
    for expected, actual in zip(out, dispatched):  # temperature 0 dispatches to greedy
        np.testing.assert_array_equal(actual, expected)


def test_greedy_ties_go_to_lowest_index_and_duplicates_can_win_deeper():
    tokens = [0, 1, 1, 3, 3, 5]
    parents = [-1, 0, 0, 1, 2, 0]  # two copies of token 1, each with a correct child
    argmax = [1, 3, 3, 2, 2, 0]
    out = accept_greedy_jit(make_tree(tokens, parents), logits_with_argmax(argmax), 3)
    np.testing.assert_array_equal(out.path_BxD1, [[0, 1, 3, 0]])
    np.testing.assert_array_equal(out.tokens_BxD1, [[1, 3, 2, -1]])
    deeper = accept_greedy_jit(make_tree(tokens + [2], parents + [4]), logits_with_argmax(argmax + [4]), 3)
    np.testing.assert_array_equal(deeper.path_BxD1, [[0, 2, 4, 6]])
    np.testing.assert_array_equal(deeper.tokens_BxD1, [[1, 3, 2, 4]])


def test_greedy_nothing_accepted_emits_bonus_only():
    out = accept_greedy_jit(make_tree([5, 1, 2], [-1, 0, 0]), logits_with_argmax([4, 0, 0]), 3)
    np.testing.assert_array_equal(out.path_BxD1, [[0, 0, 0, 0]])
    np.testing.assert_array_equal(out.length_B, [0])
    np.testing.assert_array_equal(out.tokens_BxD1, [[4, -1, -1, -1]])


def random_tree_and_logits(rng, b=3, n=10, vocab=4):
    """Random well-formed trees (some nodes padding) and logits over a tiny vocabulary, so many draft
    tokens match the target's argmax."""
    parents = np.zeros((b, n + 1), np.int32)
    valid = np.zeros((b, n + 1), bool)
    depth = np.zeros((b, n + 1), np.int32)
    parents[:, 0], valid[:, 0] = -1, True
    for row in range(b):
        for i in range(1, n + 1):
            p = rng.integers(0, i)
            if valid[row, p] and rng.random() < 0.8:
                parents[row, i], valid[row, i], depth[row, i] = p, True, depth[row, p] + 1
    tokens = rng.integers(0, vocab, (b, n + 1)).astype(np.int32)
    logits = rng.normal(size=(b, n + 1, vocab)).astype(np.float32)
    tree = Tree(tokens=jnp.asarray(tokens), parents=jnp.asarray(parents), depth=jnp.asarray(depth),
                valid=jnp.asarray(valid), scores=jnp.zeros((b, n + 1), jnp.float32))
    return tree, logits, (tokens, parents, valid, depth)


def reference_greedy(tokens, parents, valid, depth, logits, max_depth):
    """Per row: walk every valid node's path; keep the deepest fully-correct one (lowest index)."""
    argmax = logits.argmax(-1)
    rows = []
    for row in range(tokens.shape[0]):
        best = [0]
        for i in np.flatnonzero(valid[row]):
            path = [i]
            while path[-1] != 0:
                path.append(parents[row, path[-1]])
            path = path[::-1]
            ok = all(tokens[row, c] == argmax[row, p] for p, c in zip(path, path[1:]))
            if ok and len(path) - 1 <= max_depth and len(path) > len(best):
                best = path
        emitted = [int(tokens[row, c]) for c in best[1:]] + [int(argmax[row, best[-1]])]
        rows.append((best, emitted))
    return rows


def test_greedy_matches_brute_force_on_random_trees():
    rng = np.random.default_rng(0)
    max_depth = 3  # random trees are often deeper: deeper nodes must never be accepted
    for _ in range(30):
        tree, logits, arrays = random_tree_and_logits(rng)
        out = jax.device_get(accept_greedy_jit(tree, jnp.asarray(logits), max_depth))
        for row, (path, emitted) in enumerate(reference_greedy(*arrays, logits, max_depth)):
            length = len(path) - 1
            assert out.length_B[row] == length
            np.testing.assert_array_equal(out.path_BxD1[row], path + [0] * (max_depth - length))
            np.testing.assert_array_equal(out.tokens_BxD1[row], emitted + [-1] * (max_depth - length))
            assert out.bonus_B[row] == emitted[-1]


def test_sampling_with_one_hot_target_is_greedy():
    """top_k=1 makes the target a point mass: with distinct sibling tokens the sampler must accept
    exactly the greedy path."""
    rng = np.random.default_rng(1)
    one_hot = SamplingParams(temperature=1.0, top_k=1)
    for trial in range(10):
        tree, logits, (tokens, parents, valid, _) = random_tree_and_logits(rng)
        for row, i in zip(*np.nonzero(valid)):  # drop repeated sibling tokens (descendants follow)
            earlier = valid[row, 1:i] & (parents[row, 1:i] == parents[row, i]) & (tokens[row, 1:i] == tokens[row, i])
            valid[row, i] &= i == 0 or not earlier.any()
        tree = tree.replace(valid=jnp.asarray(valid))
        greedy = accept_greedy_jit(tree, jnp.asarray(logits), 3)
        sampled = accept_jit(tree, jnp.asarray(logits), one_hot, jax.random.key(trial), 3)
        assert greedy.length_B.max() > 0
        for expected, actual in zip(greedy, sampled):
            np.testing.assert_array_equal(actual, expected)


# ---- sampling: the emitted tokens must follow the target distribution exactly ----

V = 6
NUM_SAMPLES = 20_000
_table_rng = np.random.default_rng(7)
ROOT_LOGITS_V = _table_rng.normal(size=V).astype(np.float32)
NEXT_LOGITS_VxV = (1.5 * _table_rng.normal(size=(V, V))).astype(np.float32)  # row a: after token a
THIRD_LOGITS_VxVxV = _table_rng.normal(size=(V, V, V)).astype(np.float32)


def _tree_row(tokens, parents):
    """Tokens and parents of one row; the target logits of every node come from the tables indexed by
    its path's tokens, so plain decoding's joint distribution is well defined."""
    n1 = len(tokens)
    logits = np.zeros((n1, V), np.float32)
    for i in range(n1):
        path = [i]
        while path[-1] != 0:
            path.append(parents[path[-1]])
        prefix = [tokens[j] for j in path[::-1][1:]]
        if not prefix:
            logits[i] = ROOT_LOGITS_V
        elif len(prefix) == 1:
            logits[i] = NEXT_LOGITS_VxV[prefix[0]]
        else:
            logits[i] = THIRD_LOGITS_VxVxV[prefix[0], prefix[1]]
    return logits


# Row 0: root children 1, 2 and a duplicate 3 of node 1 (never acceptable: it is only visited after
# node 1's token was rejected), each with children. Row 1: a different shape over the same tables, with
# a root child (token 4) outside the top-k support. Row 2: a sibling (node 3) after a duplicate (node
# 2 repeats node 1's token), and chains to the full depth under both, so whole paths are accepted and
# the bonus is drawn at depth 2. Node 8 is padding. Tokens are chosen among the likely ones so drafts
# are often accepted.
ROW0 = ([0, 1, 0, 1, 3, 0, 1, 3, 3], [-1, 0, 0, 0, 1, 1, 2, 3, 0])
ROW1 = ([0, 4, 2, 0, 4, 1, 1, 5, 0], [-1, 0, 0, 0, 1, 1, 3, 2, 0])
ROW2 = ([0, 1, 1, 0, 3, 0, 1, 0, 0], [-1, 0, 0, 0, 1, 1, 3, 3, 0])
ROWS = (ROW0, ROW1, ROW2)
SAMPLING_TREE = Tree(tokens=jnp.array([r[0] for r in ROWS], jnp.int32),
                     parents=jnp.array([r[1] for r in ROWS], jnp.int32),
                     depth=jnp.zeros((len(ROWS), 9), jnp.int32),
                     valid=jnp.array([[True] * 8 + [False]] * len(ROWS)),
                     scores=jnp.zeros((len(ROWS), 9), jnp.float32))
SAMPLING_LOGITS = jnp.asarray(np.stack([_tree_row(*row) for row in ROWS]))


def target_probs(sampling: SamplingParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain decoding's exact law: p(first) [V], p(second | first) [V, V], p(third | first, second) [V, V, V]."""
    law = [np.exp(np.asarray(processed_logprobs(jnp.asarray(x), sampling), np.float64))
           for x in (ROOT_LOGITS_V, NEXT_LOGITS_VxV, THIRD_LOGITS_VxVxV)]
    return tuple(p / p.sum(-1, keepdims=True) for p in law)


def chi_square_pvalues(tokens_Nx3, p0, p1, p2) -> tuple[float, float, float]:
    """p-values that the first token ~ p0, the first two ~ p0 p1 and all three ~ p0 p1 p2; cells of
    probability 0 must be empty."""
    def pvalue(observed, expected):
        assert not observed[expected == 0].any(), "a token outside the target's support was emitted"
        observed, expected = observed[expected > 0], expected[expected > 0]
        small = expected < 5  # pool sparse cells so the chi-square approximation holds
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
        keep = expected > 0
        return scipy.stats.chisquare(observed[keep], expected[keep]).pvalue
    n = len(tokens_Nx3)
    laws = [p0, p0[:, None] * p1, p0[:, None, None] * p1[:, :, None] * p2]
    codes = [tokens_Nx3[:, 0], tokens_Nx3[:, 0] * V + tokens_Nx3[:, 1], tokens_Nx3 @ np.array([V * V, V, 1])]
    return tuple(pvalue(np.bincount(c, minlength=law.size), n * law.ravel()) for c, law in zip(codes, laws))


@functools.partial(jax.jit, static_argnums=(0, 1))
def sample_accept(accept, sampling: SamplingParams, rng):
    """NUM_SAMPLES copies of each test row in one batch (rows are independent draws) through `accept`
    with max_depth 2; where the step emitted fewer than three tokens, plain decoding steps complete
    them from the tables. Returns the acceptance and the three tokens, [sample, test row, ...]."""
    tiled = jax.tree.map(lambda x: jnp.tile(x, (NUM_SAMPLES,) + (1,) * (x.ndim - 1)), SAMPLING_TREE)
    logits = jnp.tile(SAMPLING_LOGITS, (NUM_SAMPLES, 1, 1))
    key_accept, key_second, key_third = jax.random.split(rng, 3)
    out = accept(tiled, logits, sampling, key_accept, 2)
    first_B = out.tokens_BxD1[:, 0]
    second_B = jnp.where(out.length_B >= 1, out.tokens_BxD1[:, 1],
                         sample(key_second, jnp.asarray(NEXT_LOGITS_VxV)[first_B], sampling))
    third_B = jnp.where(out.length_B >= 2, out.tokens_BxD1[:, 2],
                        sample(key_third, jnp.asarray(THIRD_LOGITS_VxVxV)[first_B, second_B], sampling))
    by_row = lambda x: x.reshape((NUM_SAMPLES, len(ROWS)) + x.shape[1:])
    return jax.tree.map(by_row, out), by_row(jnp.stack([first_B, second_B, third_B], axis=-1))


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
                                      SamplingParams(temperature=1.0, top_p=0.8),
                                      SamplingParams(temperature=0.7, top_k=3, top_p=0.8)])
def test_sampling_acceptance_follows_target_distribution(sampling):
    out, tokens = jax.device_get(sample_accept(verify.accept_sampling, sampling, jax.random.key(11)))
    laws = target_probs(sampling)
    for row in range(len(ROWS)):
        pvalues = chi_square_pvalues(tokens[:, row], *laws)
        assert min(pvalues) > 1e-4, (row, pvalues)
    # Row 0's duplicate sibling (node 3) and its child are never accepted, nor is row 2's (node 2); the
    # padding never is.
    assert not np.isin(out.path_BxD1[:, 0, 1], [3, 7, 8]).any() and not np.isin(out.path_BxD1[:, 2, 1], [2, 8]).any()
    assert not np.isin(out.path_BxD1[:, :, 2], [8]).any()
    assert (out.length_B > 0).mean() > 0.2  # the drafts really are being accepted
    full = out.length_B[:, 2] == 2
    assert full.mean() > 0.1 and (out.path_BxD1[:, 2, 1][full] == 3).mean() > 0.1  # whole paths, also past the dup


# Mutants of the real acceptance code (verify.accept_sampling), each a single flaw.
MUTANTS = {
    "bonus drawn from p instead of the residual": ("jnp.argmax(residual_BxV + gumbel_BxV", "jnp.argmax(logp_BxV + gumbel_BxV"),
    "a duplicate's mass counted twice": ("p_res_BxN1 = jnp.where(duplicate_BxN1, 0.0, p_token_BxN1)",
                                         "p_res_BxN1 = p_token_BxN1"),
    "the residual not renormalized": ("u_BxN1 * (1.0 - rejected_mass_BxN1) < p_res_BxN1", "u_BxN1 < p_res_BxN1"),
}


def mutant(flaw: str):
    """verify.accept_sampling with one line of its source changed, compiled in the module's namespace."""
    old, new = MUTANTS[flaw]
    source = textwrap.dedent(inspect.getsource(verify.accept_sampling))
    assert source.count(old) == 1, f"the mutation site of {flaw!r} is gone from verify.accept_sampling"
    namespace = dict(vars(verify))
    exec(compile(source.replace(old, new), f"<mutant: {flaw}>", "exec"), namespace)
    return namespace["accept_sampling"]


@pytest.mark.parametrize("flaw", sorted(MUTANTS))
def test_chi_square_catches_each_mutant_of_the_acceptance_code(flaw):
    """The distribution test has power: each single flaw in the JAX acceptance code, alone, fails it."""
    sampling = SamplingParams(temperature=1.0)
    _, tokens = jax.device_get(sample_accept(mutant(flaw), sampling, jax.random.key(11)))
    laws = target_probs(sampling)
    pvalues = [min(chi_square_pvalues(tokens[:, row], *laws)) for row in range(len(ROWS))]
    assert min(pvalues) < 1e-8, pvalues
