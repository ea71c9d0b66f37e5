"""Plan a drafter recipe's memory on its mesh without any weights (see specblock_jax/plan.py).

    python -m train.plan --config configs/eagle3-llama3.1-8b.yaml --devices 8 --dtype bfloat16
    python -m train.plan --config configs/eagle3-qwen3-8b-v5p64.yaml --devices 32 --batch 16 --kv-len 8192

The devices are simulated CPU devices (`--devices`, default 8), so the plan runs anywhere; the mesh
is the recipe's `mesh:` section laid over them. The target's config.json is read from the recipe's
`target:` directory, or, when that directory is not here, from configs/targets/<its basename>/
(the published configs of the two 8B targets). `--dtype` is the target's (and so the drafter's)
parameter dtype; it defaults to the recipe's `dtype` (what train.train_drafter loads).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGET_CONFIGS = REPO / "configs" / "targets"


def _simulate_devices(n: int) -> None:
    """Ask XLA for `n` host devices; only possible before jax starts."""
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != n:
            raise SystemExit(f"jax is already running with {jax.device_count()} device(s); cannot simulate {n}")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def target_config_path(target: str | None) -> pathlib.Path:
    """The config.json to plan with: the recipe's target directory, or its namesake under configs/targets."""
    if target is None:  # the embedded default: its GGUF's conversion (made once, then cached)
        from specblock_jax import gguf

        return gguf.convert(gguf.default_gguf()) / "config.json"
    local = pathlib.Path(target) / "config.json"
    if local.is_file():
        return local
    fallback = TARGET_CONFIGS / pathlib.Path(target).name / "config.json"
    if fallback.is_file():
        return fallback
    raise FileNotFoundError(f"no config.json for target {target!r}: neither {local} nor {fallback} exists")


def _scratch(train_drafter, cfg, drafter) -> int:
    """Cache slots the exported drafting method keeps past the target's length (EAGLE-3: its frontier
    nodes; SpecBlock: its expansion blocks), from the recipe's `decoding` section."""
    return int(train_drafter.drafting_method(cfg, drafter).scratch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML DrafterTrainConfig recipe")
    parser.add_argument("--devices", type=int, default=8, help="simulated devices (default 8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="target and drafter parameter dtype (default: the recipe's, as train_drafter loads)")
    parser.add_argument("--batch", type=int, default=1, help="decoding batch for the KV cache (default 1)")
    parser.add_argument("--kv-len", type=int, default=4096, help="decoding cache length (default 4096)")
    parser.add_argument("--train-batch", type=int, help="training batch (default: the recipe's batch_size)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--no-table", action="store_true", help="totals only, without the per-parameter tables")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices must be >= 1")
    _simulate_devices(args.devices)

    from specblock_jax import hf, plan, sharding
    from specblock_jax.config import ConfigError, load_yaml
    from train import train_drafter

    try:
        cfg = load_yaml(train_drafter.DrafterTrainConfig, args.config)
        dtype = args.dtype or cfg.dtype
        target = hf.config_from_hf(json.loads(target_config_path(cfg.target).read_text()), dtype)
        drafter = train_drafter.drafter_config(cfg, target)
        model = train_drafter.model_of(drafter)
        mesh = sharding.make_mesh(cfg.mesh)
        result = plan.plan(target, drafter, mesh, train_batch=args.train_batch or cfg.batch_size,
                           seq_len=cfg.seq_len, decode_batch=args.batch, kv_len=args.kv_len, drafter_model=model,
                           drafter_scratch=_scratch(train_drafter, cfg, drafter), grad_accum=cfg.grad_accum)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps(plan.to_json(result)))
    else:
        title = (f"{args.config}: target {cfg.target} ({target.num_params:,} params, {dtype}), "
                 f"{cfg.kind} drafter")
        print(plan.format_plan(result, title, table=not args.no_table))


if __name__ == "__main__":
    main()
