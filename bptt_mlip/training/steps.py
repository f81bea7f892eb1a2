"""Pure training steps: force pretraining and BPTT fine-tuning through whole relaxations.

Both steps are built by a ``make_*`` function that binds the static pieces (force function,
step rule, configs, optimiser) and returns a jit-compiled ``step(state, batch) -> (state,
metrics)``. The state is a pytree; nothing is global; randomness comes from ``state.key``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bptt_mlip import losses
from bptt_mlip.training import augment
from bptt_mlip.training import optim
from bptt_mlip.relax import scan as relax

from bptt_mlip.structures import ForceBatch, RelaxationBatch, Structures
from bptt_mlip.types import ForceFn, Params, TrainForceFn


@flax.struct.dataclass
class TrainState:
    """Everything a training loop carries: step counter, parameters, optimiser state, PRNG key."""

    step: jnp.ndarray
    params: Params
    opt_state: Any
    key: jax.Array


def create_train_state(params: Params, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """``params`` is ``{"model": ..., "step": ...}`` (``"step"`` may be ``{}`` for pretraining)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), key=key)


@dataclasses.dataclass(frozen=True)
class BPTTConfig:
    """Static settings of a BPTT step.

    Attributes:
      step: the frame's step rule.
      rollout: rollout length, stopping rule, rematerialisation.
      loss: ``"dq"`` (paper eq. 9) or ``"mse"`` (position MSE).
      random_stopping: draw the stopping threshold log-uniformly in ``stop_rms_range`` and the
        frame limit uniformly in ``frame_limit_range`` for every batch (paper appendix B.4).
      dq_weight: weight of the end-point loss (Dq or MSE) in the objective; 0 = force term only.
      force_weight: weight of the force-matching term, the mean squared force-component error
        ((eV/Å)^2) on a batch of reference frames handed to the step beside the relaxations
        (multi-task BPTT, issue 9); 0 = off (the paper's objective).
      augment_rotation: rotate each training example (relaxation and force frame) by its own
        random rotation (start, target, cell and forces together) before the loss.
      augment_translation: and translate it by a random vector with components uniform in
        ``[-augment_translation, augment_translation]`` Å (0 = off).
    """

    step: relax.StepConfig = relax.StepConfig()
    rollout: relax.RolloutConfig = relax.RolloutConfig()
    loss: str = "dq"
    random_stopping: bool = False
    stop_rms_range: tuple[float, float] = (1e-4, 1e-2)
    frame_limit_range: tuple[int, int] = (50, 75)
    dq_weight: float = 1.0
    force_weight: float = 0.0
    augment_rotation: bool = False
    augment_translation: float = 0.0

    def __post_init__(self):
        if self.dq_weight < 0 or self.force_weight < 0 or self.augment_translation < 0:
            raise ValueError(
                f"BPTTConfig: dq_weight={self.dq_weight}, force_weight={self.force_weight} and "
                f"augment_translation={self.augment_translation} must be >= 0"
            )
        if self.dq_weight == 0 and self.force_weight == 0:
            raise ValueError("BPTTConfig: dq_weight and force_weight are both 0; the objective would be empty")
        if self.loss not in ("dq", "mse"):
            raise ValueError(f"BPTTConfig.loss must be 'dq' or 'mse', got {self.loss!r}")
        if self.random_stopping and self.frame_limit_range[1] > self.rollout.max_frames:
            raise ValueError(
                f"frame_limit_range {self.frame_limit_range} exceeds rollout.max_frames={self.rollout.max_frames}"
            )


def bptt_loss(
    params: Params,
    batch: RelaxationBatch,
    force_fn: ForceFn,
    step_size_fn: relax.StepSizeFn,
    config: BPTTConfig,
    key: jax.Array,
    force_batch: ForceBatch | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """``dq_weight`` x the weighted batch mean of Dq (or MSE) between the rollout end point and
    the reference, plus ``force_weight`` x the mean squared force error on ``force_batch``
    (required when ``config.force_weight > 0``).

    Returns ``(loss, aux)`` with per-batch diagnostics in ``aux`` (``endpoint_loss`` and, with a
    force batch, ``force_mse`` in (eV/Å)^2 are the two terms before weighting).
    """
    if config.force_weight and force_batch is None:
        raise ValueError("BPTTConfig.force_weight > 0 needs a force_batch of reference frames")
    noise_key, stop_key = jax.random.split(key)
    if config.augment_rotation or config.augment_translation:
        # fold_in, not a third split: runs without augmentation keep their noise / stopping keys
        k_relax, k_force = jax.random.split(jax.random.fold_in(key, 2))
        batch = augment.augment_relaxation_batch(
            batch, k_relax, rotate=config.augment_rotation, max_translation=config.augment_translation
        )
        if force_batch is not None:
            force_batch = augment.augment_force_batch(
                force_batch, k_force, rotate=config.augment_rotation, max_translation=config.augment_translation
            )
    stop_rms = frame_limit = None
    if config.random_stopping:
        k1, k2 = jax.random.split(stop_key)
        lo, hi = jnp.log(config.stop_rms_range[0]), jnp.log(config.stop_rms_range[1])
        stop_rms = jnp.exp(jax.random.uniform(k1, (), minval=lo, maxval=hi))
        frame_limit = jax.random.randint(k2, (), config.frame_limit_range[0], config.frame_limit_range[1] + 1)
    result = relax.rollout(
        force_fn,
        step_size_fn,
        params,
        batch.initial,
        config.step,
        config.rollout,
        key=noise_key if config.step.noise_std else None,
        stop_rms=stop_rms,
        frame_limit=frame_limit,
    )
    s = batch.initial
    dq = losses.delta_q(result.positions, batch.target_positions, s.masses, s.mask)
    per = dq if config.loss == "dq" else losses.position_mse(result.positions, batch.target_positions, s.mask)
    endpoint = losses.weighted_mean(per, batch.weight)
    loss = config.dq_weight * endpoint if config.dq_weight else jnp.zeros((), endpoint.dtype)
    real = batch.weight > 0
    aux = {
        "endpoint_loss": endpoint,
        "dq": losses.weighted_mean(dq, batch.weight),
        "frames": losses.weighted_mean(result.num_frames.astype(jnp.float32), batch.weight),
        "converged": jnp.sum(result.converged & real),
        "diverged": jnp.sum(result.diverged & real),
    }
    if force_batch is not None:
        force_mse, _ = force_loss(params["model"], force_batch, deterministic(force_fn), key)
        aux["force_mse"] = force_mse
        if config.force_weight:
            loss = loss + config.force_weight * force_mse
    return loss, aux


def _apply(optimizer, state: TrainState, grads, key) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=key)


