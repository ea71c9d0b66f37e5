"""Decoding: prefill a static KV cache, then generate inside one `jax.lax.while_loop`.

Plain decoding is one target forward per token. Speculative decoding drafts a tree (any drafter
behind `specblock_jax.drafter`), verifies it in one target forward with a tree attention mask,
accepts a path losslessly (`verify.accept`) and commits it (`kvcache.commit`). Both loops share
`prefill`, the output bookkeeping (`emit`), `DecodeResult` and `generate`'s validation and timing.
Rows are independent: each has its own length, its own stop, and decodes greedily exactly as it
would alone.

Compiled programs are shared between calls: only the greedy-or-not choice, the drafter's method and
the shapes are static, and the shapes come in few sizes (`bucket`: the batch, the prompt width, the
output width and the cache length round up to powers of two). A call's prompts, sampling values,
`max_new_tokens` and seed are run-time inputs (`Request`), so a second call that differs only in
those compiles nothing. The loops donate their state: each step updates the caches in place.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax import chat, kvcache, verify
from specblock_jax import tree as tree_lib
from specblock_jax.config import ModelConfig
from specblock_jax.drafter import Drafter, load_drafter
from specblock_jax.kvcache import KVCache
from specblock_jax.models import target as target_lib
from specblock_jax.sampling import SamplingParams, sample
from specblock_jax.tree import Tree

PAD_ID = -1  # fills generated-token slots after a row stopped
MIN_WIDTH = 64  # the smallest bucket of prompt and output widths
MIN_MAX_LEN = 256  # the smallest bucket of default cache lengths


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n and >= `minimum`: sizes that vary between calls take one of a
    few values, so the calls share compiled programs."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


class Request(NamedTuple):
    """One call's run-time inputs, all traced: new values reuse the compiled programs."""

    prompt_BxT: jax.Array  # int32 right-padded prompt ids
    prompt_lens_B: jax.Array  # int32; 1 for padding rows
    active_B: jax.Array  # bool; False for the padding rows that fill a batch up to its bucket
    max_new_tokens: jax.Array  # [] int32, at most the output width
    sampling: SamplingParams
    rng: jax.Array


class DecodeResult(NamedTuple):
    tokens_BxN: jax.Array  # [B, output width] int32 generated ids, PAD_ID after a row stopped
    num_generated_B: jax.Array  # [B] int32, EOS included
    iterations: jax.Array  # [] int32 decode-loop target forwards (the prefill forward not counted)


class PlainState(NamedTuple):
    cache: KVCache  # lengths[b] = prompt + generated tokens of row b, except the newest (not yet written)
    tokens_BxN: jax.Array
    num_generated_B: jax.Array
    done_B: jax.Array
    rng: jax.Array
    iterations: jax.Array
    max_new_tokens: jax.Array  # [] int32
    sampling: SamplingParams


def prefill(params: Any, config: ModelConfig, prompt_BxT: jax.Array, prompt_lens_B: jax.Array,
            max_len: int, feature_layers: tuple[int, ...] = ()) -> tuple[KVCache, jax.Array, jax.Array | None]:
    """Right-padded prompts -> a `max_len`-slot cache committed up to each prompt's length, each row's
    [B, V] logits at its last prompt token, and the `feature_layers` outputs at every prompt position
    ([B, T, F], None without feature layers). Padding K/V lands in slots >= length, which decoding
    overwrites before any mask lets it be seen."""
    b, t = prompt_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = target_lib.forward(params, config, prompt_BxT, positions_BxT, kvcache.causal_mask(t, max_len),
                             kvcache.init_cache(config, b, max_len), positions_BxT,
                             feature_layers=feature_layers, logit_positions_BxP=(prompt_lens_B - 1)[:, None],
                             kv_live=t)
    return out.cache.replace(lengths=prompt_lens_B.astype(jnp.int32)), out.logits[:, 0], out.features


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Elementwise: is the token one of the (static) stop ids."""
    stop = jnp.zeros(tokens.shape, bool)
    for eos in eos_ids:
        stop = stop | (tokens == eos)
    return stop


def emit(tokens_BxN: jax.Array, num_generated_B: jax.Array, done_B: jax.Array, new_BxK: jax.Array,
         count_B: jax.Array, eos_ids: tuple[int, ...],
         max_new_tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Append each running row's first `count_B` new tokens to its output, cut at max_new_tokens and
    just after the first stop token; a row that reaches either is done. Returns the output, the
    generated counts, `done_B` and how many tokens each row emitted."""
    k_K = jnp.arange(new_BxK.shape[1])
    stop_BxK = is_eos(new_BxK, eos_ids)
    no_stop_before_BxK = jnp.cumsum(stop_BxK, axis=1) - stop_BxK == 0
    emit_BxK = ((k_K < count_B[:, None]) & (num_generated_B[:, None] + k_K < max_new_tokens)
                & no_stop_before_BxK & ~done_B[:, None])
    slots_BxK = jnp.where(emit_BxK, num_generated_B[:, None] + k_K, tokens_BxN.shape[1])  # past the end: dropped
    tokens_BxN = tokens_BxN.at[jnp.arange(tokens_BxN.shape[0])[:, None], slots_BxK].set(new_BxK, mode="drop")
    emitted_B = jnp.sum(emit_BxK, axis=1, dtype=jnp.int32)
    num_generated_B = num_generated_B + emitted_B
    done_B = done_B | jnp.any(emit_BxK & stop_BxK, axis=1) | (num_generated_B >= max_new_tokens)
    return tokens_BxN, num_generated_B, done_B, emitted_B


