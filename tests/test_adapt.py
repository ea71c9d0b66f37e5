"""Adaptation (`adapt`): the bandit on synthetic reward streams (declines what cannot pay, takes large
gains, stops when gains vanish, explores again after a shift); the feedback buffer (fixed size, the
newest records, the target's tokens as labels); an update lowers the drafter's loss on the buffer;
decoding with adaptation stays identical to plain greedy decoding, batch > 1 included."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specblock_jax import adapt, decode
from specblock_jax.config import ConfigError, ModelConfig
from specblock_jax.drafter import Drafter
from specblock_jax.models import eagle3
from specblock_jax.models import specblock as sb
from specblock_jax.ngram import NgramMethod
from specblock_jax.specblock_draft import SpecBlockMethod, drafter_params

TARGET = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, max_position_embeddings=256)
CONFIG = sb.SpecBlockConfig.for_target(TARGET, rank_hidden=8)
PROMPTS = [[5, 9, 2], [7, 1, 33, 60, 12, 8, 41], [17, 3, 22, 50, 9, 14, 1, 6, 30, 11], [40, 2, 8, 8, 19]]
N_NEW, MAX_LEN = 24, 64


@pytest.fixture(scope="module")
def target(peaked_target):
    return peaked_target(TARGET)


@pytest.fixture(scope="module")
def drafter(target):
    params = sb.init_params(CONFIG, jax.random.key(3))
    params = {n: (p if n.startswith("shift") else jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, p))
              for n, p in params.items()}
    return Drafter(SpecBlockMethod(CONFIG, budget=8, max_blocks=1, widths=(1, 2, 2, 1), slot0_width=2),
                   drafter_params(params, target.params))


# ---------------------------------------------------------------------------------------------------
# The bandit, on synthetic streams.

def _bandit(update_s, **overrides):
    cfg = adapt.AdaptConfig(**{"min_records": 1, **overrides})
    return adapt.Bandit(cfg, max_depth=4, update_s=update_s)


def test_bandit_declines_an_update_that_no_plausible_gain_pays_for():
    """Even with no evidence (the optimistic gain is every remaining depth accepted), an update that
    costs more than the whole horizon could save is declined."""
    bandit = _bandit(update_s=60.0, horizon_tokens=4096)
    bandit.observe_window(tau=2.0, step_s=0.01)  # the horizon takes 20 s in all
    decision = bandit.decide(records=1000)
    assert not decision.update and decision.gain == pytest.approx(3.0) and decision.saving_s < 60.0


def test_bandit_prices_a_gain_over_what_is_left_of_the_horizon():
    """The same evidence pays for an update early in the horizon and not once the tokens served have
    used up most of it."""
    early, late = _bandit(update_s=0.05, horizon_tokens=4096), _bandit(update_s=0.05, horizon_tokens=4096)
    for bandit, served in ((early, 128), (late, 4000)):
        bandit.observe_window(tau=2.0, step_s=0.01, tokens=served)
        bandit.observe_gain(0.01, 0.0)  # optimistically 0.03 tokens per step
    assert early.decide(records=100).update and not late.decide(records=100).update
    assert late.decide(records=100).saving_s == pytest.approx(early.decide(records=100).saving_s * 96 / 3968)


def test_bandit_waits_for_fresh_records():
    bandit = _bandit(update_s=0.001, min_records=50)
    bandit.observe_window(tau=2.0, step_s=0.01)
    assert not bandit.decide(records=49).update
    assert bandit.decide(records=50).update


def _stream(bandit, gain_of_update, tau_of_window, windows, rng):
    """Simulate serving: each window reports its tau; an update reports its measured gain (with noise
    of standard error 0.02). Returns the windows in which the bandit updated."""
    updates = []
    for w in range(windows):
        bandit.observe_window(tau=tau_of_window(w), step_s=0.01)
        if bandit.decide(records=100).update:
            updates.append(w)
            bandit.observe_gain(gain_of_update(w, len(updates)) + rng.normal(0, 0.02), 0.02)
    return updates


def test_bandit_updates_while_gains_are_large_and_stops_when_they_vanish():
    """Gains 0.6, 0.3, 0.15, ... (diminishing returns) against an update costing 0.2 s: the first
    updates pay and are taken back to back; once gains are small the bandit stops."""
    rng = np.random.default_rng(0)
    bandit = _bandit(update_s=0.2, horizon_tokens=4096)
    updates = _stream(bandit, lambda w, n: 0.6 * 0.5 ** (n - 1), lambda w: 2.0, 60, rng)
    assert updates[:3] == [0, 1, 2]
    assert len(updates) <= 15 and len([w for w in updates if w >= 15]) <= 2  # then rare re-exploration


def test_bandit_never_takes_updates_that_measure_no_gain_for_long():
    """A stream where updates never help: after the one optimistic try, updates are rare (slow
    re-exploration, about one in 30 windows). This holds where the smallest gain that pays (here 0.04
    tokens per step over a 2048-token horizon) lies above the measurement noise (0.02): below it, no
    number of discounted measurements rules a paying gain out, and the bandit keeps trying."""
    rng = np.random.default_rng(1)
    bandit = _bandit(update_s=0.2, horizon_tokens=2048)
    updates = _stream(bandit, lambda w, n: 0.0, lambda w: 2.0, 100, rng)
    assert updates[0] == 0 and len(updates) <= 5 and all(b - a >= 15 for a, b in zip(updates, updates[1:]))


def test_bandit_explores_again_after_a_shift():
    """Updates stop on a stable stream; when the accepted length halves (a new domain, as the embedded
    prose drafter meets code) the gain statistics are forgotten and the bandit updates again within a
    few windows."""
    rng = np.random.default_rng(2)
    bandit = _bandit(update_s=0.2)
    shift_at = 40
    updates = _stream(bandit, lambda w, n: 0.5 if w >= shift_at and n <= 4 else 0.0,
                      lambda w: 2.4 if w < shift_at else 1.2, 60, rng)
    assert len([w for w in updates if 5 <= w < shift_at]) <= 1  # settled before the shift
    assert bandit.shifts >= 1
    assert any(shift_at <= w <= shift_at + 4 for w in updates)  # detected within a few windows


def test_a_fall_in_the_drafts_accepted_is_a_shift_though_tau_falls_less():
    """SmolLM2's prose drafter meeting math: tau 1.6 -> 1.3 falls by 19 %, less than `drift`, but the drafts
    accepted per step (tau less the bonus token) halve. That is a shift, seen within a few windows; the
    stream's own noise (a spread of 0.1 per window) is none."""
    rng = np.random.default_rng(3)
    bandit = _bandit(update_s=0.2)
    for _ in range(60):
        bandit.observe_window(tau=1.6 + rng.normal(0, 0.1), step_s=0.01)
    assert bandit.shifts == 0
    seen = []
    for w in range(8):
        bandit.observe_window(tau=1.3 + rng.normal(0, 0.1), step_s=0.01)
        seen.append(bandit.shifts)
    assert seen[-1] >= 1 and seen.index(1) <= 5, seen


