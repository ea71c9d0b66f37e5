"""Learning curves of drafter training runs against wall-clock time, from their `log.jsonl`.

    python -m train.learning_curves runs/eagle3-smollm2/log.jsonl runs/specblock-smollm2/log.jsonl \\
        --labels EAGLE-3,SpecBlock --out docs/learning-curves.png

Two panels share the x-axis of training hours: by default (`--clock logged`) the time summed over
the log's records (`seconds`: training steps only, held-out evaluation excluded), so runs with equal
budgets end at the same place. An interval that shared the machine with other work, or waited while
the run was paused, counts in full there; `--clock median` instead puts step s at s x the run's median
seconds per step over its intervals, which such intervals (and the first one's compiles) do not move.
A table of each run's steps, logged hours, median seconds per step and that budget is printed.
A run continued by another (`init_from` its exported drafter) is given as its logs joined by `+`,
`first.jsonl+continued.jsonl`: the continuation's steps and hours follow on from the first's.
Left: the held-out chain estimate of the acceptance length (`val_acceptance_length`); right:
the held-out accuracy of each draft position (`val_step_acc`, given the earlier positions right;
EAGLE-3 logs written before that definition, 2026-12-05, hold its unconditional accuracy).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import NamedTuple

import numpy as np

from infer import plots


CLOCKS = ("logged", "median")


class Curve(NamedTuple):
    hours: np.ndarray  # [R] training hours at each logged record
    steps: np.ndarray  # [R]
    acceptance: np.ndarray  # [R] held-out chain acceptance estimate
    step_acc: np.ndarray  # [R, K] held-out accuracy per draft position
    step_seconds: np.ndarray  # [R] seconds per step over each record's interval (as logged)


def read_curve(log_path: str | pathlib.Path, clock: str = "logged") -> Curve:
    """The records of a training log, in step order (a resumed run appends to the same log), on the
    `clock` the module docstring describes."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    lines = [line for line in pathlib.Path(log_path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{log_path} holds no log records")
    records = sorted((json.loads(line) for line in lines), key=lambda r: r["step"])
    steps = np.array([r["step"] for r in records])
    seconds = np.array([r["seconds"] for r in records])
    step_seconds = seconds / np.diff(steps, prepend=0)
    hours = (np.cumsum(seconds) if clock == "logged" else steps * np.median(step_seconds)) / 3600.0
    return Curve(hours, steps, np.array([r["val_acceptance_length"] for r in records]),
                 np.array([r["val_step_acc"] for r in records]), step_seconds)


def read_run(logs: str, clock: str = "logged") -> Curve:
    """The curve of a run given as logs joined by `+`, each continuing the one before: its steps and
    hours offset by where that one ended (each log's median clock its own, as they may have run on
    other machines)."""
    parts = [read_curve(p, clock) for p in logs.split("+")]
    steps = np.cumsum([0] + [c.steps[-1] for c in parts[:-1]])
    hours = np.cumsum([0.0] + [c.hours[-1] for c in parts[:-1]])
    shifted = [c._replace(hours=c.hours + h, steps=c.steps + s) for c, s, h in zip(parts, steps, hours)]
    return Curve(*(np.concatenate(field) for field in zip(*shifted)))


def budget_table(curves: dict[str, Curve]) -> str:
    """Markdown: each run's steps, logged hours, median seconds per step and steps x that median."""
    lines = ["| run | steps | logged hours | median s / step | steps x median (hours) |", "|---|---|---|---|---|"]
    for label, c in curves.items():
        median = float(np.median(c.step_seconds))
        lines.append(f"| {label} | {c.steps[-1]} | {c.step_seconds @ np.diff(c.steps, prepend=0) / 3600:.2f} | "
                     f"{median:.1f} | {c.steps[-1] * median / 3600:.2f} |")
    return "\n".join(lines)


def plot(curves: dict[str, Curve], path: str | pathlib.Path) -> pathlib.Path:
    fig, (ax1, ax2) = plots.plt.subplots(1, 2, figsize=(11, 4))
    for (label, curve), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        ax1.plot(curve.hours, curve.acceptance, color=color, label=f"{label} ({curve.steps[-1]} steps)")
        for k in range(curve.step_acc.shape[1]):
            ax2.plot(curve.hours, curve.step_acc[:, k], color=color, alpha=1.0 - 0.7 * k / curve.step_acc.shape[1],
                     label=f"{label} position {k + 1}")
    ax1.set(xlabel="training hours", ylabel="held-out chain acceptance estimate")
    ax2.set(xlabel="training hours", ylabel="held-out accuracy per draft position")
    ax1.legend()
    ax2.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plots.plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files of drafter training runs (A+B: B continues A)")
    parser.add_argument("--labels", help="comma-separated, one per log (default: each log's directory name)")
    parser.add_argument("--out", default="docs/learning-curves.png", help="PNG to write")
    parser.add_argument("--clock", choices=CLOCKS, default="logged",
                        help="training hours as logged, or steps x the run's median seconds per step")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [pathlib.Path(p.split("+")[0]).parent.name for p in args.logs]
    if len(labels) != len(args.logs):
        parser.error(f"{len(labels)} labels for {len(args.logs)} logs")
    try:
        curves = {label: read_run(p, args.clock) for label, p in zip(labels, args.logs)}
    except (OSError, ValueError, KeyError) as e:
        parser.error(f"cannot read a training log: {e!r}")
    print(budget_table(curves))
    print(f"wrote {plot(curves, args.out)}")


if __name__ == "__main__":
    main()
