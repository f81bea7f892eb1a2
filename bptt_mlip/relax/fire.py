"""Batched, jit-compatible FIRE relaxation with ASE's semantics and defaults.

This is a JAX port of :class:`ase.optimize.FIRE` (ASE 3.29) driven by
:meth:`ase.optimize.optimize.Optimizer.run`, applied independently to every structure
of a padded batch (``mask[b, i]`` True for a real atom, see :mod:`bptt_mlip.structures`).
Each structure keeps its own FIRE state (``dt``, ``a``, ``n_pos``) exactly as if ASE ran
on it alone; padded atoms carry zero force and zero velocity and never move.

One ASE step for one structure (forces ``F`` at the current positions, velocity ``v``)::

    if first step (ASE: self.vel is None):
        v = 0                                  # nothing else changes
    elif vdot(F, v) > 0:
        v = (1 - a) v + a F / |F| * |v|        # |.|: norm over all 3n components
        if n_pos > n_min:
            dt = min(dt * f_inc, dtmax); a *= f_a
        n_pos += 1
    else:
        v = 0; a = a_start; dt *= f_dec; n_pos = 0
    v += dt F
    dr = dt v
    if |dr| > maxstep: dr = maxstep dr / |dr|  # whole-structure norm; v is NOT rescaled
    x += dr

``Optimizer.run(fmax, steps)`` checks convergence on the forces at the current positions
*before* each step (``max_i |F_i| < fmax``, the largest per-atom force norm) and stops
when converged or after ``steps`` steps. Hence ``FireState.num_frames`` (FIRE steps applied,
one frame each) equals ASE's ``opt.nsteps`` and ``FireState.converged`` equals ``opt.run``'s
return value.

Usage (``force_fn`` maps [B, N, 3] positions to [B, N, 3] forces in eV/Å)::

    state, traj = fire_relax(force_fn, positions, mask, FireConfig(fmax=0.05))

``fire_relax`` only uses ``lax`` control flow and ``jnp.where``, so it can be wrapped in
``jax.jit`` (close over ``force_fn`` and ``config``; they are static). For a model's
``force_fn(params, structures)``, :func:`make_fire_runner` gives one cached jitted runner.
Backpropagation through FIRE (a masked ``lax.scan`` with remat, differentiable in a model's
parameters, its branch decisions held constant) is :func:`bptt_mlip.relax.fire_bptt.fire_rollout`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp

from bptt_mlip.losses import safe_sqrt
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params, PositionForceFn


@dataclasses.dataclass(frozen=True)
class FireConfig:
    """FIRE hyper-parameters; the defaults are ASE's (``ase.optimize.FIRE``).

    Attributes:
      dt: initial time step (ASE ``dt``).
      maxstep: largest allowed norm of the whole displacement of one structure per step, Å
        (ASE ``maxstep``; the norm runs over all atoms' coordinates, not per atom).
      dtmax: largest time step (ASE ``dtmax``).
      n_min: number of consecutive downhill steps before dt grows (ASE ``Nmin``).
      f_inc: dt growth factor (ASE ``finc``).
      f_dec: dt shrink factor on an uphill step (ASE ``fdec``).
      a_start: initial and reset mixing coefficient (ASE ``astart`` and ``a``).
      f_a: mixing coefficient decay factor (ASE ``fa``).
      fmax: convergence threshold on the largest per-atom force norm, eV/Å (``run(fmax)``).
      max_steps: largest number of steps per structure (``run(steps=max_steps)``).
    """

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    n_min: int = 5
    f_inc: float = 1.1
    f_dec: float = 0.5
    a_start: float = 0.1
    f_a: float = 0.99
    fmax: float = 0.05
    max_steps: int = 200


@flax.struct.dataclass
class FireState:
    """Per-structure FIRE state of a padded batch.

    Attributes:
      positions: [B, N, 3] current positions, Å.
      velocities: [B, N, 3] FIRE velocities (zero on padded atoms).
      forces: [B, N, 3] forces at ``positions``, eV/Å (zero on padded atoms).
      dt: [B] current time step of each structure.
      a: [B] current mixing coefficient of each structure.
      n_pos: [B] int32 consecutive downhill steps (ASE's ``FIRE.Nsteps``).
      converged: [B] bool, largest per-atom force norm at ``positions`` < ``fmax``.
      num_frames: [B] int32 FIRE steps applied, one frame each (ASE's ``opt.nsteps``).
    """

    positions: jnp.ndarray
    velocities: jnp.ndarray
    forces: jnp.ndarray
    dt: jnp.ndarray
    a: jnp.ndarray
    n_pos: jnp.ndarray
    converged: jnp.ndarray
    num_frames: jnp.ndarray


def _masked_forces(force_fn: PositionForceFn, positions: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    forces = force_fn(positions)
    chex.assert_equal_shape([forces, positions])
    # `where`, not a product: whatever force_fn returns on padding (even NaN) is dropped.
    return jnp.where(mask[..., None], forces, jnp.zeros((), positions.dtype)).astype(positions.dtype)


def max_force(forces: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] largest per-atom force norm over the real atoms (0 for an empty structure, NaN when a
    real atom's force is NaN, so such a structure never counts as converged)."""
    sq = jnp.sum(forces * forces, axis=-1)
    sq = jnp.max(jnp.where(mask, sq, 0.0), axis=-1)
    # sqrt is monotone, so sqrt(max |F_i|^2) == max |F_i| as in ASE; safe at zero.
    return jnp.where(jnp.isnan(sq), sq, safe_sqrt(sq))


def _vdot(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """[B] dot product over all atoms and components of each structure."""
    return jnp.sum(x * y, axis=(-2, -1))


def _active(state: FireState, config: FireConfig) -> jnp.ndarray:
    return jnp.logical_not(state.converged) & (state.num_frames < config.max_steps)


def fire_init(force_fn: PositionForceFn, positions: jnp.ndarray, mask: jnp.ndarray, config: FireConfig) -> FireState:
    """Start FIRE at ``positions`` [B, N, 3]: one force call and ASE's initial convergence check."""
    chex.assert_rank(positions, 3)
    chex.assert_shape(mask, positions.shape[:2])
    mask = mask.astype(bool)
    positions = jnp.asarray(positions)
    b = positions.shape[0]
    dtype = positions.dtype
    forces = _masked_forces(force_fn, positions, mask)
    return FireState(
        positions=positions,
        velocities=jnp.zeros_like(positions),
        forces=forces,
        dt=jnp.full((b,), config.dt, dtype),
        a=jnp.full((b,), config.a_start, dtype),
        n_pos=jnp.zeros((b,), jnp.int32),
        converged=max_force(jax.lax.stop_gradient(forces), mask) < config.fmax,
        num_frames=jnp.zeros((b,), jnp.int32),
    )


def fire_step(force_fn: PositionForceFn, state: FireState, mask: jnp.ndarray, config: FireConfig,
              active: jnp.ndarray | None = None) -> FireState:
    """One ASE FIRE step for every structure that is neither converged nor out of steps.

    The other structures are returned unchanged (bit for bit). ``force_fn`` is called once,
    on the whole batch, at the new positions, and convergence is re-checked there.
    ``active``: [B] bool, the structures that take the step; None = those neither converged nor
    out of steps (a caller passes a subset to freeze more rows, e.g. diverged ones).

    Differentiable in positions, velocities and forces (hence in a force model's parameters)
    within one branch: every decision (the first step, the sign of P = F.v, dt growth after
    ``n_min`` downhill steps, the maxstep clip, the fmax stop) is taken on stop-gradient values,
    and dt, a and n_pos are piecewise constant, so they carry no derivative.
    """
    mask = mask.astype(bool)
    m3 = mask[..., None]
    dtype = state.positions.dtype
    f = state.forces
    v = state.velocities
    dt, a, n_pos = state.dt, state.a, state.n_pos

    # ASE starts with vel=None: the first step only sets v = 0 (no dt/a/n_pos update).
    first = state.num_frames == 0
    vf = jax.lax.stop_gradient(_vdot(f, v))
    grad2 = _vdot(f, f)
    downhill = (vf > 0.0) & ~first
    uphill = ~(vf > 0.0) & ~first

    # Downhill: mix the velocity towards the force direction (grad2 > 0 whenever vf > 0).
    # Same operation order as ASE: (1 - a) v + ((a F) / sqrt(F.F)) * sqrt(v.v).
    fnorm = jnp.sqrt(jnp.where(grad2 > 0, grad2, 1.0))[:, None, None]
    vnorm = safe_sqrt(_vdot(v, v))[:, None, None]
    a3 = a[:, None, None]
    v_mix = (1.0 - a3) * v + a3 * f / fnorm * vnorm
    grow = downhill & (n_pos > config.n_min)
    dt_new = jnp.where(grow, jnp.minimum(dt * config.f_inc, config.dtmax), dt)
    a_new = jnp.where(grow, a * config.f_a, a)
    n_pos_new = jnp.where(downhill, n_pos + 1, n_pos)
    # Uphill (or zero power): reset.
    dt_new = jnp.where(uphill, dt * config.f_dec, dt_new)
    a_new = jnp.where(uphill, jnp.asarray(config.a_start, dtype), a_new)
    n_pos_new = jnp.where(uphill, 0, n_pos_new)
    v_new = jnp.where(downhill[:, None, None], v_mix, jnp.zeros_like(v))

    # Euler step, then clip the norm of the whole displacement (not the velocity).
    dt3 = dt_new[:, None, None]
    v_new = v_new + dt3 * f
    dr = dt3 * v_new
    normdr = safe_sqrt(_vdot(dr, dr))
    clip = jax.lax.stop_gradient(normdr) > config.maxstep
    safe_normdr = jnp.where(clip, normdr, 1.0)[:, None, None]
    dr = jnp.where(clip[:, None, None], config.maxstep * dr / safe_normdr, dr)
    v_new = jnp.where(m3, v_new, 0.0)
    dr = jnp.where(m3, dr, 0.0)

    active = _active(state, config) if active is None else active
    act3 = active[:, None, None]
    positions = jnp.where(act3, state.positions + dr, state.positions)
    forces = _masked_forces(force_fn, positions, mask)
    forces = jnp.where(act3, forces, state.forces)
    converged = jnp.where(active, max_force(jax.lax.stop_gradient(forces), mask) < config.fmax, state.converged)
    return FireState(
        positions=positions,
        velocities=jnp.where(act3, v_new, v).astype(dtype),
        forces=forces,
        dt=jnp.where(active, dt_new, dt).astype(dtype),
        a=jnp.where(active, a_new, a).astype(dtype),
        n_pos=jnp.where(active, n_pos_new, n_pos).astype(jnp.int32),
        converged=converged,
        num_frames=state.num_frames + active.astype(jnp.int32),
    )


def fire_relax(
    force_fn: PositionForceFn,
    positions: jnp.ndarray,
    mask: jnp.ndarray,
    config: FireConfig = FireConfig(),
    *,
    return_trajectory: bool = False,
) -> tuple[FireState, jnp.ndarray | None]:
    """Relax every structure of the batch with FIRE, like ``FIRE(atoms).run(fmax, max_steps)``.

    Args:
      force_fn: maps positions [B, N, 3] to forces [B, N, 3] in eV/Å.
      positions: [B, N, 3] start positions, Å.
      mask: [B, N] bool, True for a real atom.
      config: FIRE hyper-parameters, ``fmax`` and ``max_steps``.
      return_trajectory: also return every frame. Then the loop is a ``lax.scan`` of
        ``max_steps`` steps (always that many force calls); otherwise a ``lax.while_loop``
        that stops once every structure is converged or out of steps.

    Returns:
      The final :class:`FireState` and, with ``return_trajectory``, a
      [max_steps + 1, B, N, 3] array of positions: frame 0 is the start, frame t the
      positions after step t; once structure b stops (after ``num_frames[b]`` steps) its
      frames repeat the final positions. Without it, ``None``.
    """
    state = fire_init(force_fn, positions, mask, config)

    if return_trajectory:

        def body(s, _):
            s = fire_step(force_fn, s, mask, config)
            return s, s.positions

        state, frames = jax.lax.scan(body, state, None, length=config.max_steps)
        start = jnp.asarray(positions, frames.dtype)[None]
        trajectory = jnp.concatenate([start, frames], axis=0)
        return state, trajectory

    state = jax.lax.while_loop(
        lambda s: jnp.any(_active(s, config)),
        lambda s: fire_step(force_fn, s, mask, config),
        state,
    )
    return state, None



class FireRun(NamedTuple):
    """What a :func:`make_fire_runner` runner returns for a batch of B structures.

    Attributes:
      state: the final :class:`FireState` (positions Å, ``num_frames``, ``converged``, ...).
      max_force: [B] largest per-atom force norm (eV/Å) at the final positions (0 on padding rows).
      diverged: [B] bool, the final positions are not all finite.
      trajectory: [max_steps + 1, B, N, 3] positions (Å) with ``return_trajectory``, else None.
    """

    state: FireState
    max_force: jnp.ndarray
    diverged: jnp.ndarray
    trajectory: jnp.ndarray | None


@functools.lru_cache(maxsize=64)
def make_fire_runner(force_fn: ForceFn, config: FireConfig = FireConfig(), return_trajectory: bool = False):
    """A jitted ``run(model_params, structures) -> FireRun``: FIRE on a model's forces.

    ``force_fn(model_params, structures) -> [B, N, 3]`` eV/Å is any force model. Cached on its
    (hashable) arguments, so every caller with the same force function and config shares one
    compiled function per batch shape.
    """

    def run(model_params: Params, structures: Structures) -> FireRun:
        fn = lambda x: force_fn(model_params, structures.replace(positions=x))  # noqa: E731
        state, trajectory = fire_relax(fn, structures.positions, structures.mask, config,
                                       return_trajectory=return_trajectory)
        diverged = ~jnp.all(jnp.isfinite(state.positions), axis=(-1, -2))
        return FireRun(state, max_force(state.forces, structures.mask), diverged, trajectory)

    return jax.jit(run)
