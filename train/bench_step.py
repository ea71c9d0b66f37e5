"""Seconds per drafter training step on a target, online (the target runs in the step) and offline
(the step reads cached features and top-k logits, as `feature_cache: DIR` trains), for each drafter
kind: the figure that sets how many steps a training budget buys.

    python -m train.bench_step                                 # both kinds, SmolLM2-135M-Instruct
    python -m train.bench_step --kinds eagle3 --batch-size 4 --repeats 3
    python -m train.bench_step --modes offline                 # what the feature-cache configs run

The drafters are the configs' shapes (EAGLE-3: `--ttt-steps`; SpecBlock: `--layers`, `--block-size`,
`--ttt-blocks`), freshly initialised, on random tokens: a step's time does not depend on the values.
Each step is compiled once first; the median of `--repeats` timed steps is reported, with XLA's count
of the step's floating-point operations and the rate it reached beside that of one large float32
matmul on the same machine: how close a step runs to what this machine's matmuls allow.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from specblock_jax.config import ConfigError
from specblock_jax.hf import load_target
from specblock_jax.optim import OptimConfig, make_optimizer
from train import train_drafter


def train_config(kind: str, args: argparse.Namespace) -> train_drafter.DrafterTrainConfig:
    """The training config whose drafter shape and optimizer a step is timed with."""
    vocab = args.draft_vocab or None
    return train_drafter.DrafterTrainConfig(
        OptimConfig(learning_rate=1e-4, total_steps=100, warmup_steps=0), kind=kind, seq_len=args.seq_len,
        batch_size=args.batch_size, cache_topk=args.cache_topk, target=args.target,
        eagle3=train_drafter.Eagle3Overrides(ttt_steps=args.ttt_steps, draft_vocab_size=vocab),
        specblock=train_drafter.SpecBlockOverrides(num_layers=args.layers, block_size=args.block_size,
                                                   num_ttt_blocks=args.ttt_blocks, draft_vocab_size=vocab))


def step_cost(step, state, target_params, batch, repeats: int) -> tuple[float, float]:
    """(median seconds per step, XLA's floating-point operation count of the step)."""
    compiled = step.lower(state, target_params, batch, jnp.int32(0)).compile()
    flops = float(compiled.cost_analysis()["flops"])
    jax.block_until_ready(compiled(state, target_params, batch, jnp.int32(0)))  # warm-up
    return _median_seconds(lambda: compiled(state, target_params, batch, jnp.int32(0)), repeats), flops


MATMUL_N = 2048  # the reference matmul is MATMUL_N^3, float32


def matmul_gflops(n: int = MATMUL_N, repeats: int = 5) -> float:
    """GFLOP/s of one n x n x n float32 matmul: the rate a step of large matmuls could reach here."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, a))
    return 2 * n ** 3 / _median_seconds(lambda: matmul(a, a), repeats) / 1e9


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="HF directory or .gguf (default: the embedded default)")
    parser.add_argument("--kinds", default="eagle3,specblock", help="comma-separated drafter kinds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--draft-vocab", type=int, default=16384, help="reduced draft vocabulary; 0: the target's")
    parser.add_argument("--cache-topk", type=int, default=64, help="offline mode: target logits kept per position")
    parser.add_argument("--ttt-steps", type=int, default=5, help="EAGLE-3's TTT steps")
    parser.add_argument("--layers", type=int, default=2, help="SpecBlock's decoder layers")
    parser.add_argument("--block-size", type=int, default=4, help="SpecBlock's K")
    parser.add_argument("--ttt-blocks", type=int, default=2, help="SpecBlock's TTT blocks")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per figure (median)")
    parser.add_argument("--modes", default="online,offline",
                        help="comma-separated: online (the target runs in the step), offline (cached outputs)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := sorted(set(kinds) - set(train_drafter.DRAFTER_KINDS)):
        parser.error(f"unknown kind(s) {unknown}; choose from {list(train_drafter.DRAFTER_KINDS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"online", "offline"}:
        parser.error(f"--modes must name online and/or offline, got {args.modes!r}")

    target = load_target(args.target)
    tc = target.config
    try:  # the training config's own checks, before any compile
        runs = [(cfg, train_drafter.drafter_config(cfg, tc)) for cfg in (train_config(k, args) for k in kinds)]
    except ConfigError as e:
        parser.error(str(e))
    rng = np.random.default_rng(0)
    tokens_BxT = jnp.asarray(rng.integers(0, tc.vocab_size, (args.batch_size, args.seq_len)), jnp.int32)
    online = {"tokens": tokens_BxT, "loss_mask": jnp.ones(tokens_BxT.shape, jnp.float32)}
    peak = matmul_gflops()
    print(f"{jax.devices()[0].device_kind}, batch {args.batch_size} x {args.seq_len}, draft vocabulary "
          f"{args.draft_vocab or tc.vocab_size}; a {MATMUL_N}^3 float32 matmul runs at {peak:.0f} GFLOP/s")
    print("| drafter | mode | s / step | steps / hour | TFLOP / step (XLA) | GFLOP/s | of the matmul rate |\n"
          "|---|---|---|---|---|---|---|")
    for cfg, config in runs:
        optimizer = make_optimizer(cfg.optim)
        mapping = None
        if config.draft_vocab_size is not None:
            mapping = jnp.asarray(np.sort(rng.permutation(tc.vocab_size)[:config.draft_vocab_size]), jnp.int32)
        params = train_drafter.model_of(config).init_params(config, jax.random.key(0))
        features, logits = jax.jit(lambda tp, t: train_drafter.target_outputs(tp, tc, config.feature_layers, t))(
            target.params, tokens_BxT)
        top_logits, top_ids = jax.lax.top_k(logits, cfg.cache_topk)
        offline = {**online, "features": features.astype(cfg.cache_dtype),
                   "topk_logits": top_logits.astype(cfg.cache_dtype), "topk_ids": top_ids}
        del logits
        step = jax.jit(train_drafter.make_train_step(tc, config, optimizer, draft_to_target=mapping))
        state = {"params": params, "opt_state": optimizer.init(params)}
        for mode, batch in (("online", online), ("offline", offline)):
            if mode not in modes:
                continue
            seconds, flops = step_cost(step, state, target.params, batch, args.repeats)
            rate = flops / seconds / 1e9
            print(f"| {cfg.kind} | {mode} | {seconds:.3g} | {3600 / seconds:.0f} | {flops / 1e12:.3g} | {rate:.3g} "
                  f"| {rate / peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
