"""Relax many structures of mixed sizes in padded, jitted batches: the bucketing behind
:func:`bptt_mlip.workflow.api.relax_structures`.

Structures are grouped by atom-count bucket (:func:`bptt_mlip.data.batching.bucket_atoms`) and run
in batches of a few fixed row counts, so a bucket compiles once per batch shape; results come
back in the input order, as copies of the input kinds.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from bptt_mlip import structures as structures_lib
from bptt_mlip.data.batching import bucket_atoms
from bptt_mlip.relax import runaway


def rows_for_bucket(count_in_bucket: int, batch_size: int) -> int:
    """Rows of a bucket's batches: ``batch_size``, or the next power of two for a small bucket."""
    if count_in_bucket >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(0, math.ceil(math.log2(max(count_in_bucket, 1)))))


def relax_in_buckets(objs: list, run_batch: Callable, batch_size: int, buckets: Sequence[int],
                     return_trajectory: bool, max_total_displacement: float) -> dict:
    """Group ``objs`` (ASE / pymatgen structures) by atom bucket, run ``run_batch(structures) ->
    (positions [B, N, 3] Å, num_frames [B], converged [B], diverged [B], max_force [B] eV/Å, trajectory
    [T, B, N, 3] or None)`` on padded batches, and gather the rows in input order.

    End points that are runaways (:func:`bptt_mlip.relax.runaway.end_point_runaways`: atoms in
    contact, an atom farther than ``max_total_displacement`` Å from its start, non-finite) count as
    diverged, and never as converged. Returns ``structures`` (relaxed copies), ``num_frames``,
    ``converged``, ``diverged``, ``max_force`` ([n] arrays) and ``trajectories`` (per structure
    [frames + 1, n_atoms, 3], or None).
    """
    n = len(objs)
    sizes = [len(o) for o in objs]
    num_frames = np.zeros(n, np.int64)
    converged = np.zeros(n, bool)
    diverged = np.zeros(n, bool)
    max_force = np.zeros(n, np.float64)
    positions: list[np.ndarray | None] = [None] * n
    trajectories: list | None = [None] * n if return_trajectory else None

    groups: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(bucket_atoms(size, buckets), []).append(i)
    for bucket in sorted(groups):
        idx_all = groups[bucket]
        rows = rows_for_bucket(len(idx_all), batch_size)
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            batch = structures_lib.from_atoms([objs[i] for i in idx], max_atoms=bucket, batch_size=rows)
            pos, frames, conv, div, fmax, traj = run_batch(batch)
            pos, frames, conv, div, fmax = (np.asarray(x) for x in (pos, frames, conv, div, fmax))
            traj = None if traj is None else np.asarray(traj)
            div = div | runaway.end_point_runaways(batch.positions, pos, batch.species, batch.cell, batch.mask,
                                                   max_total_displacement=max_total_displacement)[0]
            conv = conv & ~div  # atoms that collapsed onto each other may have "converged" there
            for row, i in enumerate(idx):
                k = sizes[i]
                positions[i] = pos[row, :k].astype(np.float64)
                num_frames[i], converged[i], diverged[i], max_force[i] = frames[row], conv[row], div[row], fmax[row]
                if trajectories is not None:
                    trajectories[i] = traj[: int(frames[row]) + 1, row, :k].astype(np.float64)

    relaxed = [structures_lib.copy_with_positions(o, p) for o, p in zip(objs, positions)]
    return dict(structures=relaxed, num_frames=num_frames, converged=converged, diverged=diverged,
                max_force=max_force, trajectories=trajectories)
