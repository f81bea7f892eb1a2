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


def dq_per_structure_panels(panels: dict[str, dict[str, np.ndarray]], path: Path,
                            order_by: str = "start") -> Path:
    """Test Dq (amu^0.5 Å) per structure, one panel per model side by side.

    ``panels``: model name -> {relaxation name (``"start"``, ``"pretrained_best_grid"``,
    ``"pretrained_fire"``, ``"bptt"``, ...) -> [N] Dq per test structure}; every panel holds the same N
    structures in the same order. Structures are sorted by ``panels[first][order_by]`` (not moving,
    by default) so that every panel's x position names the same structure. Non-finite values (a
    runaway) are drawn at the top edge as crosses."""
    plt = pyplot()
    names = list(panels)
    first = panels[names[0]]
    order = np.argsort(np.asarray(first[order_by], float), kind="stable")
    finite = [np.asarray(v, float) for p in panels.values() for v in p.values()]
    top = max(float(np.nanmax(np.where(np.isfinite(v), v, np.nan))) for v in finite if np.isfinite(v).any())
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), sharey=True, squeeze=False)
    styles = {"start": ("k", "-", "not moving"), "pretrained_best_grid": ("C0", ".", "pretrained, best grid step"),
              "pretrained_fire": ("C2", ".", "pretrained + FIRE"), "bptt": ("C3", ".", "BPTT-tuned")}
    for ax, name in zip(axes[0], names):
        x = np.arange(order.size)
        for key, values in panels[name].items():
            color, marker, label = styles.get(key, (None, ".", key))
            v = np.asarray(values, float)[order]
            ax.plot(x, np.where(np.isfinite(v), v, np.nan), marker if marker != "-" else "-", color=color,
                    ms=4, lw=1, label=label)
            bad = ~np.isfinite(v)
            if bad.any():
                ax.plot(x[bad], np.full(bad.sum(), top), "x", color=color)
        ax.set_title(name)
        ax.set_xlabel("test structure (sorted by Dq of not moving)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dq to the DFT minimum (amu$^{1/2}$ Å)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)
    return Path(path)
