"""Epoch loops that compose the pure steps: force pretraining, grid search over a dataset,
BPTT fine-tuning with validation and best-checkpoint selection.

These are the host-side loops the experiment scripts call. They take trajectories (numpy
records from :mod:`bptt_mlip.data`), batch them with fixed shapes per atom bucket (a run
compiles one shape per bucket), and report through an optional ``log(step, metrics)`` callback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import losses, progress
from bptt_mlip.training import evaluate
from bptt_mlip.training import optim
from bptt_mlip.training import parallel
from bptt_mlip.relax import scan as relax
from bptt_mlip.relax import grid as search
from bptt_mlip.training import steps as train
from bptt_mlip.data import batching
from bptt_mlip.data.trajectory import Trajectory
from bptt_mlip.models.adapt import AdaptConfig, Normalizer, fit_normalizer
from bptt_mlip import descriptors
from bptt_mlip.types import ForceFn, Params, TrainForceFn

LogFn = Callable[[str, int, dict], None]


def _no_log(phase: str, step: int, metrics: dict) -> None:
    return None


def normalizer_from_trajectories(trajs: Sequence[Trajectory]) -> Normalizer:
    """Fit input and force statistics over every frame of the training trajectories."""
    pos, feat, frc = [], [], []
    for t in trajs:
        if t.forces is None:
            raise ValueError(f"{t.where()}: no forces; force statistics need them")
        f = descriptors.element_features(t.species)
        pos.append(t.positions.reshape(-1, 3))
        feat.append(np.broadcast_to(f, (t.num_frames,) + f.shape).reshape(-1, f.shape[-1]))
        frc.append(t.forces.reshape(-1, 3))
    p, ft, fr = np.concatenate(pos), np.concatenate(feat), np.concatenate(frc)
    return fit_normalizer(p, ft, fr, np.ones(p.shape[0], bool))


def _host_copy(mesh) -> Callable[[Any], Any]:
    """How a loop hands its (replicated, when ``mesh`` is given) state to evaluation and saving."""
    return (lambda tree: tree) if mesh is None else parallel.fetch


def to_float(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


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
    tx = optim.make_optimizer(optim_config)
    state = train.create_train_state({"model": model_params, "step": {}}, tx, jax.random.PRNGKey(seed))
    kwargs = dict(augment_rotation=augment_rotation, augment_translation=augment_translation)
    if mesh is None:
        step = train.make_pretrain_step(train_force_fn, tx, **kwargs)
    else:
        parallel.check_batch_size(batch_size, mesh)
        step = parallel.make_sharded_pretrain_step(train_force_fn, tx, mesh, **kwargs)
        state = parallel.replicate_global(state, mesh)
    host = _host_copy(mesh)
    history, best, best_rmse = [], model_params, math.inf
    total = progress.count_batches([t.num_atoms for t in train_trajs for _ in range(t.num_frames)], batch_size, buckets)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        sums, n = {}, 0
        bar = progress.Progress(total, f"pretrain epoch {epoch + 1}/{epochs}")
        for batch in batching.force_batches(
            train_trajs, batch_size, buckets=buckets, shuffle_key_or_seed=seed * 100_003 + epoch, drop_remainder=False
        ):
            state, m = step(state, batch)
            for k, v in to_float(m).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.update(force_rmse=sums["force_rmse"] / n)
        bar.close()
        row = {"epoch": epoch + 1, **{f"train_{k}": v / max(n, 1) for k, v in sums.items()}}
        if val_trajs:
            current = host(state.params["model"])
            ev = evaluate.evaluate_forces(force_fn, current, batching.force_batches(val_trajs, batch_size, buckets=buckets))
            row.update({f"val_{k}": v for k, v in ev.items()})
            if ev["force_rmse"] < best_rmse:
                best_rmse, best = ev["force_rmse"], current
        else:
            best = host(state.params["model"])
        row["epoch_s"] = time.perf_counter() - t0
        history.append(row)
        log("pretrain", epoch + 1, row)
    return best, history


def grid_search(
    force_fn: ForceFn,
    model_params: Params,
    trajs: Sequence[Trajectory],
    step_sizes: Sequence[float],
    rollout_config: relax.RolloutConfig,
    *,
    batch_size: int,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Dq of every trajectory at every fixed step size; one compiled vmapped call per batch.

    Returns ``{"step_sizes": [S], "dq": [S, n], "mean_dq": [S], "converged": [S, n], "frames": [S, n],
    "diverged": [S, n]}`` (trajectories in batch order).
    """
    fn = search.make_grid_search(force_fn, rollout_config, chunk_size=chunk_size)
    etas = jnp.asarray(step_sizes, jnp.float32)
    cols: dict[str, list] = {}
    bar = progress.Progress(progress.count_batches([t.num_atoms for t in trajs], batch_size, buckets),
                            f"grid search ({len(step_sizes)} step sizes)")
    for batch in batching.relaxation_batches(trajs, batch_size, buckets=buckets):
        res = fn(model_params, batch, etas)
        bar.update()
        real = np.asarray(batch.weight) > 0
        for k in ("dq", "converged", "num_frames", "diverged"):
            cols.setdefault(k, []).append(np.asarray(getattr(res, k))[:, real])
    bar.close()
    out = {k: np.concatenate(v, axis=1) for k, v in cols.items()}
    out["frames"] = out.pop("num_frames")
    out["step_sizes"] = np.asarray(step_sizes, np.float64)
    with np.errstate(invalid="ignore"):
        out["mean_dq"] = np.where(np.all(np.isfinite(out["dq"]), axis=1), out["dq"].mean(axis=1), np.inf)
    return out


