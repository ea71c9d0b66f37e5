"""Cost-aware bandit adaptation: the SpecBlock drafter keeps learning from the verifier's free
feedback while it serves, and updates only when the expected throughput gain beats the update's cost.

Feedback (inside the jitted decode loop, no extra target forward). Slot k of block 1 proposes depth
k + 1; the verify forward already holds the target's distribution at the accepted path's node k, so
for k <= the accepted length (the accepted slots and the first rejected one; past it the draft was
conditioned on a wrong token) `collect` writes the slot's pre-norm hidden (the drafter's input to
its heads), the target's top-`teacher_topk` distribution there and the emitted token into a buffer
(`Feedback`, one record of K slots per running row and step, all rows). The loop fills one sized for
its call; `append` then writes it into the fixed-size ring buffer the updates draw from. For a drafter
with a reduced draft vocabulary, `to_draft_ids` first restricts the window's records to it, as the
drafter's training restricts its teacher: ids become draft ids (a label outside the draft vocabulary
becomes -1, which no head can propose), and the teacher is renormalised over the ids it covers.

Update. What is trained is the drafter's output side, chosen by `AdaptConfig.params`: a low-rank
adapter on the LM head (`lora`, merged into it for drafting, kept apart in training) or the LM head
itself (`head`), plus the rank head (`rank_head`). These read nothing but the buffered hiddens, so a
buffer replays the drafter's outputs exactly, and an update never invalidates the drafter's KV cache.
The loss is the drafter's own: soft cross-entropy to the target's distribution per slot with the
valid-prefix mask and position weights, plus the rank loss. An optimizer step draws `batch_slots`
valid slots rather than whole records, slot k with probability proportional to the position weight
w**k: under a shift most records hold a single valid slot of K, and the head's logits cost per slot.
Adam's step is relative to the LM head's scale (`_optimizer`). The adapter is the default because it
costs less and risks less: on SmolLM2-135M's drafter (a 576 x 16,384 head) an update of the adapter
costs 0.19 s against 0.52 for the head's (whose gradient and Adam step are dense [H, V] each step),
and a shifted stream's held-out records gained about as much from its first updates.

Validation. An update at the end of a window (an `Adapter.generate` call) trains on the records of
earlier windows only, and is measured on the window's own records, which it has not seen: the depth
block 1's tree would accept (its greedy chain, plus an alternative at the first miss; `depth_gains`)
under the new heads minus under the old ones, per record, gives the gain in accepted tokens per step
and its standard error. The records were drafted by the old heads, so the new heads' chains can be
cut short where the old drafts stopped: the estimate errs against the update. Only an update that
measures better (by more than `keep_stderrs` standard errors; 0 by default) is kept; any other is
discarded at once (the drafter never serves it): an update that changes nothing one window can see
may still cost the next ones (measured on SmolLM2: a kept update that measured 0.000 cost 0.1-0.5
tokens per step on the four windows after it). The window after a kept update also measures the
return (below), so harm that one window did not show is seen at the next.

Bandit. At the end of every window it chooses between two arms, update or not. Measured gains are
kept as discounted statistics (`discount` per measurement, `idle_discount` per window without one,
so an old verdict fades). The arm is chosen optimistically (discounted UCB): the gain estimate is
the mean plus `ucb_beta` spreads (between-update spread and measurement error together) over
sqrt(weight), and with no evidence the largest plausible gain (every remaining depth accepted). One
update's gain is small (a few thousandths of a token per step, in-domain or not) and one window
cannot resolve it; what the updates return together can be. So each update also measures the heads
serving (all kept updates so far) against the reference heads (those loaded, or serving at the last
shift) on its window, one those heads were not kept for (the heads an update keeps measure well on
its own window, by selection). Once `returns_after` updates were tried, that return (optimistic, as
above) divided by the updates tried caps the gain: updates that, together, return too little for
their cost stop. While the cap alone declines, a probe measures the return again every `probe_every`
windows, at a fifth of an update's cost, so one unlucky measurement cannot hold it shut. The gain
becomes time through measured costs: over what is left of the `horizon_tokens` the drafter serves
(the tokens served so far taken off), a row-step costs `step_s` at the accepted length tau, plus
`slope` seconds per further accepted token (fitted over the windows: on this CPU a step that accepts
more costs more), so the update saves left * (step_s / tau - (step_s + slope * gain) / (tau + gain))
seconds; it runs only when that beats the measured update time. Recent accepted drafts per step (tau
less the bonus token, EMA weight `tau_fast`) below the long-run ones (`tau_slow`) by the fraction
`drift` are read as a shift: the gain and return statistics are forgotten, so the bandit explores
again, and updates train only on records from the window that showed it on (the old domain's would
teach the old domain). The bonus token is left out because no drafter changes it: on SmolLM2, a
stream from prose to math took tau from 1.60 to 1.30, a fall of 19 % that is one of 50 % in what the
drafter adds. When the serving heads' return is negative even optimistically, the reference heads
serve again (`Bandit.revert`): a kept update that hurt (one window cannot always show it) is undone
rather than served for the rest of the stream. Updates touch only the drafter: decoding stays lossless.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specblock_jax import decode, losses, tree
from specblock_jax.config import ConfigError
from specblock_jax.drafter import Drafter
from specblock_jax.models import eagle3, layers, specblock
from specblock_jax.specblock_draft import SpecBlockMethod, block_scores
from specblock_jax.verify import Acceptance

PARAM_SETS = ("lora", "head")


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """What adapts, how it learns, and when the bandit lets it."""

    params: str = "lora"  # "lora": a rank-`lora_rank` adapter on the LM head; "head": the LM head itself
    lora_rank: int = 16
    rank_head: bool = False  # also train the rank head (rank loss), when the drafter has one
    buffer_size: int = 8192  # records kept (K slots each); the oldest are overwritten
    teacher_topk: int = 8  # target probabilities kept per slot (renormalised)
    learning_rate: float = 0.1  # Adam's step, as a fraction of the LM head's RMS weight (`_optimizer`)
    steps: int = 8  # optimizer steps per update
    batch_slots: int = 96  # valid slots per optimizer step (drawn from the buffer)
    batch_records: int = 64  # records per gain measurement (the newest)
    horizon_tokens: int = 16384  # the server's setting: tokens the drafter will serve; what is left prices a gain
    min_records: int = 64  # records of earlier windows an update needs to train on
    returns_after: int = 4  # updates tried before what they returned together may cap the gain
    probe_every: int = 8  # while the cap alone declines, windows between measurements of the return
    ucb_beta: float = 1.0  # optimism: spreads added to the mean measured gain
    keep_stderrs: float = 0.0  # an update is kept when its measured gain beats this many standard errors (0: > 0)
    gain_floor: float = 0.02  # the smallest spread assumed for a measured gain (tokens per step)
    discount: float = 0.5  # weight kept by older gain measurements at each new one
    idle_discount: float = 0.97  # weight kept per window without a measurement (slow re-exploration)
    drift: float = 0.3  # recent accepted drafts per step this fraction below the long-run ones mean a shift
    tau_fast: float = 0.3  # EMA weight of the newest window in the recent accepted drafts per step
    tau_slow: float = 0.05  # ... in the long-run one

    def __post_init__(self):
        if self.params not in PARAM_SETS:
            raise ConfigError(f"AdaptConfig params={self.params!r} is not one of {PARAM_SETS}")
        for name in ("lora_rank", "buffer_size", "teacher_topk", "steps", "batch_slots", "batch_records",
                     "horizon_tokens", "min_records", "returns_after", "probe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"AdaptConfig {name} must be an integer >= 1, got {value!r}")
        for name, low, high in (("learning_rate", "(0", math.inf), ("ucb_beta", "[0", math.inf),
                                ("keep_stderrs", "[0", math.inf),
                                ("gain_floor", "(0", math.inf), ("discount", "(0", 1), ("idle_discount", "(0", 1),
                                ("drift", "(0", 1), ("tau_fast", "(0", 1), ("tau_slow", "(0", 1)):
            value = getattr(self, name)
            above = value >= 0 if low == "[0" else value > 0
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (above and value <= high):
                raise ConfigError(f"AdaptConfig {name} must be a number in {low}, {high}], got {value!r}")


# ---------------------------------------------------------------------------------------------------
# Feedback: collected inside the decode loop.

class Feedback(NamedTuple):
    """A ring buffer of records: one per (running row, decode step), K slots each. Ids are target ids
    as collected; the Adapter's ring holds draft ids for a reduced-vocabulary drafter (`to_draft_ids`)."""

    hidden_CxKxH: jax.Array  # block-1 slot hiddens (pre-norm) the drafter computed
    teacher_ids_CxKxT: jax.Array  # int32 the target's top tokens at the slot's position
    teacher_probs_CxKxT: jax.Array  # float32, renormalised over them
    labels_CxK: jax.Array  # int32 the emitted token (the target's)
    valid_CxK: jax.Array  # bool: the slot's position was reached (slot k <= accepted length)
    window_C: jax.Array  # int32 the window each record was collected in; -1: never written
    written: jax.Array  # [] int32 records written so far; the next goes to written % C
    window: jax.Array  # [] int32 the window new records belong to


