"""Trajectories -> padded, fixed-shape JAX batches (``structures.RelaxationBatch`` / ``ForceBatch``).

Shapes are bucketed so that jit compiles once per bucket: every batch of a bucket has
``batch_size`` rows and ``bucket`` atom slots. Padding atoms have species 0 and mask False;
padding rows have weight 0 (and no real atoms). Arrays are built in numpy and converted once.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import structures
from bptt_mlip.data.trajectory import Trajectory

DEFAULT_BUCKETS = (16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640,
                   768, 896, 1024)
"""Atom-count padding sizes: multiples of 8, each at most 1.25x the one below from 32 atoms on, so a structure
of more than 32 atoms pays for at most 25% padding atoms (a 65-atom interstitial cell pads to 72, not 128;
docs/performance.md measures what that saves). A run compiles once per bucket its data use (at most 24)."""


def bucket_atoms(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= n (raises ValueError if n exceeds every bucket)."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"{n} atoms exceed the largest bucket {max(buckets)}; add a bigger bucket")


def _structures_np(species_list, positions_list, cells, batch_size: int, max_atoms: int) -> structures.Structures:
    species = np.zeros((batch_size, max_atoms), np.int32)
    pos = np.zeros((batch_size, max_atoms, 3), np.float32)
    cell = np.zeros((batch_size, 3, 3), np.float32)
    for i, (z, x, c) in enumerate(zip(species_list, positions_list, cells)):
        species[i, : len(z)] = z
        pos[i, : len(z)] = x
        if c is not None:
            cell[i] = c
    return structures.padded_structures(species, pos, cell)


def _pad_atoms(rows: Sequence[np.ndarray], batch_size: int, max_atoms: int) -> np.ndarray:
    out = np.zeros((batch_size, max_atoms, 3), np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _order(num: int, shuffle_key_or_seed) -> np.ndarray:
    if shuffle_key_or_seed is None:
        return np.arange(num)
    if isinstance(shuffle_key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(shuffle_key_or_seed)).permutation(num)
    return np.asarray(jax.random.permutation(shuffle_key_or_seed, num))


def _bucketed_batches(sizes: Sequence[int], batch_size: int, buckets, shuffle_key_or_seed, drop_remainder):
    """Yield (bucket, [item indices]) groups: items in shuffled order, grouped per bucket."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = _order(len(sizes), shuffle_key_or_seed)
    pending: dict[int, list[int]] = {}
    for idx in order:
        b = bucket_atoms(sizes[idx], buckets)
        pending.setdefault(b, []).append(int(idx))
        if len(pending[b]) == batch_size:
            yield b, pending.pop(b)
    if not drop_remainder:
        for b in sorted(pending):
            if pending[b]:
                yield b, pending[b]


def relaxation_batches(
    trajs: Sequence[Trajectory],
    batch_size: int,
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    shuffle_key_or_seed=None,
    drop_remainder: bool = False,
) -> Iterator[structures.RelaxationBatch]:
    """One epoch of BPTT batches: start = first frame, target = last frame.

    Trajectories are visited in (seeded) shuffled order and grouped by atom bucket; each batch
    has shape [batch_size, bucket] and padding rows have weight 0. Every trajectory appears
    exactly once per epoch (unless ``drop_remainder`` drops incomplete batches).

    Args:
      trajs: trajectories (positions in Å).
      batch_size: rows per batch B.
      buckets: atom-count buckets N.
      shuffle_key_or_seed: None (input order), an int seed, or a ``jax.random`` key.
      drop_remainder: drop the last incomplete batch of each bucket.
    Yields:
      RelaxationBatch with initial [B, N] Structures, target_positions [B, N, 3] Å, weight [B].
    """
    sizes = [t.num_atoms for t in trajs]
    for bucket, idx in _bucketed_batches(sizes, batch_size, buckets, shuffle_key_or_seed, drop_remainder):
        yield make_relaxation_batch(
            [trajs[i].species for i in idx],
            [trajs[i].initial_positions for i in idx],
            [trajs[i].final_positions for i in idx],
            [trajs[i].cell for i in idx],
            batch_size=batch_size,
            max_atoms=bucket,
        )


def make_relaxation_batch(species_list, initial_list, target_list, cells, *, batch_size: int, max_atoms: int):
    """A padded ``RelaxationBatch`` from per-structure numpy arrays (weight 1 for real rows)."""
    weight = np.zeros(batch_size, np.float32)
    weight[: len(species_list)] = 1.0
    return structures.RelaxationBatch(
        initial=_structures_np(species_list, initial_list, cells, batch_size, max_atoms),
        target_positions=jnp.asarray(_pad_atoms(target_list, batch_size, max_atoms)),
        weight=jnp.asarray(weight),
    )


