"""Readers built on ASE: extended XYZ (``.xyz``/``.extxyz``, optionally ``.gz``) and VASP
``OUTCAR`` (optionally ``.gz``), and lists of ASE ``Atoms``. Every reader
validates (raising ``TrajectoryError`` naming file, trajectory and frame) and unwraps positions
to be continuous with the first frame. :mod:`bptt_mlip.data.readers` picks the reader by name.
"""

from __future__ import annotations

import gzip
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bptt_mlip.data.trajectory import Trajectory, TrajectoryError, make_trajectory

PathLike = str | os.PathLike



def read_text(path: PathLike) -> str:
    """Whole file as text, decompressing ``.gz`` in memory (never seek a gzip stream per frame)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


class _NamedStringIO(io.StringIO):
    """In-memory text with a ``name`` (ASE's OUTCAR parser looks for a sibling POTCAR by name)."""

    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.name = name


def _atoms_forces_energy(atoms, energy_key: str | None, forces_key: str | None):
    """(forces [n,3] or None, energy or None) from an ASE Atoms, calculator first (ASE >= 3.23)."""
    forces = energy = None
    calc = atoms.calc
    if calc is not None:
        results = getattr(calc, "results", {})
        if "forces" in results:
            forces = np.asarray(atoms.get_forces(apply_constraint=False), np.float64)
        if "energy" in results or "free_energy" in results:
            try:
                energy = float(atoms.get_potential_energy())
            except Exception:  # noqa: BLE001 - some calculators only store free_energy
                energy = float(results.get("free_energy"))
    if forces is None and forces_key and forces_key in atoms.arrays:
        forces = np.asarray(atoms.arrays[forces_key], np.float64)
    if energy is None and energy_key and energy_key in atoms.info:
        energy = float(atoms.info[energy_key])
    return forces, energy


def from_ase_frames(
    frames: Sequence[Any],
    *,
    source: str = "ase",
    traj_id: str = "0",
    energy_key: str | None = "energy",
    forces_key: str | None = "forces",
    unwrap_positions: bool = True,
) -> Trajectory:
    """One trajectory from a list of ASE ``Atoms`` frames (same atoms in every frame).

    Forces/energies come from each frame's calculator (``get_forces``/``get_potential_energy``)
    or else from ``arrays[forces_key]`` / ``info[energy_key]``. They are kept only when every
    frame has them. Variable cells are kept in ``cells``.
    """
    where = f"{source} trajectory {traj_id!r}"
    if len(frames) == 0:
        raise TrajectoryError(f"{where}: zero frames, expected at least one")
    species0 = frames[0].get_atomic_numbers()
    positions, forces, energies, cells = [], [], [], []
    for i, atoms in enumerate(frames):
        z = atoms.get_atomic_numbers()
        if len(z) != len(species0) or np.any(z != species0):
            raise TrajectoryError(
                f"{where} frame {i}: {len(z)} atoms {chemical_formula(z)}, expected the {len(species0)} atoms "
                f"{chemical_formula(species0)} of frame 0"
            )
        positions.append(atoms.get_positions())
        f, e = _atoms_forces_energy(atoms, energy_key, forces_key)
        forces.append(f)
        energies.append(e)
        cells.append(np.asarray(atoms.cell.array, np.float64))
    pbc = tuple(bool(p) for p in frames[0].pbc)
    has_cell = frames[0].cell.rank == 3
    cells_arr = np.stack(cells) if has_cell else None
    variable = has_cell and not np.allclose(cells_arr, cells_arr[0], atol=1e-8)
    return make_trajectory(
        species0,
        np.stack(positions),
        cell=cells_arr[0] if has_cell else None,
        pbc=pbc if has_cell else (False, False, False),
        forces=np.stack(forces) if all(f is not None for f in forces) else None,
        energies=np.asarray(energies) if all(e is not None for e in energies) else None,
        source=source,
        traj_id=traj_id,
        cells=cells_arr if variable else None,
        unwrap_positions=unwrap_positions,
    )


def chemical_formula(z) -> str:
    from ase.formula import Formula
    from ase.data import chemical_symbols

    return str(Formula.from_list([chemical_symbols[int(i)] for i in z]))


class ExtxyzTrajectory(NamedTuple):
    """One trajectory group of an extended-XYZ file: its id and either the trajectory or the
    :class:`TrajectoryError` that says why its frames do not make a valid trajectory."""

    traj_id: str
    trajectory: Trajectory | None
    error: TrajectoryError | None


def iter_extxyz_trajectories(
    path: PathLike,
    *,
    energy_key: str = "energy",
    forces_key: str = "forces",
    trajectory_key: str | None = "traj_id",
    frame_key: str | None = "frame",
) -> Iterator[ExtxyzTrajectory]:
    """Yield each trajectory of an extended-XYZ file (``.gz`` decompressed in memory first) as
    an :class:`ExtxyzTrajectory`, a bad one with its error instead of raising it, so a caller can
    keep the good trajectories of a file that also holds bad ones.

    Frames carrying ``info[trajectory_key]`` are grouped into one trajectory per value (in
    order of first appearance; within a trajectory sorted by ``info[frame_key]`` when present,
    else file order). Without the key, the whole file is one trajectory with id = file stem.
    A file without frames raises ``TrajectoryError``.
    """
    import ase.io

    path = Path(path)
    text = read_text(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
    if not frames:
        raise TrajectoryError(f"{path}: zero frames, expected at least one")
    groups: dict[str, list[tuple[int, Any]]] = {}
    for i, atoms in enumerate(frames):
        key = atoms.info.get(trajectory_key) if trajectory_key else None
        key = file_stem(path) if key is None else str(key)
        order = atoms.info.get(frame_key, i) if frame_key else i
        groups.setdefault(key, []).append((int(order), atoms))
    for key, items in groups.items():
        items.sort(key=lambda p: p[0])
        try:
            traj = from_ase_frames(
                [a for _, a in items], source=str(path), traj_id=key, energy_key=energy_key, forces_key=forces_key
            )
        except TrajectoryError as err:
            yield ExtxyzTrajectory(key, None, err)
            continue
        yield ExtxyzTrajectory(key, traj, None)


def read_extxyz(
    path: PathLike,
    *,
    energy_key: str = "energy",
    forces_key: str = "forces",
    trajectory_key: str | None = "traj_id",
    frame_key: str | None = "frame",
) -> list[Trajectory]:
    """Read an extended-XYZ file (``.gz`` is decompressed in memory first); the first invalid
    trajectory raises its ``TrajectoryError``. Grouping as in :func:`iter_extxyz_trajectories`."""
    out = []
    for record in iter_extxyz_trajectories(
        path, energy_key=energy_key, forces_key=forces_key, trajectory_key=trajectory_key, frame_key=frame_key
    ):
        if record.error is not None:
            raise record.error
        out.append(record.trajectory)
    return out


def file_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".xz", ".bz2"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix in (".xml", ".extxyz", ".xyz", ".json", ".traj"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def read_outcar(path: PathLike, *, traj_id: str | None = None) -> list[Trajectory]:
    """Read a VASP ``OUTCAR`` (or ``.gz``) through ASE's ``vasp-out`` reader: ionic steps -> frames."""
    import ase.io

    path = Path(path)
    text = read_text(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = ase.io.read(_NamedStringIO(text, str(path)), index=":", format="vasp-out")
    return [from_ase_frames(frames, source=str(path), traj_id=traj_id or file_stem(path))]
