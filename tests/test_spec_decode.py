"""Speculative decoding: lossless against plain decoding (greedy token for token, sampling in
distribution), its statistics, and the errors a drafter or a caller can cause.

Compiles dominate the run time on this CPU: every (drafter shape, sampling, batch) pair is one compile,
so the drafters' behaviour is switched by their params (run-time arrays), not by their static config.
"""

import dataclasses
import json
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from specblock_jax import decode, hf, verify
from specblock_jax.config import ModelConfig
from specblock_jax import drafter as drafter_lib
from specblock_jax.drafter import Drafter, load_drafter
from specblock_jax.models.target import Target
from specblock_jax.ngram import NgramMethod
from specblock_jax.sampling import SamplingParams, processed_logprobs
from specblock_jax.tree import Tree

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=128)
N_NEW = 12
MAX_LEN = 128  # one cache length (so one compile per drafter shape) that holds a 64-node tree's scratch
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41], [17], [3, 22, 50, 9, 14, 1, 6, 30, 11, 2, 48, 25]]


@dataclasses.dataclass(frozen=True)
class ScriptedMethod:
    """Test drafter: random trees of a static budget and depth, steered by its params.

    Nodes 1..max_depth form a chain (node i's parent is i - 1); every later node hangs from a random
    earlier node one level up, at a random depth <= max_depth. A random prefix of the nodes is valid.
    A node at depth d carries, with probability `truth_rate`, the true greedy token d positions past
    the root (from `truth_BxS`, the prompt and its plain greedy continuation), else a uniform one.
    With `oracle` the chain is exactly the true continuation (an oracle drafter with random siblings).
    `bad_node` > 0 gives that node the last node as its parent, `oov_node` > 0 gives that node a token
    outside the vocabulary: malformed trees.
    """

    budget: int
    max_depth: int
    vocab_size: int = CONFIG.vocab_size
    feature_layers: ClassVar[tuple[int, ...]] = ()

    def init(self, params, prompt_BxT, prompt_lens_B, features_BxTxF, root_B, max_len):
        return jax.random.split(jax.random.key(params["seed"]), prompt_BxT.shape[0])

    def draft(self, params, keys_B, root_B, lengths_B):
        n1 = self.budget + 1
        keys_Bx3 = jax.vmap(lambda key: jax.random.split(key, 3))(keys_B)
        u_Bx5xN1 = jax.vmap(lambda key: jax.random.uniform(key, (5, n1)))(keys_Bx3[:, 1])
        noise_BxN1xN1 = jax.vmap(lambda key: jax.random.uniform(key, (n1, n1)))(keys_Bx3[:, 2])
        idx_N1 = jnp.arange(n1)
        chain_N1 = (idx_N1 >= 1) & (idx_N1 <= self.max_depth)
        depth_BxN1 = jnp.where(idx_N1 == 0, 0, jnp.where(chain_N1, idx_N1, 1 + (u_Bx5xN1[:, 0] * self.max_depth)))
        depth_BxN1 = depth_BxN1.astype(jnp.int32)
        # A random earlier node one level up; one exists, as the chain has a node on every level.
        up_BxN1xN1 = (idx_N1[None, None, :] < idx_N1[None, :, None]) & (
            depth_BxN1[:, None, :] == depth_BxN1[:, :, None] - 1)
        parents_BxN1 = jnp.argmax(jnp.where(up_BxN1xN1, noise_BxN1xN1, -1.0), axis=2)
        parents_BxN1 = jnp.where(idx_N1 == 0, -1, parents_BxN1)
        truth_pos_BxN1 = lengths_B[:, None] + depth_BxN1
        known_BxN1 = truth_pos_BxN1 < params["known_B"][:, None]
        truth_BxN1 = jnp.take_along_axis(params["truth_BxS"], truth_pos_BxN1, axis=1, mode="clip")
        use_truth_BxN1 = known_BxN1 & ((u_Bx5xN1[:, 1] < params["truth_rate"]) | (chain_N1 & params["oracle"]))
        tokens_BxN1 = jnp.where(use_truth_BxN1, truth_BxN1, (u_Bx5xN1[:, 2] * self.vocab_size).astype(jnp.int32))
        num_valid_B = (u_Bx5xN1[:, 3, 0] * n1).astype(jnp.int32)
        valid_BxN1 = (idx_N1 <= num_valid_B[:, None]) | (chain_N1 & params["oracle"])
        bad_N1, oov_N1 = idx_N1 == params["bad_node"], idx_N1 == params["oov_node"]
        parents_BxN1 = jnp.where(bad_N1, n1 - 1, parents_BxN1)
        tokens_BxN1 = jnp.where(oov_N1, self.vocab_size + 1, tokens_BxN1)
        valid_BxN1 = valid_BxN1 | bad_N1 | oov_N1
        tree = Tree(tokens=tokens_BxN1.at[:, 0].set(root_B).astype(jnp.int32), parents=parents_BxN1.astype(jnp.int32),
                    depth=depth_BxN1, valid=valid_BxN1,
                    scores=jnp.where(valid_BxN1, -depth_BxN1.astype(jnp.float32), -jnp.inf))
        return tree, keys_Bx3[:, 0], jnp.ones((), jnp.int32)

    def commit(self, params, keys_B, tree, acceptance, features_BxN1xF, lengths_B):
        return keys_B


