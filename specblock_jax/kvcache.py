"""Static KV cache pytree: one head-major [B, KV, S, Dh] buffer per layer for keys and values (the
layout attention reads without a transposed copy), plus each row's committed length. Shapes never
change; rows advance independently through `lengths`."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from specblock_jax.config import ModelConfig
from specblock_jax.models.layers import write_kv


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, KV, S, Dh]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32: slots [0, lengths[b]) of row b hold committed tokens

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   lengths=jnp.zeros((batch_size,), jnp.int32))


def causal_mask(t: int, s: int) -> jax.Array:
    """[1, T, S]: token t (written at slot t) sees slots <= t. Used for prefill from an empty cache."""
    return (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]


def prefix_mask(lengths_B: jax.Array, s: int) -> jax.Array:
    """[B, S]: the committed slots of each row."""
    return jnp.arange(s)[None, :] < lengths_B[:, None]


def decode_mask(lengths_B: jax.Array, s: int) -> jax.Array:
    """[B, 1, S]: a single new token written at slot lengths[b] sees the prefix and itself."""
    return (jnp.arange(s)[None, :] <= lengths_B[:, None])[:, None, :]


def write(cache: KVCache, new_kv: tuple, slots_BxT: jax.Array) -> KVCache:
    """Write per-layer new (keys, values) ([B, T, KV, Dh] each, `TargetOutput.new_kv`) at their slots
    (slots past the end are dropped); lengths are unchanged."""
    new_k, new_v = new_kv
    return cache.replace(k=tuple(write_kv(c, n, slots_BxT) for c, n in zip(cache.k, new_k)),
                         v=tuple(write_kv(c, n, slots_BxT) for c, n in zip(cache.v, new_v)))


def commit(cache: KVCache, path_BxD1: jax.Array, length_B: jax.Array, active_B: jax.Array) -> KVCache:
    """Keep an accepted tree path and advance each active row past it.

    A tree verify wrote node i's K/V at scratch slot lengths[b] + i. The accepted path (root, then
    `length_B` drafts: path[0..length]) is moved to contiguous slots lengths[b] + d, and lengths
    advance by length + 1. Inactive rows (and path entries past length) write nothing. Each layer
    is one gather of all D+1 entries, then one scatter, so overlapping source and destination slots
    are safe (path[d] >= d: a node's index is at least its depth)."""
    d1 = path_BxD1.shape[1]
    rows_Bx1 = jnp.arange(cache.batch_size)[:, None]
    lengths_Bx1 = cache.lengths[:, None]
    src_BxD1 = lengths_Bx1 + path_BxD1
    keep_BxD1 = (jnp.arange(d1)[None, :] <= length_B[:, None]) & active_B[:, None]
    dst_BxD1 = jnp.where(keep_BxD1, lengths_Bx1 + jnp.arange(d1)[None, :], cache.max_len)  # past the end: dropped

    def move(layer_BxKxSxD: jax.Array) -> jax.Array:
        entries_BxD1xKxD = layer_BxKxSxD.at[rows_Bx1, :, src_BxD1].get(mode="clip")
        return layer_BxKxSxD.at[rows_Bx1, :, dst_BxD1].set(entries_BxD1xKxD, mode="drop")

    return cache.replace(k=tuple(move(k) for k in cache.k), v=tuple(move(v) for v in cache.v),
                         lengths=cache.lengths + jnp.where(active_B, length_B + 1, 0).astype(cache.lengths.dtype))
