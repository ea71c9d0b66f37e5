"""The target's sampling distribution: temperature, then top-k, then top-p (Hugging Face's order).

Plain decoding samples from it and the speculative verifier accepts against it, so lossless
speculation means "exactly `processed_logprobs`". Everything here is pure and vectorised over
leading dimensions. `SamplingParams` is a pytree whose only static part is `greedy`, the one
setting that changes the program: passed to `jax.jit` as an ordinary argument its values are traced,
so a new temperature, top-k or top-p compiles nothing. It is also hashable, for callers that pass it
as a static argument (its values are then constants folded into the program).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax.models import layers


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean off. Built from Python numbers (checked
    here); inside a jitted function the three values may be tracers, `greedy` never is."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not _is_real(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 means off), got {self.top_p!r}")
        object.__setattr__(self, "_greedy", self.temperature == 0)

    @property
    def greedy(self) -> bool:
        return self._greedy

    def tree_flatten(self):
        dtypes = (np.float32, np.int32, np.float32)  # numbers as arrays, so a new value is a new input, not a new program
        values = (self.temperature, self.top_k, self.top_p)
        return tuple(dtype(x) if _is_concrete(x) else x for dtype, x in zip(dtypes, values)), self.greedy

    @classmethod
    def tree_unflatten(cls, greedy: bool, values) -> SamplingParams:
        params = object.__new__(cls)  # no checks: the values may be tracers (they were checked when built)
        for name, value in zip(("temperature", "top_k", "top_p"), values):
            object.__setattr__(params, name, value)
        object.__setattr__(params, "_greedy", greedy)
        return params


def _is_concrete(x) -> bool:
    return isinstance(x, numbers.Number)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def processed_logprobs(logits_xV: jax.Array, params: SamplingParams) -> jax.Array:
    """[..., V] logits -> [..., V] float32 log-probs of the distribution tokens are drawn from.

    Masked tokens get -inf. Greedy (temperature 0) is the one-hot limit: log-prob 0 at the argmax.
    Ties at the top-k or top-p threshold are kept together, so the result never depends on sort order.
    With traced top-k / top-p the truncation runs under a `lax.cond`, so untruncated sampling never
    pays for its sort; with concrete ones it is decided here.
    """
    logits_xV = logits_xV.astype(jnp.float32)
    if params.greedy:
        top_xV = jax.nn.one_hot(jnp.argmax(logits_xV, axis=-1), logits_xV.shape[-1], dtype=bool)
        return jnp.where(top_xV, 0.0, -jnp.inf)
    scaled_xV = logits_xV / params.temperature
    top_k, top_p = params.top_k, params.top_p
    if _is_concrete(top_k) and _is_concrete(top_p):
        if 0 < top_k < logits_xV.shape[-1] and top_p == 1:  # the common case, without a sort
            kth_x1 = layers.top_k(scaled_xV, top_k)[0][..., -1:]
            scaled_xV = jnp.where(scaled_xV >= kth_x1, scaled_xV, -jnp.inf)
        elif top_k > 0 or top_p < 1:
            scaled_xV = _truncate(scaled_xV, top_k, top_p)
    else:
        scaled_xV = jax.lax.cond((top_k > 0) | (top_p < 1), _truncate, lambda x_xV, *_: x_xV, scaled_xV, top_k, top_p)
    return jax.nn.log_softmax(scaled_xV, axis=-1)


def _truncate(scaled_xV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k, then top-p over what top-k kept, from one descending sort (top_k 0 and top_p 1 are off).
    Top-k keeps every token at least as likely as the k-th; top-p keeps the smallest most-likely set
    whose mass reaches top_p (the top token always survives): a token is kept when the mass strictly
    above it in sorted order is still below top_p."""
    v = scaled_xV.shape[-1]
    desc_xV = -jnp.sort(-scaled_xV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth_x1 = jnp.take_along_axis(desc_xV, jnp.broadcast_to(k - 1, desc_xV.shape[:-1] + (1,)), axis=-1)
    probs_desc_xV = jax.nn.softmax(jnp.where(desc_xV >= kth_x1, desc_xV, -jnp.inf), axis=-1)
    mass_before_xV = jnp.cumsum(probs_desc_xV, axis=-1) - probs_desc_xV
    num_kept_x1 = jnp.where(top_p < 1, jnp.sum(mass_before_xV < top_p, axis=-1, keepdims=True), v)
    threshold_x1 = jnp.maximum(kth_x1, jnp.take_along_axis(desc_xV, jnp.minimum(num_kept_x1, k) - 1, axis=-1))
    return jnp.where(scaled_xV >= threshold_x1, scaled_xV, -jnp.inf)


def sample(rng: jax.Array, logits_xV: jax.Array, params: SamplingParams) -> jax.Array:
    """[..., V] logits -> [...] int32 token ids drawn from `processed_logprobs` (argmax when greedy;
    the rng is then unused)."""
    if params.greedy:
        return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, processed_logprobs(logits_xV, params), axis=-1).astype(jnp.int32)