def scripted(budget, max_depth, rows, truth, *, oracle=False, truth_rate=0.0, seed=0, bad_node=0,
             oov_node=0) -> Drafter:
    """A ScriptedMethod drafter for prompts PROMPTS[rows], knowing their greedy continuations (rows for
    the padding of the batch's bucket know nothing)."""
    truth_BxS = np.zeros((decode.bucket(len(rows)), MAX_LEN), np.int32)
    known_B = np.zeros(len(truth_BxS), np.int32)
    for i, r in enumerate(rows):
        truth_BxS[i, :len(PROMPTS[r]) + N_NEW] = PROMPTS[r] + truth[r]
        known_B[i] = len(PROMPTS[r]) + N_NEW
    params = dict(truth_BxS=truth_BxS, known_B=known_B,
                  oracle=np.bool_(oracle), truth_rate=np.float32(truth_rate), seed=np.int32(seed),
                  bad_node=np.int32(bad_node), oov_node=np.int32(oov_node))
    return Drafter(ScriptedMethod(budget, max_depth), params)


@pytest.fixture(scope="module")
def target(peaked_target) -> Target:
    return peaked_target(CONFIG)


@pytest.fixture(scope="module")
def plain(target) -> decode.GenerateOutput:
    return decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False)


@pytest.fixture(scope="module")
def stopping(target, plain):
    """A target whose EOS is a token some rows emit mid-run (others run to max_new_tokens), and every
    row's plain greedy output under it."""
    eos = next(t for seq in plain.token_ids for t in seq[3:N_NEW - 3]
               if sum(t in other for other in plain.token_ids) < len(PROMPTS))
    expected = [seq[:seq.index(eos) + 1] if eos in seq else seq for seq in plain.token_ids]
    return Target(dataclasses.replace(CONFIG, eos_token_ids=(eos,)), target.params), expected


def test_ngram_greedy_equals_plain(target, plain):
    out = decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False, drafter="ngram")
    assert out.token_ids == plain.token_ids
    stats = out.stats
    assert stats["drafter_forwards"] == 0 and stats["malformed_trees"] == 0
    assert stats["verify_steps"] + stats["single_steps"] == stats["iterations"]
    # Both kinds of step ran: trees (the outputs repeat themselves, so there are matches) and, when no
    # row had a match, a single-token decode of the roots.
    assert stats["verify_steps"] > 0 and stats["single_steps"] > 0


# (budget, max_depth, batch): a batch of 4 runs the prompts together, a batch of 1 runs each alone.
@pytest.mark.parametrize("budget, max_depth, batch", [(1, 1, 1), (4, 3, 4), (16, 5, 4), (64, 10, 1)])
def test_scripted_drafters_greedy_equal_plain_with_stops_inside_paths(stopping, plain, budget, max_depth, batch):
    """Random trees and oracle trees, with EOS and max_new_tokens cutting accepted paths."""
    eos_target, expected = stopping
    groups = [[0, 1, 2, 3]] if batch == 4 else [[r] for r in range(4)]
    cut = 0
    for kind in (dict(truth_rate=0.5, seed=1), dict(oracle=True, seed=2)):
        for rows in groups:
            drafter = scripted(budget, max_depth, rows, plain.token_ids, **kind)
            out = decode.generate(eos_target, [PROMPTS[r] for r in rows], max_new_tokens=N_NEW, max_len=MAX_LEN,
                                  drafter=drafter)
            assert out.token_ids == [expected[r] for r in rows], (kind, rows)
            steps_BxK = np.array(out.stats["steps_by_tokens"])
            np.testing.assert_array_equal(steps_BxK @ np.arange(max_depth + 2) + 1, out.stats["new_tokens"])
            assert out.stats["drafter_forwards"] == out.stats["iterations"]  # the fixture reports 1 per draft
            cut += sum(len(expected[r]) < N_NEW for r in rows)
    assert cut > 0  # some rows stopped at EOS


