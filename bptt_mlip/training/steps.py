"""Pure training updates in the init/apply shape: force pretraining and BPTT fine-tuning.

A trainer is built once from the static pieces and returned as ``Trainer(init, update)``, the
shape optax and jax-md users know::

    trainer = make_bptt_trainer(force_fn, step_rule, BPTTConfig(...), optimizer)
    state = trainer.init({"model": model_params, "step_rule": step_rule.init(key)}, key)
    state, metrics = trainer.update(state, relaxation_batch)

Each piece is given once: the step rule to :func:`make_bptt_trainer` (its parameters are
``params["step_rule"]``), the optimiser to the trainer (``init`` builds its state). With a
``mesh`` (:func:`bptt_mlip.training.parallel.make_mesh`) the update is data parallel: batches are
split over the devices along the batch axis, the state is replicated, and XLA inserts the one
all-reduce of the batch-mean loss and its gradients; results equal the one-device update up to
float32 summation order. The state is a pytree; nothing is global; randomness comes from
``state.key``.

The pieces every trainer shares (:func:`augment_batch`, :func:`draw_stopping`, :func:`apply_updates`,
:func:`update_metrics`, :func:`build_trainer`) are public, so that trainers of other gradients
(:mod:`bptt_mlip.training.implicit_steps`) are built from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bptt_mlip import losses
from bptt_mlip.relax import fire_bptt, scan
from bptt_mlip.relax.fire import FireConfig
from bptt_mlip.relax.step_rules import StepRule
from bptt_mlip.structures import ForceBatch, RelaxationBatch
from bptt_mlip.training import augment, optim, parallel
from bptt_mlip.types import ForceFn, Params, TrainForceFn


@flax.struct.dataclass
class TrainState:
    """Everything a training loop carries: update counter, parameters, optimiser state, PRNG key.

    ``params`` is ``{"model": ..., "step_rule": ...}`` (``"step_rule"`` is ``{}`` for pretraining
    and for a rule without parameters).
    """

    step: jnp.ndarray
    params: Params
    opt_state: Any
    key: jax.Array


class Trainer(NamedTuple):
    """``init(params, key) -> TrainState`` and ``update(state, batch[, force_batch]) -> (state, metrics)``."""

    init: Callable[[Params, jax.Array], TrainState]
    update: Callable[..., tuple[TrainState, dict[str, jnp.ndarray]]]


RELAXERS = ("frame", "fire")


@dataclasses.dataclass(frozen=True)
class BPTTConfig:
    """Static settings of a BPTT step.

    The step rule itself is not here: it is given to :func:`make_bptt_trainer`.

    Attributes:
      modifiers: the frame's momentum, annealing, exploration noise and displacement cap.
      rollout: rollout length, stopping rule, rematerialisation.
      loss: ``"dq"`` (paper eq. 9) or ``"mse"`` (position MSE).
      random_stopping: draw the stopping threshold log-uniformly in ``stop_rms_range`` and the
        frame limit uniformly in ``frame_limit_range`` for every batch (paper appendix B.4).
      dq_weight: weight of the end-point loss (Dq or MSE) in the objective; 0 = force term only.
      force_weight: weight of the force-matching term, the mean squared force-component error
        ((eV/Å)^2) on a batch of reference frames handed to the step beside the relaxations
        (multi-task BPTT); 0 = off (the paper's objective).
      augment_rotation: rotate each training example (relaxation and force frame) by its own
        random rotation (start, target, cell and forces together) before the loss.
      augment_translation: and translate it by a random vector with components uniform in
        ``[-augment_translation, augment_translation]`` Å (0 = off).
      relaxer: ``"frame"`` (the step rule's frames, :func:`bptt_mlip.relax.scan.rollout`) or ``"fire"``
        (backpropagation through FIRE, :func:`bptt_mlip.relax.fire_bptt.fire_rollout`). With ``"fire"``
        the step rule plays no part (its gradient is zero; freeze it in the optimiser), ``fire.fmax`` and
        ``fire.max_steps`` stop the rollout (``rollout.max_frames``, ``stop_rms``, ``stop_fmax`` are unused;
        its remat, early-exit and divergence settings apply), and modifiers and random stopping, which
        belong to the frame, must stay off.
      fire: FIRE's settings for ``relaxer="fire"`` (default ASE's: fmax 0.05 eV/Å, 200 steps).
    """

    modifiers: scan.FrameModifiers = scan.FrameModifiers()
    rollout: scan.RolloutConfig = scan.RolloutConfig()
    loss: str = "dq"
    random_stopping: bool = False
    stop_rms_range: tuple[float, float] = (1e-4, 1e-2)
    frame_limit_range: tuple[int, int] = (50, 75)
    dq_weight: float = 1.0
    force_weight: float = 0.0
    augment_rotation: bool = False
    augment_translation: float = 0.0
    relaxer: str = "frame"
    fire: FireConfig = FireConfig()

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
        if self.relaxer not in RELAXERS:
            raise ValueError(f"BPTTConfig.relaxer must be one of {RELAXERS}, got {self.relaxer!r}")
        if self.relaxer == "fire" and (self.random_stopping or self.modifiers != scan.FrameModifiers()):
            raise ValueError(f"BPTTConfig: relaxer='fire' takes no frame modifiers ({self.modifiers}) and no "
                             f"random_stopping ({self.random_stopping}); they belong to relaxer='frame'")
        if self.random_stopping and self.frame_limit_range[1] > self.rollout.max_frames:
            raise ValueError(
                f"frame_limit_range {self.frame_limit_range} exceeds rollout.max_frames={self.rollout.max_frames}"
            )


def augment_batch(config: BPTTConfig, key: jax.Array, batch: RelaxationBatch, force_batch: ForceBatch | None):
    """Random rigid motions of the relaxations and force frames (a no-op without augmentation)."""
    if not (config.augment_rotation or config.augment_translation):
        return batch, force_batch
    # fold_in, not a third split: runs without augmentation keep their noise / stopping keys
    k_relax, k_force = jax.random.split(jax.random.fold_in(key, 2))
    batch = augment.augment_relaxation_batch(
        batch, k_relax, rotate=config.augment_rotation, max_translation=config.augment_translation
    )
    if force_batch is not None:
        force_batch = augment.augment_force_batch(
            force_batch, k_force, rotate=config.augment_rotation, max_translation=config.augment_translation
        )
    return batch, force_batch


def draw_stopping(config: BPTTConfig, stop_key: jax.Array):
    """(stop_rms Å, frame limit) of this batch: log-uniform and uniform draws, or (None, None)."""
    if not config.random_stopping:
        return None, None
    k1, k2 = jax.random.split(stop_key)
    lo, hi = jnp.log(config.stop_rms_range[0]), jnp.log(config.stop_rms_range[1])
    stop_rms = jnp.exp(jax.random.uniform(k1, (), minval=lo, maxval=hi))
    frame_limit = jax.random.randint(k2, (), config.frame_limit_range[0], config.frame_limit_range[1] + 1)
    return stop_rms, frame_limit


def _empty_weightless_rows(batch: RelaxationBatch) -> RelaxationBatch:
    """The batch with every weight-0 row emptied (no real atoms, zero positions and cell).

    A weight-0 row changes no loss value, but its rollout still runs: non-finite or exploding
    positions there would reach the gradient through ``0 * NaN`` even though the row is masked
    out of the mean. Emptying it first keeps padded rows out of gradients too."""
    real = batch.weight > 0
    s = batch.initial
    initial = s.replace(
        positions=jnp.where(real[:, None, None], s.positions, 0.0),
        mask=s.mask & real[:, None],
        cell=jnp.where(real[:, None, None], s.cell, 0.0),
    )
    target = jnp.where(real[:, None, None], batch.target_positions, 0.0)
    return batch.replace(initial=initial, target_positions=target)


def bptt_loss(
    params: Params,
    batch: RelaxationBatch,
    force_fn: ForceFn,
    step_rule: StepRule,
    config: BPTTConfig,
    key: jax.Array,
    force_batch: ForceBatch | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """``dq_weight`` x the weighted batch mean of Dq (or MSE) between the rollout end point and
    the reference, plus ``force_weight`` x the mean squared force error on ``force_batch``
    (required when ``config.force_weight > 0``).

    ``params``: ``{"model": ..., "step_rule": ...}``; ``step_rule`` turns forces into step sizes (with
    ``config.relaxer == "fire"`` the rollout is FIRE and ``params["step_rule"]`` gets a zero gradient).
    Returns ``(loss, aux)`` with per-batch diagnostics in ``aux`` (``endpoint_loss`` and, with a
    force batch, ``force_mse`` in (eV/Å)^2 are the two terms before weighting).
    """
    if config.force_weight and force_batch is None:
        raise ValueError("BPTTConfig.force_weight > 0 needs a force_batch of reference frames")
    noise_key, stop_key = jax.random.split(key)
    batch, force_batch = augment_batch(config, key, batch, force_batch)
    batch = _empty_weightless_rows(batch)
    stop_rms, frame_limit = draw_stopping(config, stop_key)
    if config.relaxer == "fire":
        result = fire_bptt.fire_rollout(force_fn, params["model"], batch.initial, config.fire, config.rollout)
    else:
        result = scan.rollout(
            force_fn, step_rule, params, batch.initial, config.modifiers, config.rollout,
            key=noise_key if config.modifiers.noise_std else None, stop_rms=stop_rms, frame_limit=frame_limit,
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


def apply_updates(optimizer, state: TrainState, grads, key) -> TrainState:
    """The state after one optimiser step on ``grads`` (step count + 1, the next PRNG ``key``)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=key)


