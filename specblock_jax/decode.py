"""Decoding: prefill a static KV cache, then generate inside one `jax.lax.while_loop`.

Plain decoding is one target forward per token. Its pieces (`prefill`, `is_eos`, the `DecodeResult`
layout, `generate`'s validation and timing) are shared with the speculative loop that will sit beside
`plain_init` / `plain_loop`. Rows are independent: each has its own length, its own stop, and decodes
greedily exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax import kvcache
from specblock_jax.config import ModelConfig
from specblock_jax.kvcache import KVCache
from specblock_jax.models import target as target_lib
from specblock_jax.sampling import SamplingParams, sample

PAD_ID = -1  # fills generated-token slots after a row stopped
MAX_LEN_MULTIPLE = 64  # default cache lengths and prompt widths are rounded up to this, to share compiles


class DecodeResult(NamedTuple):
    tokens_BxN: jax.Array  # [B, max_new_tokens] int32 generated ids, PAD_ID after a row stopped
    num_generated_B: jax.Array  # [B] int32, EOS included
    iterations: jax.Array  # [] int32 decode-loop target forwards (the prefill forward not counted)


class PlainState(NamedTuple):
    cache: KVCache  # lengths[b] = prompt + generated tokens of row b, except the newest (not yet written)
    tokens_BxN: jax.Array
    num_generated_B: jax.Array
    done_B: jax.Array
    rng: jax.Array
    iterations: jax.Array


def prefill(params: Any, config: ModelConfig, prompt_BxT: jax.Array, prompt_lens_B: jax.Array,
            max_len: int) -> tuple[KVCache, jax.Array]:
    """Right-padded prompts -> a `max_len`-slot cache committed up to each prompt's length, and each
    row's [B, V] logits at its last prompt token. Padding K/V lands in slots >= length, which decoding
    overwrites before any mask lets it be seen."""
    b, t = prompt_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = target_lib.forward(params, config, prompt_BxT, positions_BxT, kvcache.causal_mask(t, max_len),
                             kvcache.init_cache(config, b, max_len), positions_BxT,
                             logit_positions_BxP=(prompt_lens_B - 1)[:, None])
    return out.cache.replace(lengths=prompt_lens_B.astype(jnp.int32)), out.logits[:, 0]


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Elementwise: is the token one of the (static) stop ids."""
    stop = jnp.zeros(tokens.shape, bool)
    for eos in eos_ids:
        stop = stop | (tokens == eos)
    return stop


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "max_len", "sampling", "eos_ids"))
def plain_init(params: Any, config: ModelConfig, prompt_BxT: jax.Array, prompt_lens_B: jax.Array,
               rng: jax.Array, *, max_new_tokens: int, max_len: int, sampling: SamplingParams,
               eos_ids: tuple[int, ...]) -> PlainState:
    """Prefill and sample each row's first new token from its last prompt position."""
    cache, logits_BxV = prefill(params, config, prompt_BxT, prompt_lens_B, max_len)
    rng, key = jax.random.split(rng)
    first_B = sample(key, logits_BxV, sampling)
    b = prompt_BxT.shape[0]
    tokens_BxN = jnp.full((b, max_new_tokens), PAD_ID, jnp.int32).at[:, 0].set(first_B)
    return PlainState(cache=cache, tokens_BxN=tokens_BxN, num_generated_B=jnp.ones((b,), jnp.int32),
                      done_B=is_eos(first_B, eos_ids) | (max_new_tokens == 1), rng=rng,
                      iterations=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "sampling", "eos_ids"))
def plain_loop(params: Any, config: ModelConfig, state: PlainState, *, sampling: SamplingParams,
               eos_ids: tuple[int, ...]) -> PlainState:
    """One target forward per step until every row has stopped (EOS emitted, or max_new_tokens)."""
    max_new_tokens = state.tokens_BxN.shape[1]
    rows_B = jnp.arange(state.tokens_BxN.shape[0])

    def step(s: PlainState) -> PlainState:
        lengths_B = s.cache.lengths
        newest_B = s.tokens_BxN[rows_B, s.num_generated_B - 1]
        out = target_lib.forward(params, config, newest_B[:, None], lengths_B[:, None],
                                 kvcache.decode_mask(lengths_B, s.cache.max_len), s.cache, lengths_B[:, None])
        rng, key = jax.random.split(s.rng)
        next_B = sample(key, out.logits[:, 0], sampling)
        active_B = ~s.done_B
        # Stopped rows keep computing (static batch) but commit nothing: their writes are dropped.
        tokens_BxN = s.tokens_BxN.at[rows_B, jnp.where(active_B, s.num_generated_B, max_new_tokens)].set(
            next_B, mode="drop")
        num_generated_B = s.num_generated_B + active_B
        done_B = s.done_B | is_eos(next_B, eos_ids) | (num_generated_B >= max_new_tokens)
        return PlainState(cache=out.cache.replace(lengths=lengths_B + active_B), tokens_BxN=tokens_BxN,
                          num_generated_B=num_generated_B, done_B=done_B, rng=rng, iterations=s.iterations + 1)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), step, state)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "max_len", "sampling", "eos_ids"))
def decode_plain(params: Any, config: ModelConfig, prompt_BxT: jax.Array, prompt_lens_B: jax.Array,
                 rng: jax.Array, *, max_new_tokens: int, max_len: int, sampling: SamplingParams,
                 eos_ids: tuple[int, ...]) -> DecodeResult:
    """Plain decoding of right-padded prompts [B, T] (lengths [B]) in one dispatch, no host round trip."""
    state = plain_init(params, config, prompt_BxT, prompt_lens_B, rng, max_new_tokens=max_new_tokens,
                       max_len=max_len, sampling=sampling, eos_ids=eos_ids)
    state = plain_loop(params, config, state, sampling=sampling, eos_ids=eos_ids)
    return _result(state)


