"""Forward-only relaxation: frames without a gradient, computed only while something moves.

:func:`relax_until_done` runs :func:`~bptt_mlip.relax.scan.rollout`'s frames in a ``lax.while_loop``
that ends when every structure of the batch has stopped (evaluation tables, the grid search, the
relax API); :func:`forward_frame` is one frame for rows that joined a running batch at different
times (the in-flight batching of :mod:`bptt_mlip.workflow.inflight`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bptt_mlip.relax import scan
from bptt_mlip.relax.scan import FrameModifiers, RolloutConfig, RolloutResult, _Carry
from bptt_mlip.relax.step_rules import StepRule
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params


def relax_until_done(
    force_fn: ForceFn,
    step_rule: StepRule,
    params: Params,
    structures: Structures,
    modifiers: FrameModifiers = FrameModifiers(),
    rollout_config: RolloutConfig = RolloutConfig(),
    *,
    key: jax.Array | None = None,
    stop_rms: jnp.ndarray | float | None = None,
) -> RolloutResult:
    """Forward-only :func:`scan.rollout` that stops computing once every structure has stopped.

    The frames of :func:`scan.rollout` (same arguments and meaning) inside a ``lax.while_loop`` over
    the batch's done mask, so a batch whose structures all stop at frame 30 of ``max_frames`` = 75
    costs 30 force calls, also under ``vmap`` (where the rollout's early-exit ``cond`` becomes a
    select that runs both branches; a vmapped while loop runs until every mapped batch is done). End
    positions equal the rollout's to float32 rounding; frames taken, converged and diverged exactly.
    Not reverse-differentiable (a while loop): for evaluation, grid searches and relaxation
    services. ``rollout_config.remat`` and ``early_exit`` do not apply; ``return_trajectory`` is not
    supported (the number of frames is not known when the loop is compiled).
    """
    if rollout_config.return_trajectory:
        raise ValueError("relax_until_done cannot return the trajectory; use scan.rollout(..., return_trajectory=True)")
    k_max = rollout_config.max_frames
    body = scan._frame_body(force_fn, step_rule, params, structures, modifiers, rollout_config, key, stop_rms, k_max)

    def not_finished(state):
        carry, t = state
        return (t < k_max) & jnp.logical_not(jnp.all(carry.done))

    def next_frame(state):
        carry, t = state
        return body(carry, t)[0], t + 1

    start = (scan._initial_carry(structures), jnp.asarray(0, jnp.int32))
    carry, _ = jax.lax.while_loop(not_finished, next_frame, start)
    carry = scan._end_point_force_stop(force_fn, params, structures, carry, rollout_config)
    return RolloutResult(carry.positions, carry.num_frames, carry.converged, carry.diverged, carry.last_rms, None)


def relax_forward(force_fn: ForceFn, step_rule: StepRule, params: Params, structures: Structures,
                  modifiers: FrameModifiers = FrameModifiers(), rollout_config: RolloutConfig = RolloutConfig(), *,
                  key: jax.Array | None = None) -> RolloutResult:
    """A relaxation where no gradient is needed, as ``rollout_config`` asks: :func:`relax_until_done` with
    ``early_exit`` (computing stops once every structure has stopped), else :func:`scan.rollout` (every
    one of ``max_frames`` frames). Evaluation tables and the grid search relax through this."""
    relax = relax_until_done if rollout_config.early_exit else scan.rollout
    return relax(force_fn, step_rule, params, structures, modifiers, rollout_config, key=key)


def start_carry(structures: Structures) -> _Carry:
    """The state :func:`scan.rollout` starts from (positions = ``structures.positions``, nothing
    stopped), for :func:`forward_frame`; a NamedTuple of [B, ...] arrays: positions, previous, done, converged,
    diverged, num_frames, last_rms."""
    return scan._initial_carry(structures)


def forward_frame(force_fn: ForceFn, step_rule: StepRule, params: Params, structures: Structures, carry: _Carry,
                  frame_limit: jnp.ndarray, modifiers: FrameModifiers = FrameModifiers(),
                  rollout_config: RolloutConfig = RolloutConfig(), *, stop_rms=None) -> tuple[_Carry, jnp.ndarray]:
    """One frame of :func:`scan.rollout` (forward only, no exploration noise) for rows that may have
    started at different times: each row's frame index is its own ``carry.num_frames`` (the rollout's frame
    counter while a row has not stopped) and ``frame_limit`` [B] int its own most frames, so a row put
    into a running batch relaxes exactly as in a rollout of its own. A row at its limit that has not
    stopped gets the rollout's end-point ``stop_fmax`` check. Returns (carry after the frame, forces
    [B, N, 3] eV/Å at the positions before it: a row that did not move has its end-point forces there).
    """
    if modifiers.noise_std:
        raise ValueError("forward_frame runs without exploration noise: set FrameModifiers.noise_std = 0")
    mask = structures.mask
    current = structures.replace(positions=carry.positions)
    forces = force_fn(params["model"], current)
    eta = step_rule.apply(params["step_rule"], current, forces)
    t = carry.num_frames
    if modifiers.anneal != 1.0:
        eta = eta * modifiers.anneal ** t.astype(eta.dtype)
    update = scan.displacement(forces, eta, mask, modifiers, carry.previous)
    active = jnp.logical_not(carry.done) & (t < frame_limit)
    if rollout_config.stop_fmax:  # rows at their limit: the rollout's check of the end point
        carry, active = scan._force_stop(carry, jnp.logical_not(carry.done), forces, mask, rollout_config.stop_fmax)
        active = active & (t < frame_limit)
    threshold = rollout_config.stop_rms if stop_rms is None else stop_rms
    return scan._advance(carry, update, active, mask, threshold, rollout_config.divergence_displacement), forces
