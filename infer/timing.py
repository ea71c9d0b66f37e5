"""Where a decoding iteration's time goes: drafting, the target's verify forward, and the rest.

The decoding loop is one jitted `jax.lax.while_loop`, so its phases cannot be timed from inside. They
are timed outside, on real inputs, with the same functions the loop runs:

1. A real state: `decode.spec_init` (prefill with the drafter's feature layers, first token, drafter
   init) of a benchmark prompt batch, with the run's cache length and sampling.
2. **draft**: the drafter's `method.draft` on that state, `calls` times in a row inside one jitted
   `fori_loop`: each call's inputs carry a run-time zero computed from the previous call's outputs
   (so XLA can hoist no part of a call out of the loop) and every field of every tree feeds a
   checksum (so no part is dead code); ms per call.
3. **verify**: `decode.verify_forward` (the target forward over the tree's N + 1 nodes, with the tree
   mask) on the tree of step 2 and the state's cache, likewise chained through the returned cache;
   and `decode.root_forward` (the single-token forward the loop runs instead when no row drafted
   anything, and the only forward of plain decoding). Logits are reduced over the vocabulary, as
   acceptance does, so none of the LM head is dead code.
4. Each figure is the median over `rounds` dispatches of `calls` calls (per-call dispatch overhead,
   which the while_loop does not pay, is spread over `calls`), every phase of every method timed once
   per round, round-robin, so a change in machine load hits them all alike.

A method's per-iteration figures (`phase_breakdown`): draft = draft ms; verify = (verify steps x
verify ms + single steps x root ms) / iterations, from the run's own step counts; other = the loop's
measured ms per iteration minus both (acceptance, KV commit, drafter commit, tree sanitizing, output
bookkeeping; it can come out slightly negative from noise). Shapes are static, so a phase costs the
same at every step of a run.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax import decode
from specblock_jax import tree as tree_lib
from specblock_jax.drafter import Drafter
from specblock_jax.sampling import SamplingParams

TIMING_METHOD = (
    "draft_ms_per_iter: the drafter's draft() alone, jitted, on the state spec_init returns after prefilling "
    "the first benchmark batch (cache length as in the run), chained calls inside one fori_loop, median over "
    "dispatches timed round-robin with every other phase and method. verify_ms_per_iter: the target's verify "
    "forward over the budget+1-node tree (decode.verify_forward) and the single-token forward "
    "(decode.root_forward), timed the same way, weighted by the run's verify and single steps. ar: verify = "
    "root_forward, draft = 0. iteration_ms: the timed runs' decode seconds / loop iterations (median over runs). "
    "other_ms_per_iter = iteration_ms - draft - verify: acceptance, KV commit, drafter commit and bookkeeping "
    "(a difference of measurements taken at different times: machine load changes show up in it). "
    "See infer/timing.py."
)


def _checksum(tree_like: Any) -> jax.Array:
    """A float32 scalar that depends on every element of every leaf."""
    return sum(jnp.sum(jnp.nan_to_num(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree_like))


def _runtime_zero(total: jax.Array) -> jax.Array:
    """0, from the previous call's checksum: a value XLA cannot prove constant."""
    return (total == -1.25).astype(jnp.int32)


