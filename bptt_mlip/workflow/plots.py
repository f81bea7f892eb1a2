"""Plots a user would rather look at than read (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def save_figure(fig, ax, path, dpi: int = 110, legend: bool = True) -> Path:
    """Grid, legend, tight layout; write ``path`` (PNG) and close the figure."""
    if legend:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(history: Sequence[dict], path: Path, title: str = "BPTT fine-tuning") -> Path:
    """Training loss and validation Dq per epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(r["epoch"], r["train_loss"]) for r in history if "train_loss" in r]
    va = [(r["epoch"], r["val_mean_dq"]) for r in history if "val_mean_dq" in r]
    if tr:
        ax.plot(*zip(*tr), "o-", label="train loss (mean Dq of batch rollouts)")
    if va:
        ax.plot(*zip(*va), "s-", label="validation mean Dq")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dq (amu$^{1/2}$ Å)")
    ax.set_title(title)
    return save_figure(fig, ax, path)


def grid_curve(step_sizes, mean_dq_by_split: dict[str, np.ndarray], path: Path, best: float | None = None) -> Path:
    """Mean Dq against fixed step size, one line per data split (paper table 6 as a curve)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in mean_dq_by_split.items():
        v = np.asarray(values, float)
        v = np.where(np.isfinite(v), v, np.nan)
        ax.plot(step_sizes, v, "o-", label=name)
    if best is not None:
        ax.axvline(best, color="k", ls="--", lw=1, label=f"chosen step {best:g}")
    ax.set_xlabel("fixed step size η (Å²/eV)")
    ax.set_ylabel("mean Dq (amu$^{1/2}$ Å)")
    ax.set_yscale("log")
    ax.set_title("Step-size grid search, pretrained model")
    return save_figure(fig, ax, path)


def dq_before_after(before: np.ndarray, after: np.ndarray, path: Path, labels=("pretrained", "BPTT-tuned")) -> Path:
    """Per-structure Dq before against after fine-tuning; points below the diagonal improved."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    b, a = np.asarray(before, float), np.asarray(after, float)
    ax.scatter(b, a, s=18, alpha=0.8)
    hi = np.nanmax(np.concatenate([b[np.isfinite(b)], a[np.isfinite(a)], [1e-3]]))
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    improved = int(np.sum(a < b))
    ax.set_xlabel(f"Dq {labels[0]} (amu$^{{1/2}}$ Å)")
    ax.set_ylabel(f"Dq {labels[1]} (amu$^{{1/2}}$ Å)")
    ax.set_title(f"Test Dq per structure: {improved}/{len(b)} improved")
    return save_figure(fig, ax, path, legend=False)
