"""The SpecBlock drafter: one forward drafts a block of K dependent positions ("slots").

A drafter row j is the pair (condition, token): block 1's condition is the fused target feature f_j
and its token x_{j+1} (EAGLE's pairing), so slot k of row j predicts x_{j+2+k}. The K slot inputs
share the row's condition and token embedding and differ only by a learned position query:
x_k = fuse([RMSNorm(W_c f_j); RMSNorm(E[x_{j+1}]); RMSNorm(P_k)]). The K slots of all rows are
flattened and run through `num_layers` pre-norm Llama layers; before every layer after the first a
*layer-wise shift* replaces slot k's stream with shift([x_k; x_{k-1}]) (slot 0 takes itself twice),
so each slot sees its predecessor's hidden state at every depth. Slot k of row j sits at RoPE
position j + 1 + k in every block.

A later block *inherits* from slot m of a parent block: its condition is that slot's pre-norm output
(RMSNorm only, no W_c), its token the one chosen at slot m, its rows the anchor's, and it attends to
the committed rows plus the parent block's slots 0..m of the same row (and those of the parent's own
ancestors). Training unrolls `num_ttt_blocks` blocks, each new one inheriting from a random slot of
the previous one (`ttt_forward`); `train_metrics` adds the valid-prefix masked draft loss and the
rank loss. A rank head reads each slot's (detached) normalised hidden and logit statistics and
predicts where the target's token ranks in the slot's draft distribution: the tree policy
(`specblock_draft`) keeps more candidates where it predicts a worse rank.

Attention is one callable per forward (`attend(layer, q, k, v) -> (out, aux)`), so the same layers
serve training (block-1 keys of earlier rows plus same-row keys of earlier blocks, never materialised
as one big mask) and drafting (a KV cache with an explicit mask). The target's embedding table is an
input, never a drafter parameter.

With `draft_vocab_size` set, the LM head (and so the rank features) covers only a subset of the target
vocabulary, as in the authors' released drafters (32000 of 128256 / 151936 ids): logits are over draft
ids, which drafting maps to target ids through a `draft_to_target` map (EAGLE-3's `d2t`, see
`models.eagle3`), and training restricts the target's teacher to the same ids.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from specblock_jax import losses
from specblock_jax.config import DTYPES, ConfigError, ModelConfig, RopeScaling
from specblock_jax.models.eagle3 import check_against_target, target_fields
from specblock_jax.models.layers import (
    MLP,
    NEG_INF,
    RMSNorm,
    apply_rope,
    dense,
    rope_inv_freq,
    top_k,
)

SLOT_LOSS_MEANS = ("reached", "all")  # `SpecBlockConfig.slot_loss_mean`
RANK_FEATURES = 15  # 10 top log-probs, 3 logit gaps, top probability, entropy (see `rank_features`)


@dataclasses.dataclass(frozen=True)
class SpecBlockConfig:
    """Shape, ablation switches and training weights of a SpecBlock drafter for one target."""

    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (  # free to change when fine-tuning
        "num_ttt_blocks", "valid_prefix", "slot_loss_mean", "position_loss_weight", "rank_loss_weight", "dtype")

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    feature_layers: tuple[int, ...]
    num_layers: int = 2
    block_size: int = 4  # K: slots per block
    rank_classes: int = 4
    rank_bounds: tuple[int, ...] = losses.RANK_BOUNDS  # rank r is class c iff bounds[c-1] < r <= bounds[c]
    rank_hidden: int = 64
    rank_topk: int = 20  # logits the rank features read (the same in training and drafting)
    shift: bool = True  # layer-wise shift between layers
    inherit: bool = True  # later blocks start from the parent slot's hidden (else from the anchor's feature)
    rank_head: bool = True  # co-trained rank head (else the tree keeps a fixed top-k per slot)
    valid_prefix: bool = True  # slot k's loss counts only where slots < k of its block were right
    # what a slot's loss is the mean over (`SLOT_LOSS_MEANS`): "reached", the rows it counts on (the
    # reference's); "all", every trained-on row, so a slot weighs as often as drafting reaches it
    slot_loss_mean: str = "reached"
    num_ttt_blocks: int = 3
    position_loss_weight: float = 0.8  # slot k's loss weight: w ** k
    rank_loss_weight: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    dtype: str = "float32"
    draft_vocab_size: int | None = None  # LM-head width; None: the target's whole vocabulary (see `draft_vocab`)

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
                     "num_layers", "block_size", "rank_classes", "rank_hidden", "rank_topk", "num_ttt_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SpecBlockConfig {name} must be an integer >= 1, got {value!r}")
        d = self.draft_vocab_size
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= self.vocab_size):
            raise ConfigError(f"SpecBlockConfig draft_vocab_size must be None or an integer in [1, vocab_size = "
                              f"{self.vocab_size}], got {d!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"SpecBlockConfig num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        layers = self.feature_layers
        if (not isinstance(layers, tuple) or not layers or len(set(layers)) != len(layers)
                or not all(isinstance(i, int) and i >= 0 for i in layers)):
            raise ConfigError(f"SpecBlockConfig feature_layers must be distinct target layer indices >= 0, "
                              f"got {layers!r}")
        bounds = self.rank_bounds
        if (len(bounds) != self.rank_classes - 1 or any(b < 1 for b in bounds)
                or any(a >= b for a, b in itertools.pairwise(bounds))):
            raise ConfigError(f"SpecBlockConfig rank_bounds {bounds!r} must be rank_classes - 1 = "
                              f"{self.rank_classes - 1} increasing ranks >= 1")
        if not 10 <= self.rank_topk <= self.draft_vocab:
            raise ConfigError(f"SpecBlockConfig rank_topk must be in [10, draft vocabulary {self.draft_vocab}], "
                              f"got {self.rank_topk}")
        if self.slot_loss_mean not in SLOT_LOSS_MEANS:
            raise ConfigError(f"SpecBlockConfig slot_loss_mean={self.slot_loss_mean!r} is not one of {SLOT_LOSS_MEANS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"SpecBlockConfig dtype={self.dtype!r} is not one of {DTYPES}")

    @classmethod
    def for_target(cls, target: ModelConfig, **overrides: Any) -> SpecBlockConfig:
        """The drafter shape for `target`: its width, heads, MLP, RoPE and vocabulary, EAGLE-3's
        feature layers; `overrides` replace any field."""
        return cls(**{**target_fields(target), **overrides})

    def check_target(self, target: ModelConfig) -> None:
        """A drafter must match its target's width, vocabulary and depth; say which value differs."""
        check_against_target("SpecBlock", self, target)

    @property
    def draft_vocab(self) -> int:
        """Width of the drafter's LM head: `draft_vocab_size`, or the whole target vocabulary."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @property
    def reduced_vocab(self) -> bool:
        """True when the LM head covers a subset of the target vocabulary (as the authors' released
        drafters do), so drafted ids go through a draft -> target id map before they enter a tree."""
        return self.draft_vocab_size is not None

    @property
    def feature_size(self) -> int:
        return len(self.feature_layers) * self.hidden_size

    @property
    def layer_config(self) -> ModelConfig:
        """The decoder layers' shape as a ModelConfig, so the shared MLP serves them."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           intermediate_size=self.intermediate_size, rope_theta=self.rope_theta,
                           rope_scaling=self.rope_scaling, rms_norm_eps=self.rms_norm_eps, dtype=self.dtype)

    @property
    def num_params(self) -> int:
        """Trainable parameters (the target embedding excluded)."""
        h, f, v, k = self.hidden_size, self.intermediate_size, self.draft_vocab, self.block_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        inputs = self.feature_size * h + 3 * h * h + k * h + 3 * h  # condition, fuse, queries, 3 norms
        layer = 2 * h * q + 2 * h * kv + 3 * h * f + 2 * h
        shift = (self.num_layers - 1) * 2 * h * h if self.shift else 0
        rank = (h + RANK_FEATURES) * self.rank_hidden + self.rank_hidden * self.rank_classes if self.rank_head else 0
        return inputs + self.num_layers * layer + shift + h + h * v + rank


