"""Step-size grid search in one compiled call (paper appendix D).

The rollout is ``vmap``-ed over a vector of fixed step sizes; every structure of the batch is
relaxed at every step size at once, and Dq is returned per step size and structure.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_mlip import losses
from bptt_mlip.relax import forward, scan
from bptt_mlip.relax import step_rules

from bptt_mlip.structures import RelaxationBatch
from bptt_mlip.types import ForceFn, Params


class GridResult(NamedTuple):
    """Per step size s and structure b.

    Attributes:
      step_sizes: [S] Å^2/eV.
      dq: [S, B] end-point Dq (amu^(1/2) Å).
      mean_dq: [S] weighted mean over the batch's real structures.
      num_frames: [S, B] int32. converged, diverged: [S, B] bool.
    """

    step_sizes: jnp.ndarray
    dq: jnp.ndarray
    mean_dq: jnp.ndarray
    num_frames: jnp.ndarray
    converged: jnp.ndarray
    diverged: jnp.ndarray


def grid_search(
    force_fn: ForceFn,
    model_params: Params,
    batch: RelaxationBatch,
    step_sizes: jnp.ndarray,
    rollout_config: scan.RolloutConfig = scan.RolloutConfig(),
    *,
    chunk_size: int | None = None,
) -> GridResult:
    """Relax ``batch`` at every fixed step size in ``step_sizes`` [S]; one traced computation.

    ``chunk_size`` bounds memory: that many step sizes are vmapped at a time (``lax.map``);
    None vmaps all S at once. Jit the caller, or use :func:`make_grid_search`.
    """
    fixed = step_rules.FixedStep()  # its step size is the traced parameter eta: one computation serves every eta
    # vmapped over step sizes, compaction's switch would become a select running every sub-batch size
    config = dataclasses.replace(rollout_config, return_trajectory=False, compact_levels=0)
    s = batch.initial

    def one(eta):
        params = {"model": model_params, "step_rule": {"eta": eta}}
        res = forward.relax_forward(force_fn, fixed, params, s, scan.FrameModifiers(), config)
        dq = losses.delta_q(res.positions, batch.target_positions, s.masses, s.mask)
        return dq, res.num_frames, res.converged, res.diverged

    step_sizes = jnp.asarray(step_sizes, jnp.float32)
    if chunk_size is None:
        dq, frames, conv, div = jax.vmap(one)(step_sizes)
    else:
        dq, frames, conv, div = jax.lax.map(one, step_sizes, batch_size=chunk_size)
    mean = jax.vmap(lambda d: losses.weighted_mean(d, batch.weight))(dq)
    return GridResult(step_sizes, dq, mean, frames, conv, div)


@functools.lru_cache(maxsize=32)
def make_grid_search(force_fn: ForceFn, rollout_config: scan.RolloutConfig, chunk_size: int | None = None):
    """A jit-compiled ``search(model_params, batch, step_sizes) -> GridResult``; cached on its (hashable)
    arguments, so a second grid table with the same force function and config compiles nothing."""
    return jax.jit(functools.partial(grid_search, force_fn, rollout_config=rollout_config, chunk_size=chunk_size))
