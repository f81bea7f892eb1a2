"""Masked structural and force errors. Every function ignores padded atoms exactly.

Units: positions in Å, masses in amu, forces in eV/Å. Dq is in amu^(1/2) Å.
"""

from __future__ import annotations

import jax.numpy as jnp


def safe_sqrt(x: jnp.ndarray) -> jnp.ndarray:
    """sqrt with a finite (zero) gradient at x = 0; x must be >= 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def safe_norm(x: jnp.ndarray, axis: int = -1, keepdims: bool = False) -> jnp.ndarray:
    """Euclidean norm along ``axis`` with a zero (not NaN) gradient at x = 0."""
    return safe_sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdims))


def delta_q(predicted: jnp.ndarray, target: jnp.ndarray, masses: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mass-weighted end-point error of the paper (eq. 3), per structure.

    Dq = sqrt(sum_j m_j |X*_j - X^_j|^2).

    Args:
      predicted, target: [B, N, 3] positions in Å.
      masses: [B, N] amu. mask: [B, N] bool.
    Returns:
      [B] Dq in amu^(1/2) Å.
    """
    diff = jnp.where(mask[..., None], predicted - target, 0.0)
    return safe_sqrt(jnp.sum(masses * jnp.sum(diff * diff, axis=-1) * mask, axis=-1))


def largest_atom_distance(predicted: jnp.ndarray, target: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] largest distance (Å) between an atom's predicted and reference position over the real atoms
    (0 for a structure without atoms): the basin metric's measure of how far a relaxation ended."""
    distance = safe_norm(predicted - target)
    return jnp.max(jnp.where(mask, distance, 0.0), axis=-1, initial=0.0)


def position_mse(predicted: jnp.ndarray, target: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] mean over real atoms and components of the squared position error (Å^2)."""
    diff = jnp.where(mask[..., None], predicted - target, 0.0)
    n = jnp.maximum(jnp.sum(mask, axis=-1), 1) * 3
    return jnp.sum(diff * diff, axis=(-1, -2)) / n


def force_squared_error(predicted: jnp.ndarray, reference: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] sum over real atoms of |F_pred - F_ref|^2 ((eV/Å)^2)."""
    diff = jnp.where(mask[..., None], predicted - reference, 0.0)
    return jnp.sum(diff * diff, axis=(-1, -2))


def force_l2_error(predicted: jnp.ndarray, reference: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] Frobenius norm of the force error over the structure (eV/Å), the paper's table-2 metric."""
    return safe_sqrt(force_squared_error(predicted, reference, mask))


def force_rmse(predicted: jnp.ndarray, reference: jnp.ndarray, mask: jnp.ndarray, weight: jnp.ndarray | None = None):
    """Scalar RMSE of force components over all real atoms of the batch (eV/Å).

    ``weight`` [B] (0 or 1) excludes padding rows.
    """
    per = force_squared_error(predicted, reference, mask)
    count = jnp.sum(mask, axis=-1) * 3
    if weight is not None:
        per, count = per * weight, count * weight
    return safe_sqrt(jnp.sum(per) / jnp.maximum(jnp.sum(count), 1))


def force_mae(predicted: jnp.ndarray, reference: jnp.ndarray, mask: jnp.ndarray, weight: jnp.ndarray | None = None):
    """Scalar mean absolute error of force components over real atoms (eV/Å)."""
    diff = jnp.where(mask[..., None], jnp.abs(predicted - reference), 0.0)
    per = jnp.sum(diff, axis=(-1, -2))
    count = jnp.sum(mask, axis=-1) * 3
    if weight is not None:
        per, count = per * weight, count * weight
    return jnp.sum(per) / jnp.maximum(jnp.sum(count), 1)


def weighted_mean(values: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
    """Mean of [B] values with [B] weights; padding rows (weight 0) contribute nothing, even if NaN."""
    values = jnp.where(weight > 0, values, 0.0)
    return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1e-12)
