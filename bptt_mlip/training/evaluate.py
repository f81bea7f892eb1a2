"""Evaluation over many batches: per-structure Dq of relaxations and force errors, and the
tables the experiments print (fixed-step grid over trajectories, FIRE, a step rule).

Results are numpy arrays over the real structures only (padding rows removed, see
:func:`per_structure`). Diverged relaxations are never silently averaged: :func:`summarize`
reports their count and the mean over the rest as well as over all. ``diverged`` covers both the
rollout's own per-frame checks and end points that are physically runaways (:func:`with_runaways`).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import losses, progress
from bptt_mlip.data import batching
from bptt_mlip.data.trajectory import Trajectory
from bptt_mlip.relax import fire, forward
from bptt_mlip.relax import grid
from bptt_mlip.relax import runaway
from bptt_mlip.relax import scan
from bptt_mlip.relax.step_rules import StepRule
from bptt_mlip.structures import ForceBatch, RelaxationBatch
from bptt_mlip.types import ForceFn, Params

BatchFn = Callable[[int, "RelaxationBatch | ForceBatch"], dict]


def real_rows(
    run: BatchFn, batches: Iterable, *, axis: int = 0, bar: progress.Progress | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Call ``run(i, batch) -> {name: array}`` on each batch; yield the arrays without padding rows.

    ``axis`` is the structure axis of every array ([B] per structure: 0; [S, B]: 1). A row is
    padding when ``batch.weight`` is 0. ``bar`` (optional) advances once per batch.
    """
    for i, batch in enumerate(batches):
        res = run(i, batch)
        if bar is not None:
            bar.update()
        real = np.asarray(batch.weight) > 0
        yield {k: np.compress(real, np.asarray(v), axis=axis) for k, v in res.items()}


def per_structure(
    run: BatchFn, batches: Iterable, *, axis: int = 0, bar: progress.Progress | None = None
) -> dict[str, np.ndarray]:
    """:func:`real_rows` concatenated along ``axis``: one array per name over every real structure."""
    out: dict[str, list] = {}
    for res in real_rows(run, batches, axis=axis, bar=bar):
        for k, v in res.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=axis) for k, v in out.items()}


@functools.lru_cache(maxsize=64)
def make_relax_eval(
    force_fn: ForceFn,
    step_rule: StepRule,
    modifiers: scan.FrameModifiers,
    rollout_config: scan.RolloutConfig,
):
    """A jitted ``fn(params, batch, key) -> dict`` of per-structure Dq, frames, flags and end ``positions``
    [B, N, 3] Å for one batch (:func:`with_runaways` turns the positions into the runaway flags).

    Cached on its (hashable) arguments, so repeated evaluations with the same force function
    and configs (validation after every epoch) reuse one compiled function per batch shape.
    """

    @jax.jit
    def run(params, batch: RelaxationBatch, key):
        s = batch.initial
        res = forward.relax_forward(force_fn, step_rule, params, s, modifiers, rollout_config,
                                    key=key if modifiers.noise_std else None)
        return {
            "dq": losses.delta_q(res.positions, batch.target_positions, s.masses, s.mask),
            "dq_initial": losses.delta_q(s.positions, batch.target_positions, s.masses, s.mask),
            "mse": losses.position_mse(res.positions, batch.target_positions, s.mask),
            "largest_atom_error": losses.largest_atom_distance(res.positions, batch.target_positions, s.mask),
            "num_frames": res.num_frames,
            "converged": res.converged,
            "diverged": res.diverged,
            "positions": res.positions,
        }

    return run


def with_runaways(out: dict, structures) -> dict:
    """One batch's results ``out`` with the end ``positions`` [B, N, 3] Å taken out and judged against
    the start (``structures``, the batch's initial :class:`~bptt_mlip.structures.Structures`) by
    :func:`bptt_mlip.relax.runaway.end_point_runaways`: two atoms in contact, an atom moved more than
    5 Å over the whole run, or non-finite positions. ``runaway`` [B] holds that flag; ``diverged`` is
    OR-ed with it and ``converged`` cleared by it, because the rollout's per-frame checks (and FIRE's
    finiteness test) pass such end points: atoms pulled onto each other "converge" there, and atoms
    flown tens of Å away stay finite, yet neither is a relaxed structure."""
    out = {k: np.asarray(v) for k, v in out.items()}
    end = out.pop("positions")
    flags, _ = runaway.end_point_runaways(np.asarray(structures.positions), end, np.asarray(structures.species),
                                          np.asarray(structures.cell), np.asarray(structures.mask))
    out.update(runaway=flags, diverged=out["diverged"].astype(bool) | flags,
               converged=out["converged"].astype(bool) & ~flags)
    return out


