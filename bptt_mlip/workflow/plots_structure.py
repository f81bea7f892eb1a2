"""Pictures of structures: a defect's neighbourhood, predicted against reference relaxation (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from bptt_mlip.data.geometry import minimum_image
from bptt_mlip.workflow.plots import pyplot


def _relative_to_centre(start: np.ndarray, center: int, cell: np.ndarray | None) -> np.ndarray:
    """[n, 3] positions relative to atom ``center`` (Å), minimum image in a periodic cell (rows)."""
    rel = start - start[center]
    if cell is None or abs(np.linalg.det(cell)) < 1e-9:
        return rel
    return minimum_image(rel, cell)


def _symbols(species, n: int) -> np.ndarray:
    if species is None:
        return np.array(["atom"] * n)
    from ase.data import chemical_symbols

    return np.array([chemical_symbols[int(s)] if isinstance(s, (int, np.integer)) else str(s) for s in species])


def _draw_projection(ax, axes_ij, name, rel, sel, labels, colour, d_ref, d_pred, scale) -> None:
    """One 2D projection: atoms around the centre, reference (solid) and predicted (dashed) arrows."""
    i, j = axes_ij
    for k, c in colour.items():
        m = sel[labels[sel] == k]
        ax.scatter(rel[m, i], rel[m, j], s=140, color=c, edgecolor="k", alpha=0.75, label=k, zorder=2)
    ax.scatter([0], [0], s=420, facecolor="none", edgecolor="r", lw=2, zorder=3, label="centre")
    for a in sel:
        x0, y0 = rel[a, i], rel[a, j]
        ax.annotate("", xy=(x0 + scale * d_ref[a, i], y0 + scale * d_ref[a, j]), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color="k", lw=1.6), zorder=4)
        ax.annotate("", xy=(x0 + scale * d_pred[a, i], y0 + scale * d_pred[a, j]), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=1.2, ls="--"), zorder=5)
    ax.plot([], [], "k-", label="reference")
    ax.plot([], [], "--", color="tab:red", label="predicted")
    ax.set_xlabel(f"{name[0]} - centre (Å)")
    ax.set_ylabel(f"{name[1]} - centre (Å)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.set_title(f"{name} projection")


def defect_neighbourhood(
    start: np.ndarray,
    predicted: np.ndarray,
    reference: np.ndarray,
    path: str | Path,
    *,
    species: Sequence[int | str] | None = None,
    cell: np.ndarray | None = None,
    radius: float = 4.0,
    center: int | None = None,
    arrow_scale: float | None = None,
    title: str | None = None,
) -> Path:
    """Atoms within ``radius`` Å of a defect centre, in three 2D projections (xy, xz, yz).

    Each atom is drawn at its start position, with an arrow to its predicted (model) end point and
    another to its reference (e.g. DFT) end point; the two arrow heads should coincide for a good
    model. Displacements are small next to bond lengths, so arrows are drawn ``arrow_scale`` times
    longer than they are (default: scaled so the largest reference displacement is drawn 1.5 Å
    long; the factor is printed in the title).

    Args:
      start, predicted, reference: [n, 3] Cartesian positions (Å), unwrapped consistently
        (as in a trajectory; not wrapped into the cell separately).
      path: PNG file to write.
      species: [n] symbols or atomic numbers (colours and legend); default all the same.
      cell: [3, 3] lattice rows (Å) for minimum-image distances to the centre, or None.
      radius: neighbourhood radius (Å) around the centre.
      center: index of the centre atom (default: the atom that moves most from start to reference).
      arrow_scale: displacement magnification (default: automatic, see above).
      title: figure title (default describes the centre and the errors).
    """
    plt = pyplot()
    start, predicted, reference = (np.asarray(x, np.float64) for x in (start, predicted, reference))
    if not (start.shape == predicted.shape == reference.shape) or start.ndim != 2 or start.shape[1] != 3:
        raise ValueError(f"start, predicted, reference must all be [n, 3]; "
                         f"got {start.shape}, {predicted.shape}, {reference.shape}")
    cell = None if cell is None else np.asarray(cell, np.float64)
    d_ref, d_pred = reference - start, predicted - start
    if center is None:
        center = int(np.argmax(np.linalg.norm(d_ref, axis=-1)))
    rel = _relative_to_centre(start, center, cell)
    sel = np.nonzero(np.linalg.norm(rel, axis=-1) <= radius)[0]
    labels = _symbols(species, start.shape[0])
    biggest = float(np.max(np.linalg.norm(d_ref[sel], axis=-1), initial=0.0))
    biggest = max(biggest, float(np.max(np.linalg.norm(d_pred[sel], axis=-1), initial=0.0)), 1e-6)
    scale = arrow_scale if arrow_scale is not None else 1.5 / biggest
    err = np.linalg.norm(predicted[sel] - reference[sel], axis=-1)

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    cmap = plt.get_cmap("tab10")
    colour = {k: cmap(i % 10) for i, k in enumerate(sorted(set(labels[sel])))}
    for ax, axes_ij, name in zip(axes, [(0, 1), (0, 2), (1, 2)], ["xy", "xz", "yz"]):
        _draw_projection(ax, axes_ij, name, rel, sel, labels, colour, d_ref, d_pred, scale)
    axes[0].legend(loc="best", fontsize=8)
    if title is None:
        title = (f"{len(sel)} atoms within {radius:g} Å of atom {center} ({labels[center]}); arrows x{scale:.3g}; "
                 f"|predicted - reference| mean {err.mean():.3f} Å, max {err.max():.3f} Å")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