def take(feedback: Feedback, index_M: jax.Array) -> Feedback:
    """The records at ring positions `index_M`."""
    per_record = {name: value[index_M] for name, value in feedback._asdict().items() if name.endswith(
        ("_CxKxH", "_CxKxT", "_CxK", "_C"))}
    return feedback._replace(**per_record)


def empty_feedback(config: specblock.SpecBlockConfig, size: int, teacher_topk: int) -> Feedback:
    k, h = config.block_size, config.hidden_size
    return Feedback(hidden_CxKxH=jnp.zeros((size, k, h), jnp.dtype(config.dtype)),
                    teacher_ids_CxKxT=jnp.zeros((size, k, teacher_topk), jnp.int32),
                    teacher_probs_CxKxT=jnp.zeros((size, k, teacher_topk), jnp.float32),
                    labels_CxK=jnp.zeros((size, k), jnp.int32), valid_CxK=jnp.zeros((size, k), bool),
                    window_C=jnp.full((size,), -1, jnp.int32), written=jnp.zeros((), jnp.int32),
                    window=jnp.zeros((), jnp.int32))


def collect(feedback: Feedback, drafter_state: Any, acceptance: Acceptance, logits_BxN1xV: jax.Array,
            emitted_B: jax.Array, running_B: jax.Array) -> Feedback:
    """Fold one verified step into the buffer (the `collect` of `decode.spec_loop`): for each running row,
    its block-1 slots with the target's distribution at the accepted path's node k, valid for the
    slots whose position the emitted tokens reached."""
    hidden_BxKxH = drafter_state.query_hidden_BxKxH
    b, k = hidden_BxKxH.shape[:2]
    size, t = feedback.window_C.shape[0], feedback.teacher_ids_CxKxT.shape[-1]
    logits_BxKxV = jnp.take_along_axis(logits_BxN1xV, acceptance.path_BxD1[:, :k, None], axis=1)
    top_BxKxT, ids_BxKxT = layers.top_k(logits_BxKxV.astype(jnp.float32), t)
    valid_BxK = (jnp.arange(k) < emitted_B[:, None]) & running_B[:, None]
    keep_B = valid_BxK[:, 0]
    slot_B = jnp.where(keep_B, (feedback.written + jnp.cumsum(keep_B) - 1) % size, size)  # size: dropped

    def put(buffer, rows):
        return buffer.at[slot_B].set(rows.astype(buffer.dtype), mode="drop")

    return Feedback(hidden_CxKxH=put(feedback.hidden_CxKxH, hidden_BxKxH),
                    teacher_ids_CxKxT=put(feedback.teacher_ids_CxKxT, ids_BxKxT),
                    teacher_probs_CxKxT=put(feedback.teacher_probs_CxKxT, jax.nn.softmax(top_BxKxT, axis=-1)),
                    labels_CxK=put(feedback.labels_CxK, acceptance.tokens_BxD1[:, :k]),
                    valid_CxK=put(feedback.valid_CxK, valid_BxK),
                    window_C=put(feedback.window_C, jnp.broadcast_to(feedback.window, (b,))),
                    written=feedback.written + jnp.sum(keep_B, dtype=jnp.int32), window=feedback.window)


