"""SpecBlock drafting (`specblock_draft`): the candidate tree is what the training unroll computes for
the same context (block 1 and every inherited expansion, before and after a commit), trees respect
the budget and ancestor closure, and decoding is lossless: greedy identical to plain decoding (batch
1 and a batch of different prompt lengths, ablation switches included), sampling in distribution;
drafter directories of kind "specblock"."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from specblock_jax import decode, drafter_io
from specblock_jax import tree as tree_lib
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.drafter import Drafter, load_drafter
from specblock_jax.models import specblock as sb
from specblock_jax.models import target as target_lib
from specblock_jax.sampling import SamplingParams, processed_logprobs
from specblock_jax.specblock_draft import (
    SpecBlockMethod,
    drafter_params,
    merge_duplicates,
)
from specblock_jax.tree import Tree
from specblock_jax.verify import Acceptance

TARGET = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
CONFIG = sb.SpecBlockConfig.for_target(TARGET, rank_hidden=8)
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41], [17, 3, 22, 50, 9, 14, 1, 6, 30, 11]]
N_NEW, MAX_LEN = 10, 64
WIDTH = 24  # training sequences are padded to one width: one compile


_init_params = jax.jit(sb.init_params, static_argnums=0)


def _drafter(config, key):
    """Weights x10 (the shift's near-identity excepted): peaked drafts and varied rank classes."""
    params = _init_params(config, jax.random.key(key))
    return {n: (p if n.startswith("shift") else jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, p))
            for n, p in params.items()}


@pytest.fixture(scope="module")
def target(peaked_target):
    return peaked_target(TARGET)


@jax.jit
def _features_1xTxF(params, ids_1xT):
    t = ids_1xT.shape[1]
    return target_lib.forward(params, TARGET, ids_1xT, jnp.arange(t)[None], jnp.tril(jnp.ones((t, t), bool))[None],
                              feature_layers=CONFIG.feature_layers).features


def _features(target, ids):
    padded = jnp.asarray([list(ids) + [0] * (WIDTH - len(ids))], jnp.int32)
    return _features_1xTxF(target.params, padded)[0, :len(ids)]


_ttt = jax.jit(sb.ttt_forward, static_argnums=1)
# The method is static: one compile per method, however often a test calls these.
_init = jax.jit(lambda method, *args: method.init(*args), static_argnums=(0, 6))
_candidates = jax.jit(lambda method, *args: method.candidates(*args), static_argnums=0)
_commit = jax.jit(lambda method, *args: method.commit(*args), static_argnums=0)


def _training_block(method, params, target, context, continuation, m):
    """Training's view of the query row (f_{len-1}, root): (block-1 log-probs [K, V], rank logits,
    block-2 log-probs [K, V] inheriting slot m, whose token is continuation[m + 1])."""
    seq = list(context) + list(continuation)
    n = len(context)
    feats = jnp.pad(_features(target, context), ((0, WIDTH - n), (0, 0)))
    tokens = jnp.asarray([seq + [0] * (WIDTH - len(seq))], jnp.int32)
    inherit = jnp.full((1, WIDTH, 1), m + 1, jnp.int32)
    cfg = dataclasses.replace(method.config, num_ttt_blocks=2)
    out = _ttt(params["drafter"], cfg, params["embed"], feats[None], tokens, inherit).outputs
    logp = lambda o: np.asarray(jax.nn.log_softmax(o.logits[0, n - 1], axis=-1))
    rank = None if out[0].rank_logits is None else np.asarray(out[0].rank_logits[0, n - 1])
    return logp(out[0]), rank, logp(out[1])