def intermediate_start_pairs(traj: Trajectory, stride: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(start [n, 3], target [n, 3]) pairs starting at frames 0, stride, 2*stride, ... (before the
    last frame); the target is always the last frame (Å)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    last = traj.final_positions
    return [(traj.positions[t], last) for t in range(0, max(traj.num_frames - 1, 1), stride)]


def intermediate_relaxation_batches(
    trajs: Sequence[Trajectory],
    batch_size: int,
    stride: int,
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    shuffle_key_or_seed=None,
    drop_remainder: bool = False,
) -> Iterator[structures.RelaxationBatch]:
    """Like :func:`relaxation_batches` but starting also from intermediate frames (see
    :func:`intermediate_start_pairs`); target always the last frame."""
    items = [(k, start) for k, t in enumerate(trajs) for start, _ in intermediate_start_pairs(t, stride)]
    sizes = [trajs[k].num_atoms for k, _ in items]
    for bucket, idx in _bucketed_batches(sizes, batch_size, buckets, shuffle_key_or_seed, drop_remainder):
        yield make_relaxation_batch(
            [trajs[items[i][0]].species for i in idx],
            [items[i][1] for i in idx],
            [trajs[items[i][0]].final_positions for i in idx],
            [trajs[items[i][0]].cell for i in idx],
            batch_size=batch_size,
            max_atoms=bucket,
        )


def force_batches(
    trajs: Sequence[Trajectory],
    batch_size: int,
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    shuffle_key_or_seed=None,
    drop_remainder: bool = False,
) -> Iterator[structures.ForceBatch]:
    """One epoch of force-pretraining batches over every frame of every trajectory.

    Yields ForceBatch with structures [B, N], forces [B, N, 3] eV/Å (0 on padding), weight [B].
    Trajectories without forces raise ValueError naming them.
    """
    frames = _all_frames(trajs)
    sizes = [trajs[k].num_atoms for k, _ in frames]
    for bucket, idx in _bucketed_batches(sizes, batch_size, buckets, shuffle_key_or_seed, drop_remainder):
        yield _force_batch(trajs, [frames[i] for i in idx], batch_size, bucket)


def _all_frames(trajs: Sequence[Trajectory]) -> list[tuple[int, int]]:
    """(trajectory index, frame index) of every frame; trajectories without forces raise."""
    frames = []
    for k, t in enumerate(trajs):
        if t.forces is None:
            raise ValueError(f"{t.where()}: no forces, cannot make force batches")
        frames.extend((k, f) for f in range(t.num_frames))
    return frames


def _force_batch(trajs: Sequence[Trajectory], sel: Sequence[tuple[int, int]], batch_size: int, bucket: int):
    weight = np.zeros(batch_size, np.float32)
    weight[: len(sel)] = 1.0
    return structures.ForceBatch(
        structures=_structures_np(
            [trajs[k].species for k, _ in sel],
            [trajs[k].positions[f] for k, f in sel],
            [trajs[k].cells[f] if trajs[k].cells is not None else trajs[k].cell for k, f in sel],
            batch_size,
            bucket,
        ),
        forces=jnp.asarray(_pad_atoms([trajs[k].forces[f] for k, f in sel], batch_size, bucket)),
        weight=jnp.asarray(weight),
    )


class FrameSampler:
    """Random force batches of reference frames for the force term of multi-task BPTT.

    ``sampler(step)`` is a pure function of ``(seed, step)``: ``batch_size`` frames drawn
    uniformly (with replacement) from every frame of ``trajs``, padded to the bucket of the
    largest, so a resumed run sees the same force batches as an uninterrupted one.
    """

    def __init__(self, trajs: Sequence[Trajectory], batch_size: int, *, seed: int = 0,
                 buckets: Sequence[int] = DEFAULT_BUCKETS):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._trajs, self._batch_size, self._seed, self._buckets = list(trajs), batch_size, int(seed), buckets
        self._frames = _all_frames(self._trajs)
        if not self._frames:
            raise ValueError("FrameSampler: no frames to sample")

    def __call__(self, step: int) -> structures.ForceBatch:
        rng = np.random.default_rng([self._seed, int(step)])
        sel = [self._frames[i] for i in rng.integers(0, len(self._frames), self._batch_size)]
        bucket = bucket_atoms(max(self._trajs[k].num_atoms for k, _ in sel), self._buckets)
        return _force_batch(self._trajs, sel, self._batch_size, bucket)