@functools.partial(jax.jit, donate_argnums=0)
def append(feedback: Feedback, window: Feedback) -> Feedback:
    """The ring buffer with a window's records (`window`, filled by `collect` from empty) written after
    its own, the newest kept when they outnumber it. Decoding collects into a buffer of one window's
    size: a loop carrying the whole ring costs it a copy of the ring per call and more per step."""
    size, m = feedback.window_C.shape[0], window.window_C.shape[0]
    index_M = jnp.arange(m)
    keep_M = (index_M < window.written) & (index_M >= window.written - size)
    slot_M = jnp.where(keep_M, (feedback.written + index_M) % size, size)  # size: dropped
    fields = {name: value.at[slot_M].set(getattr(window, name), mode="drop")
              for name, value in feedback._asdict().items() if name not in ("written", "window")}
    return Feedback(**fields, written=feedback.written + window.written, window=feedback.window)


def to_draft_ids(window: Feedback, target_to_draft_V: jax.Array) -> Feedback:
    """A window's records over a reduced draft vocabulary (`eagle3.target_to_draft`'s table): teacher ids
    and labels as draft ids (a label outside it: -1), the teacher renormalised over the ids it covers,
    and no teacher at all (zero probabilities: no loss) where the target's top token lies outside it,
    as the drafter's training drops those positions (`losses.topk_teacher`)."""
    ids_CxKxT = target_to_draft_V[window.teacher_ids_CxKxT]
    probs_CxKxT = jnp.where((ids_CxKxT >= 0) & (ids_CxKxT[..., :1] >= 0), window.teacher_probs_CxKxT, 0.0)
    probs_CxKxT = probs_CxKxT / jnp.maximum(jnp.sum(probs_CxKxT, axis=-1, keepdims=True), 1e-30)
    return window._replace(teacher_ids_CxKxT=jnp.maximum(ids_CxKxT, 0), teacher_probs_CxKxT=probs_CxKxT,
                           labels_CxK=target_to_draft_V[window.labels_CxK])


# ---------------------------------------------------------------------------------------------------
# The update: the drafter's heads trained on the buffer.

def init_trainable(cfg: AdaptConfig, config: specblock.SpecBlockConfig, base: Any, key: jax.Array) -> dict:
    """The adapted parameters: a fresh adapter (B = 0: the drafter is unchanged) or copies of the head's."""
    if cfg.params == "lora":
        h, r = config.hidden_size, cfg.lora_rank
        trainable = {"lora_a": jax.random.normal(key, (h, r), jnp.float32) / math.sqrt(h),
                     "lora_b": jnp.zeros((r, config.draft_vocab), jnp.float32)}
    else:
        trainable = {"lm_head": base["lm_head"]}
    if cfg.rank_head and config.rank_head:
        trainable.update(rank_in=base["rank_in"], rank_out=base["rank_out"])
    return trainable


def _dense(trainable: dict) -> dict:
    """The adapted parameters that replace the drafter's own (all but the adapter)."""
    return {k: v for k, v in trainable.items() if not k.startswith("lora_")}


def _lora(trainable: dict) -> tuple[jax.Array, jax.Array] | None:
    return (trainable["lora_a"], trainable["lora_b"]) if "lora_a" in trainable else None


