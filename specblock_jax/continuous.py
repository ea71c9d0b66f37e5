"""Continuous batching for plain decoding: a fixed number of rows decode together, and a row whose
answer has stopped takes the next prompt at once, prefilled alone into that row of the shared KV
cache. No step runs for a finished row, and no prompt is padded to its batchmates' length: for
offline generation of many answers (`train.regenerate`) this spends the compute on tokens.

Every prompt brings its own rng key, and its n-th new token is drawn with `fold_in(key, n)`, so a
sampled answer depends on its prompt and key only, never on which prompts shared its steps. Greedy
answers are the target's argmax, as `decode.generate` gives. The decode steps run in one jitted
`lax.while_loop` that returns to the host only when a row stops; the host then hands the answer out
and admits the next prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax import decode, kvcache
from specblock_jax.config import ModelConfig
from specblock_jax.kvcache import KVCache
from specblock_jax.models import target as target_lib
from specblock_jax.sampling import SamplingParams, sample


class StreamState(NamedTuple):
    cache: KVCache  # lengths[b]: the committed tokens of row b (its newest token is not yet written)
    tokens_BxN: jax.Array  # int32 [rows, max_new_tokens] each row's answer so far, PAD_ID after it
    num_generated_B: jax.Array  # int32
    done_B: jax.Array  # bool: the row's answer has stopped, or the row is empty; it writes nothing
    keys_B: jax.Array  # each row's prompt key


def init_state(config: ModelConfig, rows: int, max_len: int, max_new_tokens: int) -> StreamState:
    """`rows` empty rows (done, holding nothing) over a `max_len`-slot cache."""
    return StreamState(cache=kvcache.init_cache(config, rows, max_len),
                       tokens_BxN=jnp.full((rows, max_new_tokens), decode.PAD_ID, jnp.int32),
                       num_generated_B=jnp.zeros((rows,), jnp.int32), done_B=jnp.ones((rows,), bool),
                       keys_B=jax.random.split(jax.random.key(0), rows))


def _draw(keys_B: jax.Array, index_B: jax.Array, logits_BxV: jax.Array, sampling: SamplingParams) -> jax.Array:
    """Row b's token number index_B[b], drawn with its own key folded with that index."""
    return jax.vmap(lambda key, i, logits_V: sample(jax.random.fold_in(key, i), logits_V, sampling))(
        keys_B, index_B, logits_BxV)


@functools.partial(jax.jit, static_argnames=("config", "eos_ids"), donate_argnames="state")
def admit(params: Any, config: ModelConfig, state: StreamState, row: jax.Array, prompt_1xW: jax.Array,
          prompt_len: jax.Array, key: jax.Array, sampling: SamplingParams, *,
          eos_ids: tuple[int, ...]) -> StreamState:
    """Prefill one right-padded prompt alone and put it in `row`: its keys and values over the row's
    first W slots (the slots after them hold the previous answer's, hidden until overwritten), its
    first new token, and its key."""
    cache_1, logits_1xV, _ = decode.prefill(params, config, prompt_1xW, prompt_len[None], prompt_1xW.shape[1])
    first_1 = _draw(key[None], jnp.zeros((1,), jnp.int32), logits_1xV, sampling)
    tokens_1xN, num_1, done_1, _ = decode.emit(
        jnp.full((1, state.tokens_BxN.shape[1]), decode.PAD_ID, jnp.int32), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1,), bool), first_1[:, None], jnp.ones((1,), jnp.int32), eos_ids, state.tokens_BxN.shape[1])
    place = lambda whole, one: jax.lax.dynamic_update_slice(whole, one.astype(whole.dtype),
                                                            (row,) + (0,) * (whole.ndim - 1))
    cache = state.cache.replace(k=tuple(place(w, o) for w, o in zip(state.cache.k, cache_1.k)),
                                v=tuple(place(w, o) for w, o in zip(state.cache.v, cache_1.v)),
                                lengths=state.cache.lengths.at[row].set(prompt_len))
    return StreamState(cache=cache, tokens_BxN=place(state.tokens_BxN, tokens_1xN),
                       num_generated_B=place(state.num_generated_B, num_1), done_B=place(state.done_B, done_1),
                       keys_B=state.keys_B.at[row].set(key))


