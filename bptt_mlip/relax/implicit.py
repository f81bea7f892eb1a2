"""Implicit gradients at the fixed point of a relaxation, matrix-free.

A converged rollout ends at X* with F(X*; theta) = 0 on every real atom: for the frame map
``X <- X + eta F(X)`` with any step rule (eta > 0), momentum, annealing or displacement cap, the
fixed point is a zero of the forces, so it depends on the force model's parameters only (the
step rule gets no implicit gradient). By the implicit function theorem the gradient of an
end-point loss L(X*) is

    dL/dtheta = -(dF/dtheta)^T lambda,   (dF/dX)^T lambda = dL/dX*   at X*.

This module solves for ``mu = -lambda`` (``(-dF/dX)^T mu = dL/dX*``, whose operator is the Hessian,
symmetric positive semi-definite, for a conservative model at a minimum) with vector-Jacobian
products of the force model only: no Jacobian is formed, and memory is one linearisation of the
forces at X* plus the Krylov vectors, independent of the number of frames the rollout took.

Solver (``jax.scipy.sparse.linalg``; lineax / optimistix are not dependencies of the library):

* ``"gmres"`` (default): dF/dX is not symmetric for a direct-force model such as ADAPT; GMRES
  needs no symmetry, minimises the residual monotonically, and costs one VJP per iteration and
  ``restart`` stored vectors of one structure.
* ``"bicgstab"``: also for non-symmetric operators, short recurrences (no restart memory) but two
  VJPs per iteration and a less regular convergence.
* ``"cg"``: only for conservative models (forces = -grad E) at a minimum, where -dF/dX is the
  symmetric positive semi-definite Hessian; cheapest, wrong for anything else.

Every structure is solved on its own (``vmap`` over the batch, each row evaluated as a batch of
one): the system is block diagonal, and a joint solve would share Krylov coefficients and stop on
the norm of the whole batch, hiding a structure whose solve failed.

Null modes: a translation-invariant model has dF/dX singular along rigid translations (and a
rotation-invariant one, at a zero of the forces of a non-periodic cluster, along rigid rotations).
The fixed point is then a manifold and X* is only defined up to those motions. With
``null_modes="translations"`` (or ``"rigid"``: translations, plus rotations about the centroid
for non-periodic rows; a periodic row, one with a non-zero cell, has translations only) the
right-hand side, the operator and the solution are projected onto the complement of those
modes over the real atoms of each structure: the pseudo-inverse solution, which says the end
point keeps the rigid motion of where the relaxation started (exact for translations under
forces that sum to zero: the frame map conserves the centroid; approximate for rotations).
That kept part of dL/dX* is returned as ``null_cotangent``, the cotangent of the rollout's
starting positions. ``"none"`` (default) suits models that are not translation invariant
(ADAPT reads raw Cartesian coordinates): then no direction is removed.

Checks, never silent: a structure counts as at a fixed point only if its rollout converged
(and did not diverge) and the RMS force over its real atoms is at most ``max_force_rms`` (eV/Å);
its solve counts as converged only if the relative residual ``|A mu - b| / |b|`` is finite and at
most ``max_relative_residual``. Callers give zero implicit gradient to the others and count them.
Padded atoms are masked out of every vector; padded rows are not solved (zero right-hand side).

Units: positions Å, forces eV/Å; ``mu`` has the units of dL/dX* (loss units per Å).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_mlip import losses
from bptt_mlip.relax import scan
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params

SOLVERS = ("gmres", "bicgstab", "cg")
NULL_MODES = ("none", "translations", "rigid")


@dataclasses.dataclass(frozen=True)
class AdjointConfig:
    """Settings of the implicit (adjoint) solve at a fixed point.

    Attributes:
      solver: ``"gmres"``, ``"bicgstab"`` or ``"cg"`` (see the module docstring).
      null_modes: ``"none"``, ``"translations"`` or ``"rigid"``: the symmetry modes projected out.
      tol: the solver's relative tolerance ``|A mu - b| <= tol |b|``.
      restart: GMRES Krylov subspace size between restarts.
      max_iterations: the most operator applications (VJPs) of one solve, about (GMRES: rounded up
        to whole restarts; BiCGSTAB uses two per iteration and is given ``max_iterations // 2``).
      max_relative_residual: a solve whose final relative residual exceeds this counts as failed.
      max_force_rms: a converged rollout whose end point has an RMS force (eV/Å, over real atoms)
        above this does not count as a fixed point (e.g. an annealed step stopped it early).
    """

    solver: str = "gmres"
    null_modes: str = "none"
    tol: float = 1e-5
    restart: int = 20
    max_iterations: int = 200
    max_relative_residual: float = 1e-3
    max_force_rms: float = 0.05

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"AdjointConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.null_modes not in NULL_MODES:
            raise ValueError(f"AdjointConfig.null_modes must be one of {NULL_MODES}, got {self.null_modes!r}")
        if not (self.tol > 0 and self.max_relative_residual > 0 and self.max_force_rms > 0):
            raise ValueError(f"AdjointConfig: tol, max_relative_residual and max_force_rms must be > 0: {self}")
        if self.restart < 1 or self.max_iterations < 1:
            raise ValueError(f"AdjointConfig: restart and max_iterations must be >= 1: {self}")


class AdjointSolution(NamedTuple):
    """The implicit solve of a batch.

    Attributes:
      adjoint: [B, N, 3] mu with ``(-dF/dX)^T mu = P dL/dX*`` (zero on unsolved rows, padded atoms).
      null_cotangent: [B, N, 3] the part of dL/dX* along the null modes (zero with ``"none"``).
      relative_residual: [B] ``|A mu - b| / |b|`` of each solve (0 where b = 0).
      solved: [B] bool, the row was solved (active and residual within tolerance).
    """

    adjoint: jnp.ndarray
    null_cotangent: jnp.ndarray
    relative_residual: jnp.ndarray
    solved: jnp.ndarray


# ----------------------------------------------------------------------------- null modes


def _dot(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """[B] inner products of [B, N, 3] fields."""
    return jnp.sum(a * b, axis=(-1, -2))


def null_mode_basis(structures: Structures, null_modes: str) -> jnp.ndarray | None:
    """[B, M, N, 3] orthonormal rigid modes over the real atoms of each structure (M = 3 for
    ``"translations"``, 6 for ``"rigid"``; a mode that vanishes, e.g. a periodic row's rotations or
    the axial rotation of a linear molecule, is a zero vector), or None for ``"none"``.

    Rotations are about the unweighted centroid of the real atoms at ``structures.positions`` (Å).
    """
    if null_modes == "none":
        return None
    mask = structures.mask[..., None].astype(structures.positions.dtype)
    eye = jnp.eye(3, dtype=mask.dtype)
    raw = [mask * eye[k] for k in range(3)]
    if null_modes == "rigid":
        n = jnp.maximum(jnp.sum(mask, axis=(-1, -2)), 1.0)
        centroid = jnp.sum(mask * structures.positions, axis=-2, keepdims=True) / n[:, None, None]
        r = mask * (structures.positions - centroid)
        cluster = jnp.logical_not(jnp.any(structures.cell != 0, axis=(-1, -2)))[:, None, None]
        raw += [jnp.where(cluster, jnp.cross(jnp.broadcast_to(eye[k], r.shape), r), 0.0) for k in range(3)]
    basis = []
    for v in raw:  # modified Gram-Schmidt; dropping (near-)dependent modes
        size = losses.safe_sqrt(_dot(v, v))
        for q in basis:
            v = v - _dot(v, q)[:, None, None] * q
        norm = losses.safe_sqrt(_dot(v, v))
        keep = norm > 1e-3 * size
        basis.append(jnp.where(keep[:, None, None], v / jnp.where(keep, norm, 1.0)[:, None, None], 0.0))
    return jnp.stack(basis, axis=1)


def null_mode_part(field: jnp.ndarray, basis: jnp.ndarray | None) -> jnp.ndarray:
    """[B, N, 3] orthogonal projection of ``field`` onto the null modes (zero without modes)."""
    if basis is None:
        return jnp.zeros_like(field)
    coefficients = jnp.einsum("bmni,bni->bm", basis, field)
    return jnp.einsum("bm,bmni->bni", coefficients, basis)


def remove_null_modes(field: jnp.ndarray, basis: jnp.ndarray | None, mask: jnp.ndarray) -> jnp.ndarray:
    """[B, N, 3] ``field`` on real atoms (``mask`` [B, N]) minus its part along the null modes."""
    field = jnp.where(mask[..., None], field, 0.0)
    return field - null_mode_part(field, basis)


def force_rms(forces: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] RMS over real atoms of per-atom force norms (eV/Å): the fixed-point residual."""
    return scan.rms_displacement(forces, mask)


# ----------------------------------------------------------------------------- the solve


def _krylov(config: AdjointConfig, operator, rhs: jnp.ndarray) -> jnp.ndarray:
    linalg = jax.scipy.sparse.linalg
    if config.solver == "gmres":
        restarts = -(-config.max_iterations // config.restart)
        return linalg.gmres(operator, rhs, tol=config.tol, atol=0.0, restart=config.restart, maxiter=restarts,
                            solve_method="batched")[0]
    if config.solver == "bicgstab":
        return linalg.bicgstab(operator, rhs, tol=config.tol, atol=0.0, maxiter=max(1, config.max_iterations // 2))[0]
    return linalg.cg(operator, rhs, tol=config.tol, atol=0.0, maxiter=config.max_iterations)[0]


def solve_adjoint(
    force_fn: ForceFn,
    model_params: Params,
    structures: Structures,
    cotangent: jnp.ndarray,
    config: AdjointConfig,
    active: jnp.ndarray,
) -> AdjointSolution:
    """Solve ``(-dF/dX)^T mu = P cotangent`` at the fixed points ``structures.positions`` (Å).

    Args:
      force_fn: ``force_fn(model_params, structures) -> [B, N, 3]`` eV/Å; called on one row at a
        time (a batch of one) inside ``vmap``.
      model_params: the force model's parameters (not differentiated here).
      structures: [B, N] batch at its end points X*.
      cotangent: [B, N, 3] dL/dX* (loss units per Å).
      config: solver and null modes.
      active: [B] bool, the rows to solve (others get a zero right-hand side and ``solved=False``).
    Returns:
      :class:`AdjointSolution`; nothing in it carries a gradient.
    """
    structures, cotangent, model_params = jax.lax.stop_gradient((structures, cotangent, model_params))
    mask = structures.mask
    basis = null_mode_basis(structures, config.null_modes)
    rhs = jnp.where(active[:, None, None], remove_null_modes(cotangent, basis, mask), 0.0)
    null_cotangent = null_mode_part(jnp.where(mask[..., None], cotangent, 0.0), basis)

    def solve_row(row: Structures, rhs_row: jnp.ndarray, basis_row):
        def row_forces(positions):
            one = jax.tree_util.tree_map(lambda a: a[None], row.replace(positions=positions))
            return force_fn(model_params, one)[0]

        _, force_vjp = jax.vjp(row_forces, row.positions)
        batch_basis = None if basis_row is None else basis_row[None]

        def project(v):
            return remove_null_modes(v[None], batch_basis, row.mask[None])[0]

        def operator(v):  # (-dF/dX)^T restricted to the complement of the null modes
            return project(-force_vjp(project(v))[0])

        mu = project(_krylov(config, operator, rhs_row))
        # plain sqrt: a NaN residual must stay NaN (safe_sqrt would turn it into 0); no gradient flows here
        residual = jnp.sqrt(jnp.sum((operator(mu) - rhs_row) ** 2))
        size = jnp.sqrt(jnp.sum(rhs_row * rhs_row))
        return mu, jnp.where(size > 0, residual / jnp.where(size > 0, size, 1.0), residual)

    mu, relative = jax.vmap(solve_row)(structures, rhs, basis)
    solved = active & jnp.isfinite(relative) & (relative <= config.max_relative_residual)
    mu = jnp.where(solved[:, None, None] & mask[..., None], mu, 0.0)
    return AdjointSolution(mu, jnp.where(active[:, None, None], null_cotangent, 0.0), relative, solved)


def implicit_surrogate(
    forces_at_fixed_point: jnp.ndarray,
    solution: AdjointSolution,
    start_positions: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """A scalar whose gradient is the implicit gradient of the end-point loss (its value is ~0).

    ``sum mu . F(X*; theta)`` has gradient ``(dF/dtheta)^T mu = -(dF/dtheta)^T lambda`` in the model
    parameters: compute ``forces_at_fixed_point`` [B, N, 3] (eV/Å) differentiably in theta at the
    stop-gradient end points. ``start_positions`` [B, N, 3] (Å), if given, are the positions the
    fixed-point iteration started from; they receive ``null_cotangent`` (the rigid motion the end
    point keeps from its start). Use as ``loss + s - stop_gradient(s)``.
    """
    mu = jax.lax.stop_gradient(solution.adjoint)
    value = jnp.sum(mu * forces_at_fixed_point)
    if start_positions is not None:
        kept = jax.lax.stop_gradient(jnp.where(solution.solved[:, None, None], solution.null_cotangent, 0.0))
        value = value + jnp.sum(kept * start_positions)
    return value


def relax_without_gradient(
    force_fn: ForceFn,
    step_rule,
    params: Params,
    structures: Structures,
    modifiers: scan.FrameModifiers,
    rollout_config: scan.RolloutConfig,
    *,
    key: jax.Array | None = None,
    stop_rms=None,
    frame_limit=None,
) -> scan.RolloutResult:
    """:func:`bptt_mlip.relax.scan.rollout` of stop-gradient parameters and positions, without
    rematerialisation or trajectory: nothing is kept for a backward pass, so memory does not grow
    with ``rollout_config.max_frames``."""
    config = dataclasses.replace(rollout_config, remat="none", return_trajectory=False)
    params, structures = jax.lax.stop_gradient((params, structures))
    return scan.rollout(force_fn, step_rule, params, structures, modifiers, config, key=key, stop_rms=stop_rms,
                        frame_limit=frame_limit)
