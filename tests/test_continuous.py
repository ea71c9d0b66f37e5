"""Continuous batching: greedy answers are `generate`'s, sampled answers depend only on their prompt and
key, and sampling keeps the target's distribution over consecutive tokens."""

import dataclasses

import jax
import numpy as np
import pytest
import scipy.stats

from specblock_jax import continuous, generate
from specblock_jax.config import ModelConfig
from specblock_jax.models.target import Target

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=256, eos_token_ids=(0,))
PROMPTS = [[5, 9, 2], list(range(1, 40)), [7], [3, 3, 3, 3, 3, 3], list(range(60, 0, -1)), [11, 12]]


def _answers(target, prompts, keys, **kwargs):
    answers = {}
    for i, ids in continuous.stream(target, prompts, keys, **kwargs):
        assert i not in answers
        answers[i] = ids
    assert sorted(answers) == list(range(len(prompts)))
    return [answers[i] for i in range(len(prompts))]


def _keys(seed, n):
    return [jax.random.fold_in(jax.random.key(seed), i) for i in range(n)]


def test_greedy_answers_are_generates_while_rows_stop_and_refill_at_different_steps(peaked_target):
    free = peaked_target(CONFIG)
    unstopped = generate(free, PROMPTS, max_new_tokens=16, stop_on_eos=False).token_ids
    # Stop on the token that ends the most answers early, so rows finish (and take new prompts) apart.
    firsts = [{t: ids.index(t) for t in reversed(ids[1:])} for ids in unstopped]
    eos = max(range(CONFIG.vocab_size), key=lambda t: sum(t in f for f in firsts))
    target = Target(dataclasses.replace(CONFIG, eos_token_ids=(eos,)), free.params)
    want = generate(target, PROMPTS, max_new_tokens=16).token_ids
    assert len({len(ids) for ids in want}) >= 3
    for rows in (2, 4):
        assert _answers(target, PROMPTS, _keys(0, len(PROMPTS)), max_new_tokens=16, rows=rows) == want


def test_a_sampled_answer_depends_on_its_prompt_and_key_only(peaked_target):
    target = peaked_target(CONFIG, scale=1.0)
    keys = _keys(1, len(PROMPTS))
    kwargs = dict(max_new_tokens=10, temperature=1.0, stop_on_eos=False)
    alone = _answers(target, PROMPTS, keys, rows=1, **kwargs)
    assert _answers(target, PROMPTS, keys, rows=3, **kwargs) == alone
    assert _answers(target, PROMPTS[::-1], keys[::-1], rows=4, **kwargs)[::-1] == alone
    assert _answers(target, PROMPTS, _keys(2, len(PROMPTS)), rows=3, **kwargs) != alone


def test_sampled_token_pairs_follow_the_targets_joint_distribution(peaked_target):
    """Chi-square of (first, second) new tokens over many keys against p(t0) p(t1 | t0): a key reused
    between steps, or one row's draw leaking into another's, would skew the joint."""
    config = dataclasses.replace(CONFIG, vocab_size=12)
    target = peaked_target(config, scale=2.0)
    prompt, n = [4, 7, 1], 2000
    pairs = _answers(target, [prompt] * n, _keys(3, n), max_new_tokens=2, temperature=1.0, stop_on_eos=False,
                     rows=250)
    v = config.vocab_size
    p0_V = jax.nn.softmax(target.logits([prompt])[0, -1])
    p1_VxV = jax.nn.softmax(target.logits([prompt + [t] for t in range(v)])[:, -1], axis=-1)
    expected = np.asarray(p0_V[:, None] * p1_VxV).ravel() * n
    counts = np.bincount([a * v + b for a, b in pairs], minlength=v * v)
    kept = expected >= 5
    chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    rest_expected, rest = expected[~kept].sum(), counts[~kept].sum()
    if rest_expected > 0:
        chi2 += (rest - rest_expected) ** 2 / rest_expected
    assert chi2 < scipy.stats.chi2.ppf(0.999, kept.sum() + (rest_expected > 0) - 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(keys=_keys(0, 1)), "1 keys for 2 prompts"),
    (dict(rows=0), "rows must be an integer >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_len=6), "exceeds max_len 6"),
])
def test_bad_arguments_are_refused_before_any_compute(peaked_target, kwargs, message):
    args = dict(keys=_keys(0, 2), max_new_tokens=4, rows=2) | kwargs
    with pytest.raises(ValueError, match=message):
        next(continuous.stream(peaked_target(CONFIG), [[1, 2, 3], [4]], args.pop("keys"), **args))