class BlockOutput(NamedTuple):
    logits: jax.Array  # [B, R, K, Vd] float32 over the draft vocabulary (Vd = config.draft_vocab)
    hidden: jax.Array  # [B, R, K, H] pre-norm last-layer output: what a child block inherits
    rank_logits: jax.Array | None  # [B, R, K, C] float32 (None without a rank head)
    aux: tuple[Any, ...]  # one entry per layer, whatever the `attend` callable returned


Attend = Callable[[int, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def rank_features(logits_xV: jax.Array, topk: int) -> jax.Array:
    """[.., 15] statistics of a slot's draft logits: with t_1 >= .. >= t_topk and Z = logsumexp(t),
    the log-probs t_i - Z (i <= 10), gaps t_1 - t_2, t_1 - t_3, t_1 - t_5, p_1, and the entropy over
    the top `topk`."""
    top_xK, _ = top_k(logits_xV.astype(jnp.float32), topk)
    logp_xK = top_xK - jax.nn.logsumexp(top_xK, axis=-1, keepdims=True)
    gaps = [top_xK[..., :1] - top_xK[..., i:i + 1] for i in (1, 2, 4)]
    entropy = -jnp.sum(jnp.exp(logp_xK) * logp_xK, axis=-1, keepdims=True)
    return jnp.concatenate([logp_xK[..., :10], *gaps, jnp.exp(logp_xK[..., :1]), entropy], axis=-1)


class BlockAttention(nn.Module):
    """GQA projections and RoPE; the attention itself is the caller's `attend`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, layer, x_BxQxH, positions_BxQ, attend: Attend):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        b, t, _ = x_BxQxH.shape
        q = dense(c.num_heads * c.head_dim, ("embed", "heads"), "q_proj", dtype)(x_BxQxH)
        k = dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "k_proj", dtype)(x_BxQxH)
        v = dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "v_proj", dtype)(x_BxQxH)
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), positions_BxQ, inv_freq)
        k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), positions_BxQ, inv_freq)
        out, aux = attend(layer, q, k, v.reshape(b, t, c.num_kv_heads, c.head_dim))
        return dense(c.hidden_size, ("heads", "embed"), "o_proj", dtype)(out), aux


class BlockLayer(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, layer, x, positions_BxQ, attend: Attend):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        h, aux = BlockAttention(c, name="self_attn")(
            layer, RMSNorm(c.rms_norm_eps, dtype, name="input_layernorm")(x), positions_BxQ, attend)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, dtype, name="post_attention_layernorm")(x))
        return x, aux


class SlotFuse(nn.Module):
    """The slot inputs fuse([cond; token; query_k]) @ W, W [3H, H], computed as cond @ W_c + token @ W_t
    once per row plus query_k @ W_q once per slot: a row's K slots share its condition and token, so
    this is the same linear map at 2 / 3K of the FLOPs of the concatenated [rows x K, 3H] input."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, cond_BxRxH, token_BxRxH, queries_KxH):
        h = cond_BxRxH.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("features", "embed")),
                            (3 * h, self.features), self.dtype)
        row_BxRxH = cond_BxRxH @ kernel[:h] + token_BxRxH @ kernel[h:2 * h]
        return row_BxRxH[:, :, None] + queries_KxH @ kernel[2 * h:]