def update_metrics(state: TrainState, grads, step_rule: StepRule | None = None) -> dict[str, jnp.ndarray]:
    """Metrics every trainer reports: gradient norm, the optimiser's non-finite counts, the step size (when scalar)."""
    metrics = {"grad_norm": optax.global_norm(grads), **optim.nonfinite_counts(state.opt_state)}
    eta = None if step_rule is None else step_rule.scalar_step_size(state.params["step_rule"])
    if eta is not None:
        metrics["eta"] = eta
    return metrics


def make_bptt_trainer(
    force_fn: ForceFn,
    step_rule: StepRule,
    config: BPTTConfig,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> Trainer:
    """BPTT fine-tuning: ``update(state, batch, force_batch=None) -> (state, metrics)`` takes
    gradients through every frame of the rollout of ``batch`` (a RelaxationBatch) and through the
    force term on ``force_batch`` (see :class:`BPTTConfig`).

    ``init(params, key)``: ``params = {"model": ..., "step_rule": step_rule.init(key)}``. A
    non-finite loss or gradient leaves the parameters unchanged (``optax.apply_if_finite``) and
    shows in ``metrics["nonfinite_total"]``. ``mesh``: data parallel (see the module docstring;
    both batch sizes must be divisible by the device count, pad with weight-0 rows if needed).
    """

    def bptt_update(state: TrainState, batch: RelaxationBatch, force_batch: ForceBatch | None = None):
        key, sub = jax.random.split(state.key)
        (loss, aux), grads = jax.value_and_grad(bptt_loss, has_aux=True)(
            state.params, batch, force_fn, step_rule, config, sub, force_batch
        )
        new_state = apply_updates(optimizer, state, grads, key)
        return new_state, {"loss": loss, **aux, **update_metrics(new_state, grads, step_rule)}

    return build_trainer(optimizer, bptt_update, mesh, jit, takes_force_batch=True)


def build_trainer(optimizer, update: Callable, mesh: Mesh | None, jit: bool, *, takes_force_batch: bool) -> Trainer:
    """``Trainer(init, update)``: ``init`` builds the optimiser state (replicated on ``mesh``);
    ``update`` is jitted, or sharded over ``mesh``, or left as it is."""
    mesh = None if mesh is None else parallel.one_d(mesh)

    def init(params: Params, key: jax.Array) -> TrainState:
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), key=key)
        return state if mesh is None else parallel.replicate_global(state, mesh)

    if mesh is None:
        return Trainer(init, jax.jit(update) if jit else update)
    return Trainer(init, ShardedUpdate(update, mesh, jit=jit, takes_force_batch=takes_force_batch))