def _step_metrics(state: TrainState, grads) -> dict[str, jnp.ndarray]:
    metrics = {"grad_norm": optax.global_norm(grads), **optim.nonfinite_counts(state.opt_state)}
    step_params = state.params.get("step", {})
    if "eta" in step_params:
        metrics["eta"] = step_params["eta"]
    return metrics


def make_bptt_step(
    force_fn: ForceFn,
    step_size_fn: relax.StepSizeFn,
    config: BPTTConfig,
    optimizer: optax.GradientTransformation,
    *,
    jit: bool = True,
) -> Callable[..., tuple[TrainState, dict[str, jnp.ndarray]]]:
    """Build ``bptt_step(state, batch, force_batch=None) -> (state, metrics)``: gradients
    through every frame (and through the force term on ``force_batch``, see :class:`BPTTConfig`).

    A non-finite loss or gradient leaves the parameters unchanged (``optax.apply_if_finite``)
    and shows in ``metrics["nonfinite_total"]``.
    """

    def bptt_step(state: TrainState, batch: RelaxationBatch, force_batch: ForceBatch | None = None):
        key, sub = jax.random.split(state.key)
        (loss, aux), grads = jax.value_and_grad(bptt_loss, has_aux=True)(
            state.params, batch, force_fn, step_size_fn, config, sub, force_batch
        )
        new_state = _apply(optimizer, state, grads, key)
        return new_state, {"loss": loss, **aux, **_step_metrics(new_state, grads)}

    return jax.jit(bptt_step) if jit else bptt_step


def force_loss(
    model_params: Params, batch: ForceBatch, force_fn: TrainForceFn, key: jax.Array
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Mean squared force-component error over real atoms of real frames ((eV/Å)^2)."""
    pred = force_fn(model_params, batch.structures, key)
    s = batch.structures
    per = losses.force_squared_error(pred, batch.forces, s.mask) * batch.weight
    count = jnp.sum(s.mask, axis=-1) * 3 * batch.weight
    mse = jnp.sum(per) / jnp.maximum(jnp.sum(count), 1)
    return mse, {"force_rmse": losses.safe_sqrt(mse)}


def make_pretrain_step(
    force_fn: TrainForceFn,
    optimizer: optax.GradientTransformation,
    *,
    jit: bool = True,
    augment_rotation: bool = False,
    augment_translation: float = 0.0,
) -> Callable[[TrainState, ForceBatch], tuple[TrainState, dict[str, jnp.ndarray]]]:
    """Build ``pretrain_step(state, batch) -> (state, metrics)``: supervised force matching.

    ``force_fn(model_params, structures, key)`` may use ``key`` for dropout; only
    ``state.params["model"]`` is trained. ``augment_rotation`` / ``augment_translation`` (Å)
    move every frame by a random rigid motion (forces rotated with it) before the loss, see
    :mod:`bptt_mlip.augment`.
    """

    def pretrain_step(state: TrainState, batch: ForceBatch):
        key, sub = jax.random.split(state.key)
        if augment_rotation or augment_translation:
            batch = augment.augment_force_batch(batch, jax.random.fold_in(sub, 2), rotate=augment_rotation,
                                                max_translation=augment_translation)

        def loss_fn(params):
            return force_loss(params["model"], batch, force_fn, sub)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = _apply(optimizer, state, grads, key)
        return new_state, {"loss": loss, **aux, **_step_metrics(new_state, grads)}

    return jax.jit(pretrain_step) if jit else pretrain_step


def deterministic(force_fn: ForceFn) -> TrainForceFn:
    """Wrap a ``(params, structures)`` force function as a training one that ignores the key."""
    return lambda params, structures, key: force_fn(params, structures)