def _start(params: Any, config: ModelConfig, request: Request, output_width: int, max_len: int,
           eos_ids: tuple[int, ...], feature_layers: tuple[int, ...] = ()):
    """Prefill and sample each row's first new token from its last prompt position (padding rows are
    done from the start). Returns the cache, the prompt features, the output (tokens, counts, done)
    holding that token, and the rng."""
    cache, logits_BxV, features_BxTxF = prefill(params, config, request.prompt_BxT, request.prompt_lens_B, max_len,
                                                feature_layers)
    rng, key = jax.random.split(request.rng)
    first_B = sample(key, logits_BxV, request.sampling)
    b = request.prompt_BxT.shape[0]
    output = emit(jnp.full((b, output_width), PAD_ID, jnp.int32), jnp.zeros((b,), jnp.int32), ~request.active_B,
                  first_B[:, None], jnp.ones((b,), jnp.int32), eos_ids, request.max_new_tokens)[:3]
    return cache, features_BxTxF, output, rng


@functools.partial(jax.jit, static_argnames=("config", "output_width", "max_len", "eos_ids"))
def plain_init(params: Any, config: ModelConfig, request: Request, *, output_width: int, max_len: int,
               eos_ids: tuple[int, ...]) -> PlainState:
    """Prefill and sample each row's first new token."""
    cache, _, (tokens_BxN, num_generated_B, done_B), rng = _start(params, config, request, output_width, max_len,
                                                                  eos_ids)
    return PlainState(cache=cache, tokens_BxN=tokens_BxN, num_generated_B=num_generated_B, done_B=done_B, rng=rng,
                      iterations=jnp.zeros((), jnp.int32), max_new_tokens=request.max_new_tokens,
                      sampling=request.sampling)


def plain_step(params: Any, config: ModelConfig, cache: KVCache, tokens_BxN: jax.Array, num_generated_B: jax.Array,
               done_B: jax.Array, draw: Any, eos_ids: tuple[int, ...], max_new_tokens: Any,
               live: jax.Array) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
    """One target forward for every row's newest token; `draw(logits_BxV)` picks the next tokens.
    Stopped rows keep computing (static batch) but commit nothing: their writes are dropped. `live`:
    no running row sees a cache slot at or past it. Returns the cache, output, counts and `done_B`."""
    lengths_B = cache.lengths
    newest_B = tokens_BxN[jnp.arange(tokens_BxN.shape[0]), jnp.maximum(num_generated_B - 1, 0)]
    out = target_lib.forward(params, config, newest_B[:, None], lengths_B[:, None],
                             kvcache.decode_mask(lengths_B, cache.max_len), cache, lengths_B[:, None], kv_live=live)
    tokens_BxN, num_generated_B, new_done_B, _ = emit(
        tokens_BxN, num_generated_B, done_B, draw(out.logits[:, 0])[:, None], jnp.ones_like(lengths_B), eos_ids,
        max_new_tokens)
    return out.cache.replace(lengths=lengths_B + (~done_B)), tokens_BxN, num_generated_B, new_done_B


