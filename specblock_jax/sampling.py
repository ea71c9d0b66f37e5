"""The target's sampling distribution: temperature, then top-k, then top-p (Hugging Face's order).

Plain decoding samples from it and the speculative verifier accepts against it, so lossless
speculation means "exactly `processed_logprobs`". Everything here is pure and vectorised over
leading dimensions; `SamplingParams` is static (hashable), so greedy vs sampling is decided in Python.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from specblock_jax.models import layers


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean off."""

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def processed_logprobs(logits_xV: jax.Array, params: SamplingParams) -> jax.Array:
    """[..., V] logits -> [..., V] float32 log-probs of the distribution tokens are drawn from.

    Masked tokens get -inf. Greedy (temperature 0) is the one-hot limit: log-prob 0 at the argmax.
    Ties at the top-k or top-p threshold are kept together, so the result never depends on sort order.
    """
    logits_xV = logits_xV.astype(jnp.float32)
    if params.greedy:
        top_xV = jax.nn.one_hot(jnp.argmax(logits_xV, axis=-1), logits_xV.shape[-1], dtype=bool)
        return jnp.where(top_xV, 0.0, -jnp.inf)
    scaled_xV = logits_xV / params.temperature
    if 0 < params.top_k < logits_xV.shape[-1]:
        kth_x1 = layers.top_k(scaled_xV, params.top_k)[0][..., -1:]
        scaled_xV = jnp.where(scaled_xV >= kth_x1, scaled_xV, -jnp.inf)
    if params.top_p < 1:
        scaled_xV = _top_p_filter(scaled_xV, params.top_p)
    return jax.nn.log_softmax(scaled_xV, axis=-1)


def _top_p_filter(scaled_xV: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest most-likely set whose mass reaches top_p (the top token always survives):
    a token is kept when the mass strictly above it in sorted order is still below top_p."""
    probs_xV = jax.nn.softmax(scaled_xV, axis=-1)
    probs_desc_xV = jnp.flip(jnp.sort(probs_xV, axis=-1), axis=-1)
    mass_before_xV = jnp.cumsum(probs_desc_xV, axis=-1) - probs_desc_xV
    num_kept_x1 = jnp.sum(mass_before_xV < top_p, axis=-1, keepdims=True)
    threshold_x1 = jnp.take_along_axis(probs_desc_xV, num_kept_x1 - 1, axis=-1)
    return jnp.where(probs_xV >= threshold_x1, scaled_xV, -jnp.inf)


def sample(rng: jax.Array, logits_xV: jax.Array, params: SamplingParams) -> jax.Array:
    """[..., V] logits -> [...] int32 token ids drawn from `processed_logprobs` (argmax when greedy;
    the rng is then unused)."""
    if params.greedy:
        return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, processed_logprobs(logits_xV, params), axis=-1).astype(jnp.int32)
