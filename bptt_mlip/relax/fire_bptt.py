"""FIRE as a differentiable rollout: backpropagation through every FIRE step of a batch.

:func:`fire_rollout` runs the library's FIRE (:mod:`bptt_mlip.relax.fire`: ASE's semantics and
defaults, each structure of a padded batch with its own ``dt``, ``a`` and ``n_pos``, stopping on
``fmax`` or ``max_steps``) as a masked ``lax.scan`` of ``FireConfig.max_steps`` steps, with the
rematerialisation modes and the early exit of :func:`bptt_mlip.relax.scan.rollout`. Its end
points, step counts and convergence flags equal :func:`bptt_mlip.relax.fire.fire_relax`'s.

What is differentiated. Gradients in the force model's parameters flow through the positions,
the velocities and the forces of every step, including the velocity mixing
``(1 - a) v + a F/|F| |v|`` and the maxstep clip's rescaling ``maxstep dr/|dr|`` (norms are
safe at zero). Treated as constants (stop-gradient, not differentiated):

* the branch decisions: the first step (velocity reset), the sign of the power P = F.v
  (downhill mixing or uphill reset of v, a and dt), dt growth after ``n_min`` downhill steps
  and its ``dtmax`` cap, whether the maxstep clip applies, the ``fmax`` stop, the step limit
  and the divergence test;
* the FIRE scalars dt, a and n_pos: products of the constants ``f_inc``, ``f_dec``, ``f_a`` taken
  on those decisions, so piecewise constant in the parameters (derivative zero wherever it
  exists).

The gradient is therefore the exact derivative of the rollout for parameters at which no
decision changes; a decision that flips under a perturbation is a jump that no gradient sees.

Divergence (the one deliberate departure from ``fire_relax``): a step that makes positions or
forces non-finite, or moves an atom by more than ``RolloutConfig.divergence_displacement`` Å in
one coordinate, is not applied; the structure is marked diverged and frozen at its last finite
state (``fire_relax`` would keep stepping with NaN). A force model whose vector-Jacobian
product is non-finite at a visited point still gives a non-finite gradient (the trainer's
non-finite guard skips such an update).

Units: positions Å, forces eV/Å, FIRE time steps in ASE's units.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_mlip.relax import fire, scan
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params


class _FireCarry(NamedTuple):
    state: fire.FireState
    diverged: jnp.ndarray  # [B] bool
    last_rms: jnp.ndarray  # [B] Å, RMS displacement of the last applied step


def fire_rollout(
    force_fn: ForceFn,
    model_params: Params,
    structures: Structures,
    fire_config: fire.FireConfig = fire.FireConfig(),
    rollout_config: scan.RolloutConfig = scan.RolloutConfig(),
) -> scan.RolloutResult:
    """Relax every structure of the batch with FIRE; differentiable in ``model_params``.

    Args:
      force_fn: ``force_fn(model_params, structures) -> [B, N, 3]`` eV/Å.
      model_params: the force model's parameters (no step rule: FIRE has none).
      structures: batch with starting positions [B, N, 3] Å and ``mask`` [B, N].
      fire_config: FIRE's hyper-parameters and its stop: ``fmax`` (eV/Å) and ``max_steps`` (the
        scan length; ``rollout_config.max_frames`` is not used).
      rollout_config: only ``remat``, ``segment_length``, ``remat_policy``, ``early_exit``,
        ``divergence_displacement`` (Å) and ``return_trajectory`` are used; ``max_frames``,
        ``stop_rms`` and ``stop_fmax`` belong to the frame rollout and play no part.

    Returns:
      :class:`bptt_mlip.relax.scan.RolloutResult`: end positions [B, N, 3] Å; ``num_frames`` [B]
      FIRE steps applied (ASE's ``nsteps``); ``converged`` [B] largest real-atom force below ``fmax``
      at the end positions; ``diverged`` [B]; ``last_rms`` [B] Å of the last applied step;
      ``trajectory`` [max_steps + 1, B, N, 3] (frozen after a structure stops) or None.
    """
    if fire_config.max_steps < 1:
        raise ValueError(f"FireConfig.max_steps must be >= 1 for a FIRE rollout, got {fire_config.max_steps}")
    steps_config = dataclasses.replace(rollout_config, max_frames=fire_config.max_steps)
    mask = structures.mask.astype(bool)

    def forces_at(positions: jnp.ndarray) -> jnp.ndarray:
        return force_fn(model_params, structures.replace(positions=positions))

    def active_rows(carry: _FireCarry, t: jnp.ndarray) -> jnp.ndarray:
        s = carry.state
        # t < max_steps also covers the overhang of the last remat segment
        return ~s.converged & ~carry.diverged & (s.num_frames < fire_config.max_steps) & (t < fire_config.max_steps)

    def body(carry: _FireCarry, t: jnp.ndarray):
        active = active_rows(carry, t)
        stepped = fire.fire_step(forces_at, carry.state, mask, fire_config, active=active)
        new = _freeze_diverged(carry, stepped, active, mask, rollout_config.divergence_displacement)
        return new, (new.state.positions if rollout_config.return_trajectory else None)

    def skip(carry: _FireCarry, t: jnp.ndarray):
        return carry, (carry.state.positions if rollout_config.return_trajectory else None)

    def step_unless_finished(carry: _FireCarry, t: jnp.ndarray):
        # as in scan.rollout: once no structure is active, the cond skips the force call and its backward pass
        return jax.lax.cond(jnp.any(active_rows(carry, t)), body, skip, carry, t)

    start = fire.fire_init(forces_at, structures.positions, mask, fire_config)
    b = structures.batch_size
    init = _FireCarry(start, jnp.zeros((b,), bool), jnp.zeros((b,), structures.positions.dtype))
    carry, frames = scan._scan_frames(step_unless_finished if rollout_config.early_exit else body, init, steps_config)
    trajectory = None
    if rollout_config.return_trajectory:
        trajectory = jnp.concatenate([structures.positions[None], frames], axis=0)
    s = carry.state
    return scan.RolloutResult(s.positions, s.num_frames, s.converged, carry.diverged, carry.last_rms, trajectory)


def _freeze_diverged(carry: _FireCarry, stepped: fire.FireState, active: jnp.ndarray, mask: jnp.ndarray,
                     divergence_displacement: float) -> _FireCarry:
    """Keep ``stepped`` for the ``active`` [B] rows whose step stayed finite and within
    ``divergence_displacement`` Å per coordinate; the others that were active are marked diverged and
    keep their previous state (tests on stop-gradient values)."""
    update = jax.lax.stop_gradient(stepped.positions - carry.state.positions)
    biggest = jnp.max(jnp.where(mask[..., None], jnp.abs(update), 0.0), axis=(-1, -2))
    forces_finite = jnp.all(jnp.isfinite(jax.lax.stop_gradient(stepped.forces)), axis=(-1, -2))
    bad = active & (~jnp.isfinite(biggest) | (biggest > divergence_displacement) | ~forces_finite)
    keep = lambda old, new: jnp.where(bad.reshape(bad.shape + (1,) * (new.ndim - 1)), old, new)  # noqa: E731
    state = jax.tree_util.tree_map(keep, carry.state, stepped)
    applied = active & ~bad
    rms = scan.rms_displacement(update, mask)
    return _FireCarry(state, carry.diverged | bad, jnp.where(applied, rms, carry.last_rms))
