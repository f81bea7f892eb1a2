"""Differentiable relaxation: the frame, its per-frame modifiers and a masked ``lax.scan`` rollout.

A frame (paper eq. 1) is ``X_{t+1} = X_t + eta_t * F(X_t)`` for every structure of a batch.
A rollout repeats frames up to ``max_frames`` times. Each structure stops on its own when the
RMS movement of its real atoms in one frame falls below ``stop_rms`` (paper: 1e-3 Å), or, with
``stop_fmax`` > 0, when the largest force on its real atoms at the current positions is below
``stop_fmax`` (the ASE ``fmax`` rule: checked before the frame's step, which is then not taken);
from then on its positions are frozen, so later frames change neither its value nor its gradient.
The stopping tests are computed on stop-gradient values and are not differentiated. Early
stopping is a mask over a fixed-length ``scan`` because ``while_loop`` cannot be
reverse-differentiated.

Parameters are one pytree ``{"model": model_params, "step_rule": step_params}``. ``force_fn(
params["model"], structures)`` may be any force model (ADAPT, a user's Flax model, a
jax-md potential, the negative gradient of a learned energy); the step size comes from a step
rule (:mod:`bptt_mlip.relax.step_rules`: ``rule.apply(params["step_rule"], structures, forces)``).

Units: positions Å, forces eV/Å, step sizes Å^2/eV (Å of movement per eV/Å of force).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from bptt_mlip import losses
from bptt_mlip.relax import compaction, fire
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params

if TYPE_CHECKING:  # step_rules imports FrameModifiers from here; the annotation needs the name only
    from bptt_mlip.relax.step_rules import StepRule

REMAT_MODES = ("none", "frame", "segment")
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class FrameModifiers:
    """What a frame does with the step rule's ``eta F`` besides adding it, kept apart from the rule.

    Attributes:
      momentum: heavy-ball weight beta: ``u_t = eta_t F_t + beta u_{t-1}`` (paper: 0.05; 0 = off).
      anneal: multiplicative annealing gamma: ``eta_t = eta * gamma^t`` (paper: 0.99; 1 = off).
      noise_std: std (Å) of Gaussian exploration noise added to every real atom's update
        (needs a key; 0 = off).
      max_displacement: cap (Å) on each atom's displacement per frame (0 = no cap).
    """

    momentum: float = 0.0
    anneal: float = 1.0
    noise_std: float = 0.0
    max_displacement: float = 0.0

    def __post_init__(self):
        if self.noise_std < 0 or self.max_displacement < 0 or self.momentum < 0 or self.anneal <= 0:
            raise ValueError(f"invalid FrameModifiers values: {self}")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Rollout length, stopping rule and rematerialisation.

    Attributes:
      max_frames: K, the most frames a structure may take (paper: 75 defects, 45 crystals).
      stop_rms: a structure stops once the RMS displacement of its real atoms in one frame is
        below this (Å; paper: 1e-3). That frame is applied and counted.
      stop_fmax: with a value > 0, a structure also stops once the largest per-atom force norm of its
        real atoms at the current positions is below this (eV/Å; ASE's ``fmax``): the frame about to
        be taken is not applied and not counted. The end positions are checked too (one more force
        evaluation), so a structure whose forces fall below it after its last allowed frame also
        counts as converged. A static setting: a new value compiles anew. 0 = off (no extra work;
        results bit-identical to a rollout without the rule). Data near equilibrium
        needs a value at the scale of its forces (:func:`bptt_mlip.data.relax_settings.derive_relax_settings`).
      remat: ``"none"`` (store every frame's activations), ``"frame"`` (``jax.checkpoint`` each
        frame: recompute a frame's model activations in the backward pass), or ``"segment"``
        (checkpoint segments of ``segment_length`` frames, each frame inside also checkpointed:
        memory ~ K / S + S frames, about sqrt(K) for S = sqrt(K)).
      segment_length: S for ``"segment"``; 0 picks ceil(sqrt(max_frames)).
      remat_policy: a name in ``REMAT_POLICIES`` for what a checkpointed frame may keep.
      divergence_displacement: a frame that would move an atom farther than this (Å), or makes
        positions non-finite, marks the structure diverged and freezes it at its last good frame.
      return_trajectory: also return positions after every frame, [K + 1, B, N, 3].
      early_exit: skip the force call of every frame after the whole batch has stopped (a
        ``lax.cond`` inside the scan: the backward pass of a skipped frame is skipped too).
        False computes all ``max_frames`` frames, through the same cond with a predicate that never
        holds, so both settings compile one frame: results and gradients agree bit for bit.
        Under ``vmap`` (e.g. the grid search over step sizes) a cond becomes a select and both
        branches run, so there it saves nothing.
      compact_levels: 0 = every frame calls the force model on the whole batch. ``L`` > 0 = only on
        the rows still running, gathered into the smallest of ``B, B/2, ..., B/2^L`` rows that holds
        them (:mod:`bptt_mlip.relax.compaction`: a ``lax.switch``, forward and backward), so a batch
        whose structures stop at different frames costs about the frames its structures need, not
        B times its slowest one's. Needs a force model whose rows are independent; results equal
        those without it to float32 rounding; ``L + 1`` compiled copies of the model. Ignored under
        ``vmap`` callers that turn the switch into a select (the grid search turns it off).
    """

    max_frames: int = 75
    stop_rms: float = 1e-3
    stop_fmax: float = 0.0
    remat: str = "none"
    segment_length: int = 0
    remat_policy: str = "nothing_saveable"
    divergence_displacement: float = 5.0
    return_trajectory: bool = False
    early_exit: bool = True
    compact_levels: int = 0

    def __post_init__(self):
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.compact_levels < 0:
            raise ValueError(f"compact_levels must be >= 0 (0 = off), got {self.compact_levels}")
        if not (self.stop_fmax >= 0 and math.isfinite(self.stop_fmax)):
            raise ValueError(f"stop_fmax must be a finite force >= 0 eV/Å (0 = off), got {self.stop_fmax}")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got {self.remat_policy!r}")

    @property
    def segment(self) -> int:
        if self.remat != "segment":
            return self.max_frames
        s = self.segment_length or math.ceil(math.sqrt(self.max_frames))
        return max(1, min(s, self.max_frames))