def test_bandit_stops_when_the_updates_together_return_too_little():
    """Per-update measurements too noisy to tell (zero mean, spread 0.25, so optimism alone keeps the
    plain bandit trying) while the heads serving gain only 0.02 tokens per step over the reference in
    all: that return, shared among the updates tried, soon prices them below their cost, and updates
    stop. Where the returns grow with the updates (a new domain being learnt) they keep going."""
    def serve(returns_of_tries, **overrides):
        rng = np.random.default_rng(3)
        bandit = _bandit(update_s=0.06, horizon_tokens=16384, **overrides)
        updates = []
        for w in range(200):
            bandit.observe_window(tau=2.7, step_s=0.0065)
            if bandit.decide(records=100).update:
                updates.append(w)
                bandit.observe_gain(rng.normal(0, 0.25), 0.25)
                bandit.observe_returns(returns_of_tries(bandit.tries) + rng.normal(0, 0.03), 0.03)
        return updates

    flat, learning = serve(lambda n: 0.02), serve(lambda n: 0.01 * n)
    assert len(flat) <= 25 and len([w for w in flat if w >= 100]) <= 5  # rare re-exploration
    assert len(serve(lambda n: 0.02, returns_after=10**6)) >= 3 * len(flat)  # uncapped: optimism keeps trying
    assert len(learning) >= 3 * len(flat) and len([w for w in learning if w >= 100]) >= 20


