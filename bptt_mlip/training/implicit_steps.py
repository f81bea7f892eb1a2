"""Fine-tuning with implicit or guided gradients at the relaxation's fixed point, beside BPTT.

``gradient`` of :class:`GradientConfig` chooses how the end-point loss L(X_end) is differentiated:

* ``"bptt"``: through every frame (:func:`bptt_mlip.training.steps.make_bptt_trainer`).
* ``"implicit"``: the rollout runs without gradient (memory independent of ``max_frames``) and,
  where it reached a fixed point, the gradient is the implicit one
  (:mod:`bptt_mlip.relax.implicit`): ``dL/dtheta = (dF/dtheta)^T mu``. It reaches the force model
  only; the step rule's parameters get no gradient (the fixed point F = 0 does not depend on them).
* ``"guided"``: the first ``unroll_frames`` = W frames are a differentiable rollout (BPTT, with
  the configured rematerialisation); the remaining ``max_frames - W`` frames (the tail) run
  without gradient from X_W. The end point X_end = Phi_tail(X_W; theta) is differentiated by the
  chain rule with the tail's Jacobians taken at its fixed point:
  ``dX_end/dtheta = dX*/dtheta |implicit + (dX*/dX_W) dX_W/dtheta`` where ``dX*/dX_W`` is zero for
  a unique attractor except along the null modes (the rigid motion X* keeps from X_W), so the
  window receives the null-mode part of dL/dX*. A structure whose rollout ended inside the
  window (converged, diverged or out of frames) has an empty tail, X_end = X_W, and takes plain
  BPTT. Because that first-order gradient forgets the window almost entirely, the window also gets
  a guidance term: ``guidance_weight`` x the batch-mean end-point loss (Dq or MSE) at X_W of the
  structures still moving after the window: it pulls the first W frames towards the reference
  relaxed structure, i.e. towards its basin, which the implicit gradient alone cannot see.
  W = ``max_frames`` is plain BPTT exactly (no tail); W = 0 is pure implicit (no window).

Structures without a usable implicit gradient: a tail that did not converge (or ends with an RMS
force above ``AdjointConfig.max_force_rms``) and a solve that did not converge give that
structure zero end-point gradient. It stays in the reported loss, and it is counted in the
metrics ``implicit_unconverged_rollouts`` and ``implicit_unconverged_solves`` (real rows only);
``implicit_rows`` counts the structures that took the implicit path, ``implicit_residual`` is
the largest relative residual of an attempted solve and ``implicit_force_rms`` the largest RMS
force (eV/Å) at an implicit end point.

The tail restarts the frame modifiers' state: momentum starts from zero and annealing from
eta again at X_W; with neither, the forward pass equals the plain rollout's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bptt_mlip import losses
from bptt_mlip.relax import implicit, scan
from bptt_mlip.relax.step_rules import StepRule
from bptt_mlip.structures import ForceBatch, RelaxationBatch
from bptt_mlip.training import steps
from bptt_mlip.training.steps import BPTTConfig, Trainer, TrainState
from bptt_mlip.types import ForceFn, Params

GRADIENTS = ("bptt", "implicit", "guided")
IMPLICIT_METRICS = ("implicit_rows", "implicit_unconverged_rollouts", "implicit_unconverged_solves",  # counts
                    "implicit_residual", "implicit_force_rms")


@dataclasses.dataclass(frozen=True)
class GradientConfig:
    """How a fine-tuning step differentiates the end-point loss.

    Attributes:
      bptt: rollout, loss, stopping, augmentation and force-term settings (shared by all methods).
      gradient: ``"bptt"``, ``"implicit"`` or ``"guided"`` (see the module docstring).
      unroll_frames: W, the differentiable window of ``"guided"`` (0 <= W <= max_frames); must be 0
        for ``"implicit"`` and is unused by ``"bptt"``.
      adjoint: the implicit solve (solver, null modes, tolerances).
      guidance_weight: weight of the window's end-point loss in ``"guided"`` (0 = the first-order
        gradient only).
    """

    bptt: BPTTConfig = BPTTConfig()
    gradient: str = "bptt"
    unroll_frames: int = 0
    adjoint: implicit.AdjointConfig = implicit.AdjointConfig()
    guidance_weight: float = 1.0

    def __post_init__(self):
        if self.gradient not in GRADIENTS:
            raise ValueError(f"GradientConfig.gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        k = self.bptt.rollout.max_frames
        if not 0 <= self.unroll_frames <= k:
            raise ValueError(f"GradientConfig.unroll_frames={self.unroll_frames} must be in [0, max_frames={k}]")
        if self.gradient == "implicit" and self.unroll_frames:
            raise ValueError(f"gradient='implicit' unrolls no frames; got unroll_frames={self.unroll_frames} "
                             "(use gradient='guided' for a BPTT window)")
        if self.gradient != "bptt" and self.bptt.relaxer != "frame":
            raise ValueError(f"gradient={self.gradient!r} differentiates the frame map; relaxer={self.bptt.relaxer!r} "
                             "is trained with gradient='bptt'")
        if self.guidance_weight < 0:
            raise ValueError(f"GradientConfig.guidance_weight must be >= 0, got {self.guidance_weight}")

    @property
    def window(self) -> int:
        """W, the frames differentiated by BPTT (0 for ``"implicit"``, max_frames for ``"bptt"``)."""
        if self.gradient == "bptt":
            return self.bptt.rollout.max_frames
        return self.unroll_frames if self.gradient == "guided" else 0


def _per_structure_loss(config: BPTTConfig, batch: RelaxationBatch, positions: jnp.ndarray) -> jnp.ndarray:
    """[B] Dq (amu^1/2 Å) or position MSE (Å^2) of ``positions`` against the reference."""
    s = batch.initial
    if config.loss == "dq":
        return losses.delta_q(positions, batch.target_positions, s.masses, s.mask)
    return losses.position_mse(positions, batch.target_positions, s.mask)


def _window_and_tail(params, batch, force_fn, step_rule, config: GradientConfig, noise_key, stop_rms, frame_limit):
    """(window RolloutResult or None, tail RolloutResult or None, [B] bool: took tail frames)."""
    b = config.bptt
    w, k = config.window, b.rollout.max_frames
    key = noise_key if b.modifiers.noise_std else None
    start, window = batch.initial, None
    stopped = jnp.zeros((start.batch_size,), bool)
    if w:
        window_config = dataclasses.replace(b.rollout, max_frames=w, return_trajectory=False)
        window = scan.rollout(force_fn, step_rule, params, start, b.modifiers, window_config, key=key,
                              stop_rms=stop_rms, frame_limit=frame_limit)
        start = start.replace(positions=window.positions)
        stopped = window.converged | window.diverged
    if w == k:
        return window, None, jnp.zeros_like(stopped)
    tail = implicit.relax_without_gradient(
        force_fn, step_rule, params, start, b.modifiers, dataclasses.replace(b.rollout, max_frames=k - w),
        key=None if key is None else jax.random.fold_in(key, 1), stop_rms=stop_rms,
        frame_limit=None if frame_limit is None else frame_limit - w,
    )
    return window, tail, jnp.logical_not(stopped) & (tail.num_frames > 0)


def implicit_loss(
    params: Params,
    batch: RelaxationBatch,
    force_fn: ForceFn,
    step_rule: StepRule,
    config: GradientConfig,
    key: jax.Array,
    force_batch: ForceBatch | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The objective of :func:`bptt_mlip.training.steps.bptt_loss` (same value up to the guidance
    term), differentiable so that its gradient is the implicit (``config.gradient="implicit"``) or
    guided one; ``(loss, aux)`` with the BPTT diagnostics plus the implicit metrics of the module
    docstring (and ``guidance_loss`` for guided).

    ``params``: ``{"model": ..., "step_rule": ...}``; ``batch``: B padded relaxations.
    """
    b = config.bptt
    if b.force_weight and force_batch is None:
        raise ValueError("BPTTConfig.force_weight > 0 needs a force_batch of reference frames")
    noise_key, stop_key = jax.random.split(key)
    batch, force_batch = steps.augment_batch(b, key, batch, force_batch)
    stop_rms, frame_limit = steps.draw_stopping(b, stop_key)
    window, tail, in_tail = _window_and_tail(params, batch, force_fn, step_rule, config, noise_key, stop_rms,
                                             frame_limit)
    x_window = batch.initial.positions if window is None else window.positions
    x_end = x_window if tail is None else jnp.where(in_tail[:, None, None], tail.positions, x_window)
    # the tail rows' end points are constants here; their gradient comes from the surrogate below
    x_loss = jnp.where(in_tail[:, None, None], jax.lax.stop_gradient(x_end), x_window)
    per = _per_structure_loss(b, batch, x_loss)
    endpoint = losses.weighted_mean(per, batch.weight)
    loss = b.dq_weight * endpoint if b.dq_weight else jnp.zeros((), endpoint.dtype)
    aux = _rollout_aux(batch, x_end, window, tail, in_tail, endpoint)
    if tail is not None:
        surrogate, implicit_aux = _implicit_surrogate(params, batch, force_fn, config, x_end, x_window, tail, in_tail)
        loss = loss + surrogate - jax.lax.stop_gradient(surrogate)
        aux.update(implicit_aux)
        if 0 < config.window and config.guidance_weight:
            guidance = jnp.sum(jnp.where(in_tail, _window_loss(b, batch, x_window), 0.0) * batch.weight)
            guidance = guidance / jnp.maximum(jnp.sum(batch.weight), 1e-12)
            loss = loss + config.guidance_weight * guidance
            aux["guidance_loss"] = guidance
    else:  # the window was the whole rollout: plain BPTT, nothing took the implicit path
        aux.update({name: jnp.zeros((), jnp.int32 if i < 3 else jnp.float32)
                    for i, name in enumerate(IMPLICIT_METRICS)})
    if force_batch is not None:
        force_mse, _ = steps.force_loss(params["model"], force_batch, steps.deterministic(force_fn), key)
        aux["force_mse"] = force_mse
        if b.force_weight:
            loss = loss + b.force_weight * force_mse
    return loss, aux