def test_oracle_commits_a_whole_path_per_forward(stopping, plain):
    """An oracle drafter of depth 5 has every step accept its whole chain (6 tokens with the bonus)
    until EOS or max_new_tokens cuts it, and the statistics say so."""
    eos_target, expected = stopping
    out = decode.generate(eos_target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN,
                          drafter=scripted(16, 5, [0, 1, 2, 3], plain.token_ids, oracle=True, seed=2))
    assert out.token_ids == expected
    steps_B = [-(-(len(seq) - 1) // 6) for seq in expected]
    for seq, steps_K in zip(expected, out.stats["steps_by_tokens"]):
        full, rest = divmod(len(seq) - 1, 6)
        expected_K = [0] * 6 + [full]
        expected_K[rest] += rest > 0  # the last step, cut inside the chain
        assert steps_K == expected_K
    assert out.stats["iterations"] == max(steps_B) < plain.stats["iterations"]
    assert out.stats["verify_steps"] == out.stats["iterations"] and out.stats["single_steps"] == 0
    assert out.stats["tau"] == pytest.approx(sum(len(seq) - 1 for seq in expected) / sum(steps_B))
    assert out.stats["tau"] > 3


# ---------------------------------------------------------------------------------------------------
# Sampling: the first three tokens are distributed exactly as plain sampling draws them.

SAMPLES = 4096
SAMPLE_PROMPT = PROMPTS[1]


@pytest.fixture(scope="module")
def sharp(peaked_target) -> tuple[Target, list[list[int]]]:
    """A target with weights x40 (about 1.2 nats per token at temperature 1, so the first three tokens
    concentrate on few enough cells for a chi-square test), and its greedy continuations."""
    sharp = peaked_target(CONFIG, scale=40.0)
    return sharp, decode.generate(sharp, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False).token_ids


def exact_first_tokens(target: Target, sampling: SamplingParams) -> np.ndarray:
    """[V, V, V] probability of each first three tokens under plain sampling, from exact forwards."""
    v, prompt = CONFIG.vocab_size, SAMPLE_PROMPT
    pairs = np.stack(np.meshgrid(np.arange(v), np.arange(v), indexing="ij"), -1).reshape(-1, 2)
    logits = target.logits(np.concatenate([np.tile(prompt, (v * v, 1)), pairs], axis=1))
    logp = jax.jit(processed_logprobs, static_argnums=1)
    lp1_V = logp(logits[0, len(prompt) - 1], sampling)
    lp2_VxV = logp(logits[::v, len(prompt)], sampling)  # rows with a first token a (any second)
    lp3_VxVxV = logp(logits[:, len(prompt) + 1], sampling).reshape(v, v, v)
    return np.exp(np.asarray(lp1_V[:, None, None] + lp2_VxV[:, :, None] + lp3_VxVxV, np.float64))


def spec_first_tokens(target: Target, method: ScriptedMethod, sampling: SamplingParams, truth) -> np.ndarray:
    """[SAMPLES, 3] first tokens of speculative sampling: one batch of SAMPLES copies of the prompt.
    Rows are independent (their own uniforms, Gumbels and drafter key), so each is one sample."""
    params = scripted(method.budget, method.max_depth, [1] * SAMPLES, truth, oracle=True, truth_rate=0.3).params
    out = decode.generate(target, [SAMPLE_PROMPT] * SAMPLES, max_new_tokens=3, temperature=sampling.temperature,
                          top_p=sampling.top_p, seed=11, drafter=Drafter(method, params), max_len=32)
    assert out.stats["verify_steps"] > 0
    return np.array(out.token_ids)


def chi2_and_tv(tokens_Nx3: np.ndarray, probs_VxVxV: np.ndarray) -> tuple[float, float, float]:
    """Chi-square statistic (cells with expected count < 5 pooled; infinite if a token sequence of
    probability 0 was drawn), its 0.999 bound, and the total variation distance of the empirical joint."""
    v = probs_VxVxV.shape[0]
    counts = np.bincount(tokens_Nx3 @ np.array([v * v, v, 1]), minlength=v ** 3).astype(np.float64)
    expected = len(tokens_Nx3) * probs_VxVxV.reshape(-1)
    tv = 0.5 * np.abs(counts / len(tokens_Nx3) - probs_VxVxV.reshape(-1)).sum()
    if counts[expected == 0].any():
        return np.inf, 0.0, tv
    big = expected >= 5
    pool = [] if expected[~big].sum() == 0 else [expected[~big].sum()]
    observed = np.append(counts[big], counts[~big].sum() if pool else [])
    expected_cells = np.append(expected[big], pool)
    chi2 = ((observed - expected_cells) ** 2 / expected_cells).sum()
    return chi2, scipy.stats.chi2.ppf(0.999, len(observed) - 1), tv


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.7)])
def test_sampling_first_tokens_follow_plain_distribution(sharp, sampling):
    target, truth = sharp
    tokens = spec_first_tokens(target, ScriptedMethod(8, 3), sampling, truth)
    chi2, bound, tv = chi2_and_tv(tokens, exact_first_tokens(target, sampling))
    assert chi2 < bound
    assert tv < 0.1