@functools.partial(jax.jit, static_argnames=("config", "eos_ids"), donate_argnames="state")
def plain_loop(params: Any, config: ModelConfig, state: PlainState, *, eos_ids: tuple[int, ...]) -> PlainState:
    """One target forward per step until every row has stopped (EOS emitted, or max_new_tokens)."""

    def step(s: PlainState) -> PlainState:
        rng, key = jax.random.split(s.rng)
        cache, tokens_BxN, num_generated_B, done_B = plain_step(
            params, config, s.cache, s.tokens_BxN, s.num_generated_B, s.done_B,
            lambda logits_BxV: sample(key, logits_BxV, s.sampling), eos_ids, s.max_new_tokens,
            jnp.max(s.cache.lengths) + 1)
        return s._replace(cache=cache, tokens_BxN=tokens_BxN, num_generated_B=num_generated_B, done_B=done_B,
                          rng=rng, iterations=s.iterations + 1)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), step, state)


@functools.partial(jax.jit, static_argnames=("config", "output_width", "max_len", "eos_ids"))
def decode_plain(params: Any, config: ModelConfig, request: Request, *, output_width: int, max_len: int,
                 eos_ids: tuple[int, ...]) -> DecodeResult:
    """Plain decoding of a request in one dispatch, no host round trip."""
    state = plain_init(params, config, request, output_width=output_width, max_len=max_len, eos_ids=eos_ids)
    return _result(plain_loop(params, config, state, eos_ids=eos_ids))


def _result(state: PlainState | SpecState) -> DecodeResult:
    return DecodeResult(state.tokens_BxN, state.num_generated_B, state.iterations)


class SpecStats(NamedTuple):
    verify_steps: jax.Array  # [] int32 loop steps that verified a tree (the others decoded the root alone)
    steps_by_tokens_BxK: jax.Array  # [B, max_depth + 2] int32: [b, k] = steps in which row b emitted k tokens
    #   (k - 1 accepted drafts + the bonus; fewer on a row's last step when EOS or max_new_tokens cut the path)
    drafter_forwards: jax.Array  # [] int32 drafter forward passes, all steps
    malformed_trees: jax.Array  # [] int32 (running row, step) pairs whose tree was malformed (see `_malformed`)
    first_malformed: jax.Array  # [3] int32 (node, parent, token) of the first node dropped for it; -1 if none


class SpecState(NamedTuple):
    cache: KVCache  # lengths[b] = prompt + generated tokens of row b, except the newest (the root)
    drafter_state: Any
    root_B: jax.Array  # [B] int32 the newest generated token
    tokens_BxN: jax.Array
    num_generated_B: jax.Array
    done_B: jax.Array
    rng: jax.Array
    iterations: jax.Array
    stats: SpecStats
    max_new_tokens: jax.Array  # [] int32
    sampling: SamplingParams
    feedback: Any = None  # the `collect` buffer of `spec_loop` (None when not collecting)


@functools.partial(jax.jit, static_argnames=("config", "method", "output_width", "max_len", "eos_ids"))
def spec_init(params: Any, config: ModelConfig, drafter_params: Any, request: Request, *, method: Any,
              output_width: int, max_len: int, eos_ids: tuple[int, ...]) -> SpecState:
    """Prefill (with the drafter's feature layers), sample each row's first token (the first root),
    and initialise the drafter."""
    cache, features_BxTxF, (tokens_BxN, num_generated_B, done_B), rng = _start(
        params, config, request, output_width, max_len, eos_ids, tuple(method.feature_layers))
    root_B = tokens_BxN[:, 0]
    drafter_state = method.init(drafter_params, request.prompt_BxT, request.prompt_lens_B, features_BxTxF, root_B,
                                max_len)
    b, zero = request.prompt_BxT.shape[0], jnp.zeros((), jnp.int32)
    stats = SpecStats(verify_steps=zero, steps_by_tokens_BxK=jnp.zeros((b, method.max_depth + 2), jnp.int32),
                      drafter_forwards=zero, malformed_trees=zero, first_malformed=jnp.full((3,), -1, jnp.int32))
    return SpecState(cache=cache, drafter_state=drafter_state, root_B=root_B, tokens_BxN=tokens_BxN,
                     num_generated_B=num_generated_B, done_B=done_B, rng=rng, iterations=zero, stats=stats,
                     max_new_tokens=request.max_new_tokens, sampling=request.sampling)


