"""Minimum-image arithmetic and neighbour search on the host (numpy), in one place.

Cells are [3, 3] arrays whose rows are the lattice vectors (Å); ``pbc`` is a bool or three
bools (periodic directions). Inside jit, use jax-md's ``space`` / ``partition`` instead.

Two kinds of functions:

* :func:`pair_distances` is exact for any cell (ASE's ``ase.geometry.get_distances``, which
  reduces the cell before searching images); use it for checks and one-off measurements.
* :func:`minimum_image`, :func:`lattice_shifts` and :func:`neighbor_indices` round fractional
  coordinates to the nearest integer. That is exact when every cell width exceeds twice the
  distances in question (the oracles' cutoff rule, any frame-to-frame step), and about 40
  times faster than ASE's neighbour list on 64 atoms, which matters in the data generator's
  inner loop (one neighbour search per force call).
"""

from __future__ import annotations

import numpy as np


def lattice_shifts(d: np.ndarray, cell: np.ndarray, pbc=True) -> np.ndarray:
    """[..., 3] nearest whole-lattice-vector shifts of displacements ``d`` [..., 3] Å, in fractional
    coordinates (integers as floats; 0 along non-periodic directions)."""
    frac = np.asarray(d, np.float64) @ np.linalg.inv(np.asarray(cell, np.float64))
    return np.where(np.asarray(pbc, bool), np.round(frac), 0.0)


def minimum_image(d: np.ndarray, cell: np.ndarray, pbc=True) -> np.ndarray:
    """[..., 3] minimum-image displacements (Å) of ``d`` [..., 3] Å by fractional rounding
    (exact for cells wider than twice the distances of interest, see the module docstring)."""
    cell = np.asarray(cell, np.float64)
    frac = np.asarray(d, np.float64) @ np.linalg.inv(cell)
    frac = frac - np.where(np.asarray(pbc, bool), np.round(frac), 0.0)
    return frac @ cell


def pair_distances(positions: np.ndarray, cell: np.ndarray | None = None, pbc=False) -> np.ndarray:
    """[n, n] distances (Å) between the atoms of ``positions`` [n, 3] Å, minimum image along the
    periodic directions of ``cell`` (exact for any cell: ASE's ``get_distances``); ``inf`` on the
    diagonal."""
    from ase.geometry import get_distances

    x = np.asarray(positions, np.float64)
    periodic = cell is not None and bool(np.any(pbc))
    _, r = get_distances(x, cell=np.asarray(cell, np.float64) if periodic else None, pbc=pbc if periodic else None)
    r = np.array(r, np.float64)
    r[np.diag_indices(len(x))] = np.inf
    return r


def short_pair_distances(positions: np.ndarray, cell: np.ndarray | None, reach: float) -> np.ndarray:
    """[n, n] distances (Å, ``inf`` on the diagonal) between the atoms of ``positions`` [n, 3] Å,
    minimum image in all three directions of a periodic ``cell`` (None: no cell), exact below
    ``reach`` Å; longer ones may come out longer than they are, never shorter.

    A cell wider than twice ``reach`` in every direction takes :func:`minimum_image` (exact there,
    and about 50 times faster than ASE on 64 atoms); a narrower one takes :func:`pair_distances`.
    """
    x = np.asarray(positions, np.float64)
    if cell is None:
        d = x[None, :, :] - x[:, None, :]
    else:
        cell = np.asarray(cell, np.float64)
        normals = np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]])
        widths = abs(np.linalg.det(cell)) / np.linalg.norm(normals, axis=-1)
        if widths.min() <= 2.0 * reach:
            return pair_distances(x, cell, pbc=True)
        d = minimum_image(x[None, :, :] - x[:, None, :], cell)
    r = np.sqrt(np.einsum("ijx,ijx->ij", d, d))
    np.fill_diagonal(r, np.inf)
    return r


def neighbor_indices(positions: np.ndarray, cell: np.ndarray, cutoff: float, capacity: int = 0) -> np.ndarray:
    """[n, K] indices of each atom's neighbours closer than ``cutoff`` Å (minimum image, all three
    directions periodic), in increasing order, padded with ``n``.

    K is at least ``capacity`` and the largest neighbour count, rounded up to a multiple of 8
    (few distinct shapes, few compilations of a jitted consumer).
    """
    x = np.asarray(positions, np.float64)
    n = len(x)
    d = minimum_image(x[None, :, :] - x[:, None, :], cell)
    r2 = np.einsum("ijx,ijx->ij", d, d)
    np.fill_diagonal(r2, np.inf)
    close = r2 < cutoff * cutoff
    k = max(capacity, int(close.sum(axis=1).max()) if n else 0)
    k = -(-k // 8) * 8
    idx = np.full((n, k), n, np.int32)
    for i in range(n):
        nb = np.nonzero(close[i])[0]
        idx[i, : len(nb)] = nb
    return idx
