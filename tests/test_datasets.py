"""Dataset specs (shipped set, folder, files with bad records), per-trajectory extxyz reading, splits."""

from __future__ import annotations

import numpy as np
import pytest

from bptt_mlip.data import datasets, readers, store
from bptt_mlip.data.trajectory import TrajectoryError, make_trajectory


def _traj(traj_id, *, n=3, frames=4, seed=0, check=True, **changes):
    rng = np.random.default_rng(seed)
    x0 = np.arange(n)[:, None] * np.array([2.3, 0.0, 0.0]) + rng.normal(size=(n, 3)) * 0.05
    pos = np.stack([x0 + 0.01 * k for k in range(frames)])
    fields = dict(species=["Si"] * n, positions=pos, forces=np.zeros_like(pos), source="data.xyz", traj_id=traj_id)
    fields.update(changes)
    return make_trajectory(check=check, **fields)


def _mixed_file(path):
    """Three good trajectories between three bad ones: NaN force (a reader error), two atoms 0.1 Å
    apart (a validation error), one frame (a curation drop at min_frames=2)."""
    good = [_traj(f"good{k}", seed=k) for k in range(3)]
    nan = _traj("nanforce", seed=5, check=False)
    forces = nan.forces.copy()
    forces[1, 0, 1] = np.nan
    close_pos = _traj("x", seed=6).positions.copy()
    close_pos[0, 2] = close_pos[0, 1] + 0.1
    bad = [nan.replace(forces=forces), _traj("tooclose", seed=6, check=False, positions=close_pos),
           _traj("single", frames=1, check=False)]
    store.write_extxyz([good[0], bad[0], good[1], bad[1], bad[2], good[2]], path)
    return good


def test_iter_extxyz_yields_each_trajectory_or_its_error(tmp_path):
    path = tmp_path / "mixed.extxyz"
    good = _mixed_file(path)
    records = list(readers.iter_extxyz_trajectories(path))
    assert [r.traj_id for r in records] == ["good0", "nanforce", "good1", "tooclose", "single", "good2"]
    errors = {r.traj_id: r.error for r in records if r.error is not None}
    assert list(errors) == ["nanforce"] and isinstance(errors["nanforce"], TrajectoryError)
    assert "mixed.extxyz trajectory 'nanforce' frame 1" in str(errors["nanforce"])
    kept = {r.traj_id: r.trajectory for r in records if r.error is None}
    for t in good:  # positions survive the round trip through the file
        np.testing.assert_allclose(kept[t.traj_id].positions, t.positions, atol=1e-6)
    with pytest.raises(TrajectoryError, match="'nanforce' frame 1"):  # the all-or-nothing reader
        readers.read_extxyz(path)


def test_load_dataset_spec_stops_on_bad_records_or_skips_and_counts_them(tmp_path):
    path = tmp_path / "mixed.extxyz"
    good = _mixed_file(path)
    kw = dict(min_atom_distance=0.5, min_frames=2)
    with pytest.raises(TrajectoryError, match=r"mixed.extxyz trajectory 'nanforce' frame 1: forces of atom 0"):
        datasets.load_dataset_spec(str(path), report=lambda _: None, **kw)
    lines = []
    load = datasets.load_dataset_spec(str(path), skip_bad_records=True, report=lines.append, **kw)
    assert [t.traj_id for t in load.trajectories] == [t.traj_id for t in good]
    assert load.skipped["num_skipped"] == 3
    assert load.skipped["by_reason"] == {"nonfinite": 1, "atoms_too_close": 1, "too_few_frames": 1}
    assert load.report.num_input == 3 and load.report.num_kept == 3
    assert lines[0].startswith("skipped 3 invalid trajectories") and any("curation: kept 3 of 3" in m for m in lines)
    two = datasets.load_dataset_spec(str(path), skip_bad_records=True, max_trajectories=2, report=lambda _: None, **kw)
    assert [t.traj_id for t in two.trajectories] == ["good0", "good1"]