def test_bandit_probes_the_return_so_one_unlucky_measurement_cannot_stall_it():
    """Updates returning 0.01 tokens per step each (a new domain being learnt), but the return measured
    after 20 updates reads -0.6: the cap closes. Without probes it stays shut until the idle discount
    lets it go; probing the return every 4 windows while the cap alone declines reopens it at once."""
    def serve(probe_every):
        rng = np.random.default_rng(4)
        bandit = _bandit(update_s=0.06, horizon_tokens=16384, probe_every=probe_every)
        updates, probes, unlucky = [], [], None
        for w in range(150):
            bandit.observe_window(tau=1.3, step_s=0.005)
            decision = bandit.decide(records=100)
            if decision.update:
                updates.append(w)
                if bandit.tries == 20:
                    bandit.observe_returns(-0.6, 0.03)
                    unlucky = w
                elif bandit.tries:  # as the Adapter: the serving heads' return, before this update counts
                    bandit.observe_returns(0.01 * bandit.tries + rng.normal(0, 0.03), 0.03)
                bandit.observe_gain(rng.normal(0, 0.25), 0.25)
            elif decision.probe:
                probes.append(w)
                bandit.observe_returns(0.01 * bandit.tries + rng.normal(0, 0.03), 0.03)
        return updates, probes, unlucky

    stalled, _, unlucky = serve(probe_every=10**6)
    assert unlucky is not None and not [w for w in stalled if unlucky < w <= unlucky + 60]
    probed, probes, unlucky = serve(probe_every=4)
    assert [w for w in probed if unlucky < w <= unlucky + 6]
    assert probes and all(b - a >= 4 for a, b in zip(probes, probes[1:]))
    assert len(probed) >= len(stalled) + 30


def test_bandit_reverts_only_when_the_serving_heads_return_less_beyond_noise():
    """A return of -0.3 +- 0.05 (an update that hurt) reverts: tries and the return start again, the
    gains stay. One of -0.04 +- 0.05, or one that earlier good measurements outweigh, does not."""
    bandit = _bandit(update_s=0.1)
    for _ in range(3):
        bandit.observe_gain(0.01, 0.02)
    bandit.observe_returns(-0.04, 0.05)
    assert not bandit.revert()
    bandit.observe_returns(-0.3, 0.05)
    assert bandit.revert() and bandit.reverts == 1
    assert (bandit.tries, bandit.returns.weight) == (0, 0.0) and bandit.gains.weight > 0
    for value in (0.4, 0.4, -0.3):
        bandit.observe_returns(value, 0.05)
    assert not bandit.revert()


def test_bandit_prices_the_step_cost_that_grows_with_the_accepted_length():
    """Windows whose seconds per step grow with tau (as measured on this CPU): the fitted slope is the
    true one, and a gain in tau saves less than at a flat step cost."""
    flat, growing = _bandit(update_s=0.06), _bandit(update_s=0.06)
    for tau in np.linspace(1.5, 4.0, 30):
        flat.observe_window(tau=tau, step_s=0.006)
        growing.observe_window(tau=tau, step_s=0.004 + 0.0007 * tau)
    assert flat.cost_slope() == 0.0
    assert growing.cost_slope() == pytest.approx(0.0007, rel=1e-6)
    for bandit in (flat, growing):
        bandit.step_s, bandit.tau = 0.006, 2.5  # the same operating point
        bandit.observe_gain(0.1, 0.0)
    assert 0.0 < growing.decide(records=100).saving_s < 0.8 * flat.decide(records=100).saving_s


def test_adapt_config_is_strict():
    with pytest.raises(ConfigError, match="params"):
        adapt.AdaptConfig(params="last_layer")
    with pytest.raises(ConfigError, match="buffer_size"):
        adapt.AdaptConfig(buffer_size=0)
    with pytest.raises(ConfigError, match="discount"):
        adapt.AdaptConfig(discount=1.5)
    with pytest.raises(ConfigError, match="keep_stderrs"):
        adapt.AdaptConfig(keep_stderrs=-1.0)


# ---------------------------------------------------------------------------------------------------
# The feedback buffer and the update, on real decoding.

def _collect(target, drafter, prompts, size, window=0, feedback=None):
    feedback = adapt.empty_feedback(CONFIG, size, 4) if feedback is None else feedback
    return decode.generate(target, prompts, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False,
                           drafter=drafter, collect=adapt.collect,
                           feedback=feedback._replace(window=jnp.asarray(window, jnp.int32)))


