"""Where a decoding iteration's time goes: drafting, the target's verify forward, and the rest.

The decoding loop is one jitted `jax.lax.while_loop`, so its phases cannot be timed from inside. They
are timed outside, on real inputs, with the same functions the loop runs:

1. A real state: `decode.spec_init` (prefill with the drafter's feature layers, first token, drafter
   init) of the first benchmark batch, with the run's cache length and sampling (`decode.plain_init`
   for plain decoding).
2. **loop**: the whole decoding loop (`decode.spec_loop` / `decode.plain_loop`) from that state, as
   `generate` runs it; ms per loop iteration.
3. **draft**: the drafter's `method.draft` on that state, `calls` times in a row inside one jitted
   `fori_loop`: each call's inputs carry a run-time zero computed from the previous call's outputs
   (so XLA can hoist no part of a call out of the loop) and every field of every tree feeds a
   checksum (so no part is dead code); ms per call.
4. **verify**: `decode.verify_forward` (the target forward over the tree's N + 1 nodes, with the tree
   mask) on the tree of step 3 and the state's cache, chained the same way; and **root**:
   `decode.root_forward` (the single-token forward the loop runs instead when no row drafted
   anything, and the only forward of plain decoding). Logits are reduced over the vocabulary, as
   acceptance does, so none of the LM head is dead code.
5. Each figure is the median over `rounds` dispatches (per-call dispatch overhead, which the
   while_loop does not pay, is spread over `calls`), every phase of every method timed once per
   round, round-robin, so a change in machine load hits them all alike.

A method's per-iteration figures (`phase_breakdown`), all from those same rounds: loop = loop ms per
iteration; draft = draft ms; verify = (verify steps x verify ms + single steps x root ms) / iterations,
with the loop's own step counts; other = loop - draft - verify: acceptance, KV commit, drafter commit,
tree sanitizing, output bookkeeping (noise can make it slightly negative). Shapes are static, so a
phase costs the same at every step of a run.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax import decode
from specblock_jax import tree as tree_lib
from specblock_jax.drafter import Drafter
from specblock_jax.sampling import SamplingParams

TIMING_METHOD = (
    "All on the first benchmark batch, from the state after prefill (decode.spec_init / plain_init, cache length "
    "as in the run), every phase of every method timed round-robin, medians over rounds. loop_ms_per_iter: the "
    "whole decoding loop (decode.spec_loop / plain_loop) / its iterations. draft_ms_per_iter: the drafter's "
    "draft() alone, chained calls inside one jitted fori_loop. verify_ms_per_iter: the target's forward over the "
    "budget+1-node tree (decode.verify_forward) and its single-token forward (decode.root_forward), timed the "
    "same way, weighted by the loop's verify and single steps (ar: root_forward; draft 0). other_ms_per_iter = "
    "loop - draft - verify: acceptance, KV commit, drafter commit, bookkeeping. iteration_ms: the timed runs' "
    "decode seconds / loop iterations, median over all runs. See infer/timing.py."
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


def _fresh(loop: Callable[..., Any], state: Any) -> Callable[[], Any]:
    """The loop on a copy of `state` at every call: the loops donate their state."""
    return lambda: loop(jax.tree.map(jnp.copy, state))


class Phases(NamedTuple):
    """Compiled, warmed-up zero-argument functions, and what one call of each covers."""
    fns: dict[str, Callable[[], Any]]  # phase -> function
    per_call: dict[str, int]  # phase -> phase executions per call (calls, or the loop's iterations)
    loop_iterations: int  # iterations of the whole loop on this batch
    loop_verify_steps: int  # of which verified a tree (the rest ran the single-token forward)


def phase_calls(target: Any, drafter: Drafter | None, prompts: Sequence[Any], *, max_new_tokens: int,
                max_len: int, temperature: float = 0.0, calls: int = 16) -> Phases:
    """The phases of one decoding iteration on `prompts` (one batch): `root` (the single-token forward),
    `loop` (the whole decoding loop from the prefilled state) and, with a drafter, `draft` and `verify`
    (the tree forward)."""
    config = target.config
    feature_layers = () if drafter is None else tuple(drafter.method.feature_layers)
    method = None if drafter is None else drafter.method
    request, shapes = decode.prepare(config, decode.encode_prompts(target, prompts), max_new_tokens=max_new_tokens,
                                     sampling=SamplingParams(temperature), max_len=max_len)
    eos_ids = tuple(config.eos_token_ids)
    fns = {}
    if drafter is not None:
        state = decode.spec_init(target.params, config, drafter.params, request, method=method, eos_ids=eos_ids,
                                 **shapes)
        cache, root_B = state.cache, state.root_B
        tree, _, _ = jax.jit(method.draft)(drafter.params, state.drafter_state, root_B, cache.lengths)
        # As the loop feeds it: the loop's root at node 0, invalid nodes as token 0.
        tree = tree.replace(tokens=jnp.where(tree.valid, tree.tokens, 0).at[:, 0].set(root_B))
        fns["loop"] = _fresh(functools.partial(decode.spec_loop, target.params, config, drafter.params, method=method,
                                               eos_ids=eos_ids), state)
    else:
        state = decode.plain_init(target.params, config, request, eos_ids=eos_ids, **shapes)
        cache = state.cache
        tree = tree_lib.root_only(state.tokens_BxN[:, 0], 0)
        fns["loop"] = _fresh(functools.partial(decode.plain_loop, target.params, config, eos_ids=eos_ids), state)
    forward = functools.partial(_forward_calls, target.params, cache, tree, config=config,
                                max_depth=1 if method is None else method.max_depth,
                                feature_layers=feature_layers, calls=calls)
    fns["root"] = functools.partial(forward, root_only=True)
    if drafter is not None:
        fns["verify"] = functools.partial(forward, root_only=False)
        fns["draft"] = functools.partial(_draft_calls, drafter.params, state.drafter_state, root_B, cache.lengths,
                                         method=method, calls=calls)
    outputs = {phase: jax.block_until_ready(fn()) for phase, fn in fns.items()}  # compile and warm up
    final = outputs["loop"]
    iterations = int(final.iterations)
    verify_steps = int(final.stats.verify_steps) if drafter is not None else iterations
    per_call = {phase: max(iterations, 1) if phase == "loop" else calls for phase in fns}
    return Phases(fns, per_call, iterations, verify_steps)


def time_phases(phases_by_method: dict[str, Phases], rounds: int = 7) -> dict[str, dict[str, float]]:
    """`<phase>_ms`: median ms per execution of every phase of every method, timed round-robin (every
    phase once per round), so a change in machine load hits all of them alike; plus each method's
    `loop_iterations` and `loop_verify_steps`."""
    times: dict[str, dict[str, list[float]]] = {m: {k: [] for k in p.fns} for m, p in phases_by_method.items()}
    for _ in range(rounds):
        for method, phases in phases_by_method.items():
            for phase, fn in phases.fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[method][phase].append((time.perf_counter() - start) / phases.per_call[phase] * 1e3)
    return {m: {**{f"{k}_ms": statistics.median(v) for k, v in per_phase.items()},
                "loop_iterations": phases_by_method[m].loop_iterations,
                "loop_verify_steps": phases_by_method[m].loop_verify_steps}
            for m, per_phase in times.items()}


def measure_phases(target: Any, drafter: Drafter | None, prompts: Sequence[Any], *, max_new_tokens: int,
                   max_len: int, temperature: float = 0.0, calls: int = 16, rounds: int = 7) -> dict[str, float]:
    """`phase_calls` then `time_phases` for one method."""
    phases = phase_calls(target, drafter, prompts, max_new_tokens=max_new_tokens, max_len=max_len,
                         temperature=temperature, calls=calls)
    return time_phases({"method": phases}, rounds)["method"]


def phase_breakdown(phases: dict[str, float]) -> dict[str, float]:
    """Per-iteration ms of the loop and of its draft, verify and other (module docstring)."""
    iterations, verify_steps = phases["loop_iterations"], phases["loop_verify_steps"]
    if "verify_ms" not in phases:  # plain decoding: every step is one single-token forward
        draft, verify = 0.0, phases["root_ms"]
    else:
        draft = phases["draft_ms"]
        single = iterations - verify_steps
        verify = (verify_steps * phases["verify_ms"] + single * phases["root_ms"]) / max(iterations, 1)
    loop = phases["loop_ms"]
    return {"loop_ms_per_iter": loop, "draft_ms_per_iter": draft, "verify_ms_per_iter": verify,
            "other_ms_per_iter": loop - draft - verify}
