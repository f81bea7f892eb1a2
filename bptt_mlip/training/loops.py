"""Force pretraining and BPTT fine-tuning: the training phases the experiment scripts call, each a
composition of a built train step with the one epoch loop of :mod:`bptt_mlip.training.loop`.

They take trajectories (numpy records from :mod:`bptt_mlip.data`), batch them with fixed shapes
per atom bucket (a run compiles one shape per bucket), and report through an optional
``log(phase, step, metrics)`` callback (phases ``"pretrain"``, ``"bptt"`` per epoch, ``"bptt_step"``
per update).

BPTT notes. Validation Dq runs before training and every ``eval_every_epochs`` epochs; the
best-validation parameters are returned (the last ones without validation data). Intermediate
starts (``start_stride``) take every ``start_stride``-th stored frame of a training trajectory as a
start, its last frame as the target. The force term draws its frames with
``batching.FrameSampler``, a pure function of seed and update count. Data parallel (``mesh``): every
batch is split over the devices, the state replicated, validation and checkpoints use host copies;
results equal one device up to float32 summation order. Non-finite gradients skip the update and are
counted (``skipped`` per update in the log, ``skipped_steps`` and ``nonfinite_total`` per epoch).
Checkpoints (every ``checkpoint_every`` updates and at epoch ends, only right after good updates)
hold the TrainState, the best parameters and the loop's progress; ``resume`` goes on from the newest
good one (a corrupt one is reported and the one before used), bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax

from bptt_mlip import progress
from bptt_mlip.training import evaluate
from bptt_mlip.training import loop
from bptt_mlip.training import optim
from bptt_mlip.training import parallel
from bptt_mlip.relax.step_rules import StepRule
from bptt_mlip.training import implicit_steps, steps
from bptt_mlip.data import batching
from bptt_mlip.data.trajectory import Trajectory
from bptt_mlip.types import ForceFn, Params, TrainForceFn

LogFn = loop.LogFn
_no_log = loop.no_log
to_float = loop.to_float
_best_val_epoch = loop.best_epoch  # the epoch of the best validation Dq in a history

PRETRAIN_NAMES = loop.PhaseNames("pretrain", bar="pretrain epoch", bar_metric="force_rmse")
BPTT_NAMES = loop.PhaseNames("bptt", step_log="bptt_step", bar="BPTT epoch")


def _host_copy(mesh) -> Callable[[Any], Any]:
    """How a loop hands its (replicated, when ``mesh`` is given) state to evaluation and saving."""
    return (lambda tree: tree) if mesh is None else parallel.fetch


def pretrain(
    train_force_fn: TrainForceFn,
    force_fn: ForceFn,
    model_params: Params,
    train_trajs: Sequence[Trajectory],
    val_trajs: Sequence[Trajectory],
    *,
    epochs: int,
    batch_size: int,
    optim_config: optim.OptimConfig,
    seed: int = 0,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
    log: LogFn = _no_log,
    augment_rotation: bool = False,
    augment_translation: float = 0.0,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[Params, list[dict]]:
    """Supervised force pretraining on every frame; returns the parameters with the best
    validation force RMSE (or the last, without validation data) and per-epoch history.
    ``augment_*``: random rigid motions of the training frames (validation is not augmented).
    ``mesh``: data-parallel over its devices (:mod:`bptt_mlip.parallel`; ``batch_size`` must be
    divisible by the device count); the returned parameters are host (numpy) arrays then."""
    if mesh is not None:
        parallel.check_batch_size(batch_size, mesh)
    trainer = steps.make_pretrain_trainer(train_force_fn, optim.make_optimizer(optim_config), mesh=mesh,
                                          augment_rotation=augment_rotation, augment_translation=augment_translation)
    state = trainer.init({"model": model_params, "step_rule": {}}, jax.random.PRNGKey(seed))
    validation = None
    if val_trajs:
        validation = loop.Validation(lambda p: evaluate.evaluate_forces(
            force_fn, p, batching.force_batches(val_trajs, batch_size, buckets=buckets)), "force_rmse")
    sizes = [t.num_atoms for t in train_trajs for _ in range(t.num_frames)]

    def epoch_batches(epoch: int):  # the order is a pure function of seed and epoch
        return batching.force_batches(train_trajs, batch_size, buckets=buckets,
                                      shuffle_key_or_seed=seed * 100_003 + epoch, drop_remainder=False)

    _, run = loop.run_epochs(
        trainer.update, state, epoch_batches, epochs=epochs,
        batches_per_epoch=progress.count_batches(sizes, batch_size, buckets), names=PRETRAIN_NAMES, best=model_params,
        validation=validation, select=lambda p: p["model"], host=_host_copy(mesh), log=log)
    return run.best.params, run.history


def bptt_finetune(
    force_fn: ForceFn,
    step_rule: StepRule,
    params: Params,
    train_trajs: Sequence[Trajectory],
    val_trajs: Sequence[Trajectory],
    *,
    bptt_config: steps.BPTTConfig,
    optim_config: optim.OptimConfig,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
    eval_every_epochs: int = 1,
    log: LogFn = _no_log,
    on_epoch_end: Callable[[int, steps.TrainState, dict], None] | None = None,
    max_consecutive_bad_steps: int = 10,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    max_checkpoints: int | None = 3,
    report: Callable[[str], None] = print,
    start_stride: int = 0,
    force_batch_size: int = 32,
    patience: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    gradient_config: implicit_steps.GradientConfig | None = None,
) -> tuple[Params, list[dict], steps.TrainState]:
    """BPTT fine-tuning; returns (best-validation params, history, final host state); see the module notes.

    ``gradient_config``: implicit or guided gradients instead of BPTT through every frame
    (:mod:`bptt_mlip.training.implicit_steps`; its ``bptt`` field is replaced by ``bptt_config``); None = BPTT.

    ``start_stride > 0``: rollouts also start from every ``start_stride``-th frame; ``bptt_config.force_weight
    > 0``: a force term on ``force_batch_size`` frames per update; ``patience > 0``: early stopping on validation
    Dq. More than ``max_consecutive_bad_steps`` non-finite updates in a row raise :class:`loop.TrainingStopped`.
    """
    _check_counts(epochs=epochs, checkpoint_every=checkpoint_every, start_stride=start_stride, patience=patience)
    sampler = (batching.FrameSampler(train_trajs, force_batch_size, seed=seed, buckets=buckets)
               if bptt_config.force_weight else None)
    if mesh is not None:
        parallel.check_batch_size(batch_size, mesh)
        if sampler is not None:
            parallel.check_batch_size(force_batch_size, mesh)
    trainer = _fine_tuning_trainer(force_fn, step_rule, bptt_config, gradient_config, optim_config, mesh)
    state = trainer.init(params, jax.random.PRNGKey(seed))
    identity = _run_identity(seed, batch_size, train_trajs, val_trajs, start_stride,
                             force_batch_size if sampler is not None else 0)
    if bptt_config.relaxer != "frame":  # a resume must not switch relaxer or gradient method
        identity.update(relaxer=steps.RELAXERS.index(bptt_config.relaxer))
    if gradient_config is not None and gradient_config.gradient != "bptt":
        identity.update(gradient=implicit_steps.GRADIENTS.index(gradient_config.gradient),
                        unroll_frames=int(gradient_config.unroll_frames))
    checkpointer = _checkpointer(checkpoint_dir, checkpoint_every, max_checkpoints, identity)
    state, run = loop.start_or_resume(state, params, checkpointer if resume else None, epochs=epochs, report=report)
    if mesh is not None:
        state = parallel.replicate_global(state, mesh)
    epoch_batches, batches_per_epoch = _relaxation_epochs(train_trajs, batch_size, buckets, seed, start_stride)
    state, run = loop.run_epochs(
        trainer.update, state, epoch_batches, epochs=epochs, batches_per_epoch=batches_per_epoch, names=BPTT_NAMES,
        best=params, progress=run, host=_host_copy(mesh), force_batches=sampler, checkpointer=checkpointer,
        validation=_dq_validation(force_fn, step_rule, val_trajs, bptt_config, batch_size, buckets,
                                  eval_every_epochs),
        guard=loop.NonFiniteGuard(max_consecutive_bad_steps), row_extras=_diverged_rollouts,
        early_stopping=loop.EarlyStopping(patience) if patience and val_trajs else None,
        log=log, report=report, on_epoch_end=on_epoch_end)
    return run.best.params, run.history, _host_copy(mesh)(state)


def _fine_tuning_trainer(force_fn, step_rule, bptt_config, gradient_config, optim_config, mesh) -> steps.Trainer:
    """The BPTT trainer, or the one of ``gradient_config`` (whose ``"bptt"`` is the BPTT trainer too)."""
    optimizer = optim.make_optimizer(optim_config)
    if gradient_config is None:
        return steps.make_bptt_trainer(force_fn, step_rule, bptt_config, optimizer, mesh=mesh)
    config = dataclasses.replace(gradient_config, bptt=bptt_config)
    return implicit_steps.make_implicit_trainer(force_fn, step_rule, config, optimizer, mesh=mesh)


def _check_counts(**counts: int) -> None:
    """Epoch, checkpoint-interval, start-stride and patience counts must not be negative."""
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _checkpointer(directory: str | os.PathLike | None, every: int, max_to_keep: int | None,
                  identity: dict[str, int]) -> loop.Checkpointer | None:
    return None if directory is None else loop.Checkpointer(directory, every, max_to_keep, identity)


def _run_identity(seed: int, batch_size: int, train_trajs: Sequence, val_trajs: Sequence, start_stride: int,
                  force_batch_size: int) -> dict[str, int]:
    """The settings that fix the batch order (and the force batches): a resumed run must share them."""
    return {"seed": int(seed), "batch_size": int(batch_size), "num_train": len(train_trajs), "num_val": len(val_trajs),
            "start_stride": int(start_stride), "force_batch_size": int(force_batch_size)}


def _relaxation_epochs(
    trajs: Sequence[Trajectory], batch_size: int, buckets: Sequence[int], seed: int, start_stride: int
) -> tuple[Callable[[int], Any], int]:
    """``(epoch_batches(epoch), batches per epoch)`` of relaxation batches: first frames only, or with
    ``start_stride > 0`` also every ``start_stride``-th frame as a start; the order is a pure function of
    seed and epoch."""

    def epoch_batches(epoch: int):
        order = seed * 100_003 + epoch
        if start_stride:
            return batching.intermediate_relaxation_batches(
                trajs, batch_size, start_stride, buckets=buckets, shuffle_key_or_seed=order)
        return batching.relaxation_batches(trajs, batch_size, buckets=buckets, shuffle_key_or_seed=order)

    if start_stride:
        sizes = [t.num_atoms for t in trajs for _ in batching.intermediate_start_pairs(t, start_stride)]
    else:
        sizes = [t.num_atoms for t in trajs]
    return epoch_batches, progress.count_batches(sizes, batch_size, buckets)


def _dq_validation(
    force_fn: ForceFn, step_rule: StepRule, val_trajs: Sequence[Trajectory],
    bptt_config: steps.BPTTConfig, batch_size: int, buckets: Sequence[int], every_epochs: int,
) -> loop.Validation | None:
    """Mean Dq (Å amu^1/2) of relaxing the validation trajectories with the training rollout's
    settings, without rematerialisation; None without validation data."""
    if not val_trajs:
        return None
    rollout = dataclasses.replace(bptt_config.rollout, remat="none", return_trajectory=False)

    def summary(params: Params) -> dict[str, float]:
        if bptt_config.relaxer == "fire":  # chosen by the relaxation it is trained for
            return evaluate.fire_table(force_fn, params["model"], val_trajs, bptt_config.fire, batch_size=batch_size,
                                       buckets=buckets)[0]
        batches = batching.relaxation_batches(val_trajs, batch_size, buckets=buckets)
        per = evaluate.evaluate_relaxations(force_fn, step_rule, params, batches, bptt_config.modifiers, rollout)
        return evaluate.summarize(per)

    return loop.Validation(summary, "mean_dq", every_epochs=every_epochs, at_start=True)


def _diverged_rollouts(state: steps.TrainState, metrics: loop.EpochMetrics) -> dict[str, int]:
    """Training rollouts of the epoch's good updates that diverged."""
    return {"diverged_rollouts": int(metrics.sums.get("diverged", 0.0))}


def __getattr__(name: str):
    """``normalizer_from_trajectories`` lived here before the regrouping; it is a force-model function now."""
    if name == "normalizer_from_trajectories":
        from bptt_mlip import _moved
        from bptt_mlip.models import adapt

        _moved.warn_moved(f"{__name__}.{name}", f"bptt_mlip.models.adapt.{name}")
        return adapt.normalizer_from_trajectories
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