def test_feedback_records_hold_the_targets_tokens_and_never_outgrow_the_buffer(target, drafter):
    out = _collect(target, drafter, PROMPTS[:1], size=256)
    fb = out.feedback
    steps = out.stats["iterations"]
    assert int(fb.written) == steps  # one record per step of the single row
    valid = np.asarray(fb.valid_CxK)[:steps]
    labels = np.asarray(fb.labels_CxK)[:steps]
    # A step that emitted n tokens reached min(n, K) slot positions; valid slots form a prefix.
    steps_by_tokens = np.asarray(out.stats["steps_by_tokens"][0])
    assert valid.sum() == sum(count * min(n, CONFIG.block_size) for n, count in enumerate(steps_by_tokens))
    assert valid[:, 0].all() and (np.diff(valid.astype(int), axis=1) <= 0).all()
    # Greedy: the target's top token at a slot's position is the token it emitted there.
    top1 = np.asarray(fb.teacher_ids_CxKxT)[:steps, :, 0]
    np.testing.assert_array_equal(top1[valid], labels[valid])
    probs = np.asarray(fb.teacher_probs_CxKxT)[:steps]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # Slot-0 labels are the first token each step emitted: the generated tokens, in order, at the
    # steps' starts.
    emitted = np.asarray(out.token_ids[0])
    assert labels[0, 0] == emitted[1]
    assert set(np.asarray(fb.window_C)[:steps]) == {0} and (np.asarray(fb.window_C)[steps:] == -1).all()

    # A buffer of 8 records after two calls: the shapes never change, the count goes on, and the ring
    # holds the newest records (the last 8 of the second call, window 1).
    small = _collect(target, drafter, PROMPTS[:1], size=8).feedback
    again = _collect(target, drafter, PROMPTS[1:2], size=8, window=1, feedback=small)
    fb2 = again.feedback
    assert jax.tree.map(jnp.shape, fb2) == jax.tree.map(jnp.shape, adapt.empty_feedback(CONFIG, 8, 4))
    assert int(fb2.written) == steps + again.stats["iterations"]
    assert (np.asarray(fb2.window_C) == 1).all()
    full = _collect(target, drafter, PROMPTS[1:2], size=256, window=1).feedback
    n = again.stats["iterations"]
    order = (int(fb2.written) - n + np.arange(n - 8, n)) % 8  # ring slots of the last 8 records
    np.testing.assert_array_equal(np.asarray(fb2.labels_CxK)[order], np.asarray(full.labels_CxK)[n - 8:n])
    np.testing.assert_allclose(np.asarray(fb2.hidden_CxKxH)[order], np.asarray(full.hidden_CxKxH)[n - 8:n],
                               rtol=1e-5, atol=1e-5)


def test_buffered_hiddens_replay_the_drafters_logits(target, drafter):
    """The first record's hiddens are the first draft's block-1 slots, and the heads over them give
    the candidates the drafter proposed: slot k's top-W tokens."""
    fb = _collect(target, drafter, PROMPTS[:1], size=64).feedback
    method = drafter.method
    request, shapes = decode.prepare(TARGET, [PROMPTS[0]], max_new_tokens=N_NEW, sampling=decode.SamplingParams(0.0),
                                     max_len=MAX_LEN)
    state = decode.spec_init(target.params, TARGET, drafter.params, request, method=method, eos_ids=(), **shapes)
    tree, drafted_state = method.candidates(drafter.params, state.drafter_state, state.root_B, state.cache.lengths)
    np.testing.assert_allclose(np.asarray(drafted_state.query_hidden_BxKxH[0]), np.asarray(fb.hidden_CxKxH[0]),
                               rtol=1e-5, atol=1e-5)
    logits, rank = sb.heads(drafter.params["drafter"], CONFIG, fb.hidden_CxKxH[0])
    assert logits.shape == (CONFIG.block_size, CONFIG.vocab_size) and rank.shape[-1] == CONFIG.rank_classes
    w = method.width
    proposed_KxW = np.asarray(tree.tokens[0, 1:1 + CONFIG.block_size * w]).reshape(CONFIG.block_size, w)
    np.testing.assert_array_equal(proposed_KxW, np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :w])


def test_sampled_slots_are_valid_slots_of_older_records_weighted_by_position(target, drafter):
    """Draws land only on valid slots of the records not held out, slot k about as often as its share of
    decay**k; a buffer with nothing valid gives draws marked invalid, which train nothing."""
    fb = _collect(target, drafter, PROMPTS, size=128).feedback
    n, held_out, decay = min(int(fb.written), 128), 6, 0.5
    # Every slot valid, so the draw frequencies show the weights alone.
    full = fb._replace(valid_CxK=jnp.ones_like(fb.valid_CxK) & (fb.window_C >= 0)[:, None])
    slots = adapt.sample_slots(full, jax.random.key(0), jnp.int32(held_out), fb.written, 20000, decay)
    hidden_MxH = np.asarray(slots.hidden_CxKxH[:, 0])
    newest = (int(fb.written) - 1 - np.arange(held_out)) % 128
    slot_of = {tuple(np.asarray(full.hidden_CxKxH[c, k]).round(5)): (c, k) for c in range(n) for k in range(4)}
    drawn = [slot_of[tuple(h.round(5))] for h in hidden_MxH[:2000]]
    assert not any(c in set(newest.tolist()) for c, _ in drawn)  # held-out records are never drawn
    counts_K = np.bincount([k for _, k in drawn], minlength=4)
    expected_K = 2000 * decay ** np.arange(4) / np.sum(decay ** np.arange(4))
    assert np.all(np.abs(counts_K - expected_K) < 4 * np.sqrt(expected_K)), (counts_K, expected_K)
    # Real validity: only slots the target reached are drawn.
    slots = adapt.sample_slots(fb, jax.random.key(1), jnp.int32(0), fb.written, 512, decay)
    valid = {slot_of[tuple(np.asarray(h).round(5))] for h in np.asarray(slots.hidden_CxKxH[:, 0])}
    assert all(bool(fb.valid_CxK[c, k]) for c, k in valid) and bool(jnp.all(slots.valid_CxK))
    # Nothing valid: invalid draws, a zero loss and no gradient.
    none = adapt.sample_slots(fb._replace(valid_CxK=jnp.zeros_like(fb.valid_CxK)), jax.random.key(2), jnp.int32(0),
                              fb.written, 64, decay)
    assert not bool(jnp.any(none.valid_CxK))
    base = drafter.params["drafter"]
    trainable = adapt.init_trainable(adapt.AdaptConfig(params="head"), CONFIG, base, jax.random.key(0))
    grads = jax.grad(adapt.feedback_loss)(trainable, base, none, CONFIG)
    assert float(adapt.feedback_loss(trainable, base, none, CONFIG)) == 0.0
    assert not np.any(np.asarray(grads["lm_head"]["kernel"]))


