"""Fixed-capacity periodic neighbour (edge) lists of padded batches, built inside jit.

Every atom i of structure b gets ``K`` edge slots ``index[b, i, k]`` holding the neighbours j != i
closer than the cutoff (minimum image, real atoms only), in increasing j; unused slots are
masked. The edge vectors ``x_j - x_i`` (Å) are gathered from the batch's minimum-image pair
displacements, so they are differentiable in the positions (and the cell); the choice of
neighbours is not (it is made on stop-gradient distances, and a smooth cutoff envelope makes the
energy continuous when a pair enters or leaves).

Why not jax-md's ``partition.neighbor_list``: it is built per system with one box, knows nothing
of the padding mask, and its capacity is a Python-side reallocation. Cells of 8-216 atoms need
only the dense [N, N] minimum-image distances, which handle a different cell per structure and
padding exactly.

Assumptions and limits:

* the cutoff is below half the smallest perpendicular width of every periodic cell, so each pair
  has at most one image within the cutoff and fractional rounding finds it exactly
  (:func:`cell_too_small` flags cells that break this);
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


def cell_too_small(cell: jnp.ndarray, cutoff: float) -> jnp.ndarray:
    """[B] bool: the minimum image is not exact for this cutoff (cutoff >= half the smallest width)."""
    return cutoff >= 0.5 * perpendicular_widths(cell)


def neighbour_counts(positions: jnp.ndarray, cell: jnp.ndarray, mask: jnp.ndarray, cutoff: float) -> jnp.ndarray:
    """[B, N] int32 number of real neighbours j != i within ``cutoff`` Å of each real atom."""
    return jnp.sum(_within_cutoff(jax.lax.stop_gradient(minimum_image_displacements(positions, cell)), mask, cutoff),
                   axis=-1).astype(jnp.int32)


def _within_cutoff(displacements: jnp.ndarray, mask: jnp.ndarray, cutoff: float) -> jnp.ndarray:
    n = mask.shape[-1]
    pair = mask[:, :, None] & mask[:, None, :] & jnp.logical_not(jnp.eye(n, dtype=bool))
    return pair & (jnp.sum(displacements * displacements, axis=-1) < cutoff * cutoff)


def build_edges(
    positions: jnp.ndarray, cell: jnp.ndarray, mask: jnp.ndarray, cutoff: float, capacity: int
) -> EdgeList:
    """Neighbour lists of a padded batch (see the module docstring).

    Args:
      positions: [B, N, 3] Å. cell: [B, 3, 3] Å (rows; zero = non-periodic). mask: [B, N] bool.
      cutoff: Å. capacity: K edge slots per atom (a static int; clipped to N).
    """
    n = positions.shape[1]
    k = min(int(capacity), n)
    displacements = minimum_image_displacements(positions, cell)  # [B, N, N, 3]
    within = _within_cutoff(jax.lax.stop_gradient(displacements), mask, cutoff)
    counts = jnp.sum(within, axis=-1).astype(jnp.int32)
    # a distinct positive score per neighbour, largest for the smallest j: top_k keeps the real
    # neighbours first, in increasing j, and zero scores (not neighbours) last
    score = jnp.where(within, n - jnp.arange(n, dtype=jnp.int32), 0)
    top, index = jax.lax.top_k(score, k)
    edge_mask = top > 0
    index = jnp.where(edge_mask, index, 0).astype(jnp.int32)
    vectors = jnp.take_along_axis(displacements, index[..., None], axis=2)
    safe = jnp.asarray([0.0, 0.0, 0.5 * cutoff], positions.dtype)
    vectors = jnp.where(edge_mask[..., None], vectors, safe)
    overflow = jnp.any(counts > k, axis=-1)
    return EdgeList(index=index, vectors=vectors, mask=edge_mask, counts=counts, overflow=overflow)


def host_cell_check(cell: np.ndarray, cutoff: float) -> list[str]:
    """Messages (empty if none) naming each structure of ``cell`` [B, 3, 3] whose minimum image
    is not exact at ``cutoff`` Å, with the largest cutoff it allows."""
    problems = []
    for b, c in enumerate(np.asarray(cell, np.float64)):
        limit = cutoff_limit(c)
        if cutoff >= limit:
            problems.append(f"structure {b}: cutoff {cutoff} Å is not below half the smallest cell width "
                            f"({limit:.3f} Å); the minimum image would miss or double-count pairs")
    return problems
