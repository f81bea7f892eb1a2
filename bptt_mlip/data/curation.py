"""Curation (paper appendix C.1) and deterministic splits over trajectories."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bptt_mlip.data.trajectory import Trajectory

REASON_TOO_FEW_FRAMES = "too_few_frames"
REASON_ATOMS_CHANGE = "atoms_change"


@dataclasses.dataclass(frozen=True)
class CurationReport:
    """What :func:`curate` kept and dropped.

    Attributes:
      num_input: trajectories given.
      num_kept: trajectories kept.
      dropped: reason -> tuple of dropped trajectory ids (as ``source:traj_id``).
    """

    num_input: int
    num_kept: int
    dropped: dict

    def counts(self) -> dict:
        return {reason: len(ids) for reason, ids in self.dropped.items()}

    def __str__(self) -> str:
        lines = [f"curation: kept {self.num_kept} of {self.num_input} trajectories"]
        for reason, ids in self.dropped.items():
            shown = ", ".join(ids[:5]) + (f", ... ({len(ids) - 5} more)" if len(ids) > 5 else "")
            lines.append(f"  dropped {len(ids)} ({reason}){': ' + shown if ids else ''}")
        return "\n".join(lines)


def _atoms_change(traj: Trajectory) -> bool:
    """True when per-frame arrays disagree on the atom count (only possible for unvalidated records)."""
    n = traj.species.shape[0]
    if traj.positions.ndim != 3 or traj.positions.shape[1] != n:
        return True
    if traj.forces is not None and traj.forces.shape[:2] != traj.positions.shape[:2]:
        return True
    return False


def curate(trajs: Sequence[Trajectory], min_frames: int = 3) -> tuple[list[Trajectory], CurationReport]:
    """Drop trajectories whose atoms change between frames or that have fewer than ``min_frames`` frames.

    The readers already refuse a trajectory whose species change between frames (they raise
    ``TrajectoryError``); here "atoms change" catches records built with ``check=False`` whose
    per-frame arrays disagree on the atom count.
    The paper keeps relaxations with more than two frames (``min_frames=3``). Returns
    (kept trajectories in input order, report). Print the report for a summary.
    """
    kept = []
    dropped = {REASON_ATOMS_CHANGE: [], REASON_TOO_FEW_FRAMES: []}
    for t in trajs:
        name = f"{t.source}:{t.traj_id}"
        if _atoms_change(t):
            dropped[REASON_ATOMS_CHANGE].append(name)
        elif t.num_frames < min_frames:
            dropped[REASON_TOO_FEW_FRAMES].append(name)
        else:
            kept.append(t)
    report = CurationReport(len(trajs), len(kept), {k: tuple(v) for k, v in dropped.items()})
    return kept, report


def split_test_train(trajs: Sequence, num_test: int) -> tuple[list, list]:
    """Deterministic split: the first ``num_test`` items are the test set, the rest train."""
    if not 0 <= num_test <= len(trajs):
        raise ValueError(f"num_test={num_test} must be in 0..{len(trajs)}")
    return list(trajs[:num_test]), list(trajs[num_test:])


def kfold_splits(n: int, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train_idx, val_idx) pairs over ``n`` items: validation folds are disjoint, cover
    every index once, and differ in size by at most one. Shuffled by ``seed`` (numpy)."""
    if not 2 <= k <= n:
        raise ValueError(f"k={k} folds need 2 <= k <= n={n}")
    perm = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(perm, k)
    out = []
    for i in range(k):
        val = np.sort(folds[i])
        train = np.sort(np.concatenate([folds[j] for j in range(k) if j != i]))
        out.append((train, val))
    return out


def subsample_frames(traj: Trajectory, stride: int) -> Trajectory:
    """Keep frames 0, stride, 2*stride, ... and always the last frame (the relaxed target)."""
    if stride <= 1 or traj.num_frames <= 2:
        return traj
    idx = np.unique(np.concatenate([np.arange(0, traj.num_frames, stride), [traj.num_frames - 1]]))
    return traj.replace(
        positions=traj.positions[idx],
        forces=None if traj.forces is None else traj.forces[idx],
        energies=None if traj.energies is None else traj.energies[idx],
        cells=None if traj.cells is None else traj.cells[idx],
    )