def merge(base: Any, trainable: dict) -> Any:
    """The drafter's params with the adapted ones in place (the adapter folded into the LM head), for
    drafting; training keeps the adapter apart (`specblock.heads`' `lora`), as a gradient through the
    folded [H, V] kernel would cost a dense [H, V] product per step."""
    params = {**base, **_dense(trainable)}
    if (lora := _lora(trainable)) is not None:
        kernel = base["lm_head"]["kernel"]
        params["lm_head"] = {**base["lm_head"],
                             "kernel": (kernel.astype(jnp.float32) + lora[0] @ lora[1]).astype(kernel.dtype)}
    return params


def feedback_loss(trainable: dict, base: Any, feedback: Feedback, config: specblock.SpecBlockConfig) -> jax.Array:
    """The drafter's loss on records of K slots (the buffer) or of one (`sample_slots`): per-slot soft
    cross-entropy to the target's (top-T) distribution under the valid-prefix mask, weighted w**k, plus
    the rank loss when the rank head adapts. A slot without a teacher (zero probabilities:
    `to_draft_ids`) is left out of the cross-entropy."""
    logits_CxKxV, rank_logits_CxKxC = specblock.heads(merge(base, _dense(trainable)), config, feedback.hidden_CxKxH,
                                                      _lora(trainable))
    logp_CxKxV = jax.nn.log_softmax(logits_CxKxV, axis=-1)
    ce_CxK = -jnp.sum(feedback.teacher_probs_CxKxT * jnp.take_along_axis(logp_CxKxV, feedback.teacher_ids_CxKxT,
                                                                          axis=-1), axis=-1)
    hit_CxK = jnp.argmax(logits_CxKxV, axis=-1) == feedback.labels_CxK
    taught_CxK = jnp.sum(feedback.teacher_probs_CxKxT, axis=-1) > 0
    mask_CxK = (losses.valid_prefix_mask(hit_CxK, feedback.valid_CxK) if config.valid_prefix
                else feedback.valid_CxK.astype(jnp.float32)) * taught_CxK
    per_slot_K = jnp.sum(ce_CxK * mask_CxK, axis=0) / jnp.maximum(jnp.sum(mask_CxK, axis=0), 1.0)
    loss = jnp.sum(config.position_loss_weight ** jnp.arange(hit_CxK.shape[1]) * per_slot_K)
    if "rank_in" in trainable:  # a label outside the draft vocabulary (-1) ranks past every bound
        labels_CxK = jnp.where(feedback.labels_CxK >= 0, losses.rank_labels(
            jax.lax.stop_gradient(logits_CxKxV), jnp.maximum(feedback.labels_CxK, 0), config.rank_bounds),
            len(config.rank_bounds))
        loss = loss + config.rank_loss_weight * losses.rank_loss(rank_logits_CxKxC, labels_CxK, feedback.valid_CxK)
    return loss


def _optimizer(cfg: AdaptConfig, base: Any) -> optax.GradientTransformation:
    """Adam with a step relative to the drafter's LM head: Adam moves every weight by about its step
    size whatever the gradient (rows of tokens never seen included), so an absolute step that suits a
    head whose weights are 0.08 moves one whose weights are 0.03 by most of its norm in one update
    (measured on SmolLM2's one-domain drafter: 55 % at 3e-3)."""
    kernel = base["lm_head"]["kernel"].astype(jnp.float32)
    return optax.adam(cfg.learning_rate * jnp.sqrt(jnp.mean(kernel * kernel)))


def sample_slots(feedback: Feedback, key: jax.Array, held_out: jax.Array, recent: jax.Array, slots: int,
                 decay: float) -> Feedback:
    """`slots` one-slot records ([M, 1, ..]) drawn with replacement from the valid slots of the newest
    `recent` records but the newest `held_out`, slot k with probability proportional to decay**k: the
    position weights of the drafter's loss, as sampling weights. Under a shift most records hold one
    valid slot of K, so an optimizer step over sampled slots costs a fraction of one over whole records.
    With nothing valid to draw, the draws are marked invalid (and train nothing)."""
    size, k = feedback.valid_CxK.shape
    age_C = (feedback.written - 1 - jnp.arange(size)) % size  # 0: the newest record
    older_C = (age_C >= held_out) & (age_C < jnp.minimum(recent, feedback.written))
    weight_CxK = (feedback.valid_CxK & older_C[:, None]) * decay ** jnp.arange(k, dtype=jnp.float32)
    total = jnp.sum(weight_CxK)
    flat_M = jax.random.choice(key, size * k, (slots,), p=jnp.where(total > 0, weight_CxK, 1.0).reshape(-1) /
                               jnp.where(total > 0, total, size * k))
    record_M, slot_M = flat_M // k, flat_M % k

    def pick(x):
        return x[record_M, slot_M][:, None]

    return Feedback(hidden_CxKxH=pick(feedback.hidden_CxKxH), teacher_ids_CxKxT=pick(feedback.teacher_ids_CxKxT),
                    teacher_probs_CxKxT=pick(feedback.teacher_probs_CxKxT), labels_CxK=pick(feedback.labels_CxK),
                    valid_CxK=pick(feedback.valid_CxK) & (total > 0), window_C=feedback.window_C[record_M],
                    written=feedback.written, window=feedback.window)


