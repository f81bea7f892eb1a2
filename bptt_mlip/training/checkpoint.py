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

from bptt_mlip.models.adapt import AdaptConfig, Normalizer
from bptt_mlip.relax.scan import StepConfig


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


# --------------------------------------------------------------------------------------------
# Resumable training checkpoints with an integrity record and fallback to an older step.

INTEGRITY_DIR = "integrity"


class CheckpointCorrupt(RuntimeError):
    """A checkpoint step failed its integrity check or could not be restored."""


def _file_digests(step_dir: Path) -> dict[str, list]:
    import hashlib

    out = {}
    for f in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        out[str(f.relative_to(step_dir))] = [f.stat().st_size, h]
    return out


def _integrity_path(directory: Path, step: int) -> Path:
    return directory.parent / f"{directory.name}.{INTEGRITY_DIR}" / f"{int(step)}.json"


def save_training_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    trees: dict[str, Any],
    meta: dict[str, Any],
    *,
    max_to_keep: int | None = 3,
) -> Path:
    """Save a resumable checkpoint as step ``step``: the TrainState, extra pytrees (e.g. the
    best-validation parameters) and JSON ``meta``; blocks until written.

    Orbax writes each step into a temporary folder and renames it when complete, so a process
    killed while saving leaves no half-written step behind. After that, the size and SHA-256 of
    every file of the step are recorded in ``<directory>.integrity/<step>.json``;
    :func:`restore_training_checkpoint` checks them, so a step damaged later (a truncated file)
    is detected and an older one used.
    """
    import json

    import shutil

    directory = Path(directory).absolute()
    if (directory / str(int(step))).exists():  # e.g. a step-interval save followed by the epoch-end one
        shutil.rmtree(directory / str(int(step)))
    mngr = _manager(directory, max_to_keep)
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    items.update({f"tree_{k}": ocp.args.StandardSave(v) for k, v in trees.items()})
    mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
    kept = set(mngr.all_steps())
    mngr.close()
    record = _integrity_path(directory, step)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": int(step), "files": _file_digests(directory / str(int(step)))}))
    os.replace(tmp, record)
    for old in record.parent.glob("*.json"):  # records of steps orbax has deleted
        if old.stem.isdigit() and int(old.stem) not in kept:
            old.unlink(missing_ok=True)
    return directory / str(int(step))


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Finalized steps in ``directory``, oldest first (empty if there is none)."""
    d = Path(directory)
    if not d.exists():
        return []
    mngr = _manager(d, None)
    steps = sorted(mngr.all_steps())
    mngr.close()
    return steps


def verify_training_checkpoint(directory: str | os.PathLike, step: int) -> None:
    """Raise :class:`CheckpointCorrupt` if step ``step`` differs from its integrity record
    (missing, truncated or altered files). A step without a record (the process stopped between
    orbax's commit and the record) is accepted if it restores."""
    import json

    directory = Path(directory).absolute()
    record = _integrity_path(directory, step)
    if not record.exists():
        return
    try:
        want = json.loads(record.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointCorrupt(f"unreadable integrity record {record}: {err}") from None
    have = _file_digests(directory / str(int(step)))
    for name, (size, digest) in want.items():
        if name not in have:
            raise CheckpointCorrupt(f"file {name} is missing")
        if have[name][0] != size:
            raise CheckpointCorrupt(f"file {name} has {have[name][0]} bytes, expected {size} (truncated?)")
        if have[name][1] != digest:
            raise CheckpointCorrupt(f"file {name} has changed since it was written (SHA-256 differs)")


def restore_training_checkpoint(
    directory: str | os.PathLike,
    state_target: Any,
    tree_targets: dict[str, Any],
    *,
    report=print,
    delete_bad: bool = True,
) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
    """Restore the newest good step: ``(step, state, trees, meta)``, or None if no step is good.

    Steps are tried newest first; one that fails :func:`verify_training_checkpoint` or whose
    restore raises is reported through ``report(message)`` and skipped (and, with
    ``delete_bad``, removed, so that the resumed run can write that step again).
    """
    import shutil

    directory = Path(directory).absolute()
    steps = checkpoint_steps(directory)
    for step in reversed(steps):
        try:
            verify_training_checkpoint(directory, step)
            mngr = _manager(directory, None)
            abstract = lambda t: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, t)
            items = {"state": ocp.args.StandardRestore(abstract(state_target)), "meta": ocp.args.JsonRestore()}
            items.update({f"tree_{k}": ocp.args.StandardRestore(abstract(v)) for k, v in tree_targets.items()})
            try:
                out = mngr.restore(step, args=ocp.args.Composite(**items))
            finally:
                mngr.close()
            meta = out["meta"]
            if not isinstance(meta, dict):
                raise CheckpointCorrupt("metadata is not a JSON object")
        except Exception as err:  # noqa: BLE001 - any failure means: not usable
            msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            report(f"checkpoint step {step} in {directory} is corrupt or partial ({msg}); using the one before")
            if delete_bad:
                shutil.rmtree(directory / str(step), ignore_errors=True)
                _integrity_path(directory, step).unlink(missing_ok=True)
            continue
        trees = {k: out[f"tree_{k}"] for k in tree_targets}
        return step, out["state"], trees, meta
    return None