def evaluate_relaxations(
    force_fn: ForceFn,
    step_rule: StepRule,
    params: Params,
    batches: Iterable[RelaxationBatch],
    modifiers: scan.FrameModifiers = scan.FrameModifiers(),
    rollout_config: scan.RolloutConfig = scan.RolloutConfig(),
    *,
    key: jax.Array | None = None,
) -> dict[str, np.ndarray]:
    """Relax every batch; per-structure ``dq``, ``dq_initial``, ``mse``, ``num_frames``, ``converged``,
    ``diverged`` (runaway end points included) and ``runaway`` (see :func:`with_runaways`) over the real
    rows (batch ``i`` draws its step noise from ``fold_in(key, i)``)."""
    run = make_relax_eval(force_fn, step_rule, modifiers, rollout_config)
    key = jax.random.PRNGKey(0) if key is None else key
    return per_structure(lambda i, batch: with_runaways(run(params, batch, jax.random.fold_in(key, i)), batch.initial),
                         batches)


def summarize(per_structure: dict[str, np.ndarray]) -> dict[str, float]:
    """Means of an :func:`evaluate_relaxations` result, with diverged runs counted, not hidden."""
    dq = per_structure["dq"]
    diverged = per_structure["diverged"].astype(bool)
    finite = np.isfinite(dq)
    ok = finite & ~diverged
    return {
        "num_structures": int(dq.size),
        "mean_dq": float(np.mean(dq[finite])) if finite.any() else float("nan"),
        "mean_dq_not_diverged": float(np.mean(dq[ok])) if ok.any() else float("nan"),
        "median_dq": float(np.median(dq[finite])) if finite.any() else float("nan"),
        "mean_dq_initial": float(np.mean(per_structure["dq_initial"])),
        "mean_frames": float(np.mean(per_structure["num_frames"])),
        "num_converged": int(np.sum(per_structure["converged"])),
        "num_diverged": int(np.sum(diverged)),
        "num_nonfinite": int(np.sum(~finite)),
        **basin_fractions(per_structure),
    }


BASIN_THRESHOLDS = (0.05, 0.1, 0.2)  # Å