def verify_forward(params: Any, config: ModelConfig, cache: KVCache, tree: Tree, *, max_depth: int,
                   feature_layers: tuple[int, ...] = (), read_only: bool = False
                   ) -> tuple[jax.Array, jax.Array | None, Any]:
    """The target's verify forward over all N + 1 tree nodes, node i at scratch slot lengths[b] + i
    (`tree_lib.slots`), seeing the committed prefix, itself and its ancestors: logits [B, N+1, V],
    features [B, N+1, F] (None without feature layers) and the cache with the nodes written. With
    `read_only` the cache is only read and the third output is the nodes' keys and values instead
    (`TargetOutput.new_kv`), for `kvcache.write` at those slots: inside a `lax.cond`, a branch that
    writes the cache makes XLA copy all of it every step."""
    lengths_B = cache.lengths
    if read_only:
        out = target_lib.forward(params, config, tree.tokens, tree_lib.positions(tree, lengths_B),
                                 kvcache.prefix_mask(lengths_B, cache.max_len)[:, None, :], cache,
                                 feature_layers=feature_layers, new_mask=tree_lib.ancestor_mask(tree, max_depth),
                                 kv_live=jnp.max(lengths_B))
        return out.logits, out.features, out.new_kv
    out = target_lib.forward(params, config, tree.tokens, tree_lib.positions(tree, lengths_B),
                             tree_lib.verify_mask(tree, lengths_B, cache.max_len, max_depth), cache,
                             tree_lib.slots(tree, lengths_B), feature_layers=feature_layers,
                             kv_live=jnp.max(lengths_B) + tree.tokens.shape[1])
    return out.logits, out.features, out.cache


def root_forward(params: Any, config: ModelConfig, cache: KVCache, tree: Tree, *,
                 feature_layers: tuple[int, ...] = (), read_only: bool = False
                 ) -> tuple[jax.Array, jax.Array | None, Any]:
    """Nothing drafted: a plain decode step of each row's root (node 0), padded to `verify_forward`'s
    shapes (with `read_only`, its padding keys and values go to scratch slots nothing sees)."""
    lengths_B = cache.lengths
    pad = lambda x_Bx1xF: jnp.pad(x_Bx1xF, ((0, 0), (0, tree.tokens.shape[1] - 1)) + ((0, 0),) * (x_Bx1xF.ndim - 2))
    if read_only:
        out = target_lib.forward(params, config, tree.tokens[:, :1], lengths_B[:, None],
                                 kvcache.prefix_mask(lengths_B, cache.max_len)[:, None, :], cache,
                                 feature_layers=feature_layers, new_mask=jnp.ones((lengths_B.shape[0], 1, 1), bool),
                                 kv_live=jnp.max(lengths_B))
        third = jax.tree.map(pad, out.new_kv)
    else:
        out = target_lib.forward(params, config, tree.tokens[:, :1], lengths_B[:, None],
                                 kvcache.decode_mask(lengths_B, cache.max_len), cache, lengths_B[:, None],
                                 feature_layers=feature_layers, kv_live=jnp.max(lengths_B) + 1)
        third = out.cache
    return pad(out.logits), None if out.features is None else pad(out.features), third