def test_biased_acceptance_fails_the_distribution_check(sharp, monkeypatch):
    """The check above has teeth: always accepting the root's first child (then sampling the bonus
    at it) is not lossless, and the same statistic rejects it."""

    def accept_first_child(tree, logits_BxN1xV, sampling, rng, max_depth):
        b = tree.batch_size
        take_B = tree.valid[:, 1] & (tree.parents[:, 1] == 0)
        node_B = take_B.astype(jnp.int32)
        bonus_B = jax.random.categorical(rng, processed_logprobs(logits_BxN1xV[jnp.arange(b), node_B], sampling))
        path_BxD1 = jnp.zeros((b, max_depth + 1), jnp.int32).at[:, 1].set(node_B)
        tokens_BxD1 = jnp.full((b, max_depth + 1), -1, jnp.int32)
        tokens_BxD1 = jnp.where(take_B[:, None], tokens_BxD1.at[:, 0].set(tree.tokens[:, 1]).at[:, 1].set(bonus_B),
                                tokens_BxD1.at[:, 0].set(bonus_B))
        return verify.Acceptance(path_BxD1, node_B, tokens_BxD1, bonus_B.astype(jnp.int32))

    monkeypatch.setattr(verify, "accept", accept_first_child)
    sampling = SamplingParams(temperature=1.0)
    # A method no other test compiles, so the patched acceptance is traced, not a cached executable.
    target, truth = sharp
    tokens = spec_first_tokens(target, ScriptedMethod(8, 2), sampling, truth)
    chi2, bound, tv = chi2_and_tv(tokens, exact_first_tokens(target, sampling))
    assert chi2 > 10 * bound


# ---------------------------------------------------------------------------------------------------
# Errors


@dataclasses.dataclass(frozen=True)
class MisshapedMethod(ScriptedMethod):
    """Claims `budget` but drafts trees of `drafted_budget` nodes, over the first `drafted_rows` rows."""

    drafted_budget: int = 0
    drafted_rows: int = 0

    def draft(self, params, keys_B, root_B, lengths_B):
        tree, keys_B, forwards = ScriptedMethod(self.drafted_budget, self.max_depth).draft(
            params, keys_B, root_B, lengths_B)
        return jax.tree.map(lambda x: x[:self.drafted_rows], tree), keys_B, forwards


def drafter_of(method: ScriptedMethod, batch: int = 1) -> Drafter:
    return Drafter(method, scripted(4, 3, list(range(batch)), [[0] * N_NEW] * batch).params)


def test_misshapen_drafter_fails_at_trace_time(target):
    method = MisshapedMethod(8, 3, drafted_budget=4, drafted_rows=1)
    with pytest.raises(ValueError, match=re.escape("tree.tokens must have shape (1, 9) and dtype int32, "
                                                   "got shape (1, 5) and dtype int32")):
        decode.generate(target, [PROMPTS[0]], max_new_tokens=4, max_len=32, drafter=drafter_of(method))


def test_batch_mismatch_names_both_sizes(target):
    drafter = drafter_of(MisshapedMethod(4, 3, drafted_budget=4, drafted_rows=1), batch=2)
    with pytest.raises(ValueError, match=re.escape("drafter tree has batch size 1, the batch has 2 rows")):
        decode.generate(target, PROMPTS[:2], max_new_tokens=4, max_len=32, drafter=drafter)


