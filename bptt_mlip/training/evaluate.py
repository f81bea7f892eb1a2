"""Evaluation over many batches: per-structure Dq of relaxations and force errors.

Results are numpy arrays over the real structures only (padding rows removed). Diverged
relaxations are never silently averaged: :func:`summarize` reports their count and the mean
over the rest as well as over all.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import losses
from bptt_mlip.relax import scan as relax

from bptt_mlip.structures import ForceBatch, RelaxationBatch
from bptt_mlip.types import ForceFn, Params


@functools.lru_cache(maxsize=64)
def make_relax_eval(
    force_fn: ForceFn,
    step_size_fn: relax.StepSizeFn,
    step_config: relax.StepConfig,
    rollout_config: relax.RolloutConfig,
):
    """A jitted ``fn(params, batch, key) -> dict`` of per-structure Dq, frames, flags for one batch.

    Cached on its (hashable) arguments, so repeated evaluations with the same force function
    and configs (validation after every epoch) reuse one compiled function per batch shape.
    """

    @jax.jit
    def run(params, batch: RelaxationBatch, key):
        s = batch.initial
        res = relax.rollout(
            force_fn, step_size_fn, params, s, step_config, rollout_config, key=key if step_config.noise_std else None
        )
        return {
            "dq": losses.delta_q(res.positions, batch.target_positions, s.masses, s.mask),
            "dq_initial": losses.delta_q(s.positions, batch.target_positions, s.masses, s.mask),
            "mse": losses.position_mse(res.positions, batch.target_positions, s.mask),
            "frames": res.num_frames,
            "converged": res.converged,
            "diverged": res.diverged,
        }

    return run


def evaluate_relaxations(
    force_fn: ForceFn,
    step_size_fn: relax.StepSizeFn,
    params: Params,
    batches: Iterable[RelaxationBatch],
    step_config: relax.StepConfig = relax.StepConfig(),
    rollout_config: relax.RolloutConfig = relax.RolloutConfig(),
    *,
    key: jax.Array | None = None,
) -> dict[str, np.ndarray]:
    """Relax every batch; concatenate per-structure results over real rows."""
    run = make_relax_eval(force_fn, step_size_fn, step_config, rollout_config)
    key = jax.random.PRNGKey(0) if key is None else key
    out: dict[str, list] = {}
    for i, batch in enumerate(batches):
        res = run(params, batch, jax.random.fold_in(key, i))
        real = np.asarray(batch.weight) > 0
        for k, v in res.items():
            out.setdefault(k, []).append(np.asarray(v)[real])
    return {k: np.concatenate(v) for k, v in out.items()}


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
        "mean_frames": float(np.mean(per_structure["frames"])),
        "num_converged": int(np.sum(per_structure["converged"])),
        "num_diverged": int(np.sum(diverged)),
        "num_nonfinite": int(np.sum(~finite)),
    }


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
    for batch in batches:
        res = _force_errors(force_fn, model_params, batch)
        real = np.asarray(batch.weight) > 0
        for k in ("sq", "abs", "zero_sq", "count"):
            acc[k] += float(np.sum(np.asarray(res[k])[real]))
        acc["l2"].append(np.asarray(res["l2"])[real])
    n = max(acc["count"], 1.0)
    l2 = np.concatenate(acc["l2"]) if acc["l2"] else np.zeros(0)
    return {
        "force_rmse": float(np.sqrt(acc["sq"] / n)),
        "force_mae": float(acc["abs"] / n),
        "force_l2_per_frame": float(l2.mean()) if l2.size else float("nan"),
        "zero_force_rmse": float(np.sqrt(acc["zero_sq"] / n)),
        "num_frames": int(l2.size),
    }