def _window_loss(config: BPTTConfig, batch: RelaxationBatch, window_positions: jnp.ndarray) -> jnp.ndarray:
    """[B] end-point loss (Dq or MSE) of the window's last frame, differentiable through the window."""
    return jnp.where(batch.weight > 0, _per_structure_loss(config, batch, window_positions), 0.0)


def _implicit_surrogate(params, batch, force_fn, config: GradientConfig, x_end, x_window, tail, in_tail):
    """(surrogate scalar, implicit metrics): the implicit gradient of the tail rows' end points."""
    b, s = config.bptt, batch.initial
    x_end = jax.lax.stop_gradient(x_end)

    def endpoint_objective(x):
        return b.dq_weight * losses.weighted_mean(_per_structure_loss(b, batch, x), batch.weight)

    cotangent = jax.grad(endpoint_objective)(x_end)
    at_end = s.replace(positions=x_end)
    forces = force_fn(params["model"], at_end)  # ~0 in value; its parameter gradient carries the implicit one
    residual_force = implicit.force_rms(jax.lax.stop_gradient(forces), s.mask)
    real = batch.weight > 0
    at_fixed_point = in_tail & tail.converged & ~tail.diverged & (residual_force <= config.adjoint.max_force_rms)
    solution = implicit.solve_adjoint(force_fn, params["model"], at_end, cotangent, config.adjoint,
                                      at_fixed_point & real)
    start = x_window if config.window else None  # the window's start is the batch: no parameters behind it
    surrogate = implicit.implicit_surrogate(forces, solution, start)
    attempted = at_fixed_point & real
    metrics = {
        "implicit_rows": jnp.sum(in_tail & real),
        "implicit_unconverged_rollouts": jnp.sum(in_tail & real & ~at_fixed_point),
        "implicit_unconverged_solves": jnp.sum(attempted & ~solution.solved),
        # a non-finite residual is a failed solve, counted above; the metric shows the finite ones
        "implicit_residual": jnp.max(jnp.where(attempted & jnp.isfinite(solution.relative_residual),
                                               solution.relative_residual, 0.0)),
        "implicit_force_rms": jnp.max(jnp.where(in_tail & real, residual_force, 0.0)),
    }
    return surrogate, metrics


