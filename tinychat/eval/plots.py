"""The report card's PNG plots, drawn from recorded numbers only (see tinychat.eval.report).

Why matplotlib's object API (Figure + savefig) and not pyplot: pyplot keeps global state and picks a GUI
backend; a library that draws files from a server, a test or a training job must not touch either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from tinychat.eval.report import RunData


def _save(fig: Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            xs.append(r.get("step", len(xs)))
            ys.append(v)
    return xs, ys


def curves(d: RunData, path: Path) -> bool:
    """Training loss and training-time validation numbers, one panel per stage (losses differ per objective)."""
    stages = [s for s in d.stages if d.train[s]]
    if not stages:
        return False
    fig = Figure(figsize=(6.5, 2.6 * len(stages)))
    for i, s in enumerate(stages):
        ax = fig.add_subplot(len(stages), 1, i + 1)
        ax.plot(*_series(d.train[s], "loss"), label="train loss", lw=1)
        for key in ("val_loss", "val_bpb"):
            xs, ys = _series(d.evals[s], key)
            if xs:
                ax.plot(xs, ys, "o-", label=key.replace("_", " "), ms=3)
        ax.set_title(s, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def suite_bars(d: RunData, path: Path) -> bool:
    """Accuracy per suite, one bar per stage: the metric table across stages."""
    names = d.suite_names()
    stages = [s for s in d.stages if any(n in d.suites[s] for n in names)]
    if not names or not stages:
        return False
    fig = Figure(figsize=(max(6.0, 0.9 * len(names) * max(1, len(stages)) ** 0.5 + 2), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(stages)
    for j, s in enumerate(stages):
        vals = [d.suites[s].get(n, {}).get("accuracy") for n in names]
        xs = [i + (j - (len(stages) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [100 * (v or 0.0) for v in vals], width, label=s)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def bpb_bars(d: RunData, path: Path) -> bool:
    """Bits per byte on held-out text after each stage (the alignment tax)."""
    stages = [s for s in d.stages if isinstance(d.suites[s].get("bpb", {}).get("val_bpb"), int | float)]
    if not stages:
        return False
    fig = Figure(figsize=(max(4.0, 1.1 * len(stages) + 1), 3.0))
    ax = fig.add_subplot(1, 1, 1)
    vals = [d.suites[s]["bpb"]["val_bpb"] for s in stages]
    ax.bar(stages, vals, color="tab:purple")
    for x, v in enumerate(vals):
        ax.annotate(f"{v:.3f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bits per byte")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def throughput(d: RunData, path: Path) -> bool:
    """Tokens per second and MFU per step, one line per stage."""
    stages = [s for s in d.stages if _series(d.train[s], "tok_per_s")[0]]
    if not stages:
        return False
    fig = Figure(figsize=(6.5, 4.6))
    ax1, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for s in stages:
        ax1.plot(*_series(d.train[s], "tok_per_s"), label=s, lw=1)
        xs, ys = _series(d.train[s], "mfu")
        ax2.plot(xs, [100 * y for y in ys], label=s, lw=1)
    ax1.set_ylabel("tokens / s")
    ax2.set_ylabel("MFU (%)")
    ax2.set_xlabel("step")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def draw_all(d: RunData, out_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot the data allows into out_dir; (file name, title) of those drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        ("curves.png", "training and validation curves per stage", curves),
        ("evals.png", "accuracy per suite across stages", suite_bars),
        ("bpb.png", "bits per byte after each stage", bpb_bars),
        ("throughput.png", "throughput and MFU", throughput),
    ]
    return [(name, title) for name, title, fn in plots if fn(d, out_dir / name)]
