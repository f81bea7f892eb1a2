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
import numpy as np
import orbax.checkpoint as ocp



def manager(directory: str | os.PathLike, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def arrays_of(statistics: Any) -> dict[str, np.ndarray]:
    """The array fields of a dataclass pytree (a model's standardisation statistics) by name."""
    return {f.name: np.asarray(getattr(statistics, f.name)) for f in dataclasses.fields(statistics)}


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    normalizer: Any,
    meta: dict[str, Any],
    *,
    max_to_keep: int | None = 3,
) -> Path:
    """Save ``state`` (a TrainState), the model part (``state.params`` and the array fields of
    ``normalizer``, the model's standardisation statistics) and JSON ``meta`` as step ``step``;
    blocks until written."""
    mngr = manager(directory, max_to_keep)
    model = {"params": state.params, "normalizer": arrays_of(normalizer)}
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


def save_model_checkpoint(directory: str | os.PathLike, state: Any, normalizer: Any, meta: dict[str, Any]) -> Path:
    """Save a model checkpoint (one model per directory, as :func:`save_checkpoint` writes it),
    replacing the model saved there before; returns the step folder that holds it.

    An identical earlier save (equal meta, parameters and statistics, e.g. a resumed run saving its
    best model again) is kept and its folder returned. Otherwise the new model is written as the
    step after the newest (orbax commits a step by renaming its finished temporary folder) and only
    then are the older steps deleted: a process killed at any moment leaves the old model or the
    new one complete, never neither. Readers take the newest step.
    """
    import shutil

    directory = Path(directory).absolute()
    steps = checkpoint_steps(directory)
    if steps and _holds_same_model(directory, steps[-1], state, normalizer, meta):
        return directory / str(steps[-1])
    written = save_checkpoint(directory, steps[-1] + 1 if steps else 0, state, normalizer, meta, max_to_keep=None)
    for old in steps:
        shutil.rmtree(directory / str(old), ignore_errors=True)
    return written


def _holds_same_model(directory: Path, step: int, state: Any, normalizer: Any, meta: dict[str, Any]) -> bool:
    """Whether step ``step`` holds this meta and these model parameters and statistics, bit for bit
    (the ``state`` item of a model checkpoint follows from its parameters); False if it does not restore."""
    import json

    mngr = manager(directory, None)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
    except Exception:  # noqa: BLE001 - an unreadable old save is simply replaced
        return False
    finally:
        mngr.close()
    model = {"params": state.params, "normalizer": arrays_of(normalizer)}
    return out["meta"] == json.loads(json.dumps(meta)) and trees_equal(out["model"], model)


def trees_equal(a: Any, b: Any) -> bool:
    """Whether two pytrees have the same leaf paths and bit-identical leaves (shape and dtype included);
    empty subtrees (``{}``, ``None``) count as absent."""
    leaves_a, _ = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, _ = jax.tree_util.tree_flatten_with_path(b)
    if [jax.tree_util.keystr(p) for p, _ in leaves_a] != [jax.tree_util.keystr(p) for p, _ in leaves_b]:
        return False
    for (_, x), (_, y) in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
            return False
    return True


def latest_step(directory: str | os.PathLike) -> int | None:
    if not Path(directory).exists():
        return None
    mngr = manager(directory, None)
    step = mngr.latest_step()
    mngr.close()
    return step


def restore_state(directory: str | os.PathLike, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore the full training state into the structure of ``target`` (an example state). Returns (state, meta)."""
    mngr = manager(directory, None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    mngr.close()
    return out["state"], out["meta"]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a JSON-friendly dict (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


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
    mngr = manager(directory, max_to_keep)
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
    mngr = manager(d, None)
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

    Steps are tried newest first. One that fails :func:`verify_training_checkpoint`, or that has
    no integrity record (written only in part) and does not restore, is reported through
    ``report(message)`` and skipped (and, with ``delete_bad``, removed, so that the resumed run
    can write that step again). A step whose files are intact but whose contents do not fit
    ``state_target`` (written by another version of the library or with other settings) is never
    deleted: :class:`CheckpointIncompatible` is raised naming it.
    """
    import shutil

    directory = Path(directory).absolute()
    for step in reversed(checkpoint_steps(directory)):
        try:
            verify_training_checkpoint(directory, step)
            out = _restore_step(directory, step, state_target, tree_targets)
        except Exception as err:  # noqa: BLE001 - any failure means: not usable
            msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            if not isinstance(err, CheckpointCorrupt) and _integrity_path(directory, step).exists():
                raise CheckpointIncompatible(
                    f"checkpoint step {step} in {directory} is complete but does not match this run's training state "
                    f"({msg}); it was written by another version of bptt-mlip or with other settings. It was left "
                    "in place: resume it with the version and settings that wrote it, or start a new run directory"
                ) from err
            report(f"checkpoint step {step} in {directory} is corrupt or partial ({msg}); using the one before")
            if delete_bad:
                shutil.rmtree(directory / str(step), ignore_errors=True)
                _integrity_path(directory, step).unlink(missing_ok=True)
            continue
        trees = {k: out[f"tree_{k}"] for k in tree_targets}
        return step, out["state"], trees, out["meta"]
    return None


class CheckpointIncompatible(RuntimeError):
    """A complete checkpoint whose saved training state does not fit the run resuming it."""


def _restore_step(directory: Path, step: int, state_target: Any, tree_targets: dict[str, Any]) -> dict[str, Any]:
    mngr = manager(directory, None)
    abstract = lambda t: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
    items = {"state": ocp.args.StandardRestore(abstract(state_target)), "meta": ocp.args.JsonRestore()}
    items.update({f"tree_{k}": ocp.args.StandardRestore(abstract(v)) for k, v in tree_targets.items()})
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    finally:
        mngr.close()
    if not isinstance(out["meta"], dict):
        raise CheckpointCorrupt("metadata is not a JSON object")
    return out