class ShardedUpdate:
    """A data-parallel ``update(state, batch[, force_batch]) -> (state, metrics)``.

    Host or device batches are split over ``mesh`` along their leading axis (every process
    passing the same global batch; a batch already placed by ``parallel.shard_batch`` is used as
    it is); the state is expected replicated (``Trainer.init`` places it so) and the new state
    and metrics come back replicated. ``lower`` gives the jitted computation for inspection.
    """

    def __init__(self, update: Callable, mesh: Mesh, *, jit: bool = True, takes_force_batch: bool = True):
        rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        self.mesh = mesh
        self._one = (jax.jit(lambda state, batch: update(state, batch), in_shardings=(rep, shard),
                             out_shardings=(rep, rep)) if jit else update)
        self._with_forces = None
        if takes_force_batch:
            self._with_forces = (jax.jit(update, in_shardings=(rep, shard, shard), out_shardings=(rep, rep))
                                 if jit else update)

    def _place(self, batch):
        sharding = parallel.batch_sharding(self.mesh)
        if all(isinstance(x, jax.Array) and x.sharding == sharding for x in jax.tree_util.tree_leaves(batch)):
            return batch  # already placed (e.g. by shard_batch); its size was checked there
        return parallel.shard_global_batch(batch, self.mesh)

    def __call__(self, state: TrainState, batch: Any, force_batch: ForceBatch | None = None):
        batch = self._place(batch)
        if force_batch is None:
            return self._one(state, batch)
        if self._with_forces is None:
            raise ValueError("this update takes one batch (a pretraining update has no separate force batch)")
        return self._with_forces(state, batch, self._place(force_batch))

    def lower(self, state: TrainState, batch: Any, force_batch: ForceBatch | None = None):
        if force_batch is None:
            return self._one.lower(state, batch)
        return self._with_forces.lower(state, batch, force_batch)

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