@functools.partial(jax.jit, static_argnames=("cfg", "config"))
def update(trainable: dict, opt_state: Any, base: Any, feedback: Feedback, key: jax.Array, held_out: jax.Array,
           recent: jax.Array, *, cfg: AdaptConfig, config: specblock.SpecBlockConfig) -> tuple[dict, Any, jax.Array]:
    """`cfg.steps` Adam steps, each on `batch_slots` slots drawn from the buffer's newest `recent` records
    (those since the last shift) but for its newest `held_out` (kept for validation): (trainable, optimizer
    state, mean loss of the steps)."""
    loss_and_grad = jax.value_and_grad(feedback_loss)
    optimizer = _optimizer(cfg, base)

    def step(i, carry):
        params, state, total = carry
        slots = sample_slots(feedback, jax.random.fold_in(key, i), held_out, recent, cfg.batch_slots,
                             config.position_loss_weight)
        loss, grads = loss_and_grad(params, base, slots, config)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, total + loss

    trainable, opt_state, total = jax.lax.fori_loop(0, cfg.steps, step, (trainable, opt_state, jnp.zeros(())))
    return trainable, opt_state, total / cfg.steps


class Paired(NamedTuple):
    """A paired difference of accepted depths over one window's records: mean, standard error."""

    mean: jax.Array
    stderr: jax.Array


@functools.partial(jax.jit, static_argnames=("method", "records"))
def depth_gains(base: Any, serving: dict, others: tuple[dict, ...], feedback: Feedback, window: jax.Array, *,
                method: SpecBlockMethod, records: int) -> tuple[Paired, ...]:
    """Differences other - serving of block 1's accepted depth, for each of `others` (adapted parameters
    over the drafter's `base`, as `init_trainable` makes them), over the newest `records` records that
    belong to `window`: paired estimates in accepted tokens per step. The tree is
    rebuilt as drafting builds it: the greedy chain from the root, each slot's alternatives (its width
    of top tokens) beside the chain's token as leaves, scored and pruned to the method's budget with
    drafting's own functions (`block_scores`, `tree.best`). It accepts the leading slots whose kept chain token is the
    target's (within the slots the target reached), plus one where the target's token at the first miss
    is a kept alternative. Counting the alternatives keeps a head that only swaps a slot's first and
    second token from looking like a gain; pruning counts the budget a head's confident alternatives
    take from the chain (with a budget of 4, a head that spreads slot 0's probability loses depth)."""
    config = method.config
    newest = take(feedback, (feedback.written - 1 - jnp.arange(records)) % feedback.window_C.shape[0])
    labels_MxK = newest.labels_CxK  # draft ids; -1: outside the draft vocabulary, never drafted
    m, k = labels_MxK.shape

    def accepted_M(trainable):
        logits_MxKxV, rank_MxKxC = specblock.heads(merge(base, _dense(trainable)), config, newest.hidden_CxKxH,
                                                   _lora(trainable))
        logits_MxKxV = logits_MxKxV.astype(jnp.float32)  # log-probs of the top tokens alone: half the time
        top_logit_MxKxW, top_MxKxW = layers.top_k(logits_MxKxV, method.width)
        top_lp_MxKxW = top_logit_MxKxW - jax.nn.logsumexp(logits_MxKxV, axis=-1, keepdims=True)
        offered_MxKxW = jnp.arange(method.width) < method.slot_widths(rank_MxKxC, (m, k), first_block=True)[..., None]
        score_MxKxW = jnp.where(offered_MxKxW, block_scores(top_lp_MxKxW, jnp.zeros(m)), -jnp.inf)
        kept_MxKxW = tree.best(score_MxKxW.reshape(m, -1), offered_MxKxW.reshape(m, -1),
                               method.budget).reshape(offered_MxKxW.shape)
        reached_MxK = newest.valid_CxK & (labels_MxK >= 0)
        hit_MxKxW = kept_MxKxW & (top_MxKxW == labels_MxK[..., None]) & reached_MxK[..., None]
        depth_M = jnp.sum(jnp.cumprod(hit_MxKxW[..., 0], axis=-1), axis=-1)
        sibling_MxK = jnp.any(hit_MxKxW[..., 1:], axis=-1)
        at_miss_M = jnp.take_along_axis(sibling_MxK, jnp.minimum(depth_M, k - 1)[:, None], axis=1)[:, 0]
        return (depth_M + (at_miss_M & (depth_M < k))).astype(jnp.float32)

    mine_M = (newest.window_C == window) & (jnp.arange(records) < feedback.written)
    count = jnp.sum(mine_M)
    n = jnp.maximum(count, 1)

    def paired(diff_M):
        mean = jnp.sum(jnp.where(mine_M, diff_M, 0.0)) / n
        var = jnp.sum(jnp.where(mine_M, (diff_M - mean) ** 2, 0.0)) / jnp.maximum(count - 1, 1)
        return Paired(mean, jnp.sqrt(var / n))

    serving_M = accepted_M(serving)
    return tuple(paired(accepted_M(other) - serving_M) for other in others)


# ---------------------------------------------------------------------------------------------------
# The bandit: host-side, a few floats.

class Decision(NamedTuple):
    update: bool
    gain: float | None  # optimistic gain used, accepted tokens per step (None when not estimated)
    saving_s: float  # predicted seconds saved over the horizon
    cost_s: float  # predicted seconds the update costs
    reason: str
    probe: bool = False  # the cap alone declined on a stale return: measure the return on this window


