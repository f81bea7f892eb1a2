"""Using a trained model in a materials workflow: relax API, ASE calculator, command line, defect plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.optimize import FIRE
from pymatgen.core import Lattice, Structure

from bptt_mlip.workflow import api
from bptt_mlip.workflow import calculator
from bptt_mlip.relax import fire
from bptt_mlip.models import adapt as model
from bptt_mlip.workflow import plots_structure
from bptt_mlip.relax.step_rules import LearnableStep, step_rule_to_dict
from bptt_mlip.workflow.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
ETA = 0.02


def _tiny_model() -> api.TrainedModel:
    params = {"model": model.init_params(model.TINY, jax.random.PRNGKey(0)), "step_rule": {"eta": np.float32(ETA)}}
    return api.TrainedModel(model.TINY, model.Normalizer.identity(), params, LearnableStep(init_step=0.05))


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """A run directory holding checkpoints/bptt_best (as the main job writes it)."""
    from bptt_mlip.workflow import model_io

    run = tmp_path_factory.mktemp("run")
    model_io.save_model(run / "checkpoints" / "bptt_best", tiny.params, tiny.normalizer, tiny.config,
                        step_rule_to_dict(tiny.step_rule, tiny.modifiers), {"role": "bptt_best_validation"})
    return run


def _structures():
    si = bulk("Si", "diamond", a=5.43, cubic=True)  # 8 atoms, bucket 16
    si.rattle(0.05, seed=1)
    si.info["label"] = "si8"
    nacl = Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # 2 atoms
    cu = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 3)  # 48 atoms, bucket 48
    cu.rattle(0.03, seed=2)
    gan = Structure.from_spacegroup("P6_3mc", Lattice.hexagonal(3.19, 5.19), ["Ga", "N"],
                                    [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.377]])  # 4 atoms, wurtzite
    return [si, nacl, cu, gan]


def test_trained_model_load_roundtrip(saved, tiny, tmp_path):
    for where in (saved, saved / "checkpoints" / "bptt_best"):  # run directory or checkpoint directory
        m = api.TrainedModel.load(where)
        assert m.config == tiny.config and m.step_rule == tiny.step_rule and m.modifiers == tiny.modifiers
        assert float(m.params["step_rule"]["eta"]) == pytest.approx(ETA)
        assert m.meta["role"] == "bptt_best_validation"
        assert m.num_params() == model.count_params(tiny.params["model"])
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        api.TrainedModel.load(missing)
    assert not missing.exists()  # loading never creates the directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        api.TrainedModel.load(tmp_path / "empty")


def test_relax_mixed_ase_and_pymatgen(tiny):
    inputs = _structures()
    before = [x.copy() for x in inputs]
    out = api.relax_structures(inputs, tiny, max_frames=6, return_trajectory=True)
    assert [type(o) for o in out.structures] == [type(i) for i in inputs]
    assert out.num_frames.shape == out.converged.shape == out.diverged.shape == out.max_force.shape == (4,)
    assert out.num_frames.dtype.kind == "i" and out.converged.dtype == bool and out.diverged.dtype == bool
    assert np.all(out.num_frames == 6) and not out.diverged.any()  # random model: moves all 6 frames
    for src, new, old, traj in zip(inputs, out.structures, before, out.trajectories):
        if isinstance(src, Atoms):
            assert new is not src and np.array_equal(new.numbers, src.numbers)
            assert np.array_equal(new.cell.array, src.cell.array) and np.array_equal(new.pbc, src.pbc)
            assert new.info == src.info
            assert np.array_equal(src.positions, old.positions)  # input untouched
            start, end = src.positions, new.positions
        else:
            assert new.species == src.species and new.lattice == src.lattice
            assert np.array_equal(src.cart_coords, old.cart_coords)
            start, end = src.cart_coords, new.cart_coords
            np.testing.assert_allclose(new.lattice.get_cartesian_coords(new.frac_coords), end, atol=1e-6)
        assert np.abs(end - start).max() > 1e-3  # moved
        assert traj.shape == (7, len(src), 3)
        np.testing.assert_allclose(traj[0], start, atol=1e-5)
        np.testing.assert_allclose(traj[-1], end, atol=1e-6)
    assert out.structures[0].info["label"] == "si8"

    # padding and batch neighbours change nothing: one structure alone gives the same result
    alone = api.relax_structures(inputs[2], tiny, max_frames=6, return_trajectory=True)
    np.testing.assert_allclose(alone.structure.positions, out.structures[2].positions, atol=1e-5)
    # a loose stopping rule: every structure converges after its first frame
    loose = api.relax_structures(inputs, tiny, max_frames=6, stop_rms=10.0, return_trajectory=True)  # no recompilation
    assert loose.converged.all() and np.all(loose.num_frames == 1)


def test_relax_plain_force_fn_and_fire(tiny):
    inputs = _structures()[:2]
    ref = api.relax_structures(inputs, tiny, max_frames=4)
    plain = api.relax_structures(inputs, tiny.force_fn, params=tiny.params["model"], step_size=ETA, max_frames=4)
    for a, b in zip(ref.structures, plain.structures):
        np.testing.assert_allclose(np.asarray(a.get_positions() if isinstance(a, Atoms) else a.cart_coords),
                                   np.asarray(b.get_positions() if isinstance(b, Atoms) else b.cart_coords), atol=1e-6)
    with pytest.raises(ValueError, match="step_size"):
        api.relax_structures(inputs, tiny.force_fn, params=tiny.params["model"])
    cfg = fire.FireConfig(fmax=0.01, max_steps=7)
    out = api.relax_structures(inputs, tiny.force_fn, params=tiny.params["model"], method="fire", fire_config=cfg)
    assert np.all(out.num_frames == 7) and not out.converged.any()
    with pytest.raises(ValueError, match="method"):
        api.relax_structures(inputs, tiny, method="bfgs")


def test_resolve_model_one_dispatch_for_relax_and_calculator(tiny):
    force_fn, full, trained = api.resolve_model(tiny)
    assert force_fn is tiny.force_fn and full is tiny.params and trained is tiny
    force_fn, full, trained = api.resolve_model(tiny.force_fn, tiny.params["model"])
    assert full["model"] is tiny.params["model"] and not any(v for k, v in full.items() if k != "model")
    assert trained is None
    with pytest.raises(ValueError, match="only with a plain force_fn"):
        api.resolve_model(tiny, tiny.params["model"])
    with pytest.raises(ValueError, match="BPTTCalculator with a plain force_fn needs params"):
        calculator.BPTTCalculator(tiny.force_fn)
    with pytest.raises(TypeError, match="TrainedModel or a force_fn"):
        api.resolve_model(3, {})
    assert api.relax is api.relax_structures  # the name the quickstart shows


def test_atoms_like_arrays_and_copies():
    from bptt_mlip import structures

    si, nacl = _structures()[:2]
    assert structures.is_atoms_like(si) and structures.is_atoms_like(nacl) and not structures.is_atoms_like([si])
    z, pos, cell = structures.atoms_arrays(nacl)
    assert z.tolist() == [11, 17]
    np.testing.assert_allclose(pos[1], [2.1, 2.1, 2.1])
    np.testing.assert_allclose(cell, 4.2 * np.eye(3))
    z, pos, cell = structures.atoms_arrays(si)
    assert z.tolist() == [14] * 8 and np.array_equal(pos, si.get_positions()) and np.array_equal(cell, si.cell.array)
    moved = pos + 0.1
    si_moved = structures.copy_with_positions(si, moved)
    assert si_moved.info["label"] == "si8" and np.array_equal(si_moved.get_positions(), moved)
    assert not np.array_equal(si.get_positions(), moved)  # the input is not modified
    nacl_moved = structures.copy_with_positions(nacl, np.array([[0.5, 0.0, 0.0], [2.1, 2.1, 2.1]]))
    np.testing.assert_allclose(nacl_moved.frac_coords[0], [0.5 / 4.2, 0.0, 0.0])
    np.testing.assert_allclose(nacl.cart_coords[0], [0.0, 0.0, 0.0])
    with pytest.raises(TypeError, match="ase.Atoms or a pymatgen"):
        structures.atoms_arrays("Si")


def test_ase_calculator_fire_matches_relax(tiny):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=3)
    fmax, steps = 0.01, 40
    expected = api.relax_structures(atoms, tiny, method="fire", fire_config=fire.FireConfig(fmax=fmax, max_steps=steps))

    work = atoms.copy()
    work.calc = calculator.BPTTCalculator(tiny)
    # ASE's Optimizer.log asks for the energy every step: a plain FIRE(atoms) stops with a clear error
    with pytest.raises(PropertyNotImplementedError, match="forces_only"):
        FIRE(work, logfile=None).run(fmax=fmax, steps=steps)
    work = atoms.copy()
    work.calc = calculator.BPTTCalculator(tiny)
    opt = FIRE(calculator.forces_only(work), logfile=None)
    converged = opt.run(fmax=fmax, steps=steps)
    assert opt.nsteps == int(expected.num_frames[0]) and converged == bool(expected.converged[0])
    # float32 model, ASE's float64 FIRE arithmetic: equal to well below 1e-4 Å
    np.testing.assert_allclose(work.positions, expected.structure.positions, atol=1e-4)
    assert np.abs(work.positions - atoms.positions).max() > 1e-2

    for ask in (work.get_potential_energy, work.get_stress, lambda: work.calc.get_property("free_energy", work)):
        with pytest.raises(PropertyNotImplementedError, match="predicts forces directly"):
            ask()
    # same bucket, different size: no recompilation
    jitted = api.jitted_forces(tiny.force_fn)
    n_compiled = jitted._cache_size()
    other = bulk("Si", "diamond", a=5.43) * (2, 2, 2)  # 16 atoms, same bucket (16)
    other.calc = calculator.BPTTCalculator(tiny)
    f = other.get_forces()
    assert f.shape == (16, 3) and f.dtype == np.float64 and np.isfinite(f).all()
    assert jitted._cache_size() == n_compiled


def test_oracle_from_calculator():
    from bptt_mlip.data import generator

    oracle = calculator.oracle_from_calculator(EMT(), elements=["Cu"])
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=4)
    f, e = oracle.forces_and_energy(atoms.numbers, atoms.positions, atoms.cell.array)
    atoms.calc = EMT()
    np.testing.assert_allclose(f, atoms.get_forces(), atol=1e-12)
    assert e == pytest.approx(atoms.get_potential_energy())
    with pytest.raises(ValueError, match="does not cover"):
        oracle.forces_and_energy([29, 79], atoms.positions[:2], atoms.cell.array)
    res = generator.relax_with_oracle(atoms.numbers, atoms.positions, atoms.cell.array, oracle)
    assert res.converged and res.positions.shape[1:] == (4, 3)
    # a forces-only calculator as oracle: refused unless NaN energies are acceptable
    no_e = calculator.oracle_from_calculator(calculator.BPTTCalculator(_tiny_model()), elements=["Cu"])
    with pytest.raises(PropertyNotImplementedError, match="require_energy"):
        no_e.forces_and_energy(atoms.numbers, atoms.positions, atoms.cell.array)


def test_cli_relax_info_and_errors(saved, tmp_path, capsys):
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.05, seed=5)
    gan = bulk("GaN", "wurtzite", a=3.19, c=5.19) * (2, 2, 1)
    ase.io.write(tmp_path / "si.cif", si)
    ase.io.write(tmp_path / "POSCAR", gan, format="vasp")
    ase.io.write(tmp_path / "two.extxyz", [si, gan])
    out = tmp_path / "relaxed.extxyz"
    ckpt = str(saved / "checkpoints" / "bptt_best")
    args = ["relax", str(tmp_path / "si.cif"), str(tmp_path / "POSCAR"), str(tmp_path / "two.extxyz"),
            "--checkpoint", ckpt, "--out", str(out), "--max-frames", "5"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "Ga8N8" in text
    frames = ase.io.read(out, index=":")
    assert [len(a) for a in frames] == [8, 16, 8, 16]
    for a, src in zip(frames, [si, gan, si, gan]):
        assert a.info["num_frames"] == 5 and a.info["converged"] in (False, True) and "max_force" in a.info
        np.testing.assert_allclose(a.cell.array, src.cell.array, atol=1e-5)
        assert a.get_chemical_formula() == src.get_chemical_formula()
    assert frames[0].info["source"].endswith("si.cif") and frames[3].info["source_index"] == 1

    assert cli_main(["relax", str(tmp_path / "si.cif"), "-c", ckpt, "--out", str(out), "--method", "fire",
                     "--max-frames", "3", "--fmax", "0.01"]) == 0
    assert ase.io.read(out).info["method"] == "fire"
    capsys.readouterr()

    assert cli_main(["info", str(saved)]) == 0
    text = capsys.readouterr().out
    for needle in ("d_model = 16", "parameters:", "learnable, eta = 0.02", "role: bptt_best_validation",
                   "saved step: 0", "electronegativity"):
        assert needle in text

    bad_ckpt = tmp_path / "no_such_checkpoint"
    assert cli_main(["relax", str(tmp_path / "si.cif"), "-c", str(bad_ckpt), "--out", str(out)]) == 2
    assert "no_such_checkpoint" in capsys.readouterr().err
    assert cli_main(["info", str(bad_ckpt)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["relax", str(tmp_path / "missing.cif"), "-c", ckpt]) == 2
    assert "missing.cif" in capsys.readouterr().err
    junk = tmp_path / "junk.cif"
    junk.write_text("this is not a CIF file\n")
    assert cli_main(["relax", str(junk), "-c", ckpt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot read structures" in err and "junk.cif" in err


def test_cli_module_entry_point(saved):
    proc = subprocess.run([sys.executable, "-m", "bptt_mlip", "info", str(saved)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model config (ADAPT)" in proc.stdout


def test_defect_neighbourhood_png(tmp_path):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    start = atoms.positions
    rng = np.random.default_rng(0)
    reference = start + 0.02 * rng.normal(size=start.shape)
    reference[5] += [0.3, -0.2, 0.1]  # the "defect" atom moves most
    predicted = reference + 0.03 * rng.normal(size=start.shape)
    path = plots_structure.defect_neighbourhood(start, predicted, reference, tmp_path / "defect.png",
                                                species=atoms.numbers, cell=atoms.cell.array, radius=3.0)
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        plots_structure.defect_neighbourhood(start, predicted[:3], reference, tmp_path / "bad.png")
