"""Decoder building blocks shared by the target and the drafters: RMSNorm, RoPE, GQA attention, SwiGLU.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `norm`);
`specblock_jax.sharding` maps them to mesh axes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax.config import ModelConfig, RopeScaling

NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax, never NaN


def dense(features: int, axes: tuple[str | None, str | None], name: str, dtype, use_bias: bool = False):
    """A bias-free (by default) linear layer whose kernel is laid out (in, out) with logical axes."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the activation dtype (as Hugging Face does)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                            (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * x32.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim/2], with Llama 3.x scaling of the low frequencies."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv.astype(np.float32)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = np.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def apply_rope(x_BxTxNxD: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Hugging Face rotate-half RoPE: frequencies duplicated as cat(f, f), not interleaved pairs."""
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_BxTxD = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTxD), jnp.sin(angles_BxTxD)
    x32 = x_BxTxNxD.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x_BxTxNxD.dtype)


def write_kv(cache_BxKxSxD: jax.Array, new_BxTxKxD: jax.Array, slots_BxT: jax.Array) -> jax.Array:
    """Scatter the new tokens' keys or values into their slots of a head-major cache (out-of-range
    slots are dropped)."""
    rows_Bx1 = jnp.arange(cache_BxKxSxD.shape[0])[:, None]
    return cache_BxKxSxD.at[rows_Bx1, :, slots_BxT].set(new_BxTxKxD.astype(cache_BxKxSxD.dtype), mode="drop")


def head_major(x_BxTxKxD: jax.Array) -> jax.Array:
    """[B, T, KV, D] (as projected) -> [B, KV, T, D] (as cached and attended)."""
    return jnp.swapaxes(x_BxTxKxD, 1, 2)


MIN_LIVE = 128  # the smallest static cache prefix `attend_live` attends


def attend_live(q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS, live, tail: int = 0, new=None) -> jax.Array:
    """`attend` over the cache slots a query can see: a prefix of at least `live` slots and the last
    `tail` (a drafter's scratch), never the unused rest, so a step costs what the sequence holds, not
    what the static cache could. `live` is a Python int (a static slice) or a traced scalar: then the
    prefix is the smallest of a few static sizes (MIN_LIVE times 1, 1.5, 2, 3, 4, 6, ..., up to all of
    them) that holds it, picked at run time (`lax.switch`): half-octave steps read at most 1.5x the
    live slots, where doubling read up to 2x (a third more attention on average). The caller guarantees the mask hides every other slot, so the
    result is `attend`'s. With `new` = (k [B, T, KV, D], v, mask [B, T, T]) the queries also attend
    these keys, placed after the cache's: the cache is only read."""
    s = k_BxKxSxD.shape[2]
    head = s - tail

    def prefix(n: int):
        def run(q, k, v, mask):
            if n < head:
                keep = lambda x, axis: jnp.concatenate(
                    [jax.lax.slice_in_dim(x, 0, n, axis=axis), jax.lax.slice_in_dim(x, head, s, axis=axis)], axis=axis)
                k, v, mask = keep(k, 2), keep(v, 2), keep(mask, 2)
            if new is not None:
                k_new, v_new, mask_new = new
                k = jnp.concatenate([k, head_major(k_new).astype(k.dtype)], axis=2)
                v = jnp.concatenate([v, head_major(v_new).astype(v.dtype)], axis=2)
                mask = jnp.concatenate([jnp.broadcast_to(mask, (*mask_new.shape[:2], mask.shape[2])), mask_new], axis=2)
            return attend(q, k, v, mask)
        return run

    if isinstance(live, int):
        return prefix(max(min(live, head), 1))(q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS)
    sizes = sorted({m << i for i in range(head.bit_length()) for m in (MIN_LIVE, MIN_LIVE * 3 // 2)} - {head})
    sizes = [n for n in sizes if n < head] + [head]
    if len(sizes) == 1:
        return prefix(head)(q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS)
    index = jnp.searchsorted(jnp.asarray(sizes), live)
    return jax.lax.switch(jnp.minimum(index, len(sizes) - 1), [prefix(n) for n in sizes],
                          q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS)


def attend(q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS) -> jax.Array:
    """Grouped-query attention over head-major keys and values with an explicit boolean mask; softmax
    in float32. Each KV head's G query heads and T tokens are one [G*T, D] operand, so both products
    are plain batched matmuls over (B, KV) with no transposed copy of the keys or values: on CPU a
    token-major cache cost XLA a transpose of the whole cache per layer (2-7x slower at T = 1)."""
    b, t, n, d = q_BxTxNxD.shape
    kv = k_BxKxSxD.shape[1]
    g = n // kv
    q_BxKxQxD = jnp.transpose(q_BxTxNxD.reshape(b, t, kv, g, d), (0, 2, 3, 1, 4)).reshape(b, kv, g * t, d)
    batch = ((0, 1), (0, 1))
    scores_BxKxQxS = jax.lax.dot_general(q_BxKxQxD, k_BxKxSxD, (((3,), (3,)), batch),
                                         preferred_element_type=jnp.float32) / math.sqrt(d)
    mask_Bx1xQxS = jnp.tile(mask_BxTxS, (1, g, 1))[:, None]  # query row q = g_index * T + t
    scores_BxKxQxS = jnp.where(mask_Bx1xQxS, scores_BxKxQxS, NEG_INF)
    probs = jax.nn.softmax(scores_BxKxQxS, axis=-1).astype(v_BxKxSxD.dtype)
    out_BxKxQxD = jax.lax.dot_general(probs, v_BxKxSxD, (((3,), (2,)), batch))
    return jnp.transpose(out_BxKxQxD.reshape(b, kv, g, t, d), (0, 3, 1, 2, 4)).reshape(b, t, n * d)


class Attention(nn.Module):
    """GQA self-attention. With a cache, new K/V are written to `slots` first, then the cache is
    attended under `mask` (all S slots, or with `kv_live` only the live ones and the last `kv_tail`:
    `attend_live`); without one, the T tokens attend to each other under a [B, T, T] mask. With a cache
    and `new_mask` [B, T, T], the cache is only read (under `mask`), the tokens see each other under
    `new_mask`, and the new (k, v) are returned for the caller to write."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxH, positions_BxT, mask, kv_cache=None, slots_BxT=None, kv_live=None, kv_tail: int = 0,
                 new_mask=None):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        b, t, _ = x_BxTxH.shape
        q = dense(c.num_heads * c.head_dim, ("embed", "heads"), "q_proj", dtype, c.attention_bias)(x_BxTxH)
        k = dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "k_proj", dtype, c.attention_bias)(x_BxTxH)
        v = dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "v_proj", dtype, c.attention_bias)(x_BxTxH)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, dtype, name="k_norm")(k)
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        q, k = apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq)
        if kv_cache is not None and new_mask is not None:  # read the cache; the caller writes (k, v)
            live = kv_cache[0].shape[2] if kv_live is None else kv_live
            out = attend_live(q, kv_cache[0], kv_cache[1], mask, live, kv_tail, (k, v, new_mask))
            kv_cache = (k, v)
        elif kv_cache is not None:
            k_cache, v_cache = write_kv(kv_cache[0], k, slots_BxT), write_kv(kv_cache[1], v, slots_BxT)
            out = (attend(q, k_cache, v_cache, mask) if kv_live is None
                   else attend_live(q, k_cache, v_cache, mask, kv_live, kv_tail))
            kv_cache = (k_cache, v_cache)
        else:
            out = attend(q, head_major(k), head_major(v), mask)
        out = dense(c.hidden_size, ("heads", "embed"), "o_proj", dtype)(out)
        return out, kv_cache


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        gate = dense(c.intermediate_size, ("embed", "mlp"), "gate_proj", dtype)(x)
        up = dense(c.intermediate_size, ("embed", "mlp"), "up_proj", dtype)(x)
        return dense(c.hidden_size, ("mlp", "embed"), "down_proj", dtype)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions_BxT, mask, kv_cache=None, slots_BxT=None, kv_live=None, new_mask=None):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        h, kv_cache = Attention(c, name="self_attn")(
            RMSNorm(c.rms_norm_eps, dtype, name="input_layernorm")(x), positions_BxT, mask, kv_cache, slots_BxT,
            kv_live, new_mask=new_mask)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, dtype, name="post_attention_layernorm")(x))
        return x, kv_cache


def top_k(x_xV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis, same values and indices (ties to the lower index), in two
    stages: the k groups of `group` entries with the largest maxima hold every top-k entry, so a top-k
    over the group maxima and one over those k groups replace one over the vocabulary. On XLA's CPU
    backend that is 2.5-8x faster at a 4k-32k vocabulary (top_k is a per-row selection pass there; a
    rank > 2 input even lowers to a full sort, hence the 2-D view)."""
    v = x_xV.shape[-1]
    x_RxV = x_xV.reshape(-1, v)
    group = 2 ** round(math.log2(2 * math.sqrt(v / k))) if 0 < k < v else v
    if group < 8 or k * group >= v or not jnp.issubdtype(x_xV.dtype, jnp.floating):  # one stage pays
        values, indices = jax.lax.top_k(x_RxV, k)
    else:
        g = -(-v // group)
        padded_RxV = jnp.pad(x_RxV, ((0, 0), (0, g * group - v)), constant_values=-jnp.inf)
        x_RxGxS = padded_RxV.reshape(-1, g, group)
        _, groups_Rxk = jax.lax.top_k(jnp.max(x_RxGxS, axis=-1), k)
        groups_Rxk = jnp.sort(groups_Rxk, axis=-1)  # candidates in index order keep lax's tie-breaking
        candidates_RxC = jnp.take_along_axis(x_RxGxS, groups_Rxk[:, :, None], axis=1).reshape(-1, k * group)
        values, pick_Rxk = jax.lax.top_k(candidates_RxC, k)
        indices = jnp.take_along_axis(groups_Rxk, pick_Rxk // group, axis=1) * group + pick_Rxk % group
    return values.reshape(*x_xV.shape[:-1], k), indices.reshape(*x_xV.shape[:-1], k)