def _shift_init(key, shape, dtype):
    """[A; B] = [I; 0] + N(0, 0.02): the shift starts close to the plain residual stream and learns
    how much of the previous slot to mix in (the reference starts from a random mixing)."""
    h = shape[1]
    return (jnp.eye(2 * h, h) + 0.02 * jax.random.normal(key, shape)).astype(dtype)


class SpecBlockDrafter(nn.Module):
    """One block over R rows: condition (target features `features_BxRxF`, or an inherited
    `hidden_BxRxH`; exactly one is given) and token embedding per row -> K slots per row. With
    `head_rows_BxN` the outputs (hidden, logits, rank) are of those rows only: drafting needs the
    keys/values of every row it caches but the heads of the query row alone."""

    config: SpecBlockConfig

    @nn.compact
    def __call__(self, embeds_BxRxH, rows_BxR, attend: Attend, *, features_BxRxF=None, hidden_BxRxH=None,
                 head_rows_BxN=None) -> BlockOutput:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        h, k_slots, eps = c.hidden_size, c.block_size, c.rms_norm_eps
        if (features_BxRxF is None) == (hidden_BxRxH is None):
            raise ValueError("give exactly one of features_BxRxF (target features) and hidden_BxRxH")
        if features_BxRxF is not None:
            hidden_BxRxH = dense(h, ("features", "embed"), "condition_proj", dtype)(features_BxRxF.astype(dtype))
        cond_BxRxH = RMSNorm(eps, dtype, name="condition_norm")(hidden_BxRxH.astype(dtype))
        token_BxRxH = RMSNorm(eps, dtype, name="token_norm")(embeds_BxRxH.astype(dtype))
        queries_KxH = self.param("position_queries", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                                   (None, "embed")),
                                 (k_slots, h), dtype)
        queries_KxH = RMSNorm(eps, dtype, name="query_norm")(queries_KxH)
        b, r = rows_BxR.shape
        x = SlotFuse(h, dtype, name="fuse")(cond_BxRxH, token_BxRxH, queries_KxH).reshape(b, r * k_slots, h)
        positions_BxQ = (rows_BxR[:, :, None] + 1 + jnp.arange(k_slots)).reshape(b, r * k_slots).astype(jnp.int32)
        lc = c.layer_config
        aux = []
        for layer in range(c.num_layers):
            if layer > 0 and c.shift:
                x_BxRxKxH = x.reshape(b, r, k_slots, h)
                prev = jnp.concatenate([x_BxRxKxH[:, :, :1], x_BxRxKxH[:, :, :-1]], axis=2)
                shift = nn.Dense(h, use_bias=False, dtype=dtype, param_dtype=dtype, name=f"shift_{layer}",
                                 kernel_init=nn.with_logical_partitioning(_shift_init, ("features", "embed")))
                x = shift(jnp.concatenate([x_BxRxKxH, prev], axis=-1)).reshape(b, r * k_slots, h)
            x, layer_aux = BlockLayer(lc, name=f"layers_{layer}")(layer, x, positions_BxQ, attend)
            aux.append(layer_aux)
        hidden = x.reshape(b, r, k_slots, h)
        if head_rows_BxN is not None:
            hidden = jnp.take_along_axis(hidden, head_rows_BxN[:, :, None, None], axis=1)
        logits, rank_logits = _heads(c, hidden)
        return BlockOutput(logits, hidden, rank_logits, tuple(aux))