@functools.partial(jax.jit, static_argnames=("config", "method", "eos_ids", "collect"), donate_argnames="state")
def spec_loop(params: Any, config: ModelConfig, drafter_params: Any, state: SpecState, *, method: Any,
              eos_ids: tuple[int, ...], collect: Any = None) -> SpecState:
    """Draft -> verify -> accept -> commit, one target forward per step, until every row has stopped.

    With `collect`, every step also folds the verifier's free feedback into `state.feedback`:
    `collect(feedback, drafter_state, acceptance, logits_BxN1xV, emitted_B, running_B)`, where
    `drafter_state` is the state the step's draft returned (see `specblock_jax.adapt`)."""
    b = state.tokens_BxN.shape[0]
    feature_layers = tuple(method.feature_layers)
    verify_tree = functools.partial(verify_forward, params, config, max_depth=method.max_depth,
                                    feature_layers=feature_layers)
    decode_root = functools.partial(root_forward, params, config, feature_layers=feature_layers)
    skips_empty_trees = getattr(method, "can_draft_nothing", True)

    def step(s: SpecState) -> SpecState:
        running_B = ~s.done_B
        lengths_B = s.cache.lengths
        drafted, drafter_state, forwards = method.draft(drafter_params, s.drafter_state, s.root_B, lengths_B)
        _check_draft(drafted, forwards, method.budget, b)
        drafted = drafted.replace(tokens=drafted.tokens.at[:, 0].set(s.root_B))  # the loop's root, whatever was there
        tree = _verifiable(drafted, config.vocab_size)
        if skips_empty_trees:  # a step with no draft runs the single-token forward instead
            verified = jnp.any(tree.valid[:, 1:] & running_B[:, None])
            # The branches only read the cache; the nodes' keys and values are written after the cond.
            logits_BxN1xV, features_BxN1xF, new_kv = jax.lax.cond(
                verified, functools.partial(verify_tree, read_only=True),
                functools.partial(decode_root, read_only=True), s.cache, tree)
            cache = kvcache.write(s.cache, new_kv, tree_lib.slots(tree, lengths_B))
        else:  # one target forward in the loop body: half the compile. It writes the cache itself: a
            # read-only forward (its attention a lax.switch over the loop's own cache) measured slower
            verified = jnp.ones((), bool)
            logits_BxN1xV, features_BxN1xF, cache = verify_tree(s.cache, tree)
        rng, key = jax.random.split(s.rng)
        acceptance = verify.accept(tree, logits_BxN1xV, s.sampling, key, method.max_depth)
        tokens_BxN, num_generated_B, done_B, emitted_B = emit(
            s.tokens_BxN, s.num_generated_B, s.done_B, acceptance.tokens_BxD1, acceptance.length_B + 1, eos_ids,
            s.max_new_tokens)
        # Drafts past a cut (EOS, max_new_tokens) are not committed: lengths stay prompt + generated - 1.
        cache = kvcache.commit(cache, acceptance.path_BxD1, emitted_B - 1, running_B)
        feedback = s.feedback if collect is None else collect(
            s.feedback, drafter_state, acceptance, logits_BxN1xV, emitted_B, running_B)
        # A stopped row's drafter state keeps changing (the batch is static) but nothing reads it again.
        drafter_state = method.commit(drafter_params, drafter_state, tree, acceptance, features_BxN1xF, lengths_B)
        stats = SpecStats(
            verify_steps=s.stats.verify_steps + verified,
            steps_by_tokens_BxK=s.stats.steps_by_tokens_BxK.at[jnp.arange(b), emitted_B].add(running_B),
            drafter_forwards=s.stats.drafter_forwards + forwards,
            malformed_trees=s.stats.malformed_trees + jnp.sum(_malformed(drafted, config.vocab_size) & running_B),
            first_malformed=_first_malformed(s.stats.first_malformed, drafted, tree, running_B))
        return s._replace(cache=cache, drafter_state=drafter_state,
                          root_B=jnp.where(running_B, acceptance.bonus_B, s.root_B), tokens_BxN=tokens_BxN,
                          num_generated_B=num_generated_B, done_B=done_B, rng=rng, iterations=s.iterations + 1,
                          stats=stats, feedback=feedback)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), step, state)


def _check_draft(tree: Tree, forwards: Any, budget: int, batch_size: int) -> None:
    """Trace time: the drafter's outputs have the static shapes the loop needs."""
    tree_lib.check_static(tree, budget)
    if tree.batch_size != batch_size:
        raise ValueError(f"drafter tree has batch size {tree.batch_size}, the batch has {batch_size} rows (the prompts, "
                         "padded to a power of two)")
    if jnp.shape(forwards) != () or not jnp.issubdtype(jnp.result_type(forwards), jnp.integer):
        raise ValueError(f"drafter forwards must be an integer scalar, got shape {jnp.shape(forwards)} "
                         f"and dtype {jnp.result_type(forwards)}")


def _verifiable(drafted: Tree, vocab_size: int) -> Tree:
    """The tree the target verifies: nodes with out-of-vocabulary tokens invalid, then `sanitize`d
    (malformed nodes and their descendants invalid), then invalid nodes fed as token 0, so whatever a
    drafter left there (say -1) never reaches the embedding, whose out-of-range rows would be NaN and
    leak through the attention."""
    tree = tree_lib.sanitize(drafted.replace(valid=drafted.valid & _in_vocab(drafted.tokens, vocab_size)))
    return tree.replace(tokens=jnp.where(tree.valid, tree.tokens, 0))


def _in_vocab(tokens: jax.Array, vocab_size: int) -> jax.Array:
    return (tokens >= 0) & (tokens < vocab_size)


def _malformed(drafted: Tree, vocab_size: int) -> jax.Array:
    """[B] bool: the row's tree breaks the tree invariants or has a valid out-of-vocabulary node."""
    return tree_lib.malformed(drafted) | jnp.any(drafted.valid & ~_in_vocab(drafted.tokens, vocab_size), axis=1)


