"""The n-gram drafter on hand-made histories: which matches it uses, how it builds the tree."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specblock_jax import tree as tree_lib
from specblock_jax.ngram import NgramMethod, NgramState
from specblock_jax.verify import Acceptance

S = 32  # history buffer length


@functools.partial(jax.jit, static_argnums=0)
def _draft(method: NgramMethod, history_BxS, length_B):
    state = NgramState(history_BxS, length_B)
    root_B = jnp.take_along_axis(history_BxS, (length_B - 1)[:, None], axis=1)[:, 0]
    return method.draft(None, state, root_B, length_B - 1)


def draft(method: NgramMethod, histories: list[list[int]]) -> tree_lib.Tree:
    """Draft from histories (committed tokens, then the root as the last entry); returns numpy arrays."""
    history_BxS = np.zeros((len(histories), S), np.int32)
    for i, h in enumerate(histories):
        history_BxS[i, :len(h)] = h
    tree, state, forwards = _draft(method, history_BxS, np.array([len(h) for h in histories], np.int32))
    assert forwards == 0
    np.testing.assert_array_equal(state.history_BxS, history_BxS)
    tree_lib.check_static(tree, method.budget)
    return jax.tree.map(np.asarray, tree)


def valid_nodes(tree: tree_lib.Tree, row: int = 0) -> list[tuple[int, int]]:
    """(token, parent) of each valid non-root node, in order."""
    return [(int(t), int(p)) for t, p, v in zip(tree.tokens[row, 1:], tree.parents[row, 1:], tree.valid[row, 1:])
            if v]


def test_most_recent_match_continues_to_the_history_end():
    #         0  1  2  3  4
    history = [3, 4, 3, 5, 3]  # the root 3 occurred at 0 (then 4 3 5 3) and, more recently, at 2 (then 5 3)
    tree = draft(NgramMethod(budget=4, max_depth=4, max_ngram=1, min_ngram=1, branches=1), [history])
    assert tree.tokens[0, 0] == 3 and tree.valid[0, 0]
    assert valid_nodes(tree) == [(5, 0), (3, 1)]
    np.testing.assert_array_equal(tree.depth[0, :3], [0, 1, 2])
    np.testing.assert_array_equal(tree.scores[0, :3], [0, -1, -2])
    assert np.all(tree.scores[0, 3:] == -np.inf)


HISTORY = [1, 2, 3, 7, 2, 3, 8, 3, 9, 1, 2, 3]  # suffix 1 2 3 at 0; 2 3 also at 4; 3 also at 7


def test_longer_ngrams_rank_first():
    # The 3-gram match (oldest) first, then the 2-gram match, though the 1-gram match is more recent.
    tree = draft(NgramMethod(budget=8, max_depth=4, max_ngram=3, branches=2), [HISTORY])
    assert valid_nodes(tree) == [(7, 0), (2, 1), (3, 2), (8, 3), (8, 0), (3, 5), (9, 6), (1, 7)]
    # With unigrams only, the most recent occurrence of the root wins.
    tree = draft(NgramMethod(budget=8, max_depth=4, max_ngram=1, min_ngram=1, branches=1), [HISTORY])
    assert valid_nodes(tree) == [(9, 0), (1, 1), (2, 2), (3, 3)]
    # min_ngram 2 ignores unigram matches: only two chains exist.
    tree = draft(NgramMethod(budget=12, max_depth=4, max_ngram=3, min_ngram=2, branches=3), [HISTORY])
    assert len(valid_nodes(tree)) == 8


def test_chains_sharing_a_prefix_are_merged():
    #         0  1  2  3  4  5  6  7  8
    history = [5, 1, 2, 3, 5, 1, 2, 4, 5]  # after the root 5: "1 2 4 5" (at 4) and "1 2 3 5" (at 0)
    tree = draft(NgramMethod(budget=8, max_depth=4, max_ngram=1, min_ngram=1, branches=2), [history])
    # The second chain's "1 2" is the first's; its "3" hangs from the first chain's "2" (node 2).
    assert valid_nodes(tree) == [(1, 0), (2, 1), (4, 2), (5, 3), (3, 2), (5, 5)]
    np.testing.assert_array_equal(tree.depth[0, :7], [0, 1, 2, 3, 4, 3, 4])
    # Identical continuations merge completely.
    tree = draft(NgramMethod(budget=8, max_depth=2, max_ngram=1, min_ngram=1, branches=2), [[5, 1, 2, 5, 1, 2, 5]])
    assert valid_nodes(tree) == [(1, 0), (2, 1)]


def test_nothing_matches_drafts_nothing():
    tree = draft(NgramMethod(), [[1, 2, 3, 4], [7]])
    assert not tree.valid[:, 1:].any()
    np.testing.assert_array_equal(tree.tokens[:, 0], [4, 7])
    assert tree.valid[:, 0].all()


def test_budget_keeps_the_shallowest_nodes():
    tree = draft(NgramMethod(budget=3, max_depth=4, max_ngram=3, branches=2), [HISTORY])
    assert tree.tokens.shape == (1, 4)
    # Both depth-1 nodes, then depth 2 of the first chain.
    assert sorted(valid_nodes(tree)) == sorted([(7, 0), (8, 0), (2, 1)])
    tree = draft(NgramMethod(budget=12, max_depth=4, max_ngram=3, branches=2), [HISTORY])
    assert tree.valid.sum() == 1 + 8 and not tree.valid[0, 9:].any()  # extra budget stays invalid


def test_random_histories_give_well_formed_trees_of_real_continuations():
    """Rows of different lengths over a 3-token vocabulary (many matches): every valid node's path is
    what followed an earlier occurrence of the root, parents come before children, siblings differ."""
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 3, n).tolist() for n in rng.integers(1, S, 24)]
    method = NgramMethod(budget=6, max_depth=3, max_ngram=2, branches=3)
    tree = draft(method, histories)
    assert not np.asarray(tree_lib.malformed(tree)).any()
    np.testing.assert_array_equal(tree_lib.sanitize(tree).valid, tree.valid)
    for b, h in enumerate(histories):
        paths = {0: []}
        for i in range(1, method.budget + 1):
            if not tree.valid[b, i]:
                continue
            p = tree.parents[b, i]
            assert 0 <= p < i and tree.valid[b, p] and tree.depth[b, i] == tree.depth[b, p] + 1 <= method.max_depth
            paths[i] = paths[p] + [tree.tokens[b, i]]
            assert any(h[e] == h[-1] and h[e + 1:e + 1 + len(paths[i])] == paths[i]
                       for e in range(len(h) - 1 - len(paths[i]) + 1)), (h, paths[i])
        siblings = [(tree.parents[b, i], tree.tokens[b, i]) for i in range(1, method.budget + 1) if tree.valid[b, i]]
        assert len(siblings) == len(set(siblings))


def test_init_and_commit_keep_the_history():
    method = NgramMethod()
    prompt_BxT = jnp.array([[4, 5, 6, 0], [7, 8, 0, 0]], jnp.int32)
    state = method.init(None, prompt_BxT, jnp.array([3, 2]), None, jnp.array([9, 1]), 8)
    np.testing.assert_array_equal(state.history_BxS[:, :4], [[4, 5, 6, 9], [7, 8, 1, 0]])
    np.testing.assert_array_equal(state.length_B, [4, 3])
    # Row 0 accepted two drafts (10, 11) then the bonus 12; row 1 only the bonus 13.
    acceptance = Acceptance(path_BxD1=jnp.array([[0, 1, 2, 0, 0], [0, 0, 0, 0, 0]]), length_B=jnp.array([2, 0]),
                            tokens_BxD1=jnp.array([[10, 11, 12, -1, -1], [13, -1, -1, -1, -1]]),
                            bonus_B=jnp.array([12, 13]))
    state = method.commit(None, state, None, acceptance, None, jnp.array([3, 2]))
    np.testing.assert_array_equal(state.history_BxS, [[4, 5, 6, 9, 10, 11, 12, 0], [7, 8, 1, 13, 0, 0, 0, 0]])
    np.testing.assert_array_equal(state.length_B, [7, 4])


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=0), "NgramMethod budget must be an integer >= 1, got 0"),
    (dict(max_depth=2.0), "NgramMethod max_depth must be an integer >= 1, got 2.0"),
    (dict(branches=True), "NgramMethod branches must be an integer >= 1, got True"),
    (dict(min_ngram=0), "NgramMethod min_ngram must be an integer >= 1, got 0"),
    (dict(min_ngram=3, max_ngram=2), "NgramMethod min_ngram 3 exceeds max_ngram 2"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NgramMethod(**kwargs)
