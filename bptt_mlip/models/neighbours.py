"""Fixed-capacity periodic neighbour (edge) lists of padded batches, built inside jit.

Every atom i of structure b gets ``K`` edge slots ``index[b, i, k]`` holding the neighbours j
(real atoms only; j = i only for a periodic image of i itself) closer than the cutoff, in
increasing j (then image); unused slots are masked. The edge vectors ``x_j - x_i`` (Å, the
periodic image's position for ``x_j``) are built from the batch's minimum-image pair
displacements, so they are differentiable in the positions (and the cell); the choice of
neighbours is not (it is made on stop-gradient distances, and a smooth cutoff envelope makes the
energy continuous when a pair enters or leaves).

Periodic images: with ``images = 0`` (the default) each pair is taken at its minimum image only,
exact while the cutoff is below half the smallest perpendicular width of every periodic cell.
Smaller cells (a 32-atom GaN supercell is 5.5 Å wide; a primitive cell a few Å) need more than
one image of a neighbour, and of an atom itself: ``images = m`` also searches the minimum-image
displacement shifted by every lattice translation ``n @ cell`` with integer ``n`` in
``{-m, ..., m}^3``, exact while the cutoff is below ``(m + 1/2)`` times the smallest width (the
wrapped fractional displacement lies in [-1/2, 1/2), so along the normal of each face pair an
image ``n`` is at least ``(|n_k| - 1/2) * width_k`` away). The pair work grows as ``(2m + 1)^3``;
:func:`images_needed` gives the smallest ``m`` for a cell on the host.

Assumptions and limits:

* the cutoff is below ``(images + 1/2)`` times the smallest perpendicular width of every periodic
  cell (:func:`cell_too_small` flags cells that break this);
* capacity K comes from :data:`CAPACITY_BUCKETS` so that a run compiles a bounded number of
  shapes; an atom with more than K neighbours within the cutoff sets its structure's ``overflow``
  flag. Nothing is truncated silently: models built on this list poison such structures with NaN.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip.models.periodic import cutoff_limit, minimum_image_displacements

CAPACITY_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
"""Allowed edge capacities per atom: each distinct value compiles its own shapes."""


@flax.struct.dataclass
class EdgeList:
    """Fixed-capacity neighbour lists of a padded batch.

    Attributes:
      index: [B, N, K] int32 neighbour atom j of atom i (0 in unused slots, which are masked).
      vectors: [B, N, K, 3] minimum-image ``x_j - x_i`` in Å; unused slots hold a fixed safe
        vector of length ``cutoff / 2`` so that norms and their gradients stay finite.
      mask: [B, N, K] bool, True for a real edge (both atoms real, distance < cutoff).
      counts: [B, N] int32 neighbours within the cutoff (may exceed K: that is an overflow).
      overflow: [B] bool, some atom has more neighbours than K.
    """

    index: jnp.ndarray
    vectors: jnp.ndarray
    mask: jnp.ndarray
    counts: jnp.ndarray
    overflow: jnp.ndarray


def capacity_bucket(count: int, buckets: tuple[int, ...] = CAPACITY_BUCKETS) -> int:
    """The smallest bucket >= ``count`` neighbours (ValueError if none is large enough)."""
    for b in sorted(buckets):
        if count <= b:
            return int(b)
    raise ValueError(f"{count} neighbours per atom exceed the largest capacity bucket {max(buckets)}; lower the cutoff")


def perpendicular_widths(cell: jnp.ndarray) -> jnp.ndarray:
    """[B] smallest distance (Å) between opposite faces of each cell [B, 3, 3] (rows = lattice
    vectors); ``inf`` for a zero (non-periodic) cell."""
    volume = jnp.abs(jnp.linalg.det(cell))
    areas = jnp.stack([jnp.linalg.norm(jnp.cross(cell[:, (k + 1) % 3], cell[:, (k + 2) % 3]), axis=-1)
                       for k in range(3)], axis=-1)
    periodic = volume > 1e-6
    width = volume / jnp.where(periodic, jnp.max(areas, axis=-1), 1.0)
    return jnp.where(periodic, width, jnp.inf)


def cell_too_small(cell: jnp.ndarray, cutoff: float, images: int = 0) -> jnp.ndarray:
    """[B] bool: ``images`` image shifts per axis do not find every pair within the cutoff
    (cutoff >= (images + 1/2) x the smallest width; see the module docstring)."""
    return cutoff >= (images + 0.5) * perpendicular_widths(cell)


def image_shifts(images: int) -> np.ndarray:
    """[S, 3] integer lattice translations ``n`` in ``{-images, ..., images}^3``, ``S = (2 images + 1)^3``,
    the zero shift first."""
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    r = range(-images, images + 1)
    shifts = [(a, b, c) for a in r for b in r for c in r if (a, b, c) != (0, 0, 0)]
    return np.asarray([(0, 0, 0)] + shifts, np.int32)


def images_needed(cell: np.ndarray, cutoff: float) -> int:
    """The smallest ``images`` for which pairs within ``cutoff`` Å are all found in ``cell`` [3, 3]
    (rows, Å): 0 while the cutoff is below half the smallest width; 0 for a non-periodic cell."""
    width = 2.0 * cutoff_limit(cell)
    if not np.isfinite(width) or cutoff < 0.5 * width:
        return 0
    return int(np.floor(cutoff / width - 0.5)) + 1


def neighbour_counts(positions: jnp.ndarray, cell: jnp.ndarray, mask: jnp.ndarray, cutoff: float,
                     images: int = 0) -> jnp.ndarray:
    """[B, N] int32 number of real neighbours (periodic images included) within ``cutoff`` Å of each
    real atom."""
    _, within = _candidates(jax.lax.stop_gradient(positions), cell, mask, cutoff, images)
    return jnp.sum(within, axis=-1).astype(jnp.int32)


def _candidates(positions: jnp.ndarray, cell: jnp.ndarray, mask: jnp.ndarray, cutoff: float,
                images: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Candidate neighbours of every atom: vectors [B, N, N S, 3] Å (candidate ``c = j S + s`` is
    atom j shifted by ``image_shifts(images)[s] @ cell``) and ``within`` [B, N, N S] bool (both atoms
    real, not the atom itself, closer than the cutoff; decided on stop-gradient vectors)."""
    n = mask.shape[-1]
    displacements = minimum_image_displacements(positions, cell)  # [B, N, N, 3]
    pair = mask[:, :, None] & mask[:, None, :]
    if images == 0:
        vectors = displacements
        candidate = pair & jnp.logical_not(jnp.eye(n, dtype=bool))
    else:
        shifts = jnp.asarray(image_shifts(images), cell.dtype)  # [S, 3]
        num_shifts = shifts.shape[0]
        periodic = jnp.abs(jnp.linalg.det(cell)) > 1e-6
        translations = jnp.einsum("sk,bkd->bsd", shifts, cell)  # [B, S, 3]
        vectors = (displacements[:, :, :, None, :] + translations[:, None, None, :, :]).reshape(
            displacements.shape[:2] + (n * num_shifts, 3))
        not_self = jnp.logical_not(jnp.eye(n, dtype=bool))[:, :, None] | (jnp.arange(num_shifts) > 0)
        # a non-periodic structure has only the zero shift (its translations are all zero)
        allowed = not_self[None] & ((jnp.arange(num_shifts) == 0) | periodic[:, None, None, None])
        candidate = (pair[..., None] & allowed).reshape(pair.shape[:2] + (n * num_shifts,))
    fixed = jax.lax.stop_gradient(vectors)
    return vectors, candidate & (jnp.sum(fixed * fixed, axis=-1) < cutoff * cutoff)