def _first_malformed(first_3: jax.Array, drafted: Tree, tree: Tree, running_B: jax.Array) -> jax.Array:
    """Keep the (node, parent, token) of the first node that `_verifiable` dropped from a running row.
    A row's lowest dropped node is itself at fault: its parent was not dropped, so the node's token is
    out of the vocabulary, or its parent comes after it or is not a valid node."""
    dropped_BxN1 = drafted.valid & ~tree.valid & running_B[:, None]
    flat = jnp.argmax(dropped_BxN1.reshape(-1))
    row, node = flat // dropped_BxN1.shape[1], flat % dropped_BxN1.shape[1]
    found = jnp.stack([node, drafted.parents[row, node], drafted.tokens[row, node]]).astype(jnp.int32)
    return jnp.where((first_3[0] < 0) & jnp.any(dropped_BxN1), found, first_3)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    token_ids: list[list[int]]  # generated ids per prompt, up to and including EOS
    texts: list[str] | None  # decoded (special tokens skipped) when the target has a tokenizer
    stats: dict[str, Any]
    feedback: Any = None  # the filled `feedback` buffer when `collect` was given


def check_max_new_tokens(max_new_tokens: Any) -> None:
    """`generate`'s check of its `max_new_tokens`, for callers that size buffers by it first."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def generate(target: target_lib.Target, prompts: Sequence[str | Sequence[dict] | Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, drafter: Drafter | str | None = None, max_len: int | None = None,
             stop_on_eos: bool = True, collect: Any = None, feedback: Any = None) -> GenerateOutput:
    """Generate continuations of a batch of prompts, plainly or speculatively, in one jitted loop.

    Args:
        target: a `Target` (`load_target`).
        prompts: a list of one kind: strings (tokenized, no special tokens added, and continued as
            they are), conversations (lists of `{"role", "content"}` messages, formatted with the
            target's chat template and answered as the assistant) or token-id lists. Rows of
            different lengths are batched right-padded; each stops on its own.
        max_new_tokens: new tokens per row at most (an integer >= 1).
        temperature: 0 decodes greedily; above 0 samples from the target's softmax at that
            temperature, after `top_k` (0: off) and nucleus `top_p` (1: off) filtering.
        seed: the sampling rng. Greedy rows decode exactly as they would alone; sampled rows share
            one rng stream, so a row's samples depend on the batch it is in.
        drafter: None for plain decoding, or a `Drafter` (or a kind or directory for
            `load_drafter`) for speculative decoding, which is lossless: every token is the
            target's argmax (greedy) or a draw from its distribution (the same law as plain
            decoding's). Greedy output equals plain decoding's token for token up to rounding: the
            logits come from an (N+1)-token verify forward rather than a 1-token one, so where two
            logits tie within rounding either token may be taken (`infer.bench` reports the gap).
        max_len: the static KV cache size (default: the longest prompt + max_new_tokens + the
            drafter's scratch, rounded up to a power-of-two bucket and capped at the target's
            max_position_embeddings). Attention reads only the live part of the cache.
        stop_on_eos: stop a row at the target's EOS (kept in its output) or run to max_new_tokens.
        collect, feedback: with a drafter, a collection function and a feedback buffer
            (`specblock_jax.adapt`): the loop also writes the verifier's feedback into the buffer.

    Returns:
        A `GenerateOutput`: `token_ids` (new ids per prompt, EOS included), `texts` (decoded when
        the target has a tokenizer) and `stats`: `compile_s` (timed apart), `prefill_s`, `decode_s`,
        `tokens_per_s` (new tokens over prefill + decode), `iterations`, and with a drafter `tau`
        (tokens committed per target forward) and `tau_per_row`, `verify_steps`, `single_steps`,
        `steps_by_tokens[b][k]` (steps in which row b committed k tokens), `drafter_forwards` and
        `malformed_trees`; `feedback`: the filled buffer when `collect` was given.

    Raises:
        ValueError: for bad input, checked before any compute (prompts empty, mixed or malformed;
            text on a target without a tokenizer; a conversation on a target without a chat
            template; token ids outside the vocabulary; max_new_tokens or max_len invalid or too
            long for the target; a drafter that does not fit the target), and after the run for a
            drafter that produced a malformed tree.
    """
    sampling = SamplingParams(temperature, top_k, top_p)
    config = target.config
    prompt_ids = encode_prompts(target, prompts)
    check_max_new_tokens(max_new_tokens)
    if isinstance(drafter, (str, os.PathLike)):
        drafter = load_drafter(drafter, target)
    if drafter is not None:
        _check_drafter(drafter, config)
    if (collect is None) != (feedback is None) or (collect is not None and drafter is None):
        raise ValueError("collect and feedback go together, and need a drafter")
    request, shapes = prepare(config, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                              scratch=0 if drafter is None else drafter.method.budget + 1, max_len=max_len)
    static = dict(**shapes, eos_ids=tuple(config.eos_token_ids) if stop_on_eos else ())
    if drafter is None:
        init_jit, loop_jit, weights = plain_init, plain_loop, (target.params,)
        loop_static = dict(eos_ids=static["eos_ids"])
    else:
        init_jit, loop_jit, weights = spec_init, spec_loop, (target.params, drafter.params)
        static["method"] = drafter.method
        loop_static = dict(eos_ids=static["eos_ids"], method=drafter.method)
        if collect is not None:
            loop_static["collect"] = collect

    start = time.perf_counter()
    init_lowered = init_jit.lower(weights[0], config, *weights[1:], request, **static)
    init_fn = init_lowered.compile()
    state_info = init_lowered.out_info
    if collect is not None:
        state_info = state_info._replace(feedback=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                feedback))
    loop_fn = loop_jit.lower(weights[0], config, *weights[1:], state_info, **loop_static).compile()
    compiled = time.perf_counter()
    state = jax.block_until_ready(init_fn(*weights, request))
    if collect is not None:
        state = state._replace(feedback=feedback)
    prefilled = time.perf_counter()
    state = jax.block_until_ready(loop_fn(*weights, state))
    done = time.perf_counter()

    result = _result(state)
    rows = len(prompt_ids)  # the rest are the bucket's padding rows
    tokens_BxN, num_B = np.asarray(result.tokens_BxN)[:rows], np.asarray(result.num_generated_B)[:rows]
    token_ids = [tokens_BxN[i, :num_B[i]].tolist() for i in range(rows)]
    texts = (None if target.tokenizer is None
             else [target.tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids])
    total_s = done - compiled
    stats = dict(iterations=int(result.iterations), target_forwards=int(result.iterations) + 1,
                 new_tokens=num_B.tolist(), max_len=shapes["max_len"], compile_s=compiled - start,
                 prefill_s=prefilled - compiled, decode_s=done - prefilled,
                 tokens_per_s=float(num_B.sum()) / total_s)
    if drafter is not None:
        stats.update(_spec_stats(jax.device_get(state.stats), int(result.iterations), config.vocab_size, rows))
    return GenerateOutput(token_ids=token_ids, texts=texts, stats=stats,
                          feedback=None if collect is None else state.feedback)


def prepare(config: ModelConfig, prompt_ids: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams,
            seed: int = 0, scratch: int = 0, max_len: int | None = None) -> tuple[Request, dict[str, int]]:
    """The `Request` of checked prompt ids (`encode_prompts`) and its static shapes (`output_width`,
    `max_len`): the batch, prompt width and output width rounded up to their buckets (`bucket`),
    padding rows inactive; the cache length as `resolve_max_len` says."""
    max_len = resolve_max_len(config, [len(p) for p in prompt_ids], max_new_tokens, max_len, scratch)
    width = min(bucket(max(len(p) for p in prompt_ids), MIN_WIDTH), max_len)
    rows = len(prompt_ids)
    prompt_BxT = np.zeros((bucket(rows), width), np.int32)
    for i, ids in enumerate(prompt_ids):
        prompt_BxT[i, :len(ids)] = ids
    prompt_lens_B = np.ones(len(prompt_BxT), np.int32)
    prompt_lens_B[:rows] = [len(p) for p in prompt_ids]
    request = Request(prompt_BxT=prompt_BxT, prompt_lens_B=prompt_lens_B, active_B=np.arange(len(prompt_BxT)) < rows,
                      max_new_tokens=np.int32(max_new_tokens), sampling=sampling, rng=jax.random.key(seed))
    return request, dict(output_width=bucket(max_new_tokens, MIN_WIDTH), max_len=max_len)


def _check_drafter(drafter: Any, config: ModelConfig) -> None:
    """The drafter's static config, before any compute: the loop's shapes come from it."""
    if not isinstance(drafter, Drafter):
        raise ValueError(f"drafter must be a specblock_jax.drafter.Drafter, a drafter kind or directory, or None; "
                         f"got {type(drafter).__name__}")
    method = drafter.method
    for name in ("budget", "max_depth"):
        value = getattr(method, name, None)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"drafter {name} must be an integer >= 1, got {value!r}")
    layers = getattr(method, "feature_layers", None)
    if not isinstance(layers, tuple) or not all(isinstance(i, int) and 0 <= i < config.num_layers for i in layers):
        raise ValueError(f"drafter feature_layers must be a tuple of target layer indices in "
                         f"[0, {config.num_layers}), got {layers!r}")
    try:
        hash(method)
    except TypeError as e:
        raise ValueError(f"drafter method must be hashable (a frozen dataclass): {e}") from None


def _spec_stats(stats: SpecStats, iterations: int, vocab_size: int, rows: int) -> dict[str, Any]:
    """Host-side speculative statistics; raises if the drafter ever produced a malformed tree.

    tau: tokens committed per target forward in the loop (bonus included), over all running rows:
    emitted tokens / (row, step) pairs."""
    if stats.malformed_trees:
        node, parent, token = stats.first_malformed.tolist()
        if node < 0:
            what = "whose root (node 0) is not valid"
        elif not 0 <= token < vocab_size:
            what = f"whose node {node} has token {token}, outside the target's vocabulary [0, {vocab_size})"
        elif parent >= node:
            what = f"whose node {node} has parent {parent} after it"
        else:
            what = f"whose node {node} has parent {parent}, which is not a valid node"
        raise ValueError(f"drafter produced a tree {what} ({int(stats.malformed_trees)} malformed trees in this "
                         "run); a drafter's tree needs a valid root, parents before their children and tokens "
                         "in the target's vocabulary")
    steps_BxK = np.asarray(stats.steps_by_tokens_BxK)[:rows]
    emitted_B = steps_BxK @ np.arange(steps_BxK.shape[1])
    row_steps_B = steps_BxK.sum(axis=1)
    return dict(verify_steps=int(stats.verify_steps), single_steps=iterations - int(stats.verify_steps),
                steps_by_tokens=steps_BxK.tolist(), drafter_forwards=int(stats.drafter_forwards),
                malformed_trees=int(stats.malformed_trees),
                tau=float(emitted_B.sum() / row_steps_B.sum()) if row_steps_B.sum() else float("nan"),
                tau_per_row=[float(e / n) if n else float("nan") for e, n in zip(emitted_B, row_steps_B)])


def encode_prompts(target: target_lib.Target, prompts) -> list[list[int]]:
    """Strings are tokenized (no special tokens added), conversations formatted with the chat template
    (`chat.encode`); the ids are checked against the vocabulary."""
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or chat.is_conversation(prompts):
        raise ValueError(f"prompts must be a list of strings, of conversations (lists of {{'role', 'content'}} "
                         f"messages) or of token-id lists, got {type(prompts).__name__}"
                         + (" of messages: wrap one conversation in a list" if chat.is_conversation(prompts) else ""))
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    kinds = {"string" if isinstance(p, str) else "conversation" if chat.is_conversation(p) else "ids" for p in prompts}
    if len(kinds) > 1:
        raise ValueError(f"prompts mix {' and '.join(sorted(kinds))} prompts; give one kind")
    if kinds & {"string", "conversation"} and target.tokenizer is None:
        raise ValueError("prompts are text but the target has no tokenizer; "
                         "pass token-id lists or load the target with its tokenizer")
    if kinds == {"string"}:
        prompts = [target.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    elif kinds == {"conversation"}:
        prompts = [chat.encode(target.tokenizer, p, f"prompt {i}") for i, p in enumerate(prompts)]
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


def resolve_max_len(config: ModelConfig, prompt_lens: list[int], max_new_tokens: int,
                    max_len: int | None, scratch: int = 0) -> int:
    """The cache length: given, or the longest prompt + max_new_tokens + `scratch` (a speculative
    tree's budget + 1 slots) rounded up to its bucket (fewer compiles; attention reads only the live
    slots, so the unused tail costs memory, not time), never beyond max_position_embeddings. Each
    prompt must fit with its max_new_tokens and the scratch."""
    limit = config.max_position_embeddings
    longest = max(prompt_lens)
    if max_len is None:
        max_len = min(bucket(longest + max_new_tokens + scratch, MIN_MAX_LEN), limit)
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
    if longest + max_new_tokens + scratch > max_len:
        tree = f" + tree scratch {scratch} (budget {scratch - 1} + 1)" if scratch else ""
        raise ValueError(f"prompt {i} ({longest} tokens) + max_new_tokens {max_new_tokens}{tree} = "
                         f"{longest + max_new_tokens + scratch} exceeds {what}")
    return max_len

