"""The EAGLE-3 drafter (the baseline): one decoder layer over fused low/mid/high target features.

Row j of a drafter input is EAGLE's pair (condition of token x_j, embedding of x_{j+1}); it predicts
x_{j+2}. The condition is `fc` of the concatenated outputs of three target layers (3H -> H) for a
target feature, or the drafter's own pre-norm output hidden when it drafts past what the target has
seen. The layer's attention reads concat(RMSNorm(embed), RMSNorm(hidden)) (2H -> q/k/v) while the
residual stream is the hidden; then a SwiGLU MLP, a final norm and the drafter's own LM head.

Training unrolls the drafter `ttt_steps` times (EAGLE-3's training-time test): step k > 0 feeds the
previous step's hidden back in place of the target feature, with the token shifted once more, and
attends to step 0's keys/values at earlier positions plus its own position's keys/values of steps
0..k. The target's embedding table is an input, never a drafter parameter, so it is not trained and
not duplicated in drafter checkpoints.

The layer computes what EAGLE-3's published `LlamaForCausalLMEagle3` computes (SafeAILab/EAGLE,
SpecForge, SGLang and vLLM read the same checkpoints), so imported weights (`eagle3_hf`) decode as
they do there: `fc` without bias or norm; `input_layernorm` on the embedding and `hidden_norm` on the
hidden, concatenated in that order (embedding first) into q/k/v of input 2H; the residual is the
un-normed hidden; the next step's hidden is the pre-final-norm output. With `draft_vocab_size` set,
the LM head covers a subset of the target vocabulary (see "reduced draft vocabularies" below).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax.config import ConfigError, DTYPES, ModelConfig, RopeScaling
from specblock_jax.models.layers import MLP, Attention, RMSNorm, dense


def default_feature_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / mid / high target layers (0-indexed decoder-layer outputs).

    L >= 8: (1, L/2 - 1, L - 4), as EAGLE-3 and SpecBlock read them (Llama-3.1-8B: 1, 15, 28).
    3 <= L < 8 (the embedded 4-layer target): (0, max(L//2 - 1, 1), L - 1), so the three layers stay
    distinct and the last one is still the deepest the target has (4 layers: 0, 1, 3).
    """
    n = num_target_layers
    if n < 3:
        raise ConfigError(f"EAGLE-3 needs 3 distinct target feature layers; the target has only {n} layer(s)")
    if n >= 8:
        return (1, n // 2 - 1, n - 4)
    return (0, max(n // 2 - 1, 1), n - 1)


def target_fields(target: ModelConfig) -> dict[str, Any]:
    """What a drafter copies from its target (EAGLE-3 and SpecBlock alike): width, heads, MLP,
    vocabulary, RoPE, norm epsilon, dtype, and EAGLE-3's feature layers for the target's depth."""
    return dict(hidden_size=target.hidden_size, num_heads=target.num_heads, num_kv_heads=target.num_kv_heads,
                head_dim=target.head_dim, intermediate_size=target.intermediate_size, vocab_size=target.vocab_size,
                feature_layers=default_feature_layers(target.num_layers), rms_norm_eps=target.rms_norm_eps,
                rope_theta=target.rope_theta, rope_scaling=target.rope_scaling, dtype=target.dtype)


def check_against_target(name: str, config: Any, target: ModelConfig) -> None:
    """A drafter must match its target's width, vocabulary and depth; say which value differs."""
    for field in ("hidden_size", "vocab_size"):
        if getattr(config, field) != getattr(target, field):
            raise ConfigError(f"{name} drafter {field} {getattr(config, field)} does not match the target's "
                              f"{getattr(target, field)}")
    if max(config.feature_layers) >= target.num_layers:
        raise ConfigError(f"{name} feature_layers {config.feature_layers} exceed the target's "
                          f"{target.num_layers} layers")


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """Shape of an EAGLE-3 drafter for one target (`vocab_size` is the target's vocabulary)."""

    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = ("ttt_steps", "dtype")  # free to change when fine-tuning

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    feature_layers: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    dtype: str = "float32"
    ttt_steps: int = 7  # training-time-test unroll (EAGLE-3 baseline: 7)
    draft_vocab_size: int | None = None  # LM-head width; None: the target's whole vocabulary (see `draft_vocab`)

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
                     "ttt_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Eagle3Config {name} must be an integer >= 1, got {value!r}")
        d = self.draft_vocab_size
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= self.vocab_size):
            raise ConfigError(f"Eagle3Config draft_vocab_size must be None or an integer in [1, vocab_size = "
                              f"{self.vocab_size}], got {d!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"Eagle3Config num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        layers = self.feature_layers
        if (not isinstance(layers, tuple) or len(layers) != 3 or len(set(layers)) != 3
                or not all(isinstance(i, int) and i >= 0 for i in layers)):
            raise ConfigError(f"Eagle3Config feature_layers must be 3 distinct target layer indices >= 0, "
                              f"got {layers!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"Eagle3Config dtype={self.dtype!r} is not one of {DTYPES}")

    @classmethod
    def for_target(cls, target: ModelConfig, **overrides: Any) -> Eagle3Config:
        """The EAGLE-3 baseline shape for `target`: its width, heads, RoPE and vocabulary, and the
        default feature layers; `overrides` replace any field."""
        return cls(**{**target_fields(target), **overrides})

    def check_target(self, target: ModelConfig) -> None:
        """A drafter must match its target's width, vocabulary and depth; say which value differs."""
        check_against_target("EAGLE-3", self, target)

    @property
    def draft_vocab(self) -> int:
        """Width of the drafter's LM head: `draft_vocab_size`, or the whole target vocabulary."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @property
    def reduced_vocab(self) -> bool:
        """True when the LM head covers a subset of the target vocabulary, so drafted ids go through a
        draft -> target id map (`draft_to_target`) before they enter a tree."""
        return self.draft_vocab_size is not None

    @property
    def layer_config(self) -> ModelConfig:
        """The decoder layer's shape as a ModelConfig, so the shared Attention and MLP serve it."""
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=1,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           intermediate_size=self.intermediate_size, rope_theta=self.rope_theta,
                           rope_scaling=self.rope_scaling, rms_norm_eps=self.rms_norm_eps, dtype=self.dtype)

    @property
    def num_params(self) -> int:
        """Trainable parameters (the target embedding excluded)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.draft_vocab
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        fc = 3 * h * h
        attn = 2 * h * (q + 2 * kv) + q * h
        return fc + attn + 3 * h * f + 4 * h + h * v  # 4 norms: embed, hidden, post-attention, final


class DrafterOutput(NamedTuple):
    logits: jax.Array  # [B, T, Vd] float32 over the draft vocabulary (Vd = config.draft_vocab)
    hidden: jax.Array  # [B, T, H] pre-norm layer output: the next step's condition
    kv: tuple[jax.Array, jax.Array] | None  # the (k, v) buffers with this call's rows written


class Eagle3Drafter(nn.Module):
    """One drafter step over T rows. The condition is either target features (`features_BxTxF`, fused
    by `fc`) or a hidden (`hidden_BxTxH`, the previous step's output); exactly one is given.

    `kv` are head-major [B, K, S, D] key/value buffers: this call's rows are written at `slots_BxT` first, then
    attended under `mask_BxTxS` (the same contract as the target's cache; `kv_live` and `kv_tail` as
    `layers.Attention`'s)."""

    config: Eagle3Config

    @nn.compact
    def __call__(self, embeds_BxTxH, positions_BxT, mask_BxTxS, kv, slots_BxT, *, features_BxTxF=None,
                 hidden_BxTxH=None, kv_live=None, kv_tail: int = 0) -> DrafterOutput:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if (features_BxTxF is None) == (hidden_BxTxH is None):
            raise ValueError("give exactly one of features_BxTxF (target features) and hidden_BxTxH")
        if features_BxTxF is not None:
            hidden_BxTxH = dense(c.hidden_size, ("features", "embed"), "fc", dtype)(features_BxTxF.astype(dtype))
        hidden_BxTxH = hidden_BxTxH.astype(dtype)
        embeds = RMSNorm(c.rms_norm_eps, dtype, name="input_layernorm")(embeds_BxTxH.astype(dtype))
        cond = RMSNorm(c.rms_norm_eps, dtype, name="hidden_norm")(hidden_BxTxH)
        attn_BxTxH, kv = Attention(c.layer_config, name="self_attn")(
            jnp.concatenate([embeds, cond], axis=-1), positions_BxT, mask_BxTxS, kv, slots_BxT, kv_live, kv_tail)
        x = hidden_BxTxH + attn_BxTxH
        x = x + MLP(c.layer_config, name="mlp")(RMSNorm(c.rms_norm_eps, dtype, name="post_attention_layernorm")(x))
        logits = lm_head(c.draft_vocab, dtype)(RMSNorm(c.rms_norm_eps, dtype, name="norm")(x))
        return DrafterOutput(logits, x, kv)


def lm_head(vocab: int, dtype) -> nn.Dense:
    """The drafter's LM head: parameters and inputs in the model dtype, logits accumulated and
    returned in float32 (in bfloat16, rounding logits to 8 mantissa bits would blur the soft
    targets of the TTT loss and the top-k scores of drafting)."""
    return nn.Dense(vocab, use_bias=False, dtype=dtype, param_dtype=dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                    dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32),
                    name="lm_head")


def _dummy_inputs(config: Eagle3Config):
    h = config.hidden_size
    kv = (jnp.zeros((1, config.num_kv_heads, 1, config.head_dim), jnp.dtype(config.dtype)),) * 2
    ids = jnp.zeros((1, 1), jnp.int32)
    return (jnp.zeros((1, 1, h)), ids, jnp.ones((1, 1, 1), bool), kv, ids), jnp.zeros((1, 1, 3 * h))


def init_params(config: Eagle3Config, rng: jax.Array) -> Any:
    """Random drafter parameters (normal 0.02, norms at one), unboxed from their logical axes."""
    args, features = _dummy_inputs(config)
    return nn.meta.unbox(Eagle3Drafter(config).init(rng, *args, features_BxTxF=features)["params"])


def param_axes(config: Eagle3Config) -> Any:
    """Logical axis names of every drafter parameter (PartitionSpecs), without allocating them."""
    args, features = _dummy_inputs(config)
    boxed = jax.eval_shape(lambda: Eagle3Drafter(config).init(jax.random.key(0), *args,
                                                              features_BxTxF=features)["params"])
    return nn.get_partition_spec(boxed)


def step(params: Any, config: Eagle3Config, embeds_BxTxH, positions_BxT, mask_BxTxS, kv, slots_BxT, *,
         features_BxTxF=None, hidden_BxTxH=None, kv_live=None, kv_tail: int = 0) -> DrafterOutput:
    """Apply one drafter step to explicit params (see `Eagle3Drafter`)."""
    return Eagle3Drafter(config).apply({"params": params}, embeds_BxTxH, positions_BxT, mask_BxTxS, kv, slots_BxT,
                                       features_BxTxF=features_BxTxF, hidden_BxTxH=hidden_BxTxH, kv_live=kv_live,
                                       kv_tail=kv_tail)


def embed(table_VxH: jax.Array, tokens: jax.Array) -> jax.Array:
    """The frozen target embedding of `tokens` (the table is an input, not a drafter parameter)."""
    return jnp.take(table_VxH, tokens, axis=0)


def ttt_mask(t: int, k: int) -> jax.Array:
    """[T, (k+1) T] bool: step k's row j sees step 0 at positions <= j and its own position j at
    steps 1..k (keys of step s live at s * T + i)."""
    rows_T = jnp.arange(t)[:, None]
    cols = jnp.arange((k + 1) * t)[None, :]
    step_of, pos_of = cols // t, cols % t
    return jnp.where(step_of == 0, pos_of <= rows_T, pos_of == rows_T)


def ttt_forward(params: Any, config: Eagle3Config, table_VxH: jax.Array, features_BxTxF: jax.Array,
                tokens_BxT: jax.Array) -> tuple[jax.Array, ...]:
    """Training-time test over a packed sequence: K = ttt_steps float32 logits [B, T, V], one per step.
    A tuple, not a stack: the gradient of a step read out of a [K, B, T, V] stack is that stack padded
    (K times over) and summed, which on the SmolLM2 target cost half of a training step.

    Step k, row j reads token x_{j+1+k} (0 past the end) at RoPE position j + k, the position it has
    when drafted at depth k, and predicts x_{j+2+k}; its condition is the target feature f_j at step 0
    and row j's hidden of step k - 1 after. Keys and values of all steps are concatenated (static
    shapes) and `ttt_mask` chooses what each step sees. Nothing is detached: gradients flow through
    every step. Rows whose target lies beyond the sequence are masked by the loss, not here."""
    b, t = tokens_BxT.shape
    c = config
    kv_shape = (b, c.num_kv_heads, t, c.head_dim)
    k_buf = v_buf = jnp.zeros((b, c.num_kv_heads, 0, c.head_dim), jnp.dtype(c.dtype))
    rows_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden_BxTxH, logits = None, []
    for k in range(c.ttt_steps):  # static unroll
        next_BxT = jnp.pad(tokens_BxT[:, 1 + k:], ((0, 0), (0, min(1 + k, t))))[:, :t]
        kv = (jnp.concatenate([k_buf, jnp.zeros(kv_shape, k_buf.dtype)], axis=2),
              jnp.concatenate([v_buf, jnp.zeros(kv_shape, v_buf.dtype)], axis=2))
        condition = dict(features_BxTxF=features_BxTxF) if k == 0 else dict(hidden_BxTxH=hidden_BxTxH)
        out = step(params, c, embed(table_VxH, next_BxT), rows_BxT + k, ttt_mask(t, k)[None], kv, rows_BxT + k * t,
                   **condition)
        (k_buf, v_buf), hidden_BxTxH = out.kv, out.hidden
        logits.append(out.logits)
    return tuple(logits)


# ---------------------------------------------------------------------------------------------
# reduced draft vocabularies (EAGLE-3's `d2t` / `t2d`)
#
# The drafter's LM head may cover only the `draft_vocab_size` most frequent target tokens. The map is
# kept as `draft_to_target_Vd`: int32 target ids in draft-id order (ascending target id, as EAGLE-3's
# `t2d`-masked gather orders them). Drafted ids are mapped through it before they enter a tree, so
# trees, verification and the KV cache only ever see target ids. The published checkpoint format
# stores the same map as offsets, `d2t[i] = draft_to_target[i] - i`, and `t2d` as a boolean mask.


def token_counts(tokens_NxT: np.ndarray, vocab_size: int, loss_mask_NxT: np.ndarray | None = None) -> np.ndarray:
    """[V] int64 occurrences of each token among the trained-on tokens: with the data pipeline's mask
    (`loss_mask[p]` covers x_{p+1}) the tokens x_{p+1} where loss_mask[p] > 0; without one, all tokens."""
    tokens_NxT = np.asarray(tokens_NxT)
    if tokens_NxT.ndim != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tokens_NxT.shape}")
    if loss_mask_NxT is None:
        counted = tokens_NxT.reshape(-1)
    else:
        mask_NxT = np.asarray(loss_mask_NxT)
        if mask_NxT.shape != tokens_NxT.shape:
            raise ValueError(f"loss_mask shape {mask_NxT.shape} does not match tokens {tokens_NxT.shape}")
        counted = tokens_NxT[:, 1:][mask_NxT[:, :-1] > 0]
    if counted.size and (counted.min() < 0 or counted.max() >= vocab_size):
        bad = counted[(counted < 0) | (counted >= vocab_size)][0]
        raise ValueError(f"token id {int(bad)} outside the vocabulary [0, {vocab_size})")
    return np.bincount(counted.astype(np.int64), minlength=vocab_size)


def vocab_mapping_from_counts(counts_V: np.ndarray, draft_vocab_size: int) -> np.ndarray:
    """The `draft_vocab_size` most frequent target ids (ties: the lower id; unseen ids fill up by id),
    sorted ascending: [Vd] int32 `draft_to_target`."""
    counts_V = np.asarray(counts_V)
    if not 1 <= draft_vocab_size <= len(counts_V):
        raise ValueError(f"draft_vocab_size {draft_vocab_size} must be in [1, {len(counts_V)}] (the target vocabulary)")
    order = np.lexsort((np.arange(len(counts_V)), -counts_V.astype(np.int64)))  # count desc, then id asc
    return np.sort(order[:draft_vocab_size]).astype(np.int32)


def build_vocab_mapping(tokens_NxT: np.ndarray, vocab_size: int, draft_vocab_size: int,
                        loss_mask_NxT: np.ndarray | None = None) -> np.ndarray:
    """`draft_to_target` [Vd] int32 from training data: its most frequent trained-on tokens."""
    return vocab_mapping_from_counts(token_counts(tokens_NxT, vocab_size, loss_mask_NxT), draft_vocab_size)


def check_vocab_mapping(draft_to_target_Vd: Any, config: Eagle3Config, where: str = "draft_to_target") -> np.ndarray:
    """A map fits `config`: [draft_vocab] distinct target ids in [0, vocab_size). Returns it as int32."""
    ids = np.asarray(draft_to_target_Vd)
    if ids.shape != (config.draft_vocab,):
        raise ValueError(f"{where} has shape {ids.shape}, expected ({config.draft_vocab},) (draft_vocab_size)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where} must hold integer target ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ValueError(f"{where} maps to target id {int(ids.min() if ids.min() < 0 else ids.max())}, outside "
                         f"the target vocabulary [0, {config.vocab_size})")
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{where} maps two draft ids to the same target id")
    return ids.astype(np.int32)


def d2t_offsets(draft_to_target_Vd: np.ndarray) -> np.ndarray:
    """EAGLE-3's `d2t` [Vd] int64: target_id = draft_id + d2t[draft_id]."""
    ids = np.asarray(draft_to_target_Vd, np.int64)
    return ids - np.arange(len(ids), dtype=np.int64)


def draft_to_target_from_d2t(d2t_Vd: np.ndarray) -> np.ndarray:
    """The inverse of `d2t_offsets`: [Vd] int64 offsets -> int32 target ids."""
    d2t = np.asarray(d2t_Vd, np.int64)
    return (np.arange(len(d2t), dtype=np.int64) + d2t).astype(np.int32)


def t2d_mask(draft_to_target_Vd: np.ndarray, vocab_size: int) -> np.ndarray:
    """EAGLE-3's `t2d` [V] bool: which target ids the draft vocabulary covers."""
    mask = np.zeros((vocab_size,), bool)
    mask[np.asarray(draft_to_target_Vd)] = True
    return mask


def target_to_draft(draft_to_target_Vd: jax.Array, vocab_size: int) -> jax.Array:
    """[V] int32: each target id's draft id, -1 where the draft vocabulary does not cover it."""
    draft_to_target_Vd = jnp.asarray(draft_to_target_Vd, jnp.int32)
    return jnp.full((vocab_size,), -1, jnp.int32).at[draft_to_target_Vd].set(
        jnp.arange(draft_to_target_Vd.shape[0], dtype=jnp.int32))


def to_target_ids(draft_ids: jax.Array, draft_to_target_Vd: jax.Array | None) -> jax.Array:
    """Draft-vocabulary ids -> target ids (identity without a map)."""
    if draft_to_target_Vd is None:
        return draft_ids
    return jnp.take(draft_to_target_Vd, draft_ids, axis=0)