@functools.partial(jax.jit, static_argnames=("config", "eos_ids"), donate_argnames="state")
def run(params: Any, config: ModelConfig, state: StreamState, held_B: jax.Array, sampling: SamplingParams, *,
        eos_ids: tuple[int, ...]) -> StreamState:
    """One target forward per step for every running row, until a held row (one whose answer the host
    has not taken yet) is done, or none runs."""

    def step(s: StreamState) -> StreamState:
        cache, tokens_BxN, num_generated_B, done_B = decode.plain_step(
            params, config, s.cache, s.tokens_BxN, s.num_generated_B, s.done_B,
            lambda logits_BxV: _draw(s.keys_B, s.num_generated_B, logits_BxV, sampling), eos_ids,
            s.tokens_BxN.shape[1], jnp.max(jnp.where(s.done_B, 0, s.cache.lengths)) + 1)
        return s._replace(cache=cache, tokens_BxN=tokens_BxN, num_generated_B=num_generated_B, done_B=done_B)

    return jax.lax.while_loop(lambda s: ~jnp.any(held_B & s.done_B) & ~jnp.all(s.done_B), step, state)


def stream(target: target_lib.Target, prompts: Sequence[Sequence[int]], keys: Sequence[jax.Array] | jax.Array, *,
           max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rows: int = 32,
           max_len: int | None = None, stop_on_eos: bool = True) -> Iterator[tuple[int, list[int]]]:
    """Answer every prompt (token ids) with `rows` rows decoding at once; yields (prompt index, new
    token ids, EOS included) as each answer stops, so the order is the order they finish.

    `keys[i]` is prompt i's rng key (unused when greedy). Sampling is `generate`'s: temperature 0
    greedy, else the target's softmax at `temperature` after `top_k` / `top_p` filtering. The cache
    has `max_len` slots (default: the longest prompt + max_new_tokens, rounded up to a bucket); a
    prompt is prefilled at its length rounded up to a multiple of `decode.MIN_WIDTH`, one compiled
    prefill per such width."""
    prompt_ids = decode.encode_prompts(target, prompts)
    decode.check_max_new_tokens(max_new_tokens)
    if len(keys) != len(prompt_ids):
        raise ValueError(f"{len(keys)} keys for {len(prompt_ids)} prompts; give one key per prompt")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    config = target.config
    max_len = decode.resolve_max_len(config, [len(p) for p in prompt_ids], max_new_tokens, max_len)
    sampling = SamplingParams(temperature, top_k, top_p)
    eos_ids = tuple(config.eos_token_ids) if stop_on_eos else ()
    state = init_state(config, rows, max_len, max_new_tokens)
    holder = [None] * rows  # the prompt index each row holds
    pending = iter(range(len(prompt_ids)))
    while True:
        for row in range(rows):
            if holder[row] is None and (i := next(pending, None)) is not None:
                ids = prompt_ids[i]
                width = min(-(-len(ids) // decode.MIN_WIDTH) * decode.MIN_WIDTH, max_len)
                prompt_1xW = np.zeros((1, width), np.int32)
                prompt_1xW[0, :len(ids)] = ids
                state = admit(target.params, config, state, np.int32(row), prompt_1xW, np.int32(len(ids)),
                              keys[i], sampling, eos_ids=eos_ids)
                holder[row] = i
        held_B = np.array([h is not None for h in holder])
        if not held_B.any():
            return
        state = run(target.params, config, state, held_B, sampling, eos_ids=eos_ids)
        done_B, num_B, tokens_BxN = jax.device_get((state.done_B, state.num_generated_B, state.tokens_BxN))
        for row in np.flatnonzero(held_B & done_B):
            yield holder[row], tokens_BxN[row, :num_B[row]].tolist()
            holder[row] = None