class RolloutResult(NamedTuple):
    """What a rollout returns.

    Attributes:
      positions: [B, N, 3] end-point positions (Å).
      num_frames: [B] int32 frames actually applied to each structure.
      converged: [B] bool, stopped by the RMS-movement rule or (``stop_fmax`` > 0) the largest-force rule.
      diverged: [B] bool, stopped because a frame turned non-finite or moved an atom too far.
      last_rms: [B] RMS displacement (Å) of the structure's last applied frame.
      trajectory: [K + 1, B, N, 3] positions after each frame (frozen after the stop), or None.
    """

    positions: jnp.ndarray
    num_frames: jnp.ndarray
    converged: jnp.ndarray
    diverged: jnp.ndarray
    last_rms: jnp.ndarray
    trajectory: jnp.ndarray | None


# --------------------------------------------------------------------------- frame and rollout


def displacement(
    forces: jnp.ndarray,
    step_size: jnp.ndarray,
    mask: jnp.ndarray,
    modifiers: FrameModifiers,
    previous: jnp.ndarray | None = None,
    noise: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """One frame's displacement [B, N, 3] (Å): ``eta F (+ beta u_prev) (+ noise)``, capped, masked.

    Args:
      forces: [B, N, 3] eV/Å. step_size: [B] Å^2/eV. mask: [B, N].
      previous: [B, N, 3] the previous frame's displacement (momentum), or None.
      noise: [B, N, 3] standard-normal draws scaled by ``modifiers.noise_std``, or None.
    """
    update = step_size[:, None, None] * forces
    if previous is not None and modifiers.momentum:
        update = update + modifiers.momentum * previous
    if noise is not None and modifiers.noise_std:
        update = update + modifiers.noise_std * noise
    if modifiers.max_displacement:
        norm = losses.safe_norm(update, keepdims=True)
        scale = jnp.minimum(1.0, modifiers.max_displacement / jnp.maximum(norm, 1e-12))
        update = update * scale
    return jnp.where(mask[..., None], update, 0.0)


def frame(
    force_fn: ForceFn,
    step_rule: StepRule,
    params: Params,
    structures: Structures,
    modifiers: FrameModifiers = FrameModifiers(),
) -> jnp.ndarray:
    """The paper's frame (eq. 1) without momentum/noise: returns ``X + eta F(X)`` [B, N, 3] (Å).

    ``step_rule``: a rule of :mod:`bptt_mlip.relax.step_rules` (or the neural head);
    ``params``: ``{"model": ..., "step_rule": ...}``; the displacement cap of ``modifiers`` applies.
    """
    forces = force_fn(params["model"], structures)
    eta = step_rule.apply(params["step_rule"], structures, forces)
    return structures.positions + displacement(forces, eta, structures.mask, modifiers)


def rms_displacement(update: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] root-mean-square over real atoms of per-atom displacement norms (Å)."""
    n = jnp.maximum(jnp.sum(mask, axis=-1), 1)
    return losses.safe_sqrt(jnp.sum(jnp.where(mask[..., None], update * update, 0.0), axis=(-1, -2)) / n)


class _Carry(NamedTuple):
    positions: jnp.ndarray
    previous: jnp.ndarray
    done: jnp.ndarray
    converged: jnp.ndarray
    diverged: jnp.ndarray
    num_frames: jnp.ndarray
    last_rms: jnp.ndarray


def rollout(
    force_fn: ForceFn,
    step_rule: StepRule,
    params: Params,
    structures: Structures,
    modifiers: FrameModifiers = FrameModifiers(),
    rollout_config: RolloutConfig = RolloutConfig(),
    *,
    key: jax.Array | None = None,
    stop_rms: jnp.ndarray | float | None = None,
    frame_limit: jnp.ndarray | int | None = None,
) -> RolloutResult:
    """Relax every structure of the batch with repeated frames; differentiable in ``params``.

    Args:
      force_fn: ``force_fn(params["model"], structures) -> [B, N, 3]`` eV/Å.
      step_rule: ``step_rule.apply(params["step_rule"], structures, forces) -> [B]`` Å²/eV
        (:mod:`bptt_mlip.relax.step_rules`).
      params: ``{"model": ..., "step_rule": ...}``.
      structures: batch with starting positions [B, N, 3].
      modifiers: momentum, annealing, exploration noise and displacement cap of every frame.
      rollout_config: frames, stopping rule, rematerialisation.
      key: PRNG key for exploration noise (required iff ``modifiers.noise_std > 0``).
      stop_rms: overrides ``rollout_config.stop_rms`` with a traced value (random stopping rules).
      frame_limit: a traced limit <= ``max_frames`` on the frames taken (random stopping rules).
    """
    k_max = rollout_config.max_frames
    limit = k_max if frame_limit is None else jnp.minimum(frame_limit, k_max)
    body = _frame_body(force_fn, step_rule, params, structures, modifiers, rollout_config, key, stop_rms, limit)

    def skip(carry: _Carry, t: jnp.ndarray):
        return carry, (carry.positions if rollout_config.return_trajectory else None)

    def frame_unless_finished(carry: _Carry, t: jnp.ndarray):
        # once every structure has stopped, a frame changes nothing: the cond skips the force call
        # forward and (being a cond, not a where) its backward pass too. Without early exit the frame
        # runs inside the same cond, whose predicate then holds only on the overhang frames of the last
        # remat segment (t >= max_frames, which change nothing): both settings compile the same frame,
        # so their results and gradients agree bit for bit.
        if rollout_config.early_exit:
            finished = jnp.all(carry.done | (t >= limit))
        else:
            finished = t >= k_max
        return jax.lax.cond(finished, skip, body, carry, t)

    carry, frames = _scan_frames(frame_unless_finished, _initial_carry(structures), rollout_config)
    carry = _end_point_force_stop(force_fn, params, structures, carry, rollout_config)
    trajectory = None
    if rollout_config.return_trajectory:
        trajectory = jnp.concatenate([structures.positions[None], frames], axis=0)
    return RolloutResult(carry.positions, carry.num_frames, carry.converged, carry.diverged, carry.last_rms, trajectory)


def _frame_body(force_fn: ForceFn, step_rule: StepRule, params: Params, structures: Structures,
                modifiers: FrameModifiers, rollout_config: RolloutConfig, key, stop_rms, limit):
    """``body(carry, t) -> (carry after frame t, positions or None)``: one frame of every structure
    still active (not done, ``t < limit``), shared by :func:`rollout` and :func:`relax_until_done`."""
    if modifiers.noise_std and key is None:
        raise ValueError("FrameModifiers.noise_std > 0 needs a PRNG key for the exploration noise")
    threshold = rollout_config.stop_rms if stop_rms is None else stop_rms
    mask = structures.mask

    def body(carry: _Carry, t: jnp.ndarray):
        current = structures.replace(positions=carry.positions)
        active = jnp.logical_not(carry.done) & (t < limit)
        if rollout_config.compact_levels:  # static: off, the traced program is unchanged
            forces = compaction.running_row_forces(force_fn, params["model"], current, active,
                                                   rollout_config.compact_levels)
        else:
            forces = force_fn(params["model"], current)
        eta = step_rule.apply(params["step_rule"], current, forces)
        if modifiers.anneal != 1.0:
            eta = eta * modifiers.anneal ** t.astype(eta.dtype)
        noise = None
        if modifiers.noise_std:
            noise = jax.random.normal(jax.random.fold_in(key, t), carry.positions.shape, carry.positions.dtype)
        update = displacement(forces, eta, mask, modifiers, carry.previous, noise)
        if rollout_config.stop_fmax:  # static: with the rule off the traced program is unchanged
            carry, active = _force_stop(carry, active, forces, mask, rollout_config.stop_fmax)
        new = _advance(carry, update, active, mask, threshold, rollout_config.divergence_displacement)
        return new, (new.positions if rollout_config.return_trajectory else None)

    return body


def _end_point_force_stop(force_fn: ForceFn, params: Params, structures: Structures, carry: _Carry,
                          rollout_config: RolloutConfig) -> _Carry:
    """With ``stop_fmax`` on, the end positions of rows still running are checked too (ASE's fmax test
    of the last structure)."""
    if not rollout_config.stop_fmax:
        return carry
    end_forces = force_fn(params["model"], structures.replace(positions=carry.positions))
    carry, _ = _force_stop(carry, jnp.logical_not(carry.done), end_forces, structures.mask, rollout_config.stop_fmax)
    return carry


def _initial_carry(structures: Structures) -> _Carry:
    b = structures.batch_size
    return _Carry(
        positions=structures.positions,
        previous=jnp.zeros_like(structures.positions),
        done=jnp.zeros((b,), bool),
        converged=jnp.zeros((b,), bool),
        diverged=jnp.zeros((b,), bool),
        num_frames=jnp.zeros((b,), jnp.int32),
        last_rms=jnp.zeros((b,), structures.positions.dtype),
    )


def _force_stop(carry: _Carry, active: jnp.ndarray, forces: jnp.ndarray, mask: jnp.ndarray,
                stop_fmax: float) -> tuple[_Carry, jnp.ndarray]:
    """Mark the ``active`` [B] structures whose largest real-atom force in ``forces`` [B, N, 3] is
    below ``stop_fmax`` eV/Å converged and done (a NaN force never stops); returns the updated carry
    and the structures still active, which are the ones that take this frame's step."""
    stopped = active & (jax.lax.stop_gradient(fire.max_force(forces, mask)) < stop_fmax)
    carry = carry._replace(done=carry.done | stopped, converged=carry.converged | stopped)
    return carry, active & jnp.logical_not(stopped)


def _advance(carry: _Carry, update: jnp.ndarray, active: jnp.ndarray, mask: jnp.ndarray, threshold,
             divergence_displacement: float) -> _Carry:
    """Apply one frame's ``update`` [B, N, 3] to the active structures that stay finite and within
    ``divergence_displacement`` Å; mark the ones whose RMS movement falls below ``threshold`` Å
    converged and the others that went bad diverged (stopping tests are not differentiated)."""
    moved = carry.positions + update
    rms = jax.lax.stop_gradient(rms_displacement(update, mask))
    biggest = jax.lax.stop_gradient(jnp.max(jnp.where(mask[..., None], jnp.abs(update), 0.0), axis=(-1, -2)))
    bad = jnp.logical_not(jnp.isfinite(biggest)) | (biggest > divergence_displacement)
    newly_diverged = active & bad
    step_ok = active & jnp.logical_not(bad)
    newly_converged = step_ok & (rms < threshold)
    return _Carry(
        positions=jnp.where(step_ok[:, None, None], moved, carry.positions),
        previous=jnp.where(step_ok[:, None, None], update, carry.previous),
        done=carry.done | newly_converged | newly_diverged,
        converged=carry.converged | newly_converged,
        diverged=carry.diverged | newly_diverged,
        num_frames=carry.num_frames + step_ok.astype(jnp.int32),
        last_rms=jnp.where(step_ok, rms, carry.last_rms),
    )


def _scan_frames(body, init: _Carry, rollout_config: RolloutConfig):
    """``lax.scan`` of ``body`` over ``max_frames`` frames with the configured rematerialisation:
    (final carry, per-frame outputs or None)."""
    k_max = rollout_config.max_frames
    if rollout_config.remat in ("frame", "segment"):
        body = jax.checkpoint(body, policy=REMAT_POLICIES[rollout_config.remat_policy], prevent_cse=False)
    if rollout_config.remat != "segment":
        return jax.lax.scan(body, init, jnp.arange(k_max))
    seg = rollout_config.segment
    n_seg = -(-k_max // seg)

    @jax.checkpoint
    def segment_body(carry, seg_index):
        return jax.lax.scan(body, carry, seg_index * seg + jnp.arange(seg))

    # Frames with t >= k_max (the last segment's overhang) are inactive by the limit test.
    carry, frames = jax.lax.scan(segment_body, init, jnp.arange(n_seg))
    if frames is not None:
        frames = frames.reshape((n_seg * seg,) + frames.shape[2:])[:k_max]
    return carry, frames