def _check_candidates(method, params, target, cand, row, context):
    """Block 1's and each expansion's candidates: tokens, cumulative scores and widths as the
    training unroll gives them; the expanded nodes are block 1's best valid candidates."""
    k_slots, w = method.config.block_size, method.width
    tokens, parents = np.asarray(cand.tokens[row]), np.asarray(cand.parents[row])
    scores, valid = np.asarray(cand.scores[row]), np.asarray(cand.valid[row])
    root = int(tokens[0])
    greedy = [int(tokens[1 + k * w]) for k in range(k_slots)]
    lp1, rank, _ = _training_block(method, params, target, context, [root], 0)
    expected_width = [method.slot0_width] + [method.widths[int(np.argmax(rank[k]))] for k in range(1, k_slots)]
    above = 0.0
    for k in range(k_slots):
        idx = 1 + k * w + np.arange(w)
        np.testing.assert_array_equal(tokens[idx], np.argsort(-lp1[k])[:w])
        np.testing.assert_array_equal(valid[idx], np.arange(w) < expected_width[k])
        np.testing.assert_allclose(scores[idx][valid[idx]], (above + lp1[k][tokens[idx]])[valid[idx]], atol=1e-4)
        assert np.all(parents[idx] == (0 if k == 0 else 1 + (k - 1) * w))
        above += lp1[k][greedy[k]]
    block1 = slice(1, 1 + k_slots * w)
    base = 1 + k_slots * w
    leaves = [int(parents[base + e * k_slots * w]) for e in range(method.expand)]
    best = np.argsort(-np.where(valid[block1], scores[block1], -np.inf), kind="stable")[:method.expand] + 1
    assert sorted(leaves) == sorted(best)
    for e, leaf in enumerate(leaves):
        m = (leaf - 1) // w
        _, _, lp2 = _training_block(method, params, target, context, [root] + greedy[:m] + [int(tokens[leaf])], m)
        above = scores[leaf]
        for k in range(k_slots):
            idx = base + (e * k_slots + k) * w + np.arange(w)
            np.testing.assert_array_equal(tokens[idx], np.argsort(-lp2[k])[:w])
            np.testing.assert_allclose(scores[idx][valid[idx]], (above + lp2[k][tokens[idx]])[valid[idx]], atol=1e-4)
            above += lp2[k][tokens[idx[0]]]


@pytest.fixture(scope="module")
def drafted(target):
    """Two rows of different lengths after init: the method, its params, the prompts and roots, the
    state, and the candidates and pruned tree of the first draft."""
    method = SpecBlockMethod(CONFIG, budget=20)
    params = drafter_params(_drafter(CONFIG, 3), target.params)
    prompts, roots = [PROMPTS[0], PROMPTS[2]], jnp.asarray([11, 40])
    width = max(len(p) for p in prompts)
    lens = jnp.asarray([len(p) for p in prompts])
    prompt_BxT = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
    feats_BxTxF = jnp.stack([jnp.pad(_features(target, p), ((0, width - len(p)), (0, 0))) for p in prompts])
    state = _init(method, params, prompt_BxT, lens, feats_BxTxF, roots, MAX_LEN)
    cand, drafted_state = _candidates(method, params, state, roots, lens)
    # `draft` is `candidates`, `merge_duplicates`, `tree.prune` (decoding runs it whole); one compile fewer here.
    merged = jax.jit(merge_duplicates, static_argnums=1)(cand, method.max_depth)
    tree = jax.jit(tree_lib.prune, static_argnums=4)(merged.tokens, merged.parents, merged.scores, merged.valid,
                                                     method.budget)
    return method, params, prompts, roots, lens, drafted_state, cand, merged, tree


