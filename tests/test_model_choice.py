"""Choosing the force model: the registry, checkpoints of every kind, the ASE calculator's energy,
and ``experiments.finetune --model=equivariant``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bptt_mlip import structures as structures_lib
from bptt_mlip.models import adapt, equivariant, registry
from bptt_mlip.training import checkpoint, steps
from bptt_mlip.workflow import api, model_io
from bptt_mlip.workflow.calculator import BPTTCalculator

ROOT = Path(__file__).resolve().parents[1]
SI_LATTICE = 5.43  # Å; the 8-atom diamond cell is 5.43 Å wide, so cutoffs stay below 2.715 Å
CUTOFF = 2.6  # Å: the four nearest neighbours (2.35 Å) of diamond Si
EQUIVARIANT = dataclasses.replace(equivariant.TINY_EQUIVARIANT, cutoff=CUTOFF)
PERIODIC_ADAPT = dataclasses.replace(adapt.TINY, geometry="minimum_image", cutoff=CUTOFF, num_radial=4,
                                     pair_hidden=8)


def _si8(rattle: float = 0.05, seed: int = 0):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=SI_LATTICE, cubic=True)
    atoms.rattle(stdev=rattle, seed=seed)
    return atoms


def _normalizer():
    return adapt.Normalizer(
        input_mean=np.linspace(-1.0, 1.0, 12).astype(np.float32),
        input_std=np.linspace(0.5, 2.0, 12).astype(np.float32),
        force_mean=np.array([0.1, -0.2, 0.0], np.float32), force_std=np.array([1.5, 0.7, 1.1], np.float32))


def _energy_scale(shift: float = -5.4, scale: float = 0.7):
    element_shift = np.zeros(equivariant.NUM_SPECIES, np.float32)
    element_shift[14] = shift
    return equivariant.EnergyScale(element_shift=jnp.asarray(element_shift), energy_scale=jnp.float32(scale))


MODELS = {  # name -> (config, statistics)
    "adapt": (dataclasses.replace(adapt.TINY, net_force="zero"), _normalizer()),
    "periodic_adapt": (PERIODIC_ADAPT, _normalizer()),
    "equivariant": (EQUIVARIANT, _energy_scale()),
}


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_registry_names_the_kinds_and_round_trips_configs():
    assert set(registry.KINDS) == {"adapt", "equivariant"}
    for config, _ in MODELS.values():
        kind = registry.kind_of(config)
        d = json.loads(json.dumps(registry.config_to_dict(kind, config)))  # survives JSON
        assert d["model_kind"] == kind and registry.config_from_dict(d) == (kind, config)
    assert registry.get("equivariant").has_energy and not registry.get("adapt").has_energy
    # a meta without model_kind (every checkpoint written before there was a choice) holds ADAPT
    assert registry.config_from_dict({"model_config": {"d_model": 16, "num_heads": 2}})[1] == adapt.AdaptConfig(
        d_model=16, num_heads=2)
    with pytest.raises(ValueError, match="unknown model kind 'mace'"):
        registry.config_from_dict({"model_kind": "mace", "model_config": {}})
    with pytest.raises(TypeError, match="expects a EquivariantConfig"):
        registry.config_to_dict("equivariant", adapt.TINY)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip_gives_identical_forces(tmp_path, name):
    config, statistics = MODELS[name]
    params = {"model": registry.init_params(config, jax.random.PRNGKey(3)), "step_rule": {}}
    model_io.save_model(tmp_path / name, params, statistics, config, {"kind": "fixed", "init_step": 0.02},
                        {"role": "test"})
    config2, statistics2, params2, meta = model_io.load_model(tmp_path / name)
    assert meta["model_kind"] == registry.kind_of(config) and config2 == config
    assert type(statistics2) is type(statistics) and _leaves_equal(statistics2, statistics)
    assert _leaves_equal(params2["model"], params["model"])

    loaded = api.TrainedModel.load(tmp_path / name)
    assert loaded.kind == registry.kind_of(config) and loaded.config == config
    batch = structures_lib.from_atoms([_si8(), _si8(seed=1)[:6]], max_atoms=8, batch_size=2)
    expected = registry.make_force_fn(config, statistics)(params["model"], batch)
    got = loaded.force_fn(loaded.model_params, batch)
    assert np.all(np.isfinite(np.asarray(expected)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    if name == "equivariant":
        energies, forces = loaded.energy_force_fn(loaded.model_params, batch)
        np.testing.assert_array_equal(np.asarray(forces), np.asarray(expected))
        assert np.all(np.isfinite(np.asarray(energies)))
    else:
        assert loaded.energy_force_fn is None


def test_checkpoint_without_model_kind_loads_as_adapt(tmp_path):
    cfg = adapt.TINY
    params = {"model": adapt.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": {"eta": jnp.float32(0.03)}}
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optax.identity().init(params),
                             key=jax.random.PRNGKey(0))
    old_meta = {"model_config": checkpoint.config_to_dict(cfg), "step_config": {"kind": "fixed", "init_step": 0.03}}
    checkpoint.save_checkpoint(tmp_path / "old", 0, state, _normalizer(), old_meta)
    config, statistics, _, meta = model_io.load_model(tmp_path / "old")
    assert "model_kind" not in meta and config == cfg and isinstance(statistics, adapt.Normalizer)
    model = api.TrainedModel.load(tmp_path / "old")
    assert model.kind == "adapt" and model.energy_force_fn is None
    batch = structures_lib.from_atoms([_si8()], max_atoms=8, batch_size=1)
    np.testing.assert_array_equal(np.asarray(model.force_fn(model.model_params, batch)),
                                  np.asarray(adapt.make_force_fn(cfg, _normalizer())(params["model"], batch)))


def _equivariant_model(shift: float = 0.0) -> api.TrainedModel:
    """A random equivariant model whose output scale (100 eV) gives forces of 0.1-1 eV/Å on a rattled Si8."""
    params = {"model": equivariant.init_params(EQUIVARIANT, jax.random.PRNGKey(7)), "step_rule": {}}
    return api.TrainedModel(EQUIVARIANT, _energy_scale(shift, scale=100.0), params)


def test_calculator_energy_and_forces_agree_by_central_differences():
    """The model runs in float32 (energies ~100 eV, rounding ~1e-5 eV): central differences with
    h = 1e-2 Å (measured error ~1e-3 eV/Å) must match forces of 0.1-0.3 eV/Å to 5e-3 eV/Å."""
    atoms = _si8()
    atoms.calc = BPTTCalculator(_equivariant_model())
    forces = atoms.get_forces()
    energy = atoms.get_potential_energy()
    assert atoms.get_potential_energy(force_consistent=True) == energy  # free_energy
    assert np.max(np.abs(forces)) > 0.05  # a rattled cell has forces to compare
    h = 1e-2
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for c in range(3):
            energies = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.calc = atoms.calc
                moved.positions[i, c] += sign * h
                energies.append(moved.get_potential_energy())
            numeric[i, c] = -(energies[0] - energies[1]) / (2 * h)
    np.testing.assert_allclose(forces, numeric, atol=5e-3)
    # the element offsets add to the energy and leave the forces alone
    shifted = _si8()
    shifted.calc = BPTTCalculator(_equivariant_model(shift=-5.4))
    assert shifted.get_potential_energy() == pytest.approx(energy - 8 * 5.4, abs=1e-3)
    np.testing.assert_allclose(shifted.get_forces(), forces, atol=1e-5)


def test_bfgs_converges_with_the_equivariant_model():
    from ase.optimize import BFGS

    atoms = _si8()
    atoms.calc = BPTTCalculator(_equivariant_model())
    start_energy = atoms.get_potential_energy()
    converged = BFGS(atoms, logfile=None).run(fmax=0.01, steps=300)
    assert converged
    assert np.max(np.linalg.norm(atoms.get_forces(), axis=1)) < 0.01
    assert atoms.get_potential_energy() < start_energy


def test_calculator_of_a_direct_force_model_keeps_forces_only():
    from ase.calculators.calculator import PropertyNotImplementedError

    config, statistics = MODELS["adapt"]
    model = api.TrainedModel(config, statistics, {"model": adapt.init_params(config, jax.random.PRNGKey(0)),
                                                  "step_rule": {}})
    atoms = _si8()
    atoms.calc = BPTTCalculator(model)
    assert atoms.get_forces().shape == (8, 3)
    with pytest.raises(PropertyNotImplementedError, match="predicts forces directly"):
        atoms.get_potential_energy()


def test_finetune_script_trains_the_equivariant_model(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--model=equivariant", "--cutoff=3.0", "--channels=4", "--max_angular=1", "--num_layers=1",
             "--max_trajectories=9", "--num_test=2", "--num_val=2", "--pretrain_epochs=1",
             "--pretrain_frame_stride=20", "--pretrain_batch_size=16", "--bptt_epochs=1", "--max_frames=3",
             "--grid_steps=0.01,0.04", "--fire_max_steps=3", "--batch_size=4", f"--workdir={workdir}"]
    proc = subprocess.run([sys.executable, "-m", "experiments.finetune", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["model"] == "equivariant" and results["model_kind"] == "equivariant"
    assert results["model_config"]["cutoff"] == 3.0 and results["model_config"]["channels"] == 4
    assert "equivariant" in (workdir / "results.md").read_text()
    model = api.TrainedModel.load(workdir)
    assert model.kind == "equivariant" and float(model.normalizer.energy_scale) > 0
    assert model.config.capacity in equivariant.neighbours.CAPACITY_BUCKETS