def test_an_update_lowers_the_drafters_loss_on_the_buffer(target, drafter):
    fb = _collect(target, drafter, PROMPTS, size=128).feedback
    base = drafter.params["drafter"]
    for params in adapt.PARAM_SETS:
        cfg = adapt.AdaptConfig(params=params, steps=30, batch_slots=32, learning_rate=0.15)
        trainable = adapt.init_trainable(cfg, CONFIG, base, jax.random.key(0))
        assert float(adapt.feedback_loss(trainable, base, fb, CONFIG)) == pytest.approx(
            float(adapt.feedback_loss(adapt.init_trainable(
                dataclasses.replace(cfg, params="head"), CONFIG, base, jax.random.key(0)), base, fb, CONFIG)),
            rel=1e-5)  # a fresh adapter changes nothing
        before = float(adapt.feedback_loss(trainable, base, fb, CONFIG))
        opt_state = adapt._optimizer(cfg, base).init(trainable)
        trainable, _, _ = adapt.update(trainable, opt_state, base, fb, jax.random.key(1), jnp.int32(0), fb.written,
                                       cfg=cfg, config=CONFIG)
        after = float(adapt.feedback_loss(trainable, base, fb, CONFIG))
        assert after < 0.8 * before, (params, before, after)


# ---------------------------------------------------------------------------------------------------
# Serving with adaptation stays lossless.

def test_adaptive_decoding_is_identical_to_plain_greedy_decoding(target, drafter, monkeypatch):
    """The bandit is told any gain pays, so every window after the first trains and measures an update;
    between calls the heads are also pushed at random (an update kept whatever it measured), so the
    drafter surely changes. With batch 1 and batch 3, every output equals plain decoding's."""
    # Step costs fitted from a toy target's timings are noise: a fitted slope at its cap (a token as
    # dear as a step) would price every gain at zero and skip an update by chance.
    monkeypatch.setattr(adapt.Bandit, "cost_slope", lambda self: 0.0)
    cfg = adapt.AdaptConfig(min_records=1, horizon_tokens=10 ** 9, ucb_beta=100.0, learning_rate=0.65,
                            buffer_size=128, batch_records=16)
    adapter = adapt.Adapter(target, drafter, cfg)
    plain = decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False).token_ids
    calls = [[0], [1, 2, 3], [2], [0, 3, 1]]
    row_steps = 0
    for i, rows in enumerate(calls):
        out = adapter.generate([PROMPTS[r] for r in rows], max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False)
        assert out.token_ids == [plain[r] for r in rows]
        row_steps += int(np.sum(out.stats["steps_by_tokens"]))
        adapter.trainable = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(i), x.shape), adapter.trainable)
    history = adapter.history
    assert [h["window"] for h in history] == list(range(len(calls)))
    assert [h["updated"] for h in history] == [False, True, True, True]  # window 0 has nothing older to train on
    assert all(h["kept"] == (h["measured_gain"] > 0 and not h["reverted"]) for h in history[1:])
    merged = adapter.drafter.params["drafter"]["lm_head"]["kernel"]
    assert not np.allclose(merged, drafter.params["drafter"]["lm_head"]["kernel"])
    assert int(adapter.feedback.written) == row_steps  # a record per step of every row, batch > 1 included


