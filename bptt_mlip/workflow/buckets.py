"""Relax many structures of mixed sizes in padded, jitted batches: the bucketing behind
:func:`bptt_mlip.workflow.api.relax_structures`.

Structures are grouped by atom-count bucket (:func:`bptt_mlip.data.batching.bucket_atoms`), so
structures of similar size share a batch, and each bucket runs in batches of a few fixed row counts,
so it compiles once per batch shape; results come back in the input order, as copies of the input kinds.

Two ways to run a bucket:

* :func:`relax_in_flight` (the default of ``relax_structures``): one batch of fixed rows per bucket whose
  stopped rows are refilled with the next waiting structures (:mod:`bptt_mlip.workflow.inflight`): the
  bucket costs about the mean number of frames per structure.
* :func:`relax_in_buckets`: fixed batches, each run to the end of its slowest member (also returns
  trajectories).

Both fill ``work`` (when given a dict) with what was computed: ``batch_calls`` (compiled calls),
``batch_frames`` (force evaluations of a whole batch), ``slot_frames`` (the same times its rows: the
structure-frames computed; for fixed batches counted as rows x (1 + the slowest member's frames), a
lower bound), ``frames_needed`` (per structure its frames plus one evaluation at its end point, summed).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np

from bptt_mlip import progress as progress_lib
from bptt_mlip import structures as structures_lib
from bptt_mlip.data.batching import bucket_atoms
from bptt_mlip.relax import runaway
from bptt_mlip.workflow import inflight

WORK_KEYS = ("batch_calls", "batch_frames", "slot_frames", "frames_needed")


def rows_for_bucket(count_in_bucket: int, batch_size: int) -> int:
    """Rows of a bucket's batches: ``batch_size``, or the next power of two for a small bucket."""
    if count_in_bucket >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(0, math.ceil(math.log2(max(count_in_bucket, 1)))))


def _bucket_groups(objs: list, buckets: Sequence[int]) -> dict[int, list[int]]:
    """Input indices per atom-count bucket, smallest bucket first (input order inside a bucket)."""
    groups: dict[int, list[int]] = {}
    for i, o in enumerate(objs):
        groups.setdefault(bucket_atoms(len(o), buckets), []).append(i)
    return dict(sorted(groups.items()))


def _empty_results(n: int, return_trajectory: bool) -> dict:
    return dict(positions=[None] * n, num_frames=np.zeros(n, np.int64), converged=np.zeros(n, bool),
                diverged=np.zeros(n, bool), max_force=np.zeros(n, np.float64),
                trajectories=[None] * n if return_trajectory else None)


def _store(res: dict, idx: Sequence[int], sizes: Sequence[int], batch: structures_lib.Structures, pos, frames, conv,
           div, fmax, max_total_displacement: float) -> None:
    """Write the rows of ``batch`` (structures ``idx``, in row order) into ``res``; runaway end points
    (:func:`bptt_mlip.relax.runaway.end_point_runaways`) count as diverged and never as converged."""
    k = len(idx)
    div = np.asarray(div[:k]) | runaway.end_point_runaways(
        np.asarray(batch.positions)[:k], pos[:k], np.asarray(batch.species)[:k], np.asarray(batch.cell)[:k],
        np.asarray(batch.mask)[:k], max_total_displacement=max_total_displacement)[0]
    conv = np.asarray(conv[:k]) & ~div  # atoms that collapsed onto each other may have "converged" there
    for row, i in enumerate(idx):
        res["positions"][i] = np.asarray(pos[row, : sizes[i]], np.float64)
        res["num_frames"][i], res["converged"][i], res["diverged"][i] = frames[row], conv[row], div[row]
        res["max_force"][i] = fmax[row]


def _finish(objs: list, res: dict) -> dict:
    relaxed = [structures_lib.copy_with_positions(o, p) for o, p in zip(objs, res.pop("positions"))]
    return dict(structures=relaxed, **res)


