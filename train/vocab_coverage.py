"""How much of the trained-on text a reduced draft vocabulary covers, for choosing `draft_vocab_size`.

    python -m train.vocab_coverage --config configs/eagle3-smollm2.yaml --sizes 4096,8192,16384,32768

A drafter with a reduced vocabulary drafts only its N most frequent training tokens (counted over the
rows and positions a training run learns from: the config's data, domains, `seq_len` and
`loss_on_prompt`), so a target token outside them can never be accepted. The coverage of the
held-out rows by the vocabulary chosen on the training rows is therefore a ceiling on per-token
acceptance; the training rows' own coverage is shown beside it.
"""

from __future__ import annotations

import argparse

import numpy as np

from specblock_jax.config import ConfigError, load_yaml
from specblock_jax.hf import load_target
from specblock_jax.models import eagle3
from train import train_drafter
from train.regenerate import read_parts


def coverage(counts_V: np.ndarray, draft_to_target_Vd: np.ndarray) -> float:
    """Share of the counted tokens that lie inside the draft vocabulary."""
    return float(counts_V[draft_to_target_Vd].sum() / max(counts_V.sum(), 1))


def coverage_table(cfg: train_drafter.DrafterTrainConfig, vocab_size: int, sizes: list[int]) -> list[dict]:
    """Per size N: the training rows' and the held-out rows' coverage by the N most frequent training
    tokens, and the token counts they are shares of."""
    parts = train_drafter.domain_rows(read_parts(cfg.data_dir), cfg)
    train_rows, val_rows = train_drafter.split_rows(parts, cfg, vocab_size)
    counts = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        example = train_drafter.to_example(rows)
        counts[split] = eagle3.token_counts(example["tokens"], vocab_size, example["loss_mask"])
    table = []
    for n in sizes:
        mapping = eagle3.vocab_mapping_from_counts(counts["train"], n)
        table.append({"size": n, "train": coverage(counts["train"], mapping), "val": coverage(counts["val"], mapping),
                      "train_tokens": int(counts["train"].sum()), "val_tokens": int(counts["val"].sum())})
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML DrafterTrainConfig whose training data is counted")
    parser.add_argument("--sizes", default="2048,4096,8192,16384,32768", help="comma-separated vocabulary sizes N")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    try:
        cfg = load_yaml(train_drafter.DrafterTrainConfig, args.config)
    except ConfigError as e:
        parser.error(str(e))
    vocab_size = load_target(cfg.target).config.vocab_size
    if not sizes or sizes[0] < 1 or sizes[-1] > vocab_size:
        parser.error(f"--sizes must lie in [1, {vocab_size}] (the target's vocabulary)")
    table = coverage_table(cfg, vocab_size, sizes)
    print(f"{cfg.data_dir}: {table[0]['train_tokens']} trained-on tokens, {table[0]['val_tokens']} held out "
          f"(target vocabulary {vocab_size})")
    print("| draft vocabulary N | training coverage | held-out coverage |\n|---|---|---|")
    for row in table:
        print(f"| {row['size']} | {row['train']:.4f} | {row['val']:.4f} |")


if __name__ == "__main__":
    main()