def _perturb(tree_like: Any, zero: jax.Array) -> Any:
    """Every leaf plus a run-time zero: the next call's inputs depend on the previous call's outputs, so
    XLA can hoist no part of a call out of the timing loop."""
    def add(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        return x | (zero > 0) if x.dtype == jnp.bool_ else x + zero.astype(x.dtype)
    return jax.tree.map(add, tree_like)


@functools.partial(jax.jit, static_argnames=("method", "calls"))
def _draft_calls(drafter_params: Any, drafter_state: Any, root_B: jax.Array, lengths_B: jax.Array, *,
                 method: Any, calls: int) -> jax.Array:
    def body(_, carry):
        state, root_B, lengths_B, total = carry
        state, root_B, lengths_B = _perturb((state, root_B, lengths_B), _runtime_zero(total))
        tree, state, forwards = method.draft(drafter_params, state, root_B, lengths_B)
        return state, root_B, lengths_B, total + _checksum(tree) + forwards
    return jax.lax.fori_loop(0, calls, body, (drafter_state, root_B, lengths_B, jnp.zeros((), jnp.float32)))[3]


@functools.partial(jax.jit, static_argnames=("config", "max_depth", "feature_layers", "root_only", "calls"))
def _forward_calls(params: Any, cache: Any, tree: Any, *, config: Any, max_depth: int,
                   feature_layers: tuple[int, ...], root_only: bool, calls: int) -> jax.Array:
    def body(_, carry):
        cache, tree, total = carry
        zero = _runtime_zero(total)
        tree, cache = _perturb(tree, zero), cache.replace(lengths=cache.lengths + zero)
        if root_only:
            logits, features, cache = decode.root_forward(params, config, cache, tree, feature_layers=feature_layers)
        else:
            logits, features, cache = decode.verify_forward(params, config, cache, tree, max_depth=max_depth,
                                                            feature_layers=feature_layers)
        total = total + jnp.sum(jnp.max(logits, axis=-1))
        if features is not None:
            total = total + jnp.sum(features)
        return cache, tree, total
    return jax.lax.fori_loop(0, calls, body, (cache, tree, jnp.zeros((), jnp.float32)))[2]


def prompt_array(target: Any, prompts: Sequence[str] | Sequence[Sequence[int]], max_len: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt ids [B, T] and lengths [B], padded as `generate` pads them."""
    ids = [target.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
    width = min(-(-max(map(len, ids)) // decode.MAX_LEN_MULTIPLE) * decode.MAX_LEN_MULTIPLE, max_len)
    prompt_BxT = np.zeros((len(ids), width), np.int32)
    for i, row in enumerate(ids):
        prompt_BxT[i, :len(row)] = row
    return prompt_BxT, np.array([len(row) for row in ids], np.int32)


def phase_calls(target: Any, drafter: Drafter | None, prompts: Sequence[Any], *, max_new_tokens: int,
                max_len: int, temperature: float = 0.0, calls: int = 16) -> dict[str, Callable[[], jax.Array]]:
    """Compiled, warmed-up functions that each run one phase `calls` times on `prompts` (one batch):
    `root_ms` (the single-token forward) and, with a drafter, `draft_ms` and `verify_ms` (the tree forward)."""
    config = target.config
    prompt_BxT, lens_B = prompt_array(target, prompts, max_len)
    feature_layers = () if drafter is None else tuple(drafter.method.feature_layers)
    method = None if drafter is None else drafter.method
    eos_ids, sampling = tuple(config.eos_token_ids), SamplingParams(temperature)
    if drafter is not None:
        state = decode.spec_init(target.params, config, drafter.params, prompt_BxT, lens_B, jax.random.key(0),
                                 method=method, max_new_tokens=max_new_tokens, max_len=max_len,
                                 sampling=sampling, eos_ids=eos_ids)
        cache, root_B = state.cache, state.root_B
        tree, _, _ = jax.jit(method.draft)(drafter.params, state.drafter_state, root_B, cache.lengths)
        # As the loop feeds it: the loop's root at node 0, invalid nodes as token 0.
        tree = tree.replace(tokens=jnp.where(tree.valid, tree.tokens, 0).at[:, 0].set(root_B))
    else:
        state = decode.plain_init(target.params, config, prompt_BxT, lens_B, jax.random.key(0),
                                  max_new_tokens=max_new_tokens, max_len=max_len, sampling=sampling, eos_ids=eos_ids)
        cache = state.cache
        tree = tree_lib.root_only(state.tokens_BxN[:, 0], 0)
    forward = functools.partial(_forward_calls, target.params, cache, tree, config=config,
                                max_depth=1 if method is None else method.max_depth,
                                feature_layers=feature_layers, calls=calls)
    fns = {"root_ms": functools.partial(forward, root_only=True)}
    if drafter is not None:
        fns["verify_ms"] = functools.partial(forward, root_only=False)
        fns["draft_ms"] = functools.partial(_draft_calls, drafter.params, state.drafter_state, root_B, cache.lengths,
                                            method=method, calls=calls)
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile and warm up
    return fns


def time_phases(fns_by_method: dict[str, dict[str, Callable[[], jax.Array]]], calls: int, rounds: int = 7
                ) -> dict[str, dict[str, float]]:
    """Median ms per call of every phase of every method, timed round-robin (every phase once per round),
    so a change in machine load hits all of them alike."""
    per_call: dict[str, dict[str, list[float]]] = {m: {k: [] for k in fns} for m, fns in fns_by_method.items()}
    for _ in range(rounds):
        for method, fns in fns_by_method.items():
            for phase, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn())
                per_call[method][phase].append((time.perf_counter() - start) / calls * 1e3)
    return {m: {k: statistics.median(v) for k, v in phases.items()} for m, phases in per_call.items()}


def measure_phases(target: Any, drafter: Drafter | None, prompts: Sequence[Any], *, max_new_tokens: int,
                   max_len: int, temperature: float = 0.0, calls: int = 16, rounds: int = 7) -> dict[str, float]:
    """`phase_calls` then `time_phases` for one method: median ms per call of each of its phases."""
    fns = phase_calls(target, drafter, prompts, max_new_tokens=max_new_tokens, max_len=max_len,
                      temperature=temperature, calls=calls)
    return time_phases({"method": fns}, calls, rounds)["method"]


def phase_breakdown(phases: dict[str, float], iteration_ms: float, iterations: int, verify_steps: int
                    ) -> dict[str, float]:
    """Per-iteration ms of draft, verify and other for a run with these step counts (module docstring)."""
    if "verify_ms" not in phases:  # plain decoding: every step is one single-token forward
        draft, verify = 0.0, phases["root_ms"]
    else:
        single = iterations - verify_steps
        draft = phases["draft_ms"]
        verify = (verify_steps * phases["verify_ms"] + single * phases["root_ms"]) / max(iterations, 1)
    return {"iteration_ms": iteration_ms, "draft_ms_per_iter": draft, "verify_ms_per_iter": verify,
            "other_ms_per_iter": iteration_ms - draft - verify}
