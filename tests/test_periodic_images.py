"""Neighbour lists over periodic images, for cells narrower than twice the cutoff.

Checked against independent references: ASE's neighbour list (every pair distance of every atom,
images included) and the same crystal as a supercell wide enough for the minimum image (a model's
energy is extensive and its forces repeat with the cell). Float32 tolerances as in
test_models_equivariant.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.neighborlist import neighbor_list

from bptt_mlip import structures as st
from bptt_mlip.models import equivariant as eq
from bptt_mlip.models import neighbours

CONFIG = eq.EquivariantConfig(cutoff=3.2, channels=4, max_angular=2, num_layers=2, num_radial=4, radial_hidden=8,
                              capacity=64, avg_neighbours=12.0)
SCALE = 20.0
ATOL = 1e-4
# a skewed 2-atom cell 2.6-3.5 Å wide: a 3.2 Å cutoff reaches several images of every atom and of itself
SMALL_CELL = np.array([[3.1, 0.0, 0.0], [0.9, 3.0, 0.0], [0.4, -0.6, 3.3]])
SMALL_POSITIONS = np.array([[0.1, 0.2, 0.1], [1.9, 1.4, 1.8]])


def _batch(items, **kwargs):
    return st.from_arrays([s for s, _, _ in items], [x for _, x, _ in items], [c for _, _, c in items], **kwargs)


def _small_item():
    return ["Si", "C"], SMALL_POSITIONS, SMALL_CELL


def _supercell(item, reps):
    symbols, x, cell = item
    shifts = np.array([(a, b, c) for a in range(reps) for b in range(reps) for c in range(reps)]) @ cell
    return symbols * len(shifts), np.concatenate([x + t for t in shifts]), cell * reps


def test_images_needed_is_the_smallest_sufficient_shift():
    cube = np.eye(3) * 6.0
    assert neighbours.images_needed(cube, 2.9) == 0
    assert neighbours.images_needed(cube, 3.01) == 1  # just over half the width: the minimum image is not enough
    assert neighbours.images_needed(cube, 8.9) == 1
    assert neighbours.images_needed(cube, 9.01) == 2
    assert neighbours.images_needed(np.zeros((3, 3)), 50.0) == 0
    assert neighbours.image_shifts(1).shape == (27, 3) and not neighbours.image_shifts(1)[0].any()


@pytest.mark.parametrize("cutoff", [3.2, 5.0])
def test_edges_match_ase_neighbour_list(cutoff):
    symbols, x, cell = _small_item()
    images = neighbours.images_needed(cell, cutoff)
    assert images >= 1
    s = _batch([(symbols, x, cell)])
    edges = neighbours.build_edges(s.positions, s.cell, s.mask, cutoff, capacity=256, images=images)
    assert not bool(edges.overflow[0])
    i_ase, j_ase, d_ase = neighbor_list("ijd", Atoms(symbols, positions=x, cell=cell, pbc=True), cutoff)
    lengths = np.linalg.norm(np.asarray(edges.vectors[0]), axis=-1)
    mask, index = np.asarray(edges.mask[0]), np.asarray(edges.index[0])
    for atom in range(len(symbols)):
        ours = sorted(zip(index[atom][mask[atom]], np.round(lengths[atom][mask[atom]], 4)))
        theirs = sorted(zip(j_ase[i_ase == atom], np.round(d_ase[i_ase == atom], 4)))
        assert len(ours) == len(theirs) >= 10  # images of the other atom and of the atom itself
        assert [j for j, _ in ours] == [j for j, _ in theirs]
        np.testing.assert_allclose([d for _, d in ours], [d for _, d in theirs], atol=2e-4)
    np.testing.assert_array_equal(edges.counts[0], np.bincount(i_ase, minlength=2))


def test_small_cell_equals_its_supercell():
    small = _small_item()
    config = eq.choose_periodic_images(CONFIG, [small[2]])
    assert config.periodic_images == 1
    big = _supercell(small, 3)  # 9-10.5 Å wide: the minimum image is exact at 3.2 Å
    assert neighbours.images_needed(big[2], CONFIG.cutoff) == 0
    params = eq.init_params(CONFIG, jax.random.PRNGKey(3))
    e_small, f_small = jax.jit(eq.make_energy_force_fn(config, SCALE))(params, _batch([small]))
    e_big, f_big = jax.jit(eq.make_energy_force_fn(CONFIG, SCALE))(params, _batch([big]))
    assert np.abs(np.asarray(f_small)).max() > 1e-2
    np.testing.assert_allclose(e_big[0], 27 * e_small[0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(f_big[0]).reshape(27, 2, 3), np.broadcast_to(f_small[0], (27, 2, 3)),
                               atol=ATOL)


def test_forces_equal_minus_energy_gradient_with_images():
    with jax.enable_x64(True):
        config = dataclasses.replace(CONFIG, periodic_images=1)
        s = _batch([_small_item()])
        s = s.replace(positions=s.positions.astype(jnp.float64), cell=s.cell.astype(jnp.float64),
                      masses=s.masses.astype(jnp.float64))
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), eq.init_params(CONFIG, jax.random.PRNGKey(3)))
        energy_fn = jax.jit(eq.make_energy_fn(config, SCALE))
        forces = np.asarray(jax.jit(eq.make_force_fn(config, SCALE))(params, s))[0]
        h = 1e-5
        for atom, axis in [(0, 0), (0, 2), (1, 1)]:
            def energy_at(delta):
                return float(energy_fn(params, s.replace(positions=s.positions.at[0, atom, axis].add(delta)))[0])

            np.testing.assert_allclose(forces[atom, axis], -(energy_at(h) - energy_at(-h)) / (2 * h),
                                       rtol=1e-6, atol=1e-8)


def test_too_few_images_is_reported_and_poisoned():
    batch = _batch([_small_item()])
    with pytest.raises(ValueError, match=r"structure 0: cutoff 3.2 Å is not below 0.5 x .*needs periodic_images=1"):
        eq.check_structures(CONFIG, batch)
    params = eq.init_params(CONFIG, jax.random.PRNGKey(3))
    energies, forces = jax.jit(eq.make_energy_force_fn(CONFIG, SCALE))(params, batch)
    assert np.isnan(energies[0]) and np.all(np.isnan(forces[0]))
    eq.check_structures(dataclasses.replace(CONFIG, periodic_images=1), batch)


def test_images_leave_wide_and_non_periodic_structures_unchanged():
    rng = np.random.default_rng(0)
    wide = (["Si"] * 6, rng.uniform(0, 7.0, (6, 3)), np.eye(3) * 7.0)
    molecule = (["Si", "C", "Si"], np.array([[0.0, 0, 0], [1.9, 0, 0], [0, 2.0, 0.5]]), None)
    batch = _batch([wide, molecule])
    params = eq.init_params(CONFIG, jax.random.PRNGKey(3))
    e0, f0 = jax.jit(eq.make_energy_force_fn(CONFIG, SCALE))(params, batch)
    e1, f1 = jax.jit(eq.make_energy_force_fn(dataclasses.replace(CONFIG, periodic_images=1), SCALE))(params, batch)
    assert np.all(np.isfinite(np.asarray(e0)))
    np.testing.assert_allclose(e1, e0, rtol=1e-5)
    np.testing.assert_allclose(f1, f0, atol=ATOL)


def _trained(config):
    from bptt_mlip.workflow import api

    params = {"model": eq.init_params(CONFIG, jax.random.PRNGKey(3)), "step_rule": {}}
    return api.TrainedModel(config, eq.EnergyScale.constant(SCALE), params)


def test_relax_api_and_calculator_widen_the_search_for_a_narrow_cell():
    """A model saved with periodic_images=0 relaxes a cell that needs 1: the API and the calculator
    give what the same model with periodic_images=1 gives, and the supercell's forces repeat it."""
    from bptt_mlip.workflow.api import relax_structures
    from bptt_mlip.workflow.calculator import BPTTCalculator

    symbols, x, cell = _small_item()
    atoms = Atoms(symbols, positions=x, cell=cell, pbc=True)
    saved = _trained(CONFIG)
    assert saved.covering([np.eye(3) * 8.0]) is saved  # a wide cell changes nothing
    assert saved.covering([cell]).config.periodic_images == 1
    fire = dict(method="fire", on_out_of_domain="ignore", in_flight=False)
    ours = relax_structures(atoms, saved, **fire)
    reference = relax_structures(atoms, _trained(dataclasses.replace(CONFIG, periodic_images=1)), **fire)
    assert not ours.diverged[0] and ours.num_frames[0] > 0
    np.testing.assert_allclose(ours.structures[0].positions, reference.structures[0].positions, atol=1e-5)

    atoms.calc = BPTTCalculator(saved, on_out_of_domain="ignore")
    forces = atoms.get_forces()
    big = Atoms(*_supercell((symbols, x, cell), 3)[:2], cell=cell * 3, pbc=True)
    big.calc = BPTTCalculator(saved, on_out_of_domain="ignore")
    assert np.abs(forces).max() > 1e-2
    np.testing.assert_allclose(big.get_forces().reshape(27, 2, 3), np.broadcast_to(forces, (27, 2, 3)), atol=ATOL)
    np.testing.assert_allclose(big.get_potential_energy(), 27 * atoms.get_potential_energy(), rtol=1e-5)