def _heads(c: SpecBlockConfig, hidden_xH: jax.Array, lora: tuple[jax.Array, jax.Array] | None = None
           ) -> tuple[jax.Array, jax.Array | None]:
    """The output heads of a slot's pre-norm hidden, defined in the calling module's scope (so the
    drafter and `SpecBlockHeads` name their parameters alike): float32 logits and rank logits. `lora`
    (A [H, r], B [r, V]) adds normed @ A @ B to the logits: the LM head plus a low-rank delta, without
    forming the [H, V] sum (a gradient through it would cost a dense [H, V] product per step)."""
    dtype = jnp.dtype(c.dtype)
    normed = RMSNorm(c.rms_norm_eps, dtype, name="norm")(hidden_xH)
    logits = dense(c.draft_vocab, ("embed", "vocab"), "lm_head", dtype)(normed).astype(jnp.float32)
    if lora is not None:
        logits = logits + (normed.astype(jnp.float32) @ lora[0]) @ lora[1]
    rank_logits = None
    if c.rank_head:  # detached inputs: the rank loss never trains the drafter
        rank_in = jnp.concatenate([jax.lax.stop_gradient(normed).astype(jnp.float32),
                                   rank_features(jax.lax.stop_gradient(logits), c.rank_topk)], axis=-1)
        z = dense(c.rank_hidden, (None, None), "rank_in", jnp.float32)(rank_in)
        rank_logits = dense(c.rank_classes, (None, None), "rank_out", jnp.float32)(nn.silu(z))
    return logits, rank_logits


class SpecBlockHeads(nn.Module):
    """The drafter's output heads alone, over its own parameters `HEAD_PARAMS`."""

    config: SpecBlockConfig

    @nn.compact
    def __call__(self, hidden_xH, lora=None):
        return _heads(self.config, hidden_xH, lora)


HEAD_PARAMS = ("norm", "lm_head", "rank_in", "rank_out")  # the drafter's parameters `heads` reads