def build_edges(
    positions: jnp.ndarray, cell: jnp.ndarray, mask: jnp.ndarray, cutoff: float, capacity: int, images: int = 0
) -> EdgeList:
    """Neighbour lists of a padded batch (see the module docstring).

    Args:
      positions: [B, N, 3] Å. cell: [B, 3, 3] Å (rows; zero = non-periodic). mask: [B, N] bool.
      cutoff: Å. capacity: K edge slots per atom (a static int; clipped to the number of
      candidates). images: image shifts per cell axis (a static int, see :func:`image_shifts`).
    """
    vectors, within = _candidates(positions, cell, mask, cutoff, images)
    num_candidates = within.shape[-1]
    k = min(int(capacity), num_candidates)
    counts = jnp.sum(within, axis=-1).astype(jnp.int32)
    # a distinct positive score per candidate, largest for the smallest (j, image): top_k keeps the
    # real neighbours first, in that order, and zero scores (not neighbours) last
    score = jnp.where(within, num_candidates - jnp.arange(num_candidates, dtype=jnp.int32), 0)
    top, slot = jax.lax.top_k(score, k)
    edge_mask = top > 0
    slot = jnp.where(edge_mask, slot, 0).astype(jnp.int32)
    edge_vectors = jnp.take_along_axis(vectors, slot[..., None], axis=2)
    safe = jnp.asarray([0.0, 0.0, 0.5 * cutoff], positions.dtype)
    edge_vectors = jnp.where(edge_mask[..., None], edge_vectors, safe)
    index = (slot // (2 * images + 1) ** 3).astype(jnp.int32)  # candidate j S + s -> atom j
    overflow = jnp.any(counts > k, axis=-1)
    return EdgeList(index=index, vectors=edge_vectors, mask=edge_mask, counts=counts, overflow=overflow)


def host_cell_check(cell: np.ndarray, cutoff: float, images: int = 0) -> list[str]:
    """Messages (empty if none) naming each structure of ``cell`` [B, 3, 3] whose pairs within
    ``cutoff`` Å are not all found with ``images`` image shifts, with the ``images`` it needs."""
    problems = []
    for b, c in enumerate(np.asarray(cell, np.float64)):
        needed = images_needed(c, cutoff)
        if needed > images:
            problems.append(f"structure {b}: cutoff {cutoff} Å is not below {images + 0.5:g} x the smallest cell "
                            f"width ({2 * cutoff_limit(c):.3f} Å); the neighbour list would miss pairs "
                            f"(it needs periodic_images={needed})")
    return problems