def make_pretrain_trainer(
    train_force_fn: TrainForceFn,
    optimizer: optax.GradientTransformation,
    *,
    augment_rotation: bool = False,
    augment_translation: float = 0.0,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> Trainer:
    """Supervised force matching: ``update(state, force_batch) -> (state, metrics)``.

    ``train_force_fn(model_params, structures, key)`` may use ``key`` for dropout; only
    ``state.params["model"]`` is trained (``init(params, key)`` with ``params = {"model": ...,
    "step_rule": {}}``). ``augment_rotation`` / ``augment_translation`` (Å) move every frame by
    a random rigid motion (forces rotated with it) before the loss, see
    :mod:`bptt_mlip.training.augment`. ``mesh``: data parallel, as in :func:`make_bptt_trainer`.
    """

    def pretrain_update(state: TrainState, batch: ForceBatch):
        key, sub = jax.random.split(state.key)
        if augment_rotation or augment_translation:
            batch = augment.augment_force_batch(batch, jax.random.fold_in(sub, 2), rotate=augment_rotation,
                                                max_translation=augment_translation)

        def loss_fn(params):
            return force_loss(params["model"], batch, train_force_fn, sub)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = apply_updates(optimizer, state, grads, key)
        return new_state, {"loss": loss, **aux, **update_metrics(new_state, grads)}

    return build_trainer(optimizer, pretrain_update, mesh, jit, takes_force_batch=False)

def deterministic(force_fn: ForceFn) -> TrainForceFn:
    """Wrap a ``(params, structures)`` force function as a training one that ignores the key."""
    return lambda params, structures, key: force_fn(params, structures)