def test_candidates_follow_the_training_unroll_before_and_after_commit(target, drafted):
    """Each row's candidates as training sees its context; then a commit of block 1's greedy chain
    (with the verify forward's target features) and the next draft's candidates, likewise."""
    method, params, prompts, roots, lens, state, cand, *_ = drafted
    for row, p in enumerate(prompts):
        _check_candidates(method, params, target, cand, row, p)

    k_slots, w = CONFIG.block_size, method.width
    path = [0] + [1 + k * w for k in range(k_slots)]
    bonus = [7, 50]
    chain = np.asarray(cand.tokens)[:, path[1:]]
    tokens_BxD1 = np.full((2, method.max_depth + 1), -1)
    tokens_BxD1[:, :k_slots] = chain
    tokens_BxD1[:, k_slots] = bonus
    path_BxD1 = jnp.asarray([path + [0] * (method.max_depth - k_slots)] * 2, jnp.int32)
    acceptance = Acceptance(path_BxD1, jnp.full((2,), k_slots, jnp.int32), jnp.asarray(tokens_BxD1, jnp.int32),
                            jnp.asarray(bonus, jnp.int32))
    seqs = [p + [int(roots[r])] + [int(t) for t in chain[r]] for r, p in enumerate(prompts)]
    features_BxN1xF = jnp.zeros((2, cand.tokens.shape[1], CONFIG.feature_size))
    for r, (p, seq) in enumerate(zip(prompts, seqs)):
        features_BxN1xF = features_BxN1xF.at[r, jnp.asarray(path)].set(_features(target, seq)[len(p):])
    state = _commit(method, params, state, cand, acceptance, features_BxN1xF, lens)
    cand2, _ = _candidates(method, params, state, jnp.asarray(bonus), lens + k_slots + 1)
    for row, seq in enumerate(seqs):
        _check_candidates(method, params, target, cand2, row, seq)


def test_trees_respect_the_budget_and_ancestor_closure(drafted):
    """The drafted tree keeps exactly the `budget` best (merged) candidates (ancestor-closed, since
    scores only fall along a path), in a valid topological order within max_depth, with no two
    siblings alike."""
    method, *_, cand, merged, tree = drafted
    tree_lib.check_static(tree, method.budget)
    assert cand.tokens.shape[1] == 1 + 4 * 6 * (1 + method.expand)
    assert not bool(jnp.any(tree_lib.malformed(tree)))
    for row in range(2):
        valid = np.asarray(tree.valid[row])
        assert valid.sum() == method.budget + 1
        idx = np.flatnonzero(valid)[1:]
        parents = np.asarray(tree.parents[row])[idx]
        assert np.all(parents < idx) and np.all(valid[parents])
        depth = np.asarray(tree.depth[row])
        assert depth.max() <= method.max_depth and np.all(depth[idx] == depth[parents] + 1)
        assert np.all(np.asarray(tree.scores[row])[idx] <= np.asarray(tree.scores[row])[parents] + 1e-6)
        siblings = {(int(p), int(t)) for p, t in zip(parents, np.asarray(tree.tokens[row])[idx])}
        assert len(siblings) == len(idx)
        cand_scores = np.sort(np.asarray(merged.scores[row])[1:][np.asarray(merged.valid[row])[1:]])[::-1]
        np.testing.assert_allclose(np.sort(np.asarray(tree.scores[row])[idx])[::-1], cand_scores[:method.budget])


def test_merge_duplicates_by_hand():
    """Nodes 1 and 3 are both token 5 under the root: 3 merges into 1 (best score -0.5), so 3's child 5
    (token 6) meets 1's child 2 (token 6) and merges into it, and 5's child 6 moves under 2."""
    tree = Tree(tokens=jnp.asarray([[9, 5, 6, 5, 7, 6, 8]]), parents=jnp.asarray([[-1, 0, 1, 0, 3, 3, 5]]),
                depth=jnp.zeros((1, 7), jnp.int32), valid=jnp.ones((1, 7), bool),
                scores=jnp.asarray([[0.0, -1.0, -2.0, -0.5, -3.0, -1.5, -4.0]]))
    out = merge_duplicates(tree, 3)
    valid = np.asarray(out.valid[0])
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(np.asarray(out.parents[0])[valid], [-1, 0, 1, 1, 2])
    np.testing.assert_array_equal(np.asarray(out.scores[0])[valid], [0.0, -0.5, -1.5, -3.0, -4.0])


@pytest.fixture(scope="module")
def plain(target):
    return decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False).token_ids