def _float_str(x: float) -> str:
    return repr(float(x))


def bptt_finetune(
    force_fn: ForceFn,
    step_size_fn: relax.StepSizeFn,
    params: Params,
    train_trajs: Sequence[Trajectory],
    val_trajs: Sequence[Trajectory],
    *,
    bptt_config: train.BPTTConfig,
    optim_config: optim.OptimConfig,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
    eval_every_epochs: int = 1,
    log: LogFn = _no_log,
    on_epoch_end: Callable[[int, train.TrainState, dict], None] | None = None,
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
) -> tuple[Params, list[dict], train.TrainState]:
    """BPTT fine-tuning; validation Dq after each epoch; returns (best-validation params,
    history, final state). Without validation data the last parameters are returned.

    Regularisers (issue 9): ``start_stride > 0`` starts rollouts also from every
    ``start_stride``-th stored frame of each training trajectory (target: its last frame);
    ``bptt_config.force_weight > 0`` adds the force term on ``force_batch_size`` reference
    frames drawn per step from the training trajectories (``batching.FrameSampler``, a pure
    function of seed and step); ``patience > 0`` stops early once the validation Dq has not
    improved for that many validations (the best-validation parameters are returned).

    Data parallel (``mesh`` given, see :mod:`bptt_mlip.parallel`): every batch (and force
    batch) is split over the mesh's devices, the state is replicated, validation and
    checkpoints use host copies, and the results equal the single-device run up to float32
    summation order. ``batch_size`` (and ``force_batch_size``) must be divisible by the device
    count. Multi-host: every process runs this with the same data and seed.

    Non-finite gradients skip the update and are counted (per step ``skipped`` in the log, per
    epoch ``skipped_steps`` and the running ``nonfinite_total`` in the history); more than
    ``max_consecutive_bad_steps`` in a row stop training with a RuntimeError that keeps the
    best parameters seen so far in its ``args[1]``.

    Checkpoints (``checkpoint_dir`` given): the full TrainState, the best-validation parameters
    and, as JSON, the epoch, the number of batches done in it, the partial epoch sums, the best
    validation value and the history, every ``checkpoint_every`` steps (0 = only at epoch ends)
    and after every epoch; steps right after a skipped (non-finite) update are not saved, so the
    newest checkpoint is always a good one. With ``resume`` the newest good checkpoint is
    restored (a corrupt one is reported and the one before used) and training goes on from the
    next batch: the batch order of an epoch is a pure function of ``seed`` and the epoch, so the
    batches already done are skipped, and the result is bit-identical to an uninterrupted run.
    """
    from bptt_mlip.training import checkpoint as ckpt

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if start_stride < 0 or patience < 0:
        raise ValueError(f"start_stride={start_stride} and patience={patience} must be >= 0")
    sampler = (batching.FrameSampler(train_trajs, force_batch_size, seed=seed, buckets=buckets)
               if bptt_config.force_weight else None)

    def epoch_batches(epoch):
        order = seed * 100_003 + epoch
        if start_stride:
            return batching.intermediate_relaxation_batches(
                train_trajs, batch_size, start_stride, buckets=buckets, shuffle_key_or_seed=order)
        return batching.relaxation_batches(train_trajs, batch_size, buckets=buckets, shuffle_key_or_seed=order)

    if start_stride:
        item_sizes = [t.num_atoms for t in train_trajs for _ in batching.intermediate_start_pairs(t, start_stride)]
    else:
        item_sizes = [t.num_atoms for t in train_trajs]
    tx = optim.make_optimizer(optim_config)
    state = train.create_train_state(params, tx, jax.random.PRNGKey(seed))
    if mesh is None:
        step = train.make_bptt_step(force_fn, step_size_fn, bptt_config, tx)
    else:
        parallel.check_batch_size(batch_size, mesh)
        if sampler is not None:
            parallel.check_batch_size(force_batch_size, mesh)
        step = parallel.make_sharded_bptt_step(force_fn, step_size_fn, bptt_config, tx, mesh)
    host = _host_copy(mesh)
    rollout_eval = dataclasses.replace(bptt_config.rollout, remat="none", return_trajectory=False)
    history: list[dict] = []
    best, best_val = params, math.inf
    identity = {"seed": int(seed), "batch_size": int(batch_size), "num_train": len(train_trajs),
                "num_val": len(val_trajs), "start_stride": int(start_stride),
                "force_batch_size": int(force_batch_size) if sampler is not None else 0}

    def validate(p):
        per = evaluate.evaluate_relaxations(
            force_fn, step_size_fn, host(p), batching.relaxation_batches(val_trajs, batch_size, buckets=buckets),
            bptt_config.step, rollout_eval,
        )
        return evaluate.summarize(per)

    def save(global_step, epoch, batches_done, sums, n):
        if checkpoint_dir is None:
            return
        meta = {
            **identity, "epoch": epoch, "batch_in_epoch": batches_done, "global_step": global_step,
            "epoch_sums": {k: _float_str(v) for k, v in sums.items()}, "epoch_n": n,
            "best_val": _float_str(best_val), "history_json": json.dumps(history),
        }
        ckpt.save_training_checkpoint(checkpoint_dir, global_step, host(state), {"best": best}, meta,
                                      max_to_keep=max_checkpoints)

    start_epoch, skip, global_step, sums, n = 0, 0, 0, {}, 0
    restored = None
    if resume and checkpoint_dir is not None:
        restored = ckpt.restore_training_checkpoint(checkpoint_dir, state, {"best": params}, report=report)
        if restored is None:
            report(f"no usable BPTT checkpoint in {checkpoint_dir}; starting BPTT from the beginning")
    if restored is not None:
        ck_step, state, trees, meta = restored
        for k, v in identity.items():
            if meta.get(k) != v:
                raise ValueError(
                    f"checkpoint step {ck_step} in {checkpoint_dir} was written with {k}={meta.get(k)}, this run has "
                    f"{k}={v}; resume with the same settings or start a new run"
                )
        best = trees["best"]
        best_val = float(meta["best_val"])
        history = json.loads(meta["history_json"])
        start_epoch, skip, global_step = int(meta["epoch"]), int(meta["batch_in_epoch"]), int(meta["global_step"])
        sums, n = {k: float(v) for k, v in meta["epoch_sums"].items()}, int(meta["epoch_n"])
        report(f"resuming BPTT from checkpoint step {ck_step}: epoch {start_epoch + 1} of {epochs}, "
               f"{skip} batches of it done")
    if restored is None and val_trajs:
        v0 = validate(params)
        best_val = v0["mean_dq"]
        history.append({"epoch": 0, **{f"val_{k}": v for k, v in v0.items()}})
        log("bptt", 0, history[-1])
    if mesh is not None:
        state = parallel.replicate_global(state, mesh)
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        if epoch != start_epoch:
            sums, n, skip = {}, 0, 0
        bar = progress.Progress(progress.count_batches(item_sizes, batch_size, buckets),
                                f"BPTT epoch {epoch + 1}/{epochs}")
        for i, batch in enumerate(epoch_batches(epoch)):
            bar.update()
            if i < skip:  # done before the interruption
                continue
            state, m = step(state, batch, None if sampler is None else sampler(global_step))
            m = to_float(m)
            m["skipped"] = float(m["nonfinite_consecutive"] > 0)
            global_step += 1
            log("bptt_step", global_step, m)
            if m["nonfinite_consecutive"] > max_consecutive_bad_steps:
                raise RuntimeError(
                    f"BPTT stopped: {int(m['nonfinite_consecutive'])} consecutive non-finite gradients at step "
                    f"{global_step} (more than max_consecutive_bad_steps={max_consecutive_bad_steps}); keeping the "
                    f"best parameters (validation Dq {best_val:.4g})"
                    + (f" and the last good checkpoint in {checkpoint_dir}" if checkpoint_dir is not None else ""),
                    best,
                )
            if m["skipped"]:  # left out of the epoch averages, counted
                sums["skipped"] = sums.get("skipped", 0.0) + 1.0
            else:
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
            if checkpoint_every and global_step % checkpoint_every == 0 and not m["skipped"]:
                save(global_step, epoch, i + 1, sums, n)
        bar.close()
        row = {"epoch": epoch + 1, **{f"train_{k}": v / max(n, 1) for k, v in sums.items() if k != "skipped"}}
        row["nonfinite_total"] = float(optim.nonfinite_counts(state.opt_state)["nonfinite_total"])
        row["skipped_steps"] = int(sums.get("skipped", 0.0))
        row["diverged_rollouts"] = int(sums.get("diverged", 0.0))
        if val_trajs and ((epoch + 1) % eval_every_epochs == 0 or epoch + 1 == epochs):
            v = validate(state.params)
            row.update({f"val_{k}": x for k, x in v.items()})
            if np.isfinite(v["mean_dq"]) and v["mean_dq"] < best_val:
                best_val, best = v["mean_dq"], host(state.params)
        elif not val_trajs:
            best = host(state.params)
        row["epoch_s"] = time.perf_counter() - t0
        history.append(row)
        log("bptt", epoch + 1, row)
        if not float(optim.nonfinite_counts(state.opt_state)["nonfinite_consecutive"]):
            save(global_step, epoch + 1, 0, {}, 0)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, host(state), row)
        if patience and val_trajs:
            since = epoch + 1 - _best_val_epoch(history)
            if since >= patience:
                report(f"early stopping after epoch {epoch + 1}: validation Dq has not improved for {since} "
                       f"epochs (best {best_val:.4g}, patience {patience})")
                break
    return best, history, host(state)