@dataclasses.dataclass
class Discounted:
    """Discounted statistics of noisy measurements: their weight and the sums of values, squared values
    and squared standard errors, each faded by the same factor."""

    weight: float = 0.0
    total: float = 0.0
    squares: float = 0.0
    errors: float = 0.0

    def fade(self, keep: float) -> None:
        self.weight, self.total, self.squares, self.errors = (keep * v for v in (
            self.weight, self.total, self.squares, self.errors))

    def add(self, value: float, stderr: float) -> None:
        self.weight += 1.0
        self.total += value
        self.squares += value * value
        self.errors += stderr * stderr

    @property
    def mean(self) -> float:
        return self.total / self.weight


@dataclasses.dataclass
class Bandit:
    """Update or not, from measured gains and costs (see the module docstring)."""

    config: AdaptConfig
    max_depth: int  # deepest accepted draft: a step emits at most max_depth + 1 tokens
    update_s: float  # seconds an update costs (measured)
    tau: float | None = None  # long-run accepted tokens per row-step (EMA), bonus included
    tau_recent: float | None = None
    step_s: float | None = None  # seconds per row-step (EMA)
    gains: Discounted = dataclasses.field(default_factory=Discounted)  # measured gains of single updates
    returns: Discounted = dataclasses.field(default_factory=Discounted)  # serving heads over the reference
    tries: int = 0  # updates tried since the reference heads (the start, or the last shift)
    returns_age: int = 0  # windows since the return was last measured
    cost_moments: tuple[float, ...] = (0.0,) * 5  # discounted sums 1, tau, s, tau^2, tau * s over windows
    shifts: int = 0  # shifts detected
    reverts: int = 0  # returns to the reference heads
    served: int = 0  # tokens served so far

    def observe_window(self, tau: float, step_s: float, tokens: int = 0) -> None:
        """A window's accepted tokens per row-step, seconds per row-step and tokens served (what is left
        of the horizon shrinks by them)."""
        c = self.config
        self.served += tokens
        keep = 1 - c.tau_slow
        self.cost_moments = tuple(keep * m + x for m, x in zip(self.cost_moments,
                                                                (1.0, tau, step_s, tau * tau, tau * step_s)))
        if self.tau is None:
            self.tau = self.tau_recent = tau
            self.step_s = step_s
            return
        self.tau = (1 - c.tau_slow) * self.tau + c.tau_slow * tau
        self.tau_recent = (1 - c.tau_fast) * self.tau_recent + c.tau_fast * tau
        self.step_s = (1 - c.tau_fast) * self.step_s + c.tau_fast * step_s
        self.gains.fade(c.idle_discount)
        self.returns.fade(c.idle_discount)
        self.returns_age += 1
        if self.tau_recent - 1 < (1 - c.drift) * (self.tau - 1):  # a shift: old verdicts no longer hold
            self.gains, self.returns, self.tries = Discounted(), Discounted(), 0
            self.tau = self.tau_recent
            self.shifts += 1

    def observe_gain(self, gain: float, stderr: float = 0.0) -> None:
        """The measured gain (accepted tokens per step) of the latest update, and its standard error."""
        self.gains.fade(self.config.discount)
        self.gains.add(gain, stderr)
        self.tries += 1

    def observe_returns(self, gain: float, stderr: float = 0.0) -> None:
        """The measured gain of the heads now serving over the reference heads, after `tries` updates,
        on a window they were not kept for (a kept update measures well on its own window by selection)."""
        self.returns.fade(self.config.discount)
        self.returns.add(gain, stderr)
        self.returns_age = 0

    def revert(self) -> bool:
        """Whether the heads serving return less than the reference heads beyond noise: even optimistically
        (the return's mean plus `ucb_beta` spreads over sqrt(weight), as `decide` prices it) below zero.
        Then the updates are undone (the caller restores the reference heads), and the count of updates
        tried and the return start again; the measured gains of single updates stay, to fade. The return
        is measured on records the serving heads drafted, which favours them: a negative one is no artefact."""
        c, r = self.config, self.returns
        if r.weight <= 1e-6:
            return False
        spread = max(math.sqrt(r.errors / r.weight), c.gain_floor)
        if r.mean + c.ucb_beta * spread / math.sqrt(r.weight) >= 0:
            return False
        self.returns, self.tries = Discounted(), 0
        self.reverts += 1
        return True

    def observe_update(self, seconds: float) -> None:
        self.update_s = 0.5 * (self.update_s + seconds)

    def cost_slope(self) -> float:
        """Seconds per row-step added per accepted token (least squares over the discounted windows),
        between 0 and step_s / tau: a step that accepts more never gets cheaper, nor a token dearer."""
        w, x, y, xx, xy = self.cost_moments
        if w < 2.0 or self.tau is None:
            return 0.0
        var = xx / w - (x / w) ** 2
        slope = (xy / w - (x / w) * (y / w)) / var if var > 1e-9 else 0.0
        return min(max(slope, 0.0), self.step_s / self.tau)

    def decide(self, records: int) -> Decision:
        """Update iff the optimistic gain (capped by what the updates returned together), over the horizon,
        saves more time than the update costs."""
        c = self.config
        if self.tau is None:
            return Decision(False, None, 0.0, self.update_s, "nothing observed yet")
        if records < c.min_records:
            return Decision(False, None, 0.0, self.update_s,
                            f"{records} records to train on < min_records {c.min_records}")
        bound = max(self.max_depth + 1 - self.tau, 0.0)  # no update accepts more than every depth
        g = self.gains
        if g.weight > 1e-6:
            variance = max(g.squares / g.weight - g.mean * g.mean, 0.0) + g.errors / g.weight
            spread = max(math.sqrt(variance), c.gain_floor)
            gain = min(max(g.mean + c.ucb_beta * spread / math.sqrt(g.weight), 0.0), bound)
            why = f"measured gain {g.mean:+.3f} (weight {g.weight:.2f})"
        else:
            gain = bound
            why = "no measured gain: the largest plausible"
        uncapped = gain
        r = self.returns
        if self.tries >= c.returns_after and r.weight > 1e-6:  # what the updates returned, shared among them
            spread = max(math.sqrt(r.errors / r.weight), c.gain_floor)
            average = max(r.mean + c.ucb_beta * spread / math.sqrt(r.weight), 0.0) / self.tries
            if average < gain:
                gain = average
                why += f"; capped by the {self.tries} updates' returns {r.mean:+.3f}"
        saving = self._saving(gain)
        update = saving > self.update_s
        probe = not update and self._saving(uncapped) > self.update_s and self.returns_age >= c.probe_every
        return Decision(update, gain, saving, self.update_s,
                        f"{why}; optimistic gain {gain:.3f} saves {saving * 1e3:.0f} ms "
                        f"{'>' if update else '<='} update {self.update_s * 1e3:.0f} ms", probe)

    def _saving(self, gain: float) -> float:
        """Seconds a gain in accepted tokens per step saves over what is left of the horizon, at the fitted
        step cost."""
        left = max(self.config.horizon_tokens - self.served, 0)
        return left * (self.step_s / self.tau - (self.step_s + self.cost_slope() * gain) / (self.tau + gain))