@pytest.mark.parametrize("keep_stderrs, kept", [(0.0, True), (2.0, True), (3.0, False)])
def test_an_update_is_kept_only_when_its_gain_beats_keep_stderrs_standard_errors(target, drafter, monkeypatch,
                                                                                  keep_stderrs, kept):
    """Every update measures +0.05 tokens a step with a standard error of 0.02: kept below 2.5 errors."""
    monkeypatch.setattr(adapt.Bandit, "cost_slope", lambda self: 0.0)
    measured, unchanged = adapt.Paired(0.05, 0.02), adapt.Paired(0.0, 0.0)
    monkeypatch.setattr(adapt.Adapter, "_update",
                        lambda self, held_out: (self.trainable, self.opt_state, 0.0, measured, unchanged))
    cfg = adapt.AdaptConfig(min_records=1, horizon_tokens=10 ** 9, buffer_size=128, batch_records=16,
                            keep_stderrs=keep_stderrs)
    adapter = adapt.Adapter(target, drafter, cfg)
    for rows in ([0], [1]):
        adapter.generate([PROMPTS[r] for r in rows], max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False)
    last = adapter.history[-1]
    assert last["updated"] and last["measured_gain"] == 0.05 and last["kept"] is kept


def test_heads_that_serve_worse_than_the_reference_are_reverted(target, drafter, monkeypatch):
    """Heads scrambled after a kept update accept less than the loaded ones (a drafter that first learnt
    this stream, so there is depth to lose): the next update measures their return, the reference heads
    serve again (and that update is dropped), and output stays exact."""
    monkeypatch.setattr(adapt.Bandit, "cost_slope", lambda self: 0.0)
    cfg = adapt.AdaptConfig(min_records=1, horizon_tokens=10 ** 9, buffer_size=256, batch_records=96)
    learner = adapt.Adapter(target, drafter, cfg)
    for _ in range(4):
        learner.generate(PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False)
    adapter = adapt.Adapter(target, learner.drafter, cfg)
    plain = decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False).token_ids
    for i in range(3):
        out = adapter.generate(PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False)
        assert out.token_ids == plain
        if i == 1:
            assert adapter.bandit.tries == 1 and not adapter.history[-1]["reverted"]
            adapter.trainable = jax.tree.map(lambda x: x + 10 * jax.random.normal(jax.random.key(i), x.shape),
                                             adapter.trainable)
    last = adapter.history[-1]
    assert last["updated"] and last["reverted"] and not last["kept"] and adapter.bandit.reverts == 1
    jax.tree.map(np.testing.assert_array_equal, adapter.trainable, adapter.reference)


def test_an_update_trains_neither_on_its_validation_records_nor_on_those_before_a_shift(target, drafter):
    """With the newest records held out and only the newest `recent` trained on (those since the last
    shift), the update's gradient sees neither the held-out records nor the older ones: training on a
    buffer whose records of both kinds are replaced by junk gives the same parameters."""
    fb = _collect(target, drafter, PROMPTS[:2], size=128).feedback
    n, held = int(fb.written), min(int(fb.written), 128)  # written, and still held by the ring
    held_out, before_shift = 10, 8
    newest = (n - 1 - np.arange(held_out)) % 128
    oldest = (n - 1 - np.arange(held - before_shift, held)) % 128
    junked = np.concatenate([newest, oldest])
    junk = fb._replace(hidden_CxKxH=fb.hidden_CxKxH.at[junked].set(7.0), labels_CxK=fb.labels_CxK.at[junked].set(1))
    cfg = adapt.AdaptConfig(steps=3, batch_slots=16)
    base = drafter.params["drafter"]
    trainable = adapt.init_trainable(cfg, CONFIG, base, jax.random.key(0))
    opt_state = adapt._optimizer(cfg, base).init(trainable)

    def updated(f, out, recent):
        return adapt.update(trainable, opt_state, base, f, jax.random.key(1), jnp.int32(out), jnp.int32(recent),
                            cfg=cfg, config=CONFIG)[0]

    runs = [updated(f, held_out, held - before_shift) for f in (fb, junk)]
    jax.tree.map(np.testing.assert_array_equal, *runs)
    for out, recent in ((0, held - before_shift), (held_out, held)):  # either kind of junk, once trained on, shows
        changed = updated(junk, out, recent)
        assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(changed), jax.tree.leaves(runs[0])))


