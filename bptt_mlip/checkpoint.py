"""Orbax checkpoints of training runs and of trained models.

A checkpoint step directory holds three items:

* ``state``: the whole :class:`~bptt_mlip.train.TrainState` (parameters, optimiser state,
  step, PRNG key), restored exactly given an abstract target of the same structure;
* ``model``: ``{"params": ..., "normalizer": ...}`` as plain nested dicts, restorable in a new
  process without knowing the training set-up (for relaxing with a trained model);
* ``meta``: JSON metadata (model/step/rollout configs, data statistics, anything the caller adds).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bptt_mlip.model import AdaptConfig, Normalizer
from bptt_mlip.relax import StepConfig


def _manager(directory: str | os.PathLike, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def normalizer_to_dict(normalizer: Normalizer) -> dict[str, np.ndarray]:
    return {f.name: np.asarray(getattr(normalizer, f.name)) for f in dataclasses.fields(normalizer)}


def normalizer_from_dict(d: dict[str, Any]) -> Normalizer:
    return Normalizer(**{k: jnp.asarray(v, jnp.float32) for k, v in d.items()})


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    normalizer: Normalizer,
    meta: dict[str, Any],
    *,
    max_to_keep: int | None = 3,
) -> Path:
    """Save ``state`` (a TrainState), the model part and JSON ``meta`` as step ``step``; blocks until written."""
    mngr = _manager(directory, max_to_keep)
    model = {"params": state.params, "normalizer": normalizer_to_dict(normalizer)}
    mngr.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )
    mngr.wait_until_finished()
    mngr.close()
    return Path(directory) / str(int(step))


def latest_step(directory: str | os.PathLike) -> int | None:
    if not Path(directory).exists():
        return None
    mngr = _manager(directory, None)
    step = mngr.latest_step()
    mngr.close()
    return step


def restore_state(directory: str | os.PathLike, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore the full training state into the structure of ``target`` (an example state). Returns (state, meta)."""
    mngr = _manager(directory, None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    mngr.close()
    return out["state"], out["meta"]


def restore_model(directory: str | os.PathLike, step: int | None = None) -> tuple[dict[str, Any], Normalizer, dict]:
    """Restore ``(params, normalizer, meta)`` without knowing the training set-up.

    ``params`` is ``{"model": ..., "step": ...}`` as saved.
    """
    mngr = _manager(directory, None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    out = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    mngr.close()
    model = jax.tree_util.tree_map(jnp.asarray, out["model"])
    return model["params"], normalizer_from_dict(model["normalizer"]), out["meta"]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a JSON-friendly dict (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def adapt_config_from_dict(d: dict[str, Any]) -> AdaptConfig:
    return AdaptConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def step_config_from_dict(d: dict[str, Any]) -> StepConfig:
    return StepConfig(**d)