def basin_fractions(per_structure: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of relaxations that ended in the reference basin: every atom within ``d`` Å of its reference
    relaxed position (``largest_atom_error`` < d) and not diverged, for d in :data:`BASIN_THRESHOLDS`
    (0.1 Å the headline; keys ``basin_0.05``, ``basin_0.1``, ``basin_0.2``), and the mean frames (or FIRE
    steps) of the relaxations that converged (``mean_frames_converged``, NaN when none did). Empty when
    the results hold no ``largest_atom_error``."""
    if "largest_atom_error" not in per_structure:
        return {}
    error = np.asarray(per_structure["largest_atom_error"], np.float64)
    ok = np.isfinite(error) & ~np.asarray(per_structure["diverged"]).astype(bool)
    out = {f"basin_{d:g}": float(np.mean(ok & (error < d))) if error.size else float("nan") for d in BASIN_THRESHOLDS}
    converged = np.asarray(per_structure["converged"]).astype(bool)
    frames = np.asarray(per_structure["num_frames"], np.float64)
    out["mean_frames_converged"] = float(frames[converged].mean()) if converged.any() else float("nan")
    return out


@functools.partial(jax.jit, static_argnums=0)
def _force_errors(force_fn: ForceFn, params: Params, batch: ForceBatch):
    s = batch.structures
    pred = force_fn(params, s)
    return {
        "sq": losses.force_squared_error(pred, batch.forces, s.mask),
        "abs": jnp.sum(jnp.where(s.mask[..., None], jnp.abs(pred - batch.forces), 0.0), axis=(-1, -2)),
        "l2": losses.force_l2_error(pred, batch.forces, s.mask),
        "zero_sq": losses.force_squared_error(jnp.zeros_like(pred), batch.forces, s.mask),
        "count": jnp.sum(s.mask, axis=-1) * 3,
    }


def evaluate_forces(force_fn: ForceFn, model_params: Params, batches: Iterable[ForceBatch]) -> dict[str, float]:
    """Force RMSE / MAE over all components (eV/Å), mean per-frame L2 error (paper table 2), and
    the RMSE of predicting zero force, for scale."""
    acc = {"sq": 0.0, "abs": 0.0, "l2": [], "zero_sq": 0.0, "count": 0.0}
    # summed per batch (not over the concatenation) so the float sums keep their order
    for res in real_rows(lambda i, batch: _force_errors(force_fn, model_params, batch), batches):
        for k in ("sq", "abs", "zero_sq", "count"):
            acc[k] += float(np.sum(res[k]))
        acc["l2"].append(res["l2"])
    n = max(acc["count"], 1.0)
    l2 = np.concatenate(acc["l2"]) if acc["l2"] else np.zeros(0)
    return {
        "force_rmse": float(np.sqrt(acc["sq"] / n)),
        "force_mae": float(acc["abs"] / n),
        "force_l2_per_frame": float(l2.mean()) if l2.size else float("nan"),
        "zero_force_rmse": float(np.sqrt(acc["zero_sq"] / n)),
        "num_frames": int(l2.size),
    }


# --------------------------------------------------------------------------- tables over trajectories


def grid_table(
    force_fn: ForceFn,
    model_params: Params,
    trajs: Sequence[Trajectory],
    step_sizes: Sequence[float],
    rollout_config: scan.RolloutConfig,
    *,
    batch_size: int,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Dq of every trajectory at every fixed step size (Å²/eV): :func:`bptt_mlip.relax.grid.grid_search`
    (one compiled vmapped call per batch) over the batches of ``trajs``.

    Returns ``{"step_sizes": [S], "dq": [S, n], "mean_dq": [S], "converged": [S, n], "num_frames": [S, n],
    "diverged": [S, n]}`` (trajectories in batch order; ``mean_dq`` is inf where any Dq is not finite).
    """
    search = grid.make_grid_search(force_fn, rollout_config, chunk_size=chunk_size)
    etas = jnp.asarray(step_sizes, jnp.float32)
    fields = ("dq", "converged", "num_frames", "diverged")
    bar = progress.Progress(progress.count_batches([t.num_atoms for t in trajs], batch_size, buckets),
                            f"grid search ({len(step_sizes)} step sizes)")
    out = per_structure(lambda i, batch: {k: getattr(search(model_params, batch, etas), k) for k in fields},
                        batching.relaxation_batches(trajs, batch_size, buckets=buckets), axis=1, bar=bar)
    bar.close()
    out["step_sizes"] = np.asarray(step_sizes, np.float64)
    with np.errstate(invalid="ignore"):
        out["mean_dq"] = np.where(np.all(np.isfinite(out["dq"]), axis=1), out["dq"].mean(axis=1), np.inf)
    return out


@functools.lru_cache(maxsize=64)
def make_fire_eval(force_fn: ForceFn, fire_config: fire.FireConfig):
    """A jitted ``fn(model_params, batch) -> dict`` of per-structure Dq, frames and flags of FIRE
    (ASE semantics) on the model's forces; cached like :func:`make_relax_eval`."""
    runner = fire.make_fire_runner(force_fn, fire_config)

    @jax.jit
    def run(model_params, batch: RelaxationBatch):
        s = batch.initial
        end = runner(model_params, s)
        return {
            "dq": losses.delta_q(end.state.positions, batch.target_positions, s.masses, s.mask),
            "dq_initial": losses.delta_q(s.positions, batch.target_positions, s.masses, s.mask),
            "largest_atom_error": losses.largest_atom_distance(end.state.positions, batch.target_positions, s.mask),
            "num_frames": end.state.num_frames,
            "converged": end.state.converged,
            "diverged": end.diverged,
            "positions": end.state.positions,
        }

    return run


def fire_table(
    force_fn: ForceFn,
    model_params: Params,
    trajs: Sequence[Trajectory],
    fire_config: fire.FireConfig,
    *,
    batch_size: int,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
) -> tuple[dict, dict]:
    """(summary, per-structure arrays) of relaxing ``trajs`` with FIRE (ASE semantics) on the model's forces;
    a runaway end point counts as diverged, as in :func:`relaxation_table` (:func:`with_runaways`)."""
    run = make_fire_eval(force_fn, fire_config)
    per = per_structure(lambda i, batch: with_runaways(run(model_params, batch), batch.initial),
                        batching.relaxation_batches(trajs, batch_size, buckets=buckets))
    return summarize(per), per


def relaxation_table(
    force_fn: ForceFn,
    step_rule: StepRule,
    params: Params,
    trajs: Sequence[Trajectory],
    modifiers: scan.FrameModifiers,
    rollout_config: scan.RolloutConfig,
    *,
    batch_size: int,
    buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
) -> tuple[dict, dict]:
    """(summary, per-structure arrays) of relaxing ``trajs`` with the given model and step rule; ``diverged``
    includes runaway end points (:func:`with_runaways`)."""
    per = evaluate_relaxations(
        force_fn, step_rule, params, batching.relaxation_batches(trajs, batch_size, buckets=buckets),
        modifiers, rollout_config,
    )
    return summarize(per), per