@pytest.mark.parametrize("rows, switches, knobs", [
    ([1], {}, {"budget": 16}),
    ([0, 1, 2], {"shift": False, "inherit": False, "rank_head": False},
     {"budget": 10, "max_blocks": 3, "expand": 2, "topk": 3}),
])
def test_specblock_greedy_equals_plain(target, plain, rows, switches, knobs):
    cfg = dataclasses.replace(CONFIG, **switches)
    method = SpecBlockMethod(cfg, **knobs)
    drafter = Drafter(method, drafter_params(_drafter(cfg, 5), target.params))
    out = decode.generate(target, [PROMPTS[r] for r in rows], max_new_tokens=N_NEW, max_len=MAX_LEN,
                          stop_on_eos=False, drafter=drafter)
    assert out.token_ids == [plain[r] for r in rows]
    stats = out.stats
    assert stats["malformed_trees"] == 0 and stats["verify_steps"] == stats["iterations"]
    assert stats["drafter_forwards"] == method.max_blocks * stats["verify_steps"]


# Sampling: the first two tokens are distributed exactly as plain sampling draws them.

SAMPLES = 2048


def test_specblock_sampling_follows_plain_distribution(target):
    """Wide root slots, so the first draft token is often accepted (and sometimes deeper ones, among
    duplicate siblings from the expansions); the chi-square statistic of the first two tokens (sparse
    cells pooled) stays under its 0.999 bound."""
    sampling = SamplingParams(temperature=1.0)
    method = SpecBlockMethod(CONFIG, budget=20, slot0_width=16, widths=(4, 4, 4, 4))
    drafter = Drafter(method, drafter_params(_drafter(CONFIG, 6), target.params))
    prompt = PROMPTS[1]
    out = decode.generate(target, [prompt] * SAMPLES, max_new_tokens=3, temperature=1.0, seed=3, drafter=drafter,
                          max_len=32, stop_on_eos=False)
    assert out.stats["tau"] > 1.1  # drafts were accepted in over a tenth of the steps
    v = TARGET.vocab_size
    logits = target.logits(np.concatenate([np.tile(prompt, (v, 1)), np.arange(v)[:, None]], axis=1))
    logp = jax.jit(processed_logprobs, static_argnums=1)
    probs = np.exp(np.asarray(logp(logits[0, len(prompt) - 1], sampling)[:, None]
                              + logp(logits[:, len(prompt)], sampling), np.float64)).reshape(-1)
    counts = np.bincount(np.array(out.token_ids)[:, :2] @ np.array([v, 1]), minlength=v * v).astype(np.float64)
    expected = SAMPLES * probs
    assert not counts[expected == 0].any()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected_cells = np.append(expected[big], expected[~big].sum())
    chi2 = ((observed - expected_cells) ** 2 / expected_cells).sum()
    assert chi2 < scipy.stats.chi2.ppf(0.999, len(observed) - 1)


def test_save_and_load_a_specblock_drafter(tmp_path, target):
    """A drafter directory round-trips the config, the tree knobs and the drafter's own tensors; the
    target's table is read from the target, and a mismatched target is refused."""
    cfg = dataclasses.replace(CONFIG, inherit=False, block_size=3)
    method = SpecBlockMethod(cfg, budget=9, max_blocks=3, widths=(1, 2, 3, 5), slot0_width=4, expand=2)
    params = _init_params(cfg, jax.random.key(9))
    drafter_io.save(method, params, tmp_path / "sb")
    meta = json.loads((tmp_path / "sb" / "drafter.json").read_text())
    assert meta["kind"] == "specblock" and meta["decoding"]["widths"] == [1, 2, 3, 5]
    loaded = load_drafter(str(tmp_path / "sb"), target)
    assert loaded.method == method
    assert loaded.params["embed"] is target.params["embed_tokens"]["embedding"]
    for a, b in zip(jax.tree.leaves(loaded.params["drafter"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    other = target_lib.Target(dataclasses.replace(TARGET, vocab_size=65), target.params)
    with pytest.raises(ConfigError, match="vocab_size 64 does not match the target's 65"):
        load_drafter(str(tmp_path / "sb"), other)
    with pytest.raises(ValueError, match="unexpected tensors"):
        drafter_io.save(method, {**params, "embed_tokens": {"embedding": jnp.zeros((64, 32))}}, tmp_path / "bad")
