"""Bucketed, padded batches from trajectories."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bptt_mlip.data import batching
from bptt_mlip.data.trajectory import make_trajectory


def _traj(n, t, k, seed=None):
    rng = np.random.default_rng(k if seed is None else seed)
    species = rng.choice([1, 8, 14, 31], size=n)
    pos = np.cumsum(rng.normal(scale=0.05, size=(t, n, 3)), axis=0) + rng.uniform(0, 8, (1, n, 3))
    return make_trajectory(species, pos, cell=np.eye(3) * 9.0, forces=rng.normal(size=(t, n, 3)),
                           energies=rng.normal(size=t), source="synthetic", traj_id=f"t{k}")


def test_bucket_atoms():
    assert batching.bucket_atoms(1) == 16
    assert batching.bucket_atoms(32) == 32
    assert batching.bucket_atoms(33) == 40
    assert batching.bucket_atoms(65) == 72  # a 64-atom host with an interstitial
    b = np.asarray(batching.DEFAULT_BUCKETS)
    assert np.all(b % 8 == 0) and np.all(b[1:] > b[:-1]) and b[-1] == 1024
    assert np.all(b[3:] / b[2:-1] <= 1.25)  # from 32 atoms on, at most 25% padding
    assert batching.bucket_atoms(65, buckets=(16, 65)) == 65
    with pytest.raises(ValueError, match="largest bucket"):
        batching.bucket_atoms(2000)


def test_relaxation_batches_shapes_padding_and_epoch():
    trajs = [_traj(n, 4, k) for k, n in enumerate([5, 30, 40, 33, 7, 64, 10])]
    batches = list(batching.relaxation_batches(trajs, 3, shuffle_key_or_seed=0))
    seen = []
    for b in batches:
        bsz, n = b.initial.positions.shape[:2]
        assert bsz == 3 and n in (16, 32, 40, 64)
        b.initial.check()
        assert b.target_positions.shape == (3, n, 3) and b.weight.shape == (3,)
        w = np.asarray(b.weight)
        mask = np.asarray(b.initial.mask)
        assert not mask[w == 0].any()  # padding rows have no atoms
        assert np.all(np.asarray(b.initial.positions)[~mask] == 0)
        assert np.all(np.asarray(b.target_positions)[~mask] == 0)
        assert np.all(np.asarray(b.initial.masses)[~mask] == 0)
        for row in np.nonzero(w)[0]:
            cnt = int(mask[row].sum())
            match = [t for t in trajs if t.num_atoms == cnt and np.allclose(
                t.initial_positions, np.asarray(b.initial.positions)[row, :cnt], atol=1e-5)]
            assert len(match) == 1
            np.testing.assert_allclose(np.asarray(b.target_positions)[row, :cnt], match[0].final_positions, atol=1e-5)
            seen.append(match[0].traj_id)
    assert sorted(seen) == sorted(t.traj_id for t in trajs)
    # deterministic given the seed, different for another seed or a jax key
    again = [np.asarray(b.initial.positions) for b in batching.relaxation_batches(trajs, 3, shuffle_key_or_seed=0)]
    assert all(np.array_equal(x, np.asarray(b.initial.positions)) for x, b in zip(again, batches))
    keyed = list(batching.relaxation_batches(trajs, 3, shuffle_key_or_seed=jax.random.PRNGKey(1)))
    assert sum(float(b.weight.sum()) for b in keyed) == len(trajs)


def test_drop_remainder():
    trajs = [_traj(5, 3, k) for k in range(7)]
    batches = list(batching.relaxation_batches(trajs, 3, drop_remainder=True))
    assert len(batches) == 2 and all(float(b.weight.sum()) == 3 for b in batches)


def test_force_batches_flatten_all_frames():
    trajs = [_traj(5, 3, 0), _traj(40, 2, 1), _traj(6, 4, 2)]
    batches = list(batching.force_batches(trajs, 4, shuffle_key_or_seed=3))
    assert sum(float(b.weight.sum()) for b in batches) == 9
    total_force = sum(float(np.abs(np.asarray(b.forces)).sum()) for b in batches)
    assert total_force == pytest.approx(sum(np.abs(t.forces.astype(np.float32)).sum() for t in trajs), rel=1e-5)
    for b in batches:
        assert b.forces.shape == (4, b.structures.max_atoms, 3)
        assert np.all(np.asarray(b.forces)[~np.asarray(b.structures.mask)] == 0)


def test_intermediate_start_pairs():
    t = _traj(4, 7, 0)
    pairs = batching.intermediate_start_pairs(t, 2)
    assert len(pairs) == 3  # frames 0, 2, 4 (frame 6 is the target)
    for i, (start, target) in enumerate(pairs):
        np.testing.assert_array_equal(start, t.positions[2 * i])
        np.testing.assert_array_equal(target, t.final_positions)
    batches = list(batching.intermediate_relaxation_batches([t, _traj(3, 3, 1)], 2, 2))
    assert sum(float(b.weight.sum()) for b in batches) == 3 + 1


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=9),
    batch_size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_batching_round_trip(sizes, batch_size, seed):
    trajs = [_traj(n, 2, k, seed=seed + k) for k, n in enumerate(sizes)]
    recovered = {}
    for b in batching.relaxation_batches(trajs, batch_size, buckets=(8, 32, 128), shuffle_key_or_seed=seed):
        assert b.initial.positions.shape[0] == batch_size
        assert b.initial.positions.shape[1] == batching.bucket_atoms(
            int(np.asarray(b.initial.mask).sum(axis=1).max()), (8, 32, 128))
        mask = np.asarray(b.initial.mask)
        for row in np.nonzero(np.asarray(b.weight))[0]:
            n = int(mask[row].sum())
            assert mask[row, :n].all() and not mask[row, n:].any()
            key = np.asarray(b.initial.positions)[row, :n].round(4).tobytes()
            recovered[key] = (np.asarray(b.initial.species)[row, :n], np.asarray(b.target_positions)[row, :n])
    assert len(recovered) == len(trajs)
    for t in trajs:
        species, target = recovered[t.initial_positions.astype(np.float32).round(4).tobytes()]
        np.testing.assert_array_equal(species, t.species)
        np.testing.assert_allclose(target, t.final_positions, atol=1e-5)
