"""Readers, validation, unwrapping and curation on real DFT files and synthetic inputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from bptt_mlip.data import curation, readers
from bptt_mlip.data.trajectory import Trajectory, TrajectoryError, make_trajectory, unwrap, validate

DFT_DIR = (Path(__file__).parents[1] / ".." / "shared" / "data" / "dft").resolve()
needs_dft = pytest.mark.skipif(
    not DFT_DIR.is_dir(), reason=f"reference DFT files not found at {DFT_DIR} (the 'shared' folder beside the repo)"
)

# file: (frames, atoms, max force first, max force last) from shared/data/README.md
EXPECTED = {
    "GaN_Mg_Ga_q-1.vasprun.xml.gz": (5, 32, 1.95, 0.043),
    "GaN_Mg_Ga_q0.vasprun.xml.gz": (5, 32, 1.81, 0.042),
    "GaN_v_N_q0.vasprun.xml.gz": (8, 31, 0.83, 0.025),
    "GaN_v_N_q1.vasprun.xml.gz": (5, 31, 0.69, 0.039),
    "NbCO_relax.vasprun.xml.gz": (49, 32, 22.4, 0.070),
    "NbCO_relax.OUTCAR.gz": (49, 32, 22.4, 0.070),
}


@pytest.fixture(scope="module")
def dft_trajs():
    return {name: readers.read_trajectories(DFT_DIR / name) for name in EXPECTED}


@needs_dft
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_dft_files(dft_trajs, name):
    frames, atoms, f_first, f_last = EXPECTED[name]
    (traj,) = dft_trajs[name]
    assert traj.num_frames == frames
    assert traj.num_atoms == atoms
    assert traj.forces.shape == (frames, atoms, 3) and traj.energies.shape == (frames,)
    mf = traj.max_force()
    assert mf[0] == pytest.approx(f_first, abs=0.006)
    assert mf[-1] == pytest.approx(f_last, abs=0.0006)
    assert str(DFT_DIR / name) == traj.source
    # unwrapped: no atom jumps by more than 1.5 Å between consecutive frames
    assert np.abs(np.diff(traj.positions, axis=0)).max() < 1.5


@needs_dft
def test_nbco_variable_cell_and_outcar_agree(dft_trajs):
    (v,) = dft_trajs["NbCO_relax.vasprun.xml.gz"]
    (o,) = dft_trajs["NbCO_relax.OUTCAR.gz"]
    assert v.variable_cell and o.variable_cell
    assert v.cells.shape == (49, 3, 3)
    np.testing.assert_allclose(v.cell, v.cells[0])
    np.testing.assert_allclose(v.positions, o.positions, atol=1e-4)
    np.testing.assert_allclose(v.forces, o.forces, atol=1e-4)
    np.testing.assert_array_equal(v.species, o.species)


@needs_dft
def test_gan_fixed_cell(dft_trajs):
    (t,) = dft_trajs["GaN_v_N_q0.vasprun.xml.gz"]
    assert not t.variable_cell and t.cells is None
    assert t.cell.shape == (3, 3) and t.pbc == (True, True, True)
    assert set(t.species.tolist()) == {7, 31}


# ----------------------------------------------------------------------------- validation


def _good(**over):
    rng = np.random.default_rng(0)
    kw = dict(
        species=np.array([14, 14, 8], np.int32),
        cell=np.eye(3) * 6.0,
        pbc=(True, True, True),
        positions=rng.uniform(0, 6, size=(4, 3, 3)),
        forces=rng.normal(size=(4, 3, 3)),
        energies=np.arange(4.0),
        source="/data/run7.xyz",
        traj_id="t42",
    )
    kw.update(over)
    return Trajectory(**kw)


def test_valid_trajectory_passes():
    t = validate(_good())
    assert t.num_frames == 4 and t.num_atoms == 3
    np.testing.assert_array_equal(t.final_positions, t.positions[-1])


def _expect(traj, *needles):
    with pytest.raises(TrajectoryError) as err:
        validate(traj)
    msg = str(err.value)
    for needle in ("/data/run7.xyz", "'t42'") + needles:
        assert needle in msg, msg
    return msg


def test_nan_position_names_frame():
    t = _good()
    pos = t.positions.copy()
    pos[2, 1, 0] = np.nan
    _expect(t.replace(positions=pos), "frame 2", "positions", "atom 1")


def test_inf_force_names_frame():
    t = _good()
    f = t.forces.copy()
    f[3, 0, 2] = np.inf
    _expect(t.replace(forces=f), "frame 3", "forces")


def test_mismatched_atom_count():
    t = _good()
    _expect(t.replace(positions=t.positions[:, :2]), "frame 0", "expected (3, 3)")
    _expect(t.replace(forces=t.forces[:, :2]), "frame 0", "forces")


def test_mismatched_atoms_between_frames_from_ase():
    from ase import Atoms

    frames = [Atoms("Si2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=np.eye(3) * 5, pbc=True)] * 2
    frames.append(Atoms("Si3", positions=[[0, 0, 0], [1.5, 1.5, 1.5], [3, 3, 3]], cell=np.eye(3) * 5, pbc=True))
    with pytest.raises(TrajectoryError, match=r"run9.*'a'.*frame 2.*expected the 2 atoms"):
        readers.from_ase_frames(frames, source="run9", traj_id="a")


def test_unknown_element():
    _expect(_good(species=np.array([14, 0, 8], np.int32)), "unknown element", "atom 1")
    with pytest.raises(TrajectoryError, match=r"'Xx'.*run7.*'t42'"):
        make_trajectory(["Si", "Xx"], np.zeros((1, 2, 3)), source="/data/run7.xyz", traj_id="t42")


def test_zero_frames():
    t = _good()
    _expect(t.replace(positions=t.positions[:0], forces=None, energies=None), "zero frames")
    with pytest.raises(TrajectoryError, match="zero frames"):
        readers.from_ase_frames([], source="/data/run7.xyz", traj_id="t42")


def test_wrong_cell_shape():
    _expect(_good(cell=np.eye(2)), "cell has shape (2, 2)", "expected (3, 3)")


def test_nan_energy_names_frame():
    e = np.arange(4.0)
    e[1] = np.nan
    _expect(_good(energies=e), "frame 1", "energy")


# ----------------------------------------------------------------------------- unwrap


def test_unwrap_removes_lattice_jumps():
    cell = np.array([[5.0, 0, 0], [1.0, 6.0, 0], [0, 0, 7.0]])
    rng = np.random.default_rng(1)
    n, t = 6, 10
    true = np.cumsum(rng.normal(scale=0.3, size=(t, n, 3)), axis=0) + 2.5
    frac = np.linalg.solve(cell.T, true.reshape(-1, 3).T).T
    wrapped = ((frac % 1.0) @ cell).reshape(t, n, 3)
    traj = make_trajectory([14] * n, wrapped, cell=cell, pbc=(True, True, True), unwrap_positions=True)
    # continuous with the first (wrapped) frame: true trajectory shifted by frame 0's lattice offset
    offset = wrapped[0] - true[0]
    np.testing.assert_allclose(traj.positions, true + offset[None], atol=1e-9)
    assert np.abs(np.diff(traj.positions, axis=0)).max() < 2.0


def test_unwrap_only_periodic_directions():
    cell = np.eye(3) * 4.0
    pos = np.array([[[0.1, 0.1, 0.1]], [[3.9, 3.9, 3.9]]])
    t = unwrap(make_trajectory([14], pos, cell=cell, pbc=(True, False, True)))
    np.testing.assert_allclose(t.positions[1, 0], [-0.1, 3.9, -0.1])


# ----------------------------------------------------------------------------- extxyz / MPtrj round trips


def _ase_traj(n_frames, traj_id, seed):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 4.5, (4, 3))
    frames = []
    for i in range(n_frames):
        a = Atoms("Si3O", positions=base + rng.normal(scale=0.1, size=(4, 3)), cell=np.eye(3) * 5.5, pbc=True)
        a.info["traj_id"] = traj_id
        a.info["frame"] = i
        a.calc = SinglePointCalculator(a, energy=float(rng.normal()), forces=rng.normal(size=(4, 3)))
        frames.append(a)
    return frames


@pytest.mark.parametrize("suffix", [".extxyz", ".extxyz.gz"])
def test_extxyz_round_trip(tmp_path, suffix):
    import ase.io

    fa, fb = _ase_traj(3, "a", 0), _ase_traj(4, "b", 1)
    path = tmp_path / f"two{suffix}"
    if suffix.endswith(".gz"):
        import io

        buf = io.StringIO()
        ase.io.write(buf, fa + fb, format="extxyz")
        path.write_bytes(gzip.compress(buf.getvalue().encode()))
    else:
        ase.io.write(path, fa + fb, format="extxyz")
    trajs = readers.read_trajectories(path)
    assert [t.traj_id for t in trajs] == ["a", "b"]
    for t, frames in zip(trajs, (fa, fb)):
        assert t.num_frames == len(frames)
        np.testing.assert_allclose(t.positions, [f.positions for f in frames], atol=1e-7)
        np.testing.assert_allclose(t.forces, [f.get_forces() for f in frames], atol=1e-7)
        np.testing.assert_allclose(t.energies, [f.get_potential_energy() for f in frames], atol=1e-7)
        np.testing.assert_array_equal(t.species, [14, 14, 14, 8])


def test_extxyz_without_traj_key_is_one_trajectory(tmp_path):
    import ase.io

    frames = _ase_traj(3, "x", 2)
    for f in frames:
        del f.info["traj_id"]
    ase.io.write(tmp_path / "run.xyz", frames, format="extxyz")
    (t,) = readers.read_extxyz(tmp_path / "run.xyz")
    assert t.traj_id == "run" and t.num_frames == 3


def test_mptrj_round_trip(tmp_path):
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(3)
    data, expected = {}, {}
    for mp in ("mp-1", "mp-22"):
        frames = {}
        pos_list = []
        for k in (0, 1, 2, 10):  # natural order: 10 after 2
            s = Structure(Lattice.cubic(5.0), ["Ga", "N"], rng.uniform(0, 1, (2, 3)))
            f = rng.normal(size=(2, 3)).tolist()
            frames[f"task-0-{k}"] = {"structure": s.as_dict(), "force": f, "uncorrected_total_energy": -float(k),
                                    "energy_per_atom": -float(k) / 2}
            pos_list.append((s.cart_coords, f, -float(k)))
        data[mp] = dict(reversed(list(frames.items())))  # file order must not matter
        expected[mp] = pos_list
    path = tmp_path / "mptrj.json"
    path.write_text(json.dumps(data))
    trajs = readers.read_trajectories(path)
    assert sorted(t.traj_id for t in trajs) == ["mp-1", "mp-22"]
    for t in trajs:
        want = expected[t.traj_id]
        assert t.num_frames == 4
        np.testing.assert_allclose(t.energies, [w[2] for w in want])
        np.testing.assert_allclose(t.forces, [w[1] for w in want])
        np.testing.assert_allclose(t.positions[0], want[0][0], atol=1e-9)
        np.testing.assert_array_equal(t.species, [31, 7])
    (per_atom,) = readers.read_mptrj_json(path, energy_key="energy_per_atom")[:1]
    np.testing.assert_allclose(per_atom.energies, [0.0, -1.0, -2.0, -10.0])


def test_from_pymatgen_structures():
    from pymatgen.core import Lattice, Structure

    s = [Structure(Lattice.cubic(4.0), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25 + 0.01 * i]]) for i in range(3)]
    t = readers.from_pymatgen_structures(s, forces=[np.zeros((2, 3))] * 3, source="pmg", traj_id="x")
    assert t.num_frames == 3 and t.cells is None
    np.testing.assert_allclose(t.positions[2, 1], [1.0, 1.0, 1.08])


def test_guess_format_errors():
    assert readers.guess_format("a/vasprun.xml.gz") == "vasprun"
    assert readers.guess_format("OUTCAR") == "outcar"
    assert readers.guess_format("x.extxyz.gz") == "extxyz"
    with pytest.raises(ValueError, match="cannot guess"):
        readers.guess_format("weird.bin")


# ----------------------------------------------------------------------------- curation


def test_curation_counts_and_splits():
    good = [_good(traj_id=f"g{i}") for i in range(5)]
    short = _good(traj_id="short", positions=np.zeros((2, 3, 3)), forces=None, energies=None)
    bad = _good(traj_id="bad", positions=np.zeros((4, 2, 3)))  # unvalidated: atoms disagree
    kept, report = curation.curate([good[0], short, good[1], bad] + good[2:])
    assert [t.traj_id for t in kept] == ["g0", "g1", "g2", "g3", "g4"]
    assert report.counts() == {"atoms_change": 1, "too_few_frames": 1}
    assert report.num_input == 7 and report.num_kept == 5
    text = str(report)
    assert "kept 5 of 7" in text and "short" in text and "bad" in text
    test, train = curation.split_test_train(kept, 2)
    assert [t.traj_id for t in test] == ["g0", "g1"] and len(train) == 3
    folds = curation.kfold_splits(11, 3, seed=0)
    vals = np.concatenate([v for _, v in folds])
    assert sorted(vals.tolist()) == list(range(11))
    for tr, va in folds:
        assert not set(tr) & set(va) and len(tr) + len(va) == 11
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, curation.kfold_splits(11, 3, seed=0)))
