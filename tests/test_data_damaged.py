"""Damaged and unusual input: runs cut off mid-way, unknown element symbols, damaged gzip, and
variable-cell relaxations, each on a file made in the test (copies of the shipped DFT files cut or
edited in tmp_path, or frames written by ASE)."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from bptt_mlip.data import checks, datasets, readers, store
from bptt_mlip.data.integrity import IncompleteRunWarning
from bptt_mlip.data.trajectory import TrajectoryError, make_trajectory

DFT_DIR = (Path(__file__).parents[1] / ".." / "shared" / "data" / "dft").resolve()
needs_dft = pytest.mark.skipif(
    not DFT_DIR.is_dir(), reason=f"reference DFT files not found at {DFT_DIR} (the 'shared' folder beside the repo)"
)
QUIET = dict(report=lambda _: None)


def _unzipped(name: str) -> bytes:
    return gzip.decompress((DFT_DIR / name).read_bytes())


@pytest.fixture(scope="module")
def nbco_vasprun():
    """(the whole file's bytes, its 49 frames as read)."""
    (full,) = readers.read_trajectories(DFT_DIR / "NbCO_relax.vasprun.xml.gz")
    return _unzipped("NbCO_relax.vasprun.xml.gz"), full


def _read_recording(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trajs = readers.read_trajectories(path, **kw)
    return trajs, [str(w.message) for w in caught if issubclass(w.category, IncompleteRunWarning)]


@needs_dft
@pytest.mark.parametrize("fraction", [0.05, 0.6, 0.99])
def test_truncated_vasprun_is_refused_or_kept_with_a_warning_naming_the_last_frame(tmp_path, nbco_vasprun, fraction):
    text, full = nbco_vasprun
    cut = text[: int(len(text) * fraction)]
    complete = cut.count(b"</calculation>")  # ionic steps written in full before the cut
    path = tmp_path / "cut.vasprun.xml"
    path.write_bytes(cut)
    with pytest.raises(TrajectoryError, match=r"cut\.vasprun\.xml trajectory 'cut\.vasprun': incomplete") as info:
        readers.read_trajectories(path)
    assert info.value.reason == "incomplete"
    if complete == 0:  # 5%: not one ionic step, refused even when incomplete runs are allowed
        assert fraction == 0.05
        with pytest.raises(TrajectoryError, match="not one complete ionic step"):
            readers.read_trajectories(path, allow_incomplete=True)
        return
    assert f"last complete ionic step is frame {complete - 1} ({complete} frames)" in str(info.value)
    (kept,), messages = _read_recording(path, allow_incomplete=True)
    assert 0 < complete < full.num_frames and kept.num_frames == complete
    assert len(messages) == 1 and f"keeping {complete} frames: the last, frame {complete - 1}," in messages[0]
    np.testing.assert_allclose(kept.positions, full.positions[:complete], atol=1e-9)
    np.testing.assert_allclose(kept.forces, full.forces[:complete], atol=1e-9)
    # the same through a dataset spec: refused, skipped and counted, or kept
    with pytest.raises(TrajectoryError, match="incomplete"):
        datasets.load_dataset_spec(str(path), keep_variable_cell=True, **QUIET)
    assert datasets.read_files([path], skip_bad_records=True)[1][0]["reason"] == "incomplete"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteRunWarning)
        load = datasets.load_dataset_spec(str(path), allow_incomplete=True, keep_variable_cell=True,
                                          min_frames=1, **QUIET)
    assert load.trajectories[0].num_frames == complete


@needs_dft
def test_outcar_missing_its_final_step_is_refused_or_kept_with_a_warning(tmp_path):
    text = _unzipped("NbCO_relax.OUTCAR.gz")
    (full,) = readers.read_trajectories(DFT_DIR / "NbCO_relax.OUTCAR.gz")
    path = tmp_path / "OUTCAR"
    path.write_bytes(text[: text.rfind(b"TOTAL-FORCE")])  # killed while writing the last (49th) ionic step
    with pytest.raises(TrajectoryError, match=r"OUTCAR trajectory 'OUTCAR': incomplete OUTCAR") as info:
        readers.read_trajectories(path)
    assert info.value.reason == "incomplete"
    assert f"last complete ionic step is frame {full.num_frames - 2}" in str(info.value)
    (kept,), messages = _read_recording(path, allow_incomplete=True)
    assert kept.num_frames == full.num_frames - 1
    assert len(messages) == 1 and f"the last, frame {full.num_frames - 2}," in messages[0]
    np.testing.assert_allclose(kept.positions, full.positions[:-1], atol=1e-9)
    np.testing.assert_allclose(kept.forces, full.forces[:-1], atol=1e-9)


def _frames_text(traj_ids, frames=3, symbol="Si"):
    """Extended XYZ text: each trajectory two atoms (``symbol`` first) in a fixed 6 Å cube."""
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    import io

    buf = io.StringIO()
    for k, tid in enumerate(traj_ids):
        for f in range(frames):
            atoms = Atoms("Si2", positions=[[0, 0, 0], [2.3 + 0.01 * f + 0.1 * k, 0, 0]], cell=6 * np.eye(3),
                          pbc=True)
            atoms.info.update(traj_id=tid, frame=f)
            atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - f, forces=np.zeros((2, 3)))
            ase.io.write(buf, atoms, format="extxyz")
    return buf.getvalue()