# ---------------------------------------------------------------------------------------------------
# Serving with adaptation.

def tally(records: list[dict]) -> dict:
    """What an adapter did over windows (`generate`'s `stats["adapt"]` records, one per window): the updates
    tried and kept, the probes and reverts, the most shifts one adapter saw, and its seconds adapting."""
    return {"windows": len(records), "updates": sum(r["updated"] for r in records),
            "kept": sum(r["kept"] for r in records), "probes": sum(r["probed"] for r in records),
            "reverts": sum(r["reverted"] for r in records), "shifts": max(r["shifts"] for r in records),
            "adapt_s": sum(r["adapt_s"] for r in records)}


class Adapter:
    """A SpecBlock drafter that adapts while it serves. Each `generate` call (a window) decodes with the
    current drafter, collecting feedback in the loop; then the bandit decides, and an update it asks
    for is trained on earlier windows, validated on this one and kept unless it measures worse.

        adapter = Adapter(target, load_drafter("specblock", target))
        for batch in stream:
            out = adapter.generate(batch, max_new_tokens=128)   # out.stats["adapt"]: this window's record

    Args:
        target: the `Target` served.
        drafter: a SpecBlock `Drafter` (full or reduced draft vocabulary); its parameters are the
            reference the updates' returns are measured against.
        config: what adapts, the buffer, the optimizer and the bandit's prices (`AdaptConfig`).
        seed: the updates' rng (LoRA initialisation, slot draws).

    Attributes: `drafter` (the drafter as it serves now), `history` (one record per window: tau,
    the bandit's decision, the measured gain, seconds), `feedback` (the ring buffer).

    Raises:
        ValueError: a drafter of another kind, or a config that is not an `AdaptConfig`.
    """

    def __init__(self, target: Any, drafter: Drafter, config: AdaptConfig = AdaptConfig(), seed: int = 0):
        if not isinstance(drafter.method, SpecBlockMethod):
            raise ValueError(f"adaptation needs a SpecBlock drafter, got {type(drafter.method).__name__}")
        if not isinstance(config, AdaptConfig):
            raise ValueError(f"config must be an AdaptConfig, got {type(config).__name__}")
        self.target, self.method, self.config = target, drafter.method, config
        self.params, self.base = drafter.params, drafter.params["drafter"]  # base: the drafter's own weights
        d2t = drafter.params.get("draft_to_target")
        self.target_to_draft = None if d2t is None else eagle3.target_to_draft(d2t, drafter.method.config.vocab_size)
        self.key, init_key = jax.random.split(jax.random.key(seed))
        self.trainable = init_trainable(config, drafter.method.config, self.base, init_key)
        self.opt_state = _optimizer(config, self.base).init(self.trainable)
        self.feedback = empty_feedback(drafter.method.config, config.buffer_size, config.teacher_topk)
        self.window = 0
        self.since_written = 0  # feedback records written before the last shift: older ones are not trained on
        self.history: list[dict] = []
        self.reference = self.trainable  # what the updates' returns are measured against
        self.bandit = Bandit(config, drafter.method.max_depth, update_s=self._time_update())

    @property
    def drafter(self) -> Drafter:
        """The drafter as it serves now."""
        return Drafter(self.method, {**self.params, "drafter": merge(self.base, self.trainable)})

    @property
    def _gain_records(self) -> int:
        return min(self.config.batch_records, self.config.buffer_size)

    def _depth_gains(self, *others: dict) -> list[Paired]:
        """This window's gains in accepted depth of `others` (trainables) over the heads serving."""
        gains = depth_gains(self.base, self.trainable, others, self.feedback, jnp.asarray(self.window, jnp.int32),
                            method=self.method, records=self._gain_records)
        return [Paired(float(p.mean), float(p.stderr)) for p in gains]

    def _update(self, held_out: int) -> tuple[dict, Any, float, Paired, Paired]:
        """Train on the records since the last shift but the newest `held_out`, measure on those: (trainable,
        optimizer state, mean loss, and the depth gains of the new heads and of the reference over the
        serving ones)."""
        recent = int(self.feedback.written) - self.since_written
        trainable, opt_state, loss = update(self.trainable, self.opt_state, self.base, self.feedback,
                                            jax.random.fold_in(self.key, self.window),
                                            jnp.asarray(held_out, jnp.int32), jnp.asarray(recent, jnp.int32),
                                            cfg=self.config, config=self.method.config)
        gain, reference = self._depth_gains(trainable, self.reference)
        return trainable, opt_state, float(loss), gain, reference

    def _observe_returns(self, reference: Paired) -> bool:
        """The serving heads' return: the reference's depth gain over them, negated. When it is negative
        beyond noise (`Bandit.revert`), the reference heads serve again: True."""
        self.bandit.observe_returns(-reference.mean, reference.stderr)
        if not self.bandit.revert():
            return False
        self.trainable, self.opt_state = self.reference, _optimizer(self.config, self.base).init(self.reference)
        return True

    def _time_update(self) -> float:
        """Compile the update and the measurements (a probe's too), then time one update on the (empty)
        buffer; nothing is kept."""
        self._update(0)
        self._depth_gains(self.reference)
        start = time.perf_counter()
        self._update(0)
        return time.perf_counter() - start

    def generate(self, prompts: Any, *, max_new_tokens: int, **kwargs: Any) -> decode.GenerateOutput:
        """`decode.generate` with the current drafter (same keyword arguments, `drafter` excluded),
        followed by this window's bandit step and, when it asks for one, a validated update.

        Returns `decode.generate`'s output with `stats["adapt"]`: this window's record (also appended
        to `history`), its adaptation seconds in `adapt_s`. Raises ValueError, before any compute,
        when the window could write more feedback records than `AdaptConfig.buffer_size` holds, and
        whatever `decode.generate` raises for its arguments."""
        decode.check_max_new_tokens(max_new_tokens)
        steps = len(prompts) * max_new_tokens  # row-steps, records, at most
        if steps > self.config.buffer_size:
            raise ValueError(f"{len(prompts)} prompts x {max_new_tokens} new tokens can write {steps} records, more "
                             f"than AdaptConfig buffer_size {self.config.buffer_size} holds")
        window = empty_feedback(self.method.config, steps, self.config.teacher_topk)
        out = decode.generate(self.target, prompts, max_new_tokens=max_new_tokens, drafter=self.drafter,
                              collect=collect, feedback=window._replace(window=jnp.asarray(self.window, jnp.int32)),
                              **kwargs)
        stats = out.stats
        start = time.perf_counter()
        written_before = int(self.feedback.written)
        fresh_records = out.feedback if self.target_to_draft is None else to_draft_ids(out.feedback,
                                                                                        self.target_to_draft)
        self.feedback = append(self.feedback, fresh_records)
        shifts = self.bandit.shifts
        self.bandit.observe_window(stats["tau"], stats["decode_s"] / max(stats["iterations"], 1) / len(prompts),
                                   int(np.sum(stats["new_tokens"])))
        if self.bandit.shifts > shifts:  # a new domain: returns count from the heads serving now, updates
            self.reference, self.since_written = self.trainable, written_before  # learn from this window on
        fresh = int(self.feedback.written) - written_before
        older = min(written_before - self.since_written, self.config.buffer_size - fresh)  # to train on
        decision = self.bandit.decide(older)
        loss = gain = stderr = None
        kept = probed = reverted = False
        if decision.update and fresh:
            trainable, opt_state, loss, measured, reference = self._update(fresh)
            gain, stderr = measured
            earlier = self.bandit.tries  # the serving heads hold earlier updates, not kept for this window
            self.bandit.observe_gain(*measured)
            reverted = bool(earlier) and self._observe_returns(reference)
            kept = not reverted and gain > self.config.keep_stderrs * stderr
            if kept:
                self.trainable, self.opt_state = trainable, opt_state
            self.bandit.observe_update(time.perf_counter() - start)
        elif (decision.probe or self.history and self.history[-1]["kept"]) and fresh:  # the window after a kept update
            reverted = self._observe_returns(*self._depth_gains(self.reference))
            probed = True
        record = dict(window=self.window, tau=stats["tau"], new_tokens=int(np.sum(stats["new_tokens"])),
                      seconds=stats["prefill_s"] + stats["decode_s"], adapt_s=time.perf_counter() - start,
                      updated=decision.update and bool(fresh), kept=kept, probed=probed, reverted=reverted,
                      measured_gain=gain,
                      measured_stderr=stderr, loss=loss,
                      predicted_gain=decision.gain, saving_s=decision.saving_s, cost_s=decision.cost_s,
                      step_s=self.bandit.step_s, cost_slope=self.bandit.cost_slope(),  # the prices it used
                      reason=decision.reason, shifts=self.bandit.shifts)
        self.history.append(record)
        stats["adapt"] = record
        self.window += 1
        return out