def heads(params: Any, config: SpecBlockConfig, hidden_xH: jax.Array, lora: tuple[jax.Array, jax.Array] | None = None
          ) -> tuple[jax.Array, jax.Array | None]:
    """(logits, rank logits) of pre-norm hiddens (`BlockOutput.hidden`), exactly as the drafter's forward
    computes them: the heads read nothing else, so buffered hiddens replay the drafter's outputs. `lora`:
    a low-rank delta on the LM head (`_heads`)."""
    own = {name: params[name] for name in HEAD_PARAMS if name in params}
    return SpecBlockHeads(config).apply({"params": own}, hidden_xH, lora)


def _init_args(config: SpecBlockConfig):
    """One row of dummy inputs (block-1 attention) and target features to trace the drafter with."""
    args = (jnp.zeros((1, 1, config.hidden_size)), jnp.zeros((1, 1), jnp.int32),
            _train_attend(config.block_size, None, [], None))
    return args, jnp.zeros((1, 1, config.feature_size))


def init_params(config: SpecBlockConfig, rng: jax.Array) -> Any:
    """Random drafter parameters (normal 0.02, norms at one, shift near identity), unboxed."""
    args, features = _init_args(config)
    return nn.meta.unbox(SpecBlockDrafter(config).init(rng, *args, features_BxRxF=features)["params"])


def param_axes(config: SpecBlockConfig) -> Any:
    """Logical axis names of every drafter parameter (PartitionSpecs), without allocating them."""
    args, features = _init_args(config)
    boxed = jax.eval_shape(lambda: SpecBlockDrafter(config).init(jax.random.key(0), *args,
                                                                 features_BxRxF=features)["params"])
    return nn.get_partition_spec(boxed)


def forward(params: Any, config: SpecBlockConfig, table_VxH: jax.Array, tokens_BxR: jax.Array, rows_BxR: jax.Array,
            attend: Attend, *, features_BxRxF=None, hidden_BxRxH=None, head_rows_BxN=None) -> BlockOutput:
    """One block over explicit params: the row tokens' embeddings come from the target's table."""
    embeds = jnp.take(table_VxH, tokens_BxR, axis=0)
    return SpecBlockDrafter(config).apply({"params": params}, embeds, rows_BxR, attend,
                                          features_BxRxF=features_BxRxF, hidden_BxRxH=hidden_BxRxH,
                                          head_rows_BxN=head_rows_BxN)


# ---------------------------------------------------------------------------------------------------
# Training: the multi-block training-time test.

CHUNK_ROWS = 32  # training attention's query rows per chunk (see `_train_attend`)