def test_gains_count_block_ones_accepted_depth_not_the_greedy_chain_alone(drafter):
    """Block 1 accepts the greedy chain plus a slot's alternative (width 2 here) at the first miss: heads
    that rank the target's token first at slots 0-1 and third at slot 2 accept as deep (2) as heads that
    rank it first at slot 0 and second at slot 1, though their greedy chains are 2 and 1; heads that
    rank it third at slot 1 accept 1."""
    method = SpecBlockMethod(CONFIG, budget=8, max_blocks=1, widths=(2, 2, 2, 2), slot0_width=2)
    k, h, v = CONFIG.block_size, CONFIG.hidden_size, CONFIG.vocab_size
    labels = 10 + np.arange(k)

    def heads(ranks):  # slot j's hidden is the j-th unit vector; its logits are row j of the kernel
        kernel = np.zeros((h, v), np.float32)
        for j, rank in enumerate(ranks):
            kernel[j, labels[j]] = 3.0 - rank
            kernel[j, 40:40 + rank] = 5.0  # `rank` tokens above the target's
        base = drafter.params["drafter"]
        return {**base, "lm_head": {**base["lm_head"], "kernel": jnp.asarray(kernel)}}

    fb = adapt.empty_feedback(CONFIG, 1, 4)
    fb = fb._replace(hidden_CxKxH=jnp.eye(k, h)[None], labels_CxK=jnp.asarray(labels, jnp.int32)[None],
                     valid_CxK=jnp.ones((1, k), bool), window_C=jnp.zeros((1,), jnp.int32), written=jnp.int32(1))
    swapped, greedy, worse = heads([0, 1, 0, 0]), heads([0, 0, 2, 0]), heads([0, 2, 0, 0])
    same, fewer = adapt.depth_gains({}, swapped, (greedy, worse), fb, jnp.int32(0), method=method, records=1)
    assert float(same.mean) == 0.0 and float(fewer.mean) == -1.0


def test_gains_count_the_depth_a_heads_alternatives_take_from_the_chain_under_the_budget(drafter):
    """With a budget of 3 nodes, heads that give slot 0's alternative as much probability as its first
    token spend a node on it, and block 1 keeps only 2 chain slots; heads whose alternatives are unlikely
    keep 3. Same greedy chain, same ranks of the target's tokens: only the pruning tells them apart."""
    method = SpecBlockMethod(CONFIG, budget=3, max_blocks=1, widths=(2, 2, 2, 2), slot0_width=2)
    k, h, v = CONFIG.block_size, CONFIG.hidden_size, CONFIG.vocab_size
    labels = 10 + np.arange(k)

    def heads(tied_alternative):  # slot j's hidden is the j-th unit vector; its logits are row j of the kernel
        kernel = np.zeros((h, v), np.float32)
        kernel[np.arange(k), labels] = 10.0  # every slot's first token is the target's, near-certain
        if tied_alternative:
            kernel[0, 40] = 10.0  # ties with slot 0's first token (a higher id: ranked second)
        base = drafter.params["drafter"]
        return {**base, "lm_head": {**base["lm_head"], "kernel": jnp.asarray(kernel)}}

    fb = adapt.empty_feedback(CONFIG, 1, 4)
    fb = fb._replace(hidden_CxKxH=jnp.eye(k, h)[None], labels_CxK=jnp.asarray(labels, jnp.int32)[None],
                     valid_CxK=jnp.ones((1, k), bool), window_C=jnp.zeros((1,), jnp.int32), written=jnp.int32(1))
    confident, spread = heads(False), heads(True)
    (shallower,) = adapt.depth_gains({}, confident, (spread,), fb, jnp.int32(0), method=method, records=1)
    assert float(shallower.mean) == -1.0
    wide = SpecBlockMethod(CONFIG, budget=8, max_blocks=1, widths=(2, 2, 2, 2), slot0_width=2)
    (same,) = adapt.depth_gains({}, confident, (spread,), fb, jnp.int32(0), method=wide, records=1)
    assert float(same.mean) == 0.0  # room for every node: the alternative costs the chain nothing


def test_adapter_needs_a_specblock_drafter(target, drafter):
    with pytest.raises(ValueError, match="SpecBlock"):
        adapt.Adapter(target, Drafter(NgramMethod()))
    with pytest.raises(ValueError, match="AdaptConfig"):
        adapt.Adapter(target, drafter, {"params": "head"})


