"""The target LLM: a Llama / Qwen2 / Qwen3 decoder as a pure-functional Flax module.

One forward serves prefill, single-token decode and multi-token tree verify: the caller gives the
tokens, their positions, the cache slots they are written to and an explicit attention mask.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from specblock_jax.config import ModelConfig
from specblock_jax.kvcache import KVCache
from specblock_jax.models.layers import DecoderLayer, RMSNorm, dense


class TargetOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] (or [B, P, V] at logit_positions), float32
    features: jax.Array | None  # [B, T, len(feature_layers) * H]: chosen layers' outputs, concatenated
    cache: KVCache | None
    new_kv: tuple | None = None  # with `new_mask`: per-layer new (keys, values) [B, T, KV, Dh], unwritten


class Transformer(nn.Module):
    config: ModelConfig
    feature_layers: tuple[int, ...] = ()  # 0-indexed decoder layers whose outputs are returned

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, mask, cache: KVCache | None = None, slots_BxT=None,
                 logit_positions_BxP=None, kv_live=None, new_mask=None) -> TargetOutput:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=dtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                         name="embed_tokens")
        x = embed(tokens_BxT)
        outputs, new_k, new_v = [], [], []
        for i in range(c.num_layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = DecoderLayer(c, name=f"layers_{i}")(x, positions_BxT, mask, kv, slots_BxT, kv_live, new_mask)
            outputs.append(x)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        features = (jnp.concatenate([outputs[i] for i in self.feature_layers], axis=-1)
                    if self.feature_layers else None)
        x = RMSNorm(c.rms_norm_eps, dtype, name="norm")(x)
        if logit_positions_BxP is not None:
            x = jnp.take_along_axis(x, logit_positions_BxP[..., None], axis=1)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = dense(c.vocab_size, ("embed", "vocab"), "lm_head", dtype)(x)
        if new_mask is not None:
            return TargetOutput(logits.astype(jnp.float32), features, None, (tuple(new_k), tuple(new_v)))
        if cache is not None:
            cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
        return TargetOutput(logits.astype(jnp.float32), features, cache)


def forward(params: Any, config: ModelConfig, tokens_BxT, positions_BxT, mask, cache=None, slots_BxT=None,
            *, feature_layers: tuple[int, ...] = (), logit_positions_BxP=None, kv_live=None,
            new_mask=None) -> TargetOutput:
    """Apply the target to explicit params. Lengths in `cache` are not changed: committing is the
    caller's decision (see `kvcache`). `kv_live` (an int, or a traced scalar): no query sees a cache
    slot at or past it, so attention reads only the slots before it (`layers.attend_live`).
    With `new_mask` [B, T, T] the cache is read, never written: the tokens see its slots under `mask`
    and each other under `new_mask`, and `new_kv` holds their keys and values (`cache` is None), for
    the caller to write (`kvcache.write`)."""
    return Transformer(config, tuple(feature_layers)).apply(
        {"params": params}, tokens_BxT, positions_BxT, mask, cache, slots_BxT, logit_positions_BxP, kv_live, new_mask)


def init_params(config: ModelConfig, rng: jax.Array) -> Any:
    """Random parameters (normal 0.02, norms at one), unboxed from their logical-axis metadata."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(config).init(rng, tokens, tokens, jnp.ones((1, 1, 1), bool))
    return nn.meta.unbox(variables["params"])


def param_axes(config: ModelConfig) -> Any:
    """Logical axis names of every parameter (a pytree of PartitionSpecs), without allocating them."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(config).init(
        jax.random.key(0), tokens, tokens, jnp.ones((1, 1, 1), bool))["params"])
    return nn.get_partition_spec(boxed)


def causal_logits(params: Any, config: ModelConfig, token_ids_BxT) -> jax.Array:
    """Full causal forward without a cache: [B, T] ids -> [B, T, V] float32 logits."""
    b, t = token_ids_BxT.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    return forward(params, config, token_ids_BxT, positions, mask).logits


_causal_logits_jit = jax.jit(causal_logits, static_argnums=1)


@dataclasses.dataclass(frozen=True)
class Target:
    """A loaded target model: config, parameter pytree, (optionally) its tokenizer, and the Hugging Face
    directory it was loaded from (None when built in memory)."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None
    path: pathlib.Path | None = None

    def logits(self, token_ids) -> jax.Array:
        """[B, T] token ids (array or nested lists) -> [B, T, V] float32 logits of a causal forward."""
        ids = jnp.asarray(token_ids, jnp.int32)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"token_ids must be a non-empty [B, T] array, got shape {ids.shape}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {self.config.vocab_size})")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        return _causal_logits_jit(self.params, self.config, ids)