def _best_val_epoch(history: Sequence[dict]) -> int:
    """The epoch (0 = before training) with the lowest finite validation mean Dq."""
    scored = [(h["val_mean_dq"], h["epoch"]) for h in history
              if "val_mean_dq" in h and np.isfinite(h["val_mean_dq"])]
    return min(scored)[1] if scored else 0


def fire_table(
    force_fn: ForceFn,
    model_params: Params,
    trajs: Sequence[Trajectory],
    fire_config,
    *,
    batch_size: int,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
) -> tuple[dict, dict]:
    """(summary, per-structure arrays) of relaxing ``trajs`` with FIRE (ASE semantics) on the model's forces."""
    from bptt_mlip.relax import fire

    @jax.jit
    def run(p, batch):
        s = batch.initial
        ff = lambda x: force_fn(p, s.replace(positions=x))
        st, _ = fire.fire_relax(ff, s.positions, s.mask, fire_config)
        return {
            "dq": losses.delta_q(st.positions, batch.target_positions, s.masses, s.mask),
            "dq_initial": losses.delta_q(s.positions, batch.target_positions, s.masses, s.mask),
            "frames": st.n_steps,
            "converged": st.converged,
            "diverged": ~jnp.all(jnp.isfinite(st.positions), axis=(-1, -2)),
        }

    out: dict[str, list] = {}
    for batch in batching.relaxation_batches(trajs, batch_size, buckets=buckets):
        res = run(model_params, batch)
        real = np.asarray(batch.weight) > 0
        for k, v in res.items():
            out.setdefault(k, []).append(np.asarray(v)[real])
    per = {k: np.concatenate(v) for k, v in out.items()}
    return evaluate.summarize(per), per


def relaxation_table(
    force_fn: ForceFn,
    step_size_fn: relax.StepSizeFn,
    params: Params,
    trajs: Sequence[Trajectory],
    step_config: relax.StepConfig,
    rollout_config: relax.RolloutConfig,
    *,
    batch_size: int,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
) -> tuple[dict, dict]:
    """(summary, per-structure arrays) of relaxing ``trajs`` with the given model and step rule."""
    per = evaluate.evaluate_relaxations(
        force_fn, step_size_fn, params, batching.relaxation_batches(trajs, batch_size, buckets=buckets),
        step_config, rollout_config,
    )
    return evaluate.summarize(per), per