def test_load_dataset_spec_shipped_set_folder_and_several_files(tmp_path):
    quiet = dict(report=lambda _: None)
    shipped = datasets.load_dataset_spec("default:si_defects", max_trajectories=4, **quiet)
    reference = store.load_default_dataset("si_defects")
    assert [t.traj_id for t in shipped.trajectories] == [t.traj_id for t in reference[:4]]
    assert shipped.skipped["num_skipped"] == 0
    store.save_dataset(reference[:3], tmp_path / "ds", manifest={"kind": "test"}, write_xyz=False,
                           dtype=np.float64)
    folder = datasets.load_dataset_spec(str(tmp_path / "ds"), min_frames=1, **quiet)
    assert [t.traj_id for t in folder.trajectories] == [t.traj_id for t in reference[:3]]
    a, b = tmp_path / "a.extxyz", tmp_path / "b.extxyz"
    store.write_extxyz([_traj("ta", seed=1)], a)
    store.write_extxyz([_traj("tb", seed=2), _traj("tc", seed=3)], b)
    files = datasets.load_dataset_spec(f"{a},{b}", **quiet)
    assert [t.traj_id for t in files.trajectories] == ["ta", "tb", "tc"]


def test_load_dataset_spec_errors_name_the_problem(tmp_path):
    quiet = dict(report=lambda _: None)
    with pytest.raises(ValueError, match="dataset spec is empty"):
        datasets.load_dataset_spec(",", **quiet)
    with pytest.raises(FileNotFoundError, match="nope.extxyz"):
        datasets.load_dataset_spec(str(tmp_path / "nope.extxyz"), **quiet)
    short = tmp_path / "short.extxyz"
    store.write_extxyz([_traj("s", frames=2)], short)
    with pytest.raises(ValueError, match="no usable trajectories"):  # curated away (fewer than 3 frames)
        datasets.load_dataset_spec(str(short), **quiet)


def test_split_by_position_takes_test_then_validation_then_train():
    items = list(range(10))
    assert datasets.split_by_position(items, 3, 2) == ([0, 1, 2], [3, 4], [5, 6, 7, 8, 9])
    assert datasets.split_by_position(items, 0, 0) == ([], [], items)
    with pytest.raises(ValueError, match=r"num_test=6 \+ num_val=4 >= 10 usable trajectories: no training data"):
        datasets.split_by_position(items, 6, 4)
    with pytest.raises(ValueError, match="must be >= 0"):
        datasets.split_by_position(items, -1, 2)


def test_split_fold_tests_every_item_once_and_validates_on_the_first_of_the_rest():
    items = [f"t{i}" for i in range(11)]
    tested = []
    for fold in range(3):
        test, val, train = datasets.split_fold(items, 3, fold, seed=7, num_val=2)
        rest = [x for x in items if x not in test]  # dataset order
        assert val == rest[:2] and train == rest[2:]
        assert len(test) in (3, 4)
        tested.extend(test)
    assert sorted(tested) == sorted(items)
    again = datasets.split_fold(items, 3, 1, seed=7, num_val=2)
    assert again == datasets.split_fold(items, 3, 1, seed=7, num_val=2)  # seeded: the same every time
    assert again[0] != datasets.split_fold(items, 3, 1, seed=8, num_val=2)[0]
    with pytest.raises(ValueError, match=r"fold=3 must be in 0..2 \(folds=3\)"):
        datasets.split_fold(items, 3, 3, seed=0, num_val=2)
    with pytest.raises(ValueError, match="num_val=7 >= 7 trajectories outside test fold 0: no training data left"):
        datasets.split_fold(items, 3, 0, seed=0, num_val=7)


def test_a_folder_of_data_files_is_read_file_by_file_and_one_run_saved_twice_once(tmp_path):
    from bptt_mlip.data import datasets as ds

    for name in ("GaN_v_N.vasprun.xml.gz", "GaN_v_N.OUTCAR.gz", "other_OUTCAR", "frames.extxyz", "README.md"):
        (tmp_path / name).write_text("")
    names = [p.name for p in ds.data_files_in(tmp_path)]
    assert names == ["GaN_v_N.vasprun.xml.gz", "frames.extxyz", "other_OUTCAR"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no data files"):
        ds.data_files_in(empty)
