"""Static KV cache pytree: one [B, S, KV, Dh] buffer per layer for keys and values, plus each row's
committed length. Shapes never change; rows advance independently through `lengths`."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from specblock_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, KV, Dh]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32: slots [0, lengths[b]) of row b hold committed tokens

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
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