def _result(state: PlainState) -> DecodeResult:
    return DecodeResult(state.tokens_BxN, state.num_generated_B, state.iterations)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    token_ids: list[list[int]]  # generated ids per prompt, up to and including EOS
    texts: list[str] | None  # decoded (special tokens skipped) when the target has a tokenizer
    stats: dict[str, Any]


def generate(target: target_lib.Target, prompts: Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, drafter: Any = None, max_len: int | None = None,
             stop_on_eos: bool = True) -> GenerateOutput:
    """Generate continuations of a batch of prompts (strings, or token-id lists).

    Every input is checked before any compute. Compilation is done ahead and timed apart
    (`stats["compile_s"]`), so `prefill_s`, `decode_s` and `tokens_per_s` (all new tokens over
    prefill + decode time) measure execution only. Greedy rows decode exactly as they would alone;
    sampled rows share one rng stream, so a row's samples depend on the batch it is in.
    """
    if drafter is not None:
        raise NotImplementedError("speculative decoding arrives with the tree core")
    sampling = SamplingParams(temperature, top_k, top_p)
    config = target.config
    prompt_ids = _encode_prompts(target, prompts)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_len = _resolve_max_len(config, [len(p) for p in prompt_ids], max_new_tokens, max_len)
    width = min(_round_up(max(len(p) for p in prompt_ids), MAX_LEN_MULTIPLE), max_len)
    prompt_BxT = np.zeros((len(prompt_ids), width), np.int32)
    for i, ids in enumerate(prompt_ids):
        prompt_BxT[i, :len(ids)] = ids
    prompt_lens_B = np.array([len(p) for p in prompt_ids], np.int32)
    static = dict(sampling=sampling, eos_ids=tuple(config.eos_token_ids) if stop_on_eos else ())
    rng = jax.random.key(seed)

    start = time.perf_counter()
    init_lowered = plain_init.lower(target.params, config, prompt_BxT, prompt_lens_B, rng,
                                    max_new_tokens=max_new_tokens, max_len=max_len, **static)
    init_fn = init_lowered.compile()
    loop_fn = plain_loop.lower(target.params, config, init_lowered.out_info, **static).compile()
    compiled = time.perf_counter()
    state = jax.block_until_ready(init_fn(target.params, prompt_BxT, prompt_lens_B, rng))
    prefilled = time.perf_counter()
    result = jax.block_until_ready(_result(loop_fn(target.params, state)))
    done = time.perf_counter()

    tokens_BxN, num_B = np.asarray(result.tokens_BxN), np.asarray(result.num_generated_B)
    token_ids = [tokens_BxN[i, :num_B[i]].tolist() for i in range(len(prompt_ids))]
    texts = (None if target.tokenizer is None
             else [target.tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids])
    total_s = done - compiled
    stats = dict(iterations=int(result.iterations), target_forwards=int(result.iterations) + 1,
                 new_tokens=num_B.tolist(), max_len=max_len, compile_s=compiled - start,
                 prefill_s=prefilled - compiled, decode_s=done - prefilled,
                 tokens_per_s=float(num_B.sum()) / total_s)
    return GenerateOutput(token_ids=token_ids, texts=texts, stats=stats)


def _encode_prompts(target: target_lib.Target, prompts) -> list[list[int]]:
    """Strings are tokenized (no special tokens added); id lists are checked against the vocabulary."""
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    if any(isinstance(p, str) for p in prompts):
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts mix strings and token-id lists; give one kind")
        if target.tokenizer is None:
            raise ValueError("prompts are strings but the target has no tokenizer; "
                             "pass token-id lists or load the target with its tokenizer")
        prompts = [target.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    vocab = target.config.vocab_size
    prompt_ids = []
    for i, p in enumerate(prompts):
        ids = list(p)
        if not ids:
            raise ValueError(f"prompt {i} is empty (0 tokens); every prompt needs at least one token")
        bad = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if bad:
            raise ValueError(f"prompt {i}: token {bad[0]!r} is not an integer id")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {vocab})")
        prompt_ids.append([int(t) for t in ids])
    return prompt_ids


def _resolve_max_len(config: ModelConfig, prompt_lens: list[int], max_new_tokens: int,
                     max_len: int | None) -> int:
    """The cache length: given, or the longest prompt + max_new_tokens rounded up (fewer recompiles),
    never beyond max_position_embeddings. Each prompt must fit with its max_new_tokens."""
    limit = config.max_position_embeddings
    longest = max(prompt_lens)
    if max_len is None:
        max_len = min(_round_up(longest + max_new_tokens, MAX_LEN_MULTIPLE), limit)
        what = f"max_len {max_len} (the default, capped at max_position_embeddings {limit})"
    elif not isinstance(max_len, int) or isinstance(max_len, bool):
        raise ValueError(f"max_len must be an integer or None, got {max_len!r}")
    elif max_len > limit:
        raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {limit}")
    else:
        what = f"max_len {max_len}"
    i = prompt_lens.index(longest)
    if longest > max_len:
        raise ValueError(f"prompt {i} has {longest} tokens, more than {what}")
    if longest + max_new_tokens > max_len:
        raise ValueError(f"prompt {i} ({longest} tokens) + max_new_tokens {max_new_tokens} = "
                         f"{longest + max_new_tokens} exceeds {what}")
    return max_len


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