def _count(work: dict | None, **amounts) -> None:
    if work is not None:
        for key, value in amounts.items():
            work[key] = work.get(key, 0) + int(value)


def relax_in_buckets(objs: list, run_batch: Callable, batch_size: int, buckets: Sequence[int],
                     return_trajectory: bool, max_total_displacement: float, work: dict | None = None) -> dict:
    """Group ``objs`` (ASE / pymatgen structures) by atom bucket, run ``run_batch(structures) ->
    (positions [B, N, 3] Å, num_frames [B], converged [B], diverged [B], max_force [B] eV/Å, trajectory
    [T, B, N, 3] or None)`` on padded batches, and gather the rows in input order.

    End points that are runaways (:func:`bptt_mlip.relax.runaway.end_point_runaways`: atoms in
    contact, an atom farther than ``max_total_displacement`` Å from its start, non-finite) count as
    diverged, and never as converged. Returns ``structures`` (relaxed copies), ``num_frames``,
    ``converged``, ``diverged``, ``max_force`` ([n] arrays) and ``trajectories`` (per structure
    [frames + 1, n_atoms, 3], or None); ``work`` (a dict) gets the counts of the module docstring.
    """
    sizes = [len(o) for o in objs]
    res = _empty_results(len(objs), return_trajectory)
    for bucket, idx_all in _bucket_groups(objs, buckets).items():
        rows = rows_for_bucket(len(idx_all), batch_size)
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            batch = structures_lib.from_atoms([objs[i] for i in idx], max_atoms=bucket, batch_size=rows)
            pos, frames, conv, div, fmax, traj = run_batch(batch)
            pos, frames, conv, div, fmax = (np.asarray(x) for x in (pos, frames, conv, div, fmax))
            _store(res, idx, sizes, batch, pos, frames, conv, div, fmax, max_total_displacement)
            slowest = int(frames[: len(idx)].max())
            _count(work, batch_calls=1, batch_frames=slowest + 1, slot_frames=rows * (slowest + 1),
                   frames_needed=np.sum(frames[: len(idx)] + 1))
            if return_trajectory:
                traj = np.asarray(traj)
                for row, i in enumerate(idx):
                    res["trajectories"][i] = traj[: int(frames[row]) + 1, row, : sizes[i]].astype(np.float64)
    return _finish(objs, res)