def _train_attend(block_size: int, cross, local, local_mask_BxTxL, chunk_rows: int = CHUNK_ROWS):
    """Training attention of one block over T rows of K slots. Slot (j, k) sees block 1's keys at every
    slot of rows j' < j (`cross`, per layer; None in block 1 itself: its own keys), its own row's
    keys of earlier blocks where `local_mask_BxTxL` allows (`local`, per layer [B, T, L, G, D]), and
    its own row's slots <= k of this block. Block >= 2 never sees other rows' keys of block >= 2:
    drafting cannot either (only committed rows are cached).

    The query rows go in chunks of `chunk_rows`, each against the block-1 keys of the rows before its
    end only: the cross scores are the step's largest tensors, and the causal half of them that every
    query would mask is never built (with 32-row chunks of 256 rows, 56 % of the full square)."""
    k_slots = block_size

    def attend(layer, q_BxQxNxD, k_BxQxGxD, v_BxQxGxD):
        b, q_len, n, d = q_BxQxNxD.shape
        g, t = k_BxQxGxD.shape[2], q_len // k_slots
        cross_k, cross_v = (k_BxQxGxD, v_BxQxGxD) if cross is None else cross[layer]
        own_k = k_BxQxGxD.reshape(b, t, k_slots, g, d)
        own_v = v_BxQxGxD.reshape(b, t, k_slots, g, d)
        causal_KxK = jnp.arange(k_slots)[None, :] <= jnp.arange(k_slots)[:, None]
        mask_BxTxKxL = jnp.broadcast_to(causal_KxK, (b, t, k_slots, k_slots))
        if local:
            own_k = jnp.concatenate([local[layer][0], own_k], axis=2)
            own_v = jnp.concatenate([local[layer][1], own_v], axis=2)
            earlier = jnp.broadcast_to(local_mask_BxTxL[:, :, None, :], (b, t, k_slots, local_mask_BxTxL.shape[-1]))
            mask_BxTxKxL = jnp.concatenate([earlier, mask_BxTxKxL], axis=-1)
        q = q_BxQxNxD.reshape(b, t, k_slots, g, n // g, d) / math.sqrt(d)
        # Chunks by split, not by slicing: a slice's gradient is a zero-padded full-size tensor per chunk,
        # a split's is one concatenation (4-5 % of SpecBlock's SmolLM2 training step).
        cuts = list(range(chunk_rows, t, chunk_rows))
        chunks = lambda x, scale=1: jnp.split(x, [c * scale for c in cuts], axis=1)
        q_chunks, own_k_chunks, own_v_chunks, mask_chunks = map(chunks, (q, own_k, own_v, mask_BxTxKxL))
        cross_k_chunks, cross_v_chunks = chunks(cross_k, k_slots), chunks(cross_v, k_slots)
        outs = []
        for i, lo in enumerate(range(0, t, chunk_rows)):  # static: each chunk's key count is its own
            hi = min(lo + chunk_rows, t)
            q_c, keys = q_chunks[i], hi * k_slots
            chunk_k = jnp.concatenate(cross_k_chunks[:i + 1], axis=1)
            chunk_v = jnp.concatenate(cross_v_chunks[:i + 1], axis=1)
            cross_scores = jnp.einsum("btkgnd,bsgd->bgntks", q_c, chunk_k, preferred_element_type=jnp.float32)
            row_S = jnp.arange(keys) // k_slots
            cross_scores = jnp.where(row_S < jnp.arange(lo, hi)[:, None, None], cross_scores, NEG_INF)
            own_scores = jnp.einsum("btkgnd,btlgd->bgntkl", q_c, own_k_chunks[i], preferred_element_type=jnp.float32)
            own_scores = jnp.where(mask_chunks[i][:, None, None], own_scores, NEG_INF)
            # One softmax over both key sets, without concatenating them (a concatenation, and its
            # gradient's slices, would copy the scores). The shift leaves the softmax unchanged, so
            # no gradient flows through it.
            top = jax.lax.stop_gradient(jnp.maximum(jnp.max(cross_scores, axis=-1), jnp.max(own_scores, axis=-1)))
            cross_p, own_p = jnp.exp(cross_scores - top[..., None]), jnp.exp(own_scores - top[..., None])
            total_BxGxNxTxK = jnp.sum(cross_p, axis=-1) + jnp.sum(own_p, axis=-1)
            out = (jnp.einsum("bgntks,bsgd->btkgnd", cross_p.astype(v_BxQxGxD.dtype), chunk_v,
                              preferred_element_type=jnp.float32)
                   + jnp.einsum("bgntkl,btlgd->btkgnd", own_p.astype(v_BxQxGxD.dtype), own_v_chunks[i],
                                preferred_element_type=jnp.float32))
            outs.append(out / jnp.transpose(total_BxGxNxTxK, (0, 3, 4, 1, 2))[..., None])
        out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
        return out.astype(v_BxQxGxD.dtype).reshape(b, q_len, n * d), (k_BxQxGxD, v_BxQxGxD)

    return attend


class TTTBlocks(NamedTuple):
    outputs: tuple[BlockOutput, ...]  # one per block; `aux` holds each layer's (k, v) of the block
    offsets_NxBxT: jax.Array  # int32 depth of each block's slot 0 below its anchor row's block-1 slot 0


def ttt_forward(params: Any, config: SpecBlockConfig, table_VxH: jax.Array, features_BxTxF: jax.Array,
                tokens_BxT: jax.Array, inherit_BxTxN1: jax.Array, chunk_rows: int = CHUNK_ROWS) -> TTTBlocks:
    """The multi-block unroll over a packed sequence. Block 0, row j: (f_j, x_{j+1}); slot k at depth
    d = k predicts x_{j+2+d}. Block b + 1 of row j inherits from slot M - 1 of block b
    (M = inherit[.., b] in 1..K): condition that slot's hidden (or f_j without `inherit`), token the
    ground truth x_{j+1+O} at the new offset O = O_b + M (teacher forcing), and attention to row j's
    block-b slots < M besides block 1's earlier rows. Nothing is detached. Tokens past the sequence
    are clamped to its end: their targets are masked by the loss. `chunk_rows` sets how many query
    rows the attention takes at once (`_train_attend`): a matter of speed, not of the result."""
    c = config
    b, t = tokens_BxT.shape
    k_slots = c.block_size
    rows_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    offset_BxT = jnp.zeros((b, t), jnp.int32)
    condition = {"features_BxRxF": features_BxTxF}
    cross, local, local_mask = None, [], None
    outputs, offsets = [], []
    for block in range(c.num_ttt_blocks):  # static unroll
        token_BxT = jnp.take_along_axis(tokens_BxT, jnp.minimum(rows_BxT + 1 + offset_BxT, t - 1), axis=1)
        attend = _train_attend(k_slots, cross, local, local_mask, chunk_rows)
        out = forward(params, c, table_VxH, token_BxT, rows_BxT, attend, **condition)
        outputs.append(out)
        offsets.append(offset_BxT)
        if block == c.num_ttt_blocks - 1:
            break
        m_BxT = inherit_BxTxN1[..., block].astype(jnp.int32)
        kv_rows = [(kb.reshape(b, t, k_slots, *kb.shape[2:]), vb.reshape(b, t, k_slots, *vb.shape[2:]))
                   for kb, vb in out.aux]
        cross = out.aux if cross is None else cross
        local = kv_rows if not local else [(jnp.concatenate([lk, nk], axis=2), jnp.concatenate([lv, nv], axis=2))
                                           for (lk, lv), (nk, nv) in zip(local, kv_rows)]
        seen_BxTxK = jnp.arange(k_slots) < m_BxT[..., None]
        local_mask = seen_BxTxK if local_mask is None else jnp.concatenate([local_mask, seen_BxTxK], axis=-1)
        offset_BxT = offset_BxT + m_BxT
        if c.inherit:
            parent_BxTxH = jnp.take_along_axis(out.hidden, (m_BxT - 1)[:, :, None, None], axis=2)[:, :, 0]
            condition = {"hidden_BxRxH": parent_BxTxH}
    return TTTBlocks(tuple(outputs), jnp.stack(offsets))


def sample_inherit(config: SpecBlockConfig, key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """[B, T, num_ttt_blocks - 1] int32 slot counts M ~ Uniform{1..K}, drawn per anchor row (the
    reference draws one M per batch)."""
    return jax.random.randint(key, (*shape, config.num_ttt_blocks - 1), 1, config.block_size + 1, jnp.int32)


class BlockMetrics(NamedTuple):
    loss_K: jax.Array  # [K] soft cross-entropy per slot under the training mask
    acc_K: jax.Array  # [K] accuracy per slot where the earlier slots were right
    rank_loss: jax.Array  # [] (0 without a rank head)
    rank_acc: jax.Array  # []


def block_metrics(out: BlockOutput, offset_BxT: jax.Array, teacher: losses.Teacher, loss_mask_BxT: jax.Array,
                  valid_prefix: bool, rank_bounds: tuple[int, ...], slot_loss_mean: str) -> BlockMetrics:
    """One block's losses. Slot k of row j at depth O + k is taught by the target at position
    p = j + 1 + O + k (its distribution of x_{p+1}), counted where p < T and loss_mask[p]. With the
    valid-prefix mask, slot k's loss sums over the rows it counts on and divides by their number
    (`slot_loss_mean` "reached") or by all trained-on rows ("all"). "reached" gives a slot its full
    weight however rarely drafting reaches it; "all" weighs it by that rate, so slot 0 learns first
    and later slots join as the earlier ones get right (on SmolLM2 the later slots at full weight, with
    or without the mask, held every slot at unigram accuracy)."""
    b, t, k_slots, _ = out.logits.shape
    pos_BxTxK = jnp.arange(t)[None, :, None] + 1 + offset_BxT[..., None] + jnp.arange(k_slots)
    pos_BxQ = jnp.minimum(pos_BxTxK, t - 1).reshape(b, t * k_slots)
    taught = jax.tree.map(lambda x: x.reshape(b, t, k_slots, *x.shape[2:]), teacher.rows(pos_BxQ))
    mask_BxTxK = (pos_BxTxK < t) * jnp.take_along_axis(loss_mask_BxT, pos_BxQ, axis=1).reshape(b, t, k_slots)
    hit_BxTxK = jnp.argmax(out.logits, axis=-1) == taught.argmax_BxT
    chain_BxTxK = losses.valid_prefix_mask(hit_BxTxK, mask_BxTxK)
    train_BxTxK = chain_BxTxK if valid_prefix else mask_BxTxK
    ce_BxTxK = losses.cross_entropy(out.logits, taught.probs_BxTxk, taught.ids_BxTxk)
    total = lambda x: jnp.sum(x, axis=(0, 1))
    rows_K = total(train_BxTxK if slot_loss_mean == "reached" else mask_BxTxK)
    loss_K = total(ce_BxTxK * train_BxTxK) / jnp.maximum(rows_K, 1.0)
    acc_K = total(hit_BxTxK * chain_BxTxK) / jnp.maximum(total(chain_BxTxK), 1.0)
    if out.rank_logits is None:
        return BlockMetrics(loss_K, acc_K, jnp.zeros(()), jnp.zeros(()))
    labels_BxTxK = losses.rank_labels(jax.lax.stop_gradient(out.logits), taught.argmax_BxT, rank_bounds)
    right_BxTxK = (jnp.argmax(out.rank_logits, axis=-1) == labels_BxTxK) * mask_BxTxK
    return BlockMetrics(loss_K, acc_K, losses.rank_loss(out.rank_logits, labels_BxTxK, mask_BxTxK),
                        jnp.sum(right_BxTxK) / jnp.maximum(jnp.sum(mask_BxTxK), 1.0))


def train_metrics(params: Any, config: SpecBlockConfig, table_VxH: jax.Array, features_BxTxF: jax.Array,
                  tokens_BxT: jax.Array, teacher: losses.Teacher, loss_mask_BxT: jax.Array, key: jax.Array,
                  inherit_BxTxN1: jax.Array | None = None) -> losses.SpecBlockLoss:
    """SpecBlock's training loss over a packed batch: `ttt_forward` with inheritance slots drawn from
    `key` per anchor row (or given), then sum_k w**k sum_b L_{b,k} + rank weight * sum_b R_b. The
    teacher at p (`losses.dense_teacher` or `topk_teacher`, over the drafter's vocabulary) is the
    target's distribution of x_{p+1}; `loss_mask[p]` says x_{p+1} is trained on."""
    c = config
    if teacher.ids_BxTxk is None and teacher.probs_BxTxk.shape[-1] != c.draft_vocab:
        raise ValueError(f"the teacher covers {teacher.probs_BxTxk.shape[-1]} ids, the drafter's vocabulary "
                         f"{c.draft_vocab}: restrict it with the draft_to_target map")
    if inherit_BxTxN1 is None:
        inherit_BxTxN1 = sample_inherit(c, key, tokens_BxT.shape)
    blocks = ttt_forward(params, c, table_VxH, features_BxTxF, tokens_BxT, inherit_BxTxN1)
    per_block = [block_metrics(out, offset_BxT, teacher, loss_mask_BxT.astype(jnp.float32), c.valid_prefix,
                               c.rank_bounds, c.slot_loss_mean)
                 for out, offset_BxT in zip(blocks.outputs, blocks.offsets_NxBxT)]
    loss_NxK = jnp.stack([m.loss_K for m in per_block])
    acc_NxK = jnp.stack([m.acc_K for m in per_block])
    rank_loss = sum(m.rank_loss for m in per_block)
    weights_K = c.position_loss_weight ** jnp.arange(c.block_size, dtype=jnp.float32)
    total = jnp.sum(weights_K * jnp.sum(loss_NxK, axis=0)) + c.rank_loss_weight * rank_loss
    return losses.SpecBlockLoss(loss=total, step_loss_K=loss_NxK[0], step_acc_K=acc_NxK[0], rank_loss=rank_loss,
                                rank_acc=per_block[0].rank_acc, block_loss_NxK=loss_NxK, block_acc_NxK=acc_NxK)