@pytest.fixture(scope="module")
def reduced(target):
    """A drafter over 32 of the 64 ids: half of those plain greedy decoding emits (the most frequent)
    and ids it never emits, so some labels lie outside the draft vocabulary; and its target -> draft table."""
    plain = decode.generate(target, PROMPTS, max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False).token_ids
    counts = np.bincount(np.concatenate(plain), minlength=TARGET.vocab_size)
    emitted = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i]]
    unseen = [i for i in range(TARGET.vocab_size) if not counts[i]]
    d2t = np.sort(np.array((emitted[:len(emitted) // 2] + unseen)[:32], np.int32))
    config = dataclasses.replace(CONFIG, draft_vocab_size=32)
    params = sb.init_params(config, jax.random.key(3))
    params = {n: (p if n.startswith("shift") else jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, p))
              for n, p in params.items()}
    drafter = Drafter(SpecBlockMethod(config, budget=8, max_blocks=1, widths=(1, 2, 2, 1), slot0_width=2),
                      drafter_params(params, target.params, d2t))
    return drafter, d2t, plain


def test_a_reduced_vocabulary_windows_records_become_draft_ids(target, reduced):
    """Labels map to draft ids (-1 outside the draft vocabulary; both occur); the teacher keeps the ids it
    covers, renormalised, and is empty where the target's top token is outside."""
    drafter, d2t, _ = reduced
    window = _collect(target, drafter, PROMPTS[:2], size=128).feedback
    n = int(window.written)
    mapped = adapt.to_draft_ids(window, eagle3.target_to_draft(d2t, TARGET.vocab_size))
    labels, drafted = np.asarray(window.labels_CxK)[:n], np.asarray(mapped.labels_CxK)[:n]
    valid = np.asarray(window.valid_CxK)[:n]
    inside = np.isin(labels, d2t)
    assert (inside & valid).any() and (~inside & valid).any()
    np.testing.assert_array_equal(d2t[drafted[inside]], labels[inside])
    assert (drafted[~inside] == -1).all()
    ids, probs = np.asarray(window.teacher_ids_CxKxT)[:n], np.asarray(window.teacher_probs_CxKxT)[:n]
    new_ids, new_probs = np.asarray(mapped.teacher_ids_CxKxT)[:n], np.asarray(mapped.teacher_probs_CxKxT)[:n]
    covered = np.isin(ids, d2t)
    top_inside = covered[..., 0]
    assert top_inside.any() and (~top_inside).any()
    np.testing.assert_allclose(new_probs.sum(-1), top_inside.astype(np.float32), rtol=1e-5, atol=1e-6)
    expected = np.where(covered & top_inside[..., None], probs, 0.0)
    expected /= np.maximum(expected.sum(-1, keepdims=True), 1e-30)
    np.testing.assert_allclose(new_probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(d2t[new_ids][covered], ids[covered])


def test_a_reduced_vocabulary_drafter_learns_from_the_buffer_and_adapts_losslessly(target, reduced, monkeypatch):
    """Updates of the head and of a LoRA adapter over the draft vocabulary lower the loss on the
    (draft-id) buffer; served with forced updates, the adapter's output equals plain greedy decoding."""
    drafter, d2t, plain = reduced
    config = drafter.method.config
    window = _collect(target, drafter, PROMPTS, size=128).feedback
    fb = adapt.to_draft_ids(window, eagle3.target_to_draft(d2t, TARGET.vocab_size))
    base = drafter.params["drafter"]
    for params in adapt.PARAM_SETS:
        cfg = adapt.AdaptConfig(params=params, steps=30, batch_slots=32, learning_rate=0.15)
        trainable = adapt.init_trainable(cfg, config, base, jax.random.key(0))
        if params == "lora":
            assert trainable["lora_b"].shape == (cfg.lora_rank, 32)
        before = float(adapt.feedback_loss(trainable, base, fb, config))
        opt_state = adapt._optimizer(cfg, base).init(trainable)
        trainable, _, _ = adapt.update(trainable, opt_state, base, fb, jax.random.key(1), jnp.int32(0), fb.written,
                                       cfg=cfg, config=config)
        assert float(adapt.feedback_loss(trainable, base, fb, config)) < 0.8 * before, params
    monkeypatch.setattr(adapt.Bandit, "cost_slope", lambda self: 0.0)
    cfg = adapt.AdaptConfig(min_records=1, horizon_tokens=10 ** 9, ucb_beta=100.0, learning_rate=0.65,
                            buffer_size=128, batch_records=16)
    adapter = adapt.Adapter(target, drafter, cfg)
    for i, rows in enumerate([[0, 1], [2, 3], [1, 0]]):
        out = adapter.generate([PROMPTS[r] for r in rows], max_new_tokens=N_NEW, max_len=MAX_LEN, stop_on_eos=False)
        assert out.token_ids == [plain[r] for r in rows]
        adapter.trainable = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(i), x.shape), adapter.trainable)
    assert [h["updated"] for h in adapter.history] == [False, True, True]
    labels = np.asarray(adapter.feedback.labels_CxK)[np.asarray(adapter.feedback.window_C) >= 0]
    assert labels.min() >= -1 and labels.max() < 32 and (labels == -1).any()  # the ring holds draft ids