def _rollout_aux(batch, x_end, window, tail, in_tail, endpoint) -> dict[str, jnp.ndarray]:
    """The BPTT diagnostics (endpoint_loss, dq, frames, converged, diverged) of the joined rollout."""
    s, real = batch.initial, batch.weight > 0
    zeros = jnp.zeros((s.batch_size,), bool)
    frames = jnp.zeros((s.batch_size,), jnp.int32) if window is None else window.num_frames
    converged = zeros if window is None else window.converged
    diverged = zeros if window is None else window.diverged
    if tail is not None:
        frames = frames + jnp.where(in_tail, tail.num_frames, 0)
        converged = jnp.where(in_tail, tail.converged, converged)
        diverged = diverged | (in_tail & tail.diverged)
    dq = losses.delta_q(jax.lax.stop_gradient(x_end), batch.target_positions, s.masses, s.mask)
    return {
        "endpoint_loss": endpoint,
        "dq": losses.weighted_mean(dq, batch.weight),
        "frames": losses.weighted_mean(frames.astype(jnp.float32), batch.weight),
        "converged": jnp.sum(converged & real),
        "diverged": jnp.sum(diverged & real),
    }


def make_implicit_trainer(
    force_fn: ForceFn,
    step_rule: StepRule,
    config: GradientConfig,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> Trainer:
    """A fine-tuning trainer whose gradient is ``config.gradient``: ``"bptt"`` returns
    :func:`bptt_mlip.training.steps.make_bptt_trainer` (with ``config.bptt``); ``"implicit"`` and
    ``"guided"`` differentiate :func:`implicit_loss`. Same ``Trainer(init, update)`` shape,
    ``update(state, batch, force_batch=None) -> (state, metrics)``, optimiser and ``mesh`` handling.
    """
    if config.gradient == "bptt":
        return steps.make_bptt_trainer(force_fn, step_rule, config.bptt, optimizer, mesh=mesh, jit=jit)

    def implicit_update(state: TrainState, batch: RelaxationBatch, force_batch: ForceBatch | None = None):
        key, sub = jax.random.split(state.key)
        (loss, aux), grads = jax.value_and_grad(implicit_loss, has_aux=True)(
            state.params, batch, force_fn, step_rule, config, sub, force_batch
        )
        new_state = steps.apply_updates(optimizer, state, grads, key)
        return new_state, {"loss": loss, **aux, **steps.update_metrics(new_state, grads, step_rule)}

    return steps.build_trainer(optimizer, implicit_update, mesh, jit, takes_force_batch=True)
