"""The equivariant message-passing potential: conservative forces, symmetries, padding, neighbour
capacity, and the BPTT gradient through its forces (second derivatives) against finite differences.

Float32 tolerances (symmetry and padding tests): forces are O(1) eV/Å; reordered float32 sums
differ by ~1e-6 relative, so 1e-4 eV/Å absolute is tight. Finite-difference tests run in float64.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_mlip import losses
from bptt_mlip import structures as st
from bptt_mlip.models import equivariant as eq
from bptt_mlip.models import neighbours
from bptt_mlip.relax import FixedStep, RolloutConfig, rollout

CONFIG = eq.EquivariantConfig(cutoff=3.2, channels=4, max_angular=2, num_layers=2, num_radial=4, radial_hidden=8,
                              capacity=16, avg_neighbours=6.0)
TENSOR = dataclasses.replace(CONFIG, messages="tensor")
BOTH_KINDS = pytest.mark.parametrize("config", [CONFIG, TENSOR], ids=["density", "tensor"])
SCALE = 20.0  # eV: sparse 8-atom cells give the tiny model small forces; this makes them O(0.1-1) eV/Å
ATOL = 1e-4  # eV/Å and eV, float32
TRICLINIC = np.array([[7.0, 0.0, 0.0], [1.1, 6.9, 0.0], [0.6, -0.8, 7.2]])


def _random_positions(rng, n, cell, min_distance=1.7):
    """n positions in the cell (Å) no closer than min_distance under the minimum image."""
    cell = np.asarray(cell, np.float64)
    out = []
    while len(out) < n:
        x = rng.uniform(0.0, 1.0, 3) @ cell
        if all(np.linalg.norm(_mic(x - y, cell)) >= min_distance for y in out):
            out.append(x)
    return np.array(out)


def _mic(d, cell):
    f = d @ np.linalg.inv(cell)
    return (f - np.round(f)) @ cell


def _structure(n, cell, seed, species="Si"):
    rng = np.random.default_rng(seed)
    symbols = [species if i % 3 else "C" for i in range(n)]  # two elements: the embedding matters
    return symbols, _random_positions(rng, n, cell), np.asarray(cell, np.float64)


def _batch(items, **kwargs):
    return st.from_arrays([s for s, _, _ in items], [x for _, x, _ in items], [c for _, _, c in items], **kwargs)


@functools.lru_cache(maxsize=None)
def _params(config=CONFIG):
    # parameters do not depend on the capacity: one set serves every capacity of a message kind
    return eq.init_params(dataclasses.replace(config, capacity=CONFIG.capacity), jax.random.PRNGKey(3))


@functools.lru_cache(maxsize=None)
def _energy_force(config=CONFIG):
    return jax.jit(eq.make_energy_force_fn(config, SCALE))


def _as64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                  tree)


@BOTH_KINDS
def test_forces_equal_minus_energy_gradient_by_central_differences(config):
    with jax.enable_x64(True):
        s = _as64(_batch([_structure(8, TRICLINIC, seed=0)]))
        params = _as64(_params(config))
        energy_fn = jax.jit(eq.make_energy_fn(config, SCALE))
        forces = np.asarray(jax.jit(eq.make_force_fn(config, SCALE))(params, s))[0]
        assert np.abs(forces).max() > 1e-2  # a real test, not zeros against zeros
        h = 1e-5
        for atom, axis in [(0, 0), (1, 2), (3, 1), (5, 0), (7, 2)]:
            def energy_at(delta):
                x = s.positions.at[0, atom, axis].add(delta)
                return float(energy_fn(params, s.replace(positions=x))[0])

            fd = -(energy_at(h) - energy_at(-h)) / (2 * h)
            np.testing.assert_allclose(forces[atom, axis], fd, rtol=1e-6, atol=1e-8)


@BOTH_KINDS
def test_translation_and_wrapping_change_nothing(config):
    s = _batch([_structure(8, TRICLINIC, seed=1)])
    e0, f0 = _energy_force(config)(_params(config), s)
    moved = s.replace(positions=s.positions + jnp.asarray([0.37, -1.9, 2.6]))
    e1, f1 = _energy_force(config)(_params(config), moved)
    cell = s.cell[0]
    wrapped = s.replace(positions=s.positions.at[0, 2].add(cell[0] - cell[2]).at[0, 5].add(-cell[1]))
    e2, f2 = _energy_force(config)(_params(config), wrapped)
    for e, f in [(e1, f1), (e2, f2)]:
        np.testing.assert_allclose(e, e0, atol=ATOL, rtol=1e-6)
        np.testing.assert_allclose(f, f0, atol=ATOL)


def _rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@BOTH_KINDS
def test_rotating_positions_and_cell_rotates_forces(config):
    s = _batch([_structure(8, TRICLINIC, seed=2)])
    e0, f0 = _energy_force(config)(_params(config), s)
    rot = jnp.asarray(_rotation(7), jnp.float32)
    rotated = s.replace(positions=s.positions @ rot.T, cell=s.cell @ rot.T)
    e1, f1 = _energy_force(config)(_params(config), rotated)
    np.testing.assert_allclose(e1, e0, atol=ATOL, rtol=1e-6)
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=ATOL)
    assert float(jnp.abs(f0).max()) > 1e-2


def test_permuting_atoms_permutes_forces():
    symbols, x, cell = _structure(8, TRICLINIC, seed=3)
    perm = np.random.default_rng(0).permutation(8)
    s = _batch([(symbols, x, cell)])
    sp = _batch([([symbols[i] for i in perm], x[perm], cell)])
    e0, f0 = _energy_force()(_params(), s)
    e1, f1 = _energy_force()(_params(), sp)
    np.testing.assert_allclose(e1, e0, atol=ATOL, rtol=1e-6)
    np.testing.assert_allclose(f1[0], f0[0][perm], atol=ATOL)


def test_padded_batch_of_mixed_sizes_equals_each_structure_alone():
    items = [_structure(4, np.diag([6.6, 7.0, 6.8]), seed=4), _structure(12, TRICLINIC, seed=5),
             _structure(8, np.eye(3) * 7.0, seed=6)]
    batch = _batch(items, max_atoms=16, batch_size=4)  # and one all-padding row
    energies, forces = _energy_force()(_params(), batch)
    for b, item in enumerate(items):
        e_alone, f_alone = _energy_force()(_params(), _batch([item]))
        n = len(item[0])
        np.testing.assert_allclose(energies[b], e_alone[0], atol=ATOL, rtol=1e-6)
        np.testing.assert_allclose(forces[b, :n], f_alone[0], atol=ATOL)
        assert np.all(np.asarray(forces[b, n:]) == 0.0)
    assert float(energies[3]) == 0.0 and np.all(np.asarray(forces[3]) == 0.0)


def _cluster_structure():
    """10 atoms within 2.1 Å of each other: every atom has 9 neighbours within the 3.2 Å cutoff."""
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], np.float64) * 1.2 + 2.0
    extra = np.array([[2.6, 2.6, 3.85], [2.6, 3.85, 2.6]])
    return ["Si"] * 10, np.concatenate([corners, extra]), np.eye(3) * 8.0


def test_overflow_is_detected_never_truncated():
    small = dataclasses.replace(CONFIG, capacity=8)
    batch = _batch([_cluster_structure(), _structure(8, TRICLINIC, seed=8)])
    assert eq.max_neighbour_count(small, batch) == 9
    np.testing.assert_array_equal(eq.neighbour_overflow(small, batch), [True, False])
    with pytest.raises(ValueError, match=r"structure 0: an atom has 9 neighbours.*capacity 8.*capacity=16"):
        eq.check_structures(small, batch)
    energies, forces = _energy_force(small)(_params(), batch)
    assert np.isnan(energies[0]) and np.all(np.isnan(forces[0, :10]))
    assert np.isfinite(energies[1]) and np.all(np.isfinite(forces[1]))
    # the same batch with enough capacity: nothing flagged, and capacity does not change parameters
    assert eq.choose_capacity(small, [batch]).capacity == 16
    eq.check_structures(CONFIG, batch)
    energies, forces = _energy_force()(_params(), batch)
    assert np.all(np.isfinite(energies)) and np.all(np.isfinite(forces))


def test_cell_narrower_than_twice_the_cutoff_is_rejected():
    batch = _batch([_structure(4, np.eye(3) * 6.0, seed=9)])
    with pytest.raises(ValueError, match=r"structure 0: cutoff 3.2 Å is not below 0.5 x the smallest cell width "
                                         r"\(6.000 Å\).*needs periodic_images=1"):
        eq.check_structures(CONFIG, batch)
    assert bool(neighbours.cell_too_small(batch.cell, CONFIG.cutoff)[0])
    assert np.isnan(_energy_force()(_params(), batch)[0][0])


@BOTH_KINDS
def test_bptt_gradient_through_rollout_matches_central_differences(config):
    """d/d(theta) of the mean Dq after 3 frames X + eta F(X), F = -dE/dX: needs second derivatives."""
    with jax.enable_x64(True):
        items = [_structure(6, TRICLINIC, seed=10), _structure(9, np.eye(3) * 7.0, seed=11)]
        batch = _as64(_batch(items, max_atoms=12, batch_size=3))
        rng = np.random.default_rng(1)
        target = jnp.where(batch.mask[..., None], batch.positions + 0.05 * rng.normal(size=batch.positions.shape), 0.0)
        force_fn = eq.make_force_fn(config, SCALE)
        rule = FixedStep(0.02)
        frames = RolloutConfig(max_frames=3, stop_rms=0.0)

        def loss(model_params):
            result = rollout(force_fn, rule, {"model": model_params, "step_rule": {}}, batch, rollout_config=frames)
            dq = losses.delta_q(result.positions, target, batch.masses, batch.mask)
            return losses.weighted_mean(dq, jnp.asarray([1.0, 1.0, 0.0]))

        params = _as64(_params(config))
        grads = jax.jit(jax.grad(loss))(params)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
        loss_jit = jax.jit(loss)
        h = 1e-5
        for path in [("interaction_0", "radial_out", "kernel"), ("species_embedding", "embedding")]:
            leaf = functools.reduce(lambda t, k: t[k], path, params)
            index = (14, 1) if path[0] == "species_embedding" else (0, 0)  # Si row of the embedding

            def with_entry(delta):
                new = jax.tree_util.tree_map(lambda a: a, params)
                functools.reduce(lambda t, k: t[k], path[:-1], new)[path[-1]] = leaf.at[index].add(delta)
                return float(loss_jit(new))

            fd = (with_entry(h) - with_entry(-h)) / (2 * h)
            analytic = float(functools.reduce(lambda t, k: t[k], path, grads)[index])
            assert abs(fd) > 1e-6
            np.testing.assert_allclose(analytic, fd, rtol=1e-5, atol=1e-9)


def test_fit_energy_scale_offsets_and_scale():
    species = np.array([[14, 14, 6, 0], [14, 6, 6, 6]])
    mask = species > 0
    energies = np.array([2 * -4.5 + 1 * -7.0, 1 * -4.5 + 3 * -7.0])
    forces = np.zeros((2, 4, 3))
    forces[mask] = 0.5
    fitted = eq.fit_energy_scale(species, forces, mask, energies)
    np.testing.assert_allclose(fitted.element_shift[14], -4.5, rtol=1e-6)
    np.testing.assert_allclose(fitted.element_shift[6], -7.0, rtol=1e-6)
    np.testing.assert_allclose(fitted.energy_scale, 0.5, rtol=1e-6)
    # offsets move the energy by their sum over atoms and leave the forces alone
    s = _batch([_structure(8, TRICLINIC, seed=12)])
    shifted = eq.EnergyScale(element_shift=fitted.element_shift, energy_scale=jnp.asarray(SCALE))
    e0, f0 = _energy_force()(_params(), s)
    e1, f1 = jax.jit(eq.make_energy_force_fn(CONFIG, shifted))(_params(), s)
    expected = float(jnp.sum(fitted.element_shift[s.species[0]]))
    np.testing.assert_allclose(e1 - e0, expected, rtol=1e-5)
    np.testing.assert_allclose(f1, f0, atol=ATOL)