def _with_unknown_symbol(text: str, traj_id: str, frame: int) -> str:
    """``text`` with the first atom of frame ``frame`` of trajectory ``traj_id`` renamed to 'Xx'."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if f"traj_id={traj_id} " in line and f" frame={frame} " in f" {line}":
            lines[i + 1] = lines[i + 1].replace("Si", "Xx", 1)
            return "".join(lines)
    raise AssertionError("frame not found")


def test_unknown_symbol_is_named_and_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.extxyz"
    path.write_text(_with_unknown_symbol(_frames_text(["good0", "bad", "good1"]), "bad", 1))
    with pytest.raises(TrajectoryError, match=r"mixed\.extxyz trajectory 'bad' frame 1: unknown element 'Xx'") as e:
        readers.read_trajectories(path)
    assert e.value.reason == "unknown_element"
    load = datasets.load_dataset_spec(str(path), skip_bad_records=True, min_frames=2, **QUIET)
    assert [t.traj_id for t in load.trajectories] == ["good0", "good1"]
    assert load.skipped["by_reason"] == {"unknown_element": 1}
    assert "trajectory 'bad' frame 1" in load.skipped["records"][0]["message"]
    with pytest.raises(TrajectoryError, match="unknown element 'Xx'"):
        datasets.load_dataset_spec(str(path), min_frames=2, **QUIET)


@needs_dft
def test_unknown_symbol_in_a_vasprun_is_named_and_skipped(tmp_path, nbco_vasprun):
    text, _ = nbco_vasprun
    bad = tmp_path / "bad.vasprun.xml"
    bad.write_bytes(text.replace(b"<rc><c>Nb</c>", b"<rc><c>Xx</c>", 1))
    with pytest.raises(TrajectoryError, match=r"bad\.vasprun\.xml trajectory 'bad\.vasprun' frame 0: unknown element "
                                              r"'Xx'") as e:
        readers.read_trajectories(bad)
    assert e.value.reason == "unknown_element"
    good = tmp_path / "good.extxyz"
    good.write_text(_frames_text(["g"]))
    load = datasets.load_dataset_spec(f"{bad},{good}", skip_bad_records=True, min_frames=2, **QUIET)
    assert [t.traj_id for t in load.trajectories] == ["g"] and load.skipped["by_reason"] == {"unknown_element": 1}


@pytest.mark.parametrize("name", ["frames.extxyz.gz", "run.vasprun.xml.gz"])
def test_truncated_gzip_is_named_and_skipped_and_counted(tmp_path, name):
    packed = gzip.compress(_frames_text(["a", "b"]).encode() * 20)
    bad = tmp_path / name
    bad.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(TrajectoryError, match=rf"{name.replace('.', '[.]')}: damaged gzip file") as e:
        readers.read_trajectories(bad)
    assert e.value.reason == "damaged_file"
    good = tmp_path / "good.extxyz"
    good.write_text(_frames_text(["g"]))
    load = datasets.load_dataset_spec(f"{bad},{good}", skip_bad_records=True, min_frames=2, **QUIET)
    assert [t.traj_id for t in load.trajectories] == ["g"]
    assert load.skipped["by_reason"] == {"damaged_file": 1} and str(bad) in load.skipped["records"][0]["message"]
    with pytest.raises(TrajectoryError, match="damaged gzip"):
        datasets.load_dataset_spec(f"{bad},{good}", min_frames=2, **QUIET)


def _variable_cell_traj(traj_id="vc", frames=4, strain=0.01):
    """Two Si atoms in a cube shrinking by ``strain`` per frame (an ISIF=3-like run), atoms scaled with it."""
    cells = np.stack([(5.0 - 5.0 * strain * k) * np.eye(3) + strain * k * np.triu(np.ones((3, 3)), 1)
                      for k in range(frames)])
    frac = np.array([[0.1, 0.1, 0.1], [0.55, 0.5, 0.45]])
    positions = np.einsum("na,tab->tnb", frac, cells)
    return make_trajectory(["Si", "Si"], positions, cell=cells[0], cells=cells, pbc=True,
                           forces=np.zeros_like(positions), energies=-np.arange(frames, dtype=float),
                           source="made", traj_id=traj_id)


def test_save_load_of_a_variable_cell_dataset_round_trips_every_cell(tmp_path):
    variable = _variable_cell_traj()
    fixed = make_trajectory(["Si", "Si"], variable.positions[:, :, :] * 0 + variable.positions[0], cell=5 * np.eye(3),
                            pbc=True, source="made", traj_id="fixed")
    store.save_dataset([variable, fixed], tmp_path / "ds", manifest={"kind": "test"})
    loaded = store.load_dataset(tmp_path / "ds")
    assert [t.traj_id for t in loaded] == ["vc", "fixed"]
    np.testing.assert_array_equal(loaded[0].cells, variable.cells)  # every frame's cell, exactly
    assert loaded[0].variable_cell and loaded[1].cells is None
    np.testing.assert_array_equal(loaded[1].cell, fixed.cell)
    manifest = json.loads((tmp_path / "ds" / store.MANIFEST_NAME).read_text())
    assert manifest["format_version"] == store.FORMAT_VERSION == 2
    # the extxyz copy keeps them too (the fallback when the cache does not match)
    (from_xyz_vc, from_xyz_fixed) = readers.read_extxyz(tmp_path / "ds" / store.EXTXYZ_NAME)
    np.testing.assert_allclose(from_xyz_vc.cells, variable.cells, atol=1e-10)
    assert from_xyz_fixed.cells is None
    # a fixed-cell dataset keeps the version-1 layout (what older code reads), and loads
    arrays = store.trajectories_to_arrays([fixed])
    assert int(arrays["format_version"]) == 1 and "frame_cells" not in arrays
    assert store.trajectories_from_arrays(arrays)[0].cells is None
    newer = dict(store.trajectories_to_arrays([variable]), format_version=np.array(3))
    with pytest.raises(ValueError, match="newer"):
        store.trajectories_from_arrays(newer)


def test_variable_cell_trajectory_is_skipped_and_counted_by_default(tmp_path):
    from bptt_mlip.data.store import write_extxyz

    fixed = make_trajectory(["Si", "Si"], [[[0, 0, 0], [2.3, 0, 0]], [[0, 0, 0], [2.35, 0, 0]],
                                           [[0, 0, 0], [2.36, 0, 0]]], cell=6 * np.eye(3), pbc=True, traj_id="fixed")
    tiny = _variable_cell_traj("tiny", strain=1e-5)  # 5e-5 Å per frame: numerical noise, not a strain
    path = tmp_path / "cells.extxyz"
    write_extxyz([_variable_cell_traj("vc"), fixed, tiny], path)
    lines = []
    load = datasets.load_dataset_spec(str(path), min_frames=2, report=lines.append)
    assert [t.traj_id for t in load.trajectories] == ["fixed", "tiny"]
    assert load.skipped["by_reason"] == {"variable_cell": 1}
    message = load.skipped["records"][0]["message"]
    assert "trajectory 'vc'" in message and "variable cell" in message
    v0, v1 = 125.0, np.linalg.det(_variable_cell_traj().cells[-1])
    assert f"{100 * (v1 - v0) / v0:+.2f}%" in message  # -8.73% for a 3% linear shrink
    assert any("skipped 1 variable-cell" in line for line in lines)
    kept = datasets.load_dataset_spec(str(path), min_frames=2, keep_variable_cell=True, **QUIET)
    assert [t.traj_id for t in kept.trajectories] == ["vc", "fixed", "tiny"] and kept.skipped["num_skipped"] == 0
    assert checks.max_cell_change(kept.trajectories[0]) == pytest.approx(5.0 * 0.01 * 3, abs=1e-12)
    strict = datasets.load_dataset_spec(str(path), min_frames=2, cell_tolerance=1e-6, **QUIET)
    assert [t.traj_id for t in strict.trajectories] == ["fixed"] and strict.skipped["by_reason"] == {"variable_cell": 2}
    only = tmp_path / "only.extxyz"
    write_extxyz([_variable_cell_traj("vc")], only)
    with pytest.raises(ValueError, match=r"(?s)no usable trajectories.*variable_cell"):
        datasets.load_dataset_spec(str(only), min_frames=2, **QUIET)


@needs_dft
def test_real_isif3_run_is_left_out_by_default():
    spec = str(DFT_DIR / "NbCO_relax.vasprun.xml.gz")
    with pytest.raises(ValueError, match=r"variable_cell"):
        datasets.load_dataset_spec(spec, **QUIET)
    assert datasets.load_dataset_spec(spec, keep_variable_cell=True, **QUIET).trajectories[0].variable_cell