@pytest.mark.parametrize("fault, message", [
    (dict(bad_node=2), "drafter produced a tree whose node 2 has parent 4 after it"),
    (dict(oov_node=3), "drafter produced a tree whose node 3 has token 65, outside the target's vocabulary [0, 64)"),
])
def test_malformed_tree_is_reported_after_the_run(stopping, plain, fault, message):
    drafter = scripted(4, 3, [0, 1, 2, 3], plain.token_ids, oracle=True, **fault)
    with pytest.raises(ValueError, match=re.escape(message)):
        decode.generate(stopping[0], PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, drafter=drafter)


@pytest.mark.parametrize("drafter, kwargs, error, message", [
    (object(), {}, ValueError, "drafter must be a specblock_jax.drafter.Drafter, a drafter kind or directory, "
                               "or None; got object"),
    ("medusa", {}, ValueError, "unknown drafter 'medusa': give one of 'ngram', 'eagle3', 'specblock'"),
    (Drafter(ScriptedMethod(0, 3)), {}, ValueError, "drafter budget must be an integer >= 1, got 0"),
    (Drafter(ScriptedMethod(4, 0)), {}, ValueError, "drafter max_depth must be an integer >= 1, got 0"),
    (Drafter(ScriptedMethod(True, 3)), {}, ValueError, "drafter budget must be an integer >= 1, got True"),
    ("ngram", dict(max_len=21), ValueError, "prompt 0 (3 tokens) + max_new_tokens 12 + tree scratch 7 (budget 6 + 1) "
                                            "= 22 exceeds max_len 21"),
])
def test_bad_drafter_inputs_fail_before_any_compute(target, monkeypatch, drafter, kwargs, error, message):
    monkeypatch.setattr(decode, "spec_init", None)  # reaching compilation would raise AttributeError
    with pytest.raises(error, match=re.escape(message)):
        decode.generate(target, [PROMPTS[0]], max_new_tokens=N_NEW, drafter=drafter, **kwargs)


def test_feature_layers_must_exist_in_the_target(target, monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Featured(ScriptedMethod):
        feature_layers: ClassVar[tuple[int, ...]] = (0, 2)

    monkeypatch.setattr(decode, "spec_init", None)
    with pytest.raises(ValueError, match=re.escape("drafter feature_layers must be a tuple of target layer indices "
                                                   "in [0, 2), got (0, 2)")):
        decode.generate(target, [PROMPTS[0]], max_new_tokens=4, drafter=Drafter(Featured(4, 3)))


def test_load_drafter(tmp_path, target, monkeypatch):
    assert load_drafter("ngram", target) == Drafter(NgramMethod())
    with pytest.raises(FileNotFoundError, match="no eagle3 drafter ships for the target at None .*: train one"):
        load_drafter("eagle3", target)  # built in memory: no shipped drafter is for it
    monkeypatch.setattr(drafter_lib, "TOY_DRAFTERS_DIR", tmp_path / "drafters")
    toy = dataclasses.replace(target, path=hf.TOY_TARGET_DIR)
    for kind in ("eagle3", "specblock"):
        with pytest.raises(FileNotFoundError, match=f"no {kind} drafter is shipped at .*drafters/{kind}: train one"):
            load_drafter(kind, toy)
    with pytest.raises(FileNotFoundError, match="is not a trained drafter directory: .*drafter.json does not exist"):
        load_drafter(str(tmp_path), target)
    with pytest.raises(ValueError, match="NgramMethod budget must be an integer >= 1, got 0"):
        NgramMethod(budget=0)


@pytest.mark.parametrize("kind", ["eagle3", "specblock"])
def test_trained_drafters_are_lossless_and_accept_something(kind):
    """The drafters trained for the toy target (its shipped ones), on its held-out prompts of both
    domains, batch 3: greedy identical to plain decoding, and tau > 1.2, so a drafter whose drafts the
    verifier rejected would fail (losslessness alone holds for any drafter)."""
    toy = hf.load_target(hf.TOY_TARGET_DIR)
    prompts = [row["prompt"] for domain in ("code", "prose")
               for row in map(json.loads, (hf.TOY_TARGET_DIR / "prompts" / f"{domain}.jsonl").read_text().splitlines()[:2])][:3]
    plain = decode.generate(toy, prompts, max_new_tokens=48)
    spec = decode.generate(toy, prompts, max_new_tokens=48, drafter=kind)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["tau"] > 1.2, spec.stats["tau"]