def relax_in_flight(objs: list, engine, batch_size: int, buckets: Sequence[int], max_total_displacement: float, *,
                    limits: Sequence[int] | None = None, max_iterations: int = 64, refill_rows: int | None = None,
                    progress: bool = False, work: dict | None = None) -> dict:
    """Relax ``objs`` (ASE / pymatgen structures) with in-flight batching: per atom bucket one batch of
    :func:`rows_for_bucket` rows whose finished rows take the next waiting structure of the bucket.

    Args:
      engine: a :class:`bptt_mlip.workflow.inflight.FrameEngine` or ``FireEngine`` (method, model, settings).
      limits: per structure its most frames (FIRE steps); default the engine's (``max_frames`` / ``max_steps``).
      max_iterations: most frames per compiled call: how often the host sees progress.
      refill_rows: while structures wait, a call returns once this many rows are free (default ``rows // 16``,
        at least 1: large batches on an accelerator go back to the host less often, at the cost of a few idle
        rows).
      progress: show a bar counting structures done (:class:`bptt_mlip.progress.Progress`).
      work: a dict that gets the counts of the module docstring.

    Returns what :func:`relax_in_buckets` returns (``trajectories`` None): per structure the same end
    point, frames and flags as relaxing it alone.
    """
    n = len(objs)
    limits = np.full(n, engine.default_limit, np.int64) if limits is None else np.asarray(limits, np.int64)
    if limits.shape != (n,) or np.any(limits < 0):
        raise ValueError(f"limits: expected {n} frame limits >= 0 (one per structure), got {limits.tolist()}")
    sizes = [len(o) for o in objs]
    res = _empty_results(n, False)
    bar = progress_lib.Progress(n, f"relax ({engine.name}, in flight)") if progress else None
    for bucket, idx in _bucket_groups(objs, buckets).items():
        # padded one structure at a time: the host-to-device conversions inside compile per shape, and
        # [1, bucket] is one shape per bucket whatever the number of structures
        one_by_one = [_take_rows(structures_lib.from_atoms([objs[i]], max_atoms=bucket), 0) for i in idx]
        batch = jax.tree.map(lambda *rows_: np.stack(rows_), *one_by_one)
        rows = rows_for_bucket(len(idx), batch_size)
        refill = max(1, rows // 16) if refill_rows is None else min(max(1, int(refill_rows)), rows)
        call = (max_iterations, refill)
        pos, frames, conv, div, fmax = _run_bucket(engine, batch, limits[idx], rows, call, bar, work)
        _store(res, idx, sizes, batch, pos, frames, conv, div, fmax, max_total_displacement)
        _count(work, frames_needed=np.sum(frames + 1))
    if bar is not None:
        bar.close()
    return _finish(objs, res)


def _take_rows(structures: structures_lib.Structures, rows) -> structures_lib.Structures:
    """The ``rows`` of a padded batch, as numpy copies."""
    return jax.tree.map(lambda a: np.asarray(a)[rows], structures)


def _run_bucket(engine, batch: structures_lib.Structures, limits: np.ndarray, rows: int, call: tuple[int, int],
                bar, work: dict | None) -> tuple:
    """Relax the structures of one bucket (``batch``, [count] rows) in flight in ``rows`` rows, ``call`` =
    (most frames per compiled call, free rows that end it while structures wait): their (positions
    [count, N, 3], frames, converged, diverged, max_force [count]) in ``batch`` order."""
    max_iterations, refill = call
    count, n_atoms = batch.mask.shape
    positions, cells = np.zeros((rows, n_atoms, 3), np.float32), np.zeros((rows, 3, 3), np.float32)
    empty = structures_lib.padded_structures(np.zeros((rows, n_atoms), np.int32), positions, cells)
    slot_structures = _take_rows(empty, np.arange(rows))
    slots = engine.empty_slots(slot_structures)
    owner = np.full(rows, -1)  # the bucket index of the structure in each row
    out = dict(pos=np.zeros((count, n_atoms, 3), np.float32), frames=np.zeros(count, np.int64),
               conv=np.zeros(count, bool), div=np.zeros(count, bool), fmax=np.zeros(count, np.float64))
    waiting = 0
    while waiting < count or np.any(owner >= 0):
        take = np.flatnonzero(owner < 0)[: count - waiting]
        if len(take):  # the next waiting structures into the free rows, their state reset
            new = np.arange(waiting, waiting + len(take))
            slot_structures = inflight.set_rows(slot_structures, take, _take_rows(batch, new))
            slots = inflight.start_rows(slots, take, engine.start_state(_take_rows(batch, new)), limits[new])
            owner[take], waiting = new, waiting + len(take)
        min_free = min(refill, count - waiting) if waiting < count else rows
        slots, iterations = engine.run(slot_structures, slots, max_iterations, min_free)
        _count(work, batch_calls=1, batch_frames=iterations, slot_frames=rows * iterations)
        done = np.flatnonzero((owner >= 0) & slots.finished)
        pos, frames, conv, div = engine.results(slots)
        for key, values in (("pos", pos), ("frames", frames), ("conv", conv), ("div", div), ("fmax", slots.max_force)):
            out[key][owner[done]] = values[done]
        owner[done] = -1
        idle = _take_rows(empty, done)  # rows left empty never move and hold no stale atoms
        slot_structures = inflight.set_rows(slot_structures, done, idle)
        slots = inflight.empty_rows(slots, done, engine.idle_state(idle))
        if bar is not None and len(done):
            bar.update(len(done))
    return out["pos"], out["frames"], out["conv"], out["div"], out["fmax"]
