"""``curves.png``: loss, accuracy and learning rate per epoch, drawn from the metrics history.

Why the object API (``Figure`` + Agg canvas) rather than pyplot: no global figure state, no GUI
backend, safe in headless jobs and in processes that use pyplot for something else.
"""
from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Three panels: every training loss term (log scale), train/test top-1, and the lr."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    terms = [k for k in (history[0] if history else {}) if k.startswith("train_loss_")]
    loss_keys = ["train_loss"] + (terms if len(terms) > 1 else [])  # one term would just repeat the total
    for key in loss_keys:
        ax_loss.plot(*_series(history, key), label=key.removeprefix("train_"), lw=2 if key == "train_loss" else 1)
    ax_loss.plot(*_series(history, "test_loss"), label="test loss (CE)", ls="--")
    if any(v > 0 for k in loss_keys for v in _series(history, k)[1]):
        ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    for key, label in (("train_top1", "train top-1"), ("test_top1", "test top-1"), ("test_top5", "test top-5")):
        ax_acc.plot(*_series(history, key), marker=".", label=label)
    heads = sorted({k for row in history for k in row if k.startswith("test_top1_")})
    for key in heads:  # a distiller's further heads (Block-KD: each stepping-stone and their ensemble)
        ax_acc.plot(*_series(history, key), ls=":", marker=".", label=key.removeprefix("test_top1_") + " top-1")
    ax_acc.set_title("accuracy (%)")
    ax_lr.plot(*_series(history, "lr"))
    ax_lr.set_title("learning rate (start of epoch)")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_comparison(runs: dict[str, str | Path], path: str | Path, key: str = "test_top1") -> Path:
    """Test top-1 per epoch of several runs (``name -> metrics.jsonl``) on one axis."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, metrics in runs.items():
        history = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
        ax.plot(*_series(history, key), marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
