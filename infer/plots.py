"""PNG plots of a benchmark report (infer/bench.py): speedup and tau per method, the time of one
decoding iteration split into draft / verify / other, and the acceptance-length histogram; and of an
adaptation report (infer/adapt_bench.py): tau and throughput over each stream, static and adapting."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PHASES = (("draft_ms_per_iter", "draft", "tab:orange"), ("verify_ms_per_iter", "verify", "tab:blue"),
          ("other_ms_per_iter", "other (accept, commit)", "tab:gray"))


def _measured(report: dict) -> dict[str, dict[str, Any]]:
    return {name: m for name, m in report["methods"].items() if m.get("runs")}


def _title(report: dict) -> str:
    c = report.get("config", {})
    device = report.get("versions", {}).get("device", "")
    return (f"{c.get('num_prompts', '?')} prompts, {c.get('max_new_tokens', '?')} new tokens, "
            f"T={c.get('temperature', '?')}, batch {c.get('batch_size', '?')} | {device}")


def speedup_tau(report: dict, path: pathlib.Path) -> pathlib.Path:
    methods = _measured(report)
    names = list(methods)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    speedups = [methods[n]["speedup_vs_ar"] or 0.0 for n in names]
    ax1.bar(names, speedups, color="tab:green")
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax1.set_ylabel("speedup vs ar (median of per-run ratios)")
    for i, v in enumerate(speedups):
        ax1.text(i, v, f"{v:.2f}x", ha="center", va="bottom")
    taus = [methods[n]["tau"] or 0.0 for n in names]
    ax2.bar(names, taus, color="tab:purple")
    ax2.set_ylabel("tau: tokens per target forward")
    for i, v in enumerate(taus):
        ax2.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def time_breakdown(report: dict, path: pathlib.Path) -> pathlib.Path:
    methods = _measured(report)
    names = list(methods)
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(names)
    for key, label, color in PHASES:
        values = [max(methods[n].get(key) or 0.0, 0.0) for n in names]  # noise can make "other" a hair negative
        ax.bar(names, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, n in enumerate(names):
        ax.text(i, bottom[i], f"{methods[n].get('loop_ms_per_iter') or 0.0:.2f} ms", ha="center", va="bottom")
    ax.set_ylabel("ms per decoding iteration (first batch, timed apart)")
    ax.legend(fontsize=8)
    ax.set_title(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def acceptance(report: dict, path: pathlib.Path) -> pathlib.Path:
    methods = {n: m for n, m in _measured(report).items() if n != "ar"}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(methods), 1)
    for j, (name, m) in enumerate(methods.items()):
        hist = m["acceptance_histogram"]
        total = sum(hist) or 1
        ax.bar([k + (j - (len(methods) - 1) / 2) * width for k in range(len(hist))], [h / total for h in hist],
               width=width, label=f"{name} (tau {m['tau']:.2f})")
    ax.set_xlabel("tokens committed per iteration (accepted drafts + 1 bonus)")
    ax.set_ylabel("fraction of (row, iteration) steps")
    if methods:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no speculative method in this run", ha="center", transform=ax.transAxes)
    ax.set_title(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict, stem: str | pathlib.Path) -> list[pathlib.Path]:
    """Write `<stem>_speedup_tau.png`, `<stem>_time_breakdown.png`, `<stem>_acceptance.png`."""
    stem = pathlib.Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    return [speedup_tau(report, stem.with_name(stem.name + "_speedup_tau.png")),
            time_breakdown(report, stem.with_name(stem.name + "_time_breakdown.png")),
            acceptance(report, stem.with_name(stem.name + "_acceptance.png"))]


def _rolling(values: list[float], width: int) -> list[float]:
    return [sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1])
            for i in range(len(values))]


def adaptation(report: dict, path: pathlib.Path) -> pathlib.Path:
    """Per stream (first pass): tau per prompt (rolling mean over a twentieth of the stream, at least 6
    prompts) with the adapter's events marked (updates kept shaded, updates discarded as ticks, reverts and
    shifts as lines), and the adapting method's tokens/s over the static one's, cumulative over the stream
    (its update time included): where learning costs and where it pays."""
    streams = report["streams"]
    fig, axes = plt.subplots(2, len(streams), figsize=(5.5 * len(streams), 7), squeeze=False)
    colors = {"static": "tab:blue", "adapt": "tab:red"}
    for col, (name, stream) in enumerate(streams.items()):
        records = stream["passes"][0]["records"]
        window = max(6, len(records["static"]) // 20)
        top, bottom = axes[0, col], axes[1, col]
        for method, rows in records.items():
            top.plot(_rolling([r["tau"] for r in rows], window), color=colors[method], label=method)
        shifts = 0
        for r in records["adapt"]:
            if r["kept"]:
                top.axvline(r["prompt"], color="tab:red", alpha=0.15, linewidth=2)
            elif r["updated"]:
                top.plot(r["prompt"], 0, marker="|", color="tab:gray", markersize=8,
                         transform=top.get_xaxis_transform())
            if r["reverted"]:
                top.axvline(r["prompt"], color="black", linestyle="--", linewidth=0.8)
            if r["shifts"] > shifts:
                top.axvline(r["prompt"], color="tab:green", linestyle=":", linewidth=1.2)
            shifts = r["shifts"]
        ratio, served, seconds = [], {m: 0.0 for m in records}, {m: 0.0 for m in records}
        for rows in zip(records["static"], records["adapt"]):
            for method, r in zip(("static", "adapt"), rows):
                served[method] += r["new_tokens"]
                seconds[method] += r["seconds"] + r["adapt_s"]
            ratio.append((served["adapt"] / seconds["adapt"]) / (served["static"] / seconds["static"]))
        bottom.plot(ratio, color="tab:red")
        bottom.axhline(1.0, color="tab:blue", linewidth=0.8)
        updates = sum(r["updated"] for r in records["adapt"])
        kept = sum(r["kept"] for r in records["adapt"])
        top.set_title(f"{name} (pass 1)\nadapt / static {ratio[-1]:.3f}x tokens/s, {updates} updates ({kept} kept)",
                      fontsize=10)
        top.set_xlabel("prompt (kept updates shaded, discarded |, reverts --, shifts seen ..)")
        top.set_ylabel(f"tau (rolling mean of {window})")
        top.legend()
        bottom.set_xlabel("prompt")
        bottom.set_ylabel("adapt / static tokens/s, cumulative")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_adaptation_plots(report: dict, stem: str | pathlib.Path) -> list[pathlib.Path]:
    stem = pathlib.Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    return [adaptation(report, stem.with_name(f"{stem.name}_adaptation.png"))]
