"""The optimizer every training loop here uses: AdamW with linear warm-up, then linear or cosine
decay, and global-norm gradient clipping."""

from __future__ import annotations

import dataclasses

import optax

from specblock_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    total_steps: int
    warmup_steps: int = 100
    decay: str = "cosine"  # "cosine" | "linear"
    end_lr_fraction: float = 0.1  # final learning rate as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.decay not in ("cosine", "linear"):
            raise ConfigError(f"decay={self.decay!r} is not one of ('cosine', 'linear')")
        if self.total_steps < 1 or not 0 <= self.warmup_steps < self.total_steps:
            raise ConfigError(f"need 0 <= warmup_steps ({self.warmup_steps}) < total_steps ({self.total_steps})")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")


def schedule(c: OptimConfig) -> optax.Schedule:
    end = c.learning_rate * c.end_lr_fraction
    decay_steps = c.total_steps - c.warmup_steps
    if c.decay == "cosine":
        decay = optax.cosine_decay_schedule(c.learning_rate, decay_steps, alpha=c.end_lr_fraction)
    else:
        decay = optax.linear_schedule(c.learning_rate, end, decay_steps)
    warmup = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
    return optax.join_schedules([warmup, decay], [c.warmup_steps])


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(c.grad_clip),
        optax.adamw(schedule(c), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay),
    )
