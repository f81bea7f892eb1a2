"""Readers built on ASE: extended XYZ (``.xyz``/``.extxyz``, optionally ``.gz``) and VASP
``OUTCAR`` (optionally ``.gz``), and lists of ASE ``Atoms``. Every reader
validates (raising ``TrajectoryError`` naming file, trajectory and frame) and unwraps positions
to be continuous with the first frame. :mod:`bptt_mlip.data.readers` picks the reader by name.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bptt_mlip.data import integrity
from bptt_mlip.data.trajectory import REASON_DAMAGED_FILE, Trajectory, TrajectoryError, make_trajectory

PathLike = str | os.PathLike


def read_text(path: PathLike) -> str:
    """Whole file as text, decompressing ``.gz`` in memory (never seek a gzip stream per frame).

    A gzip file that cannot be decompressed (truncated, corrupted) raises ``TrajectoryError``
    (reason ``damaged_file``) naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except integrity.GZIP_ERRORS as err:
            raise integrity.damaged_gzip_error(path, err) from None
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
        items_of_file = [(_frame_key(path, a.info, trajectory_key, frame_key, i), a) for i, a in enumerate(frames)]
    except Exception:  # noqa: BLE001 - some frame is unreadable: parse frame by frame to name it
        items_of_file = _parse_extxyz_frames(path, text, trajectory_key, frame_key)
    if not items_of_file:
        raise TrajectoryError(f"{path}: zero frames, expected at least one")
    groups: dict[str, list[tuple[int, Any]]] = {}
    for (key, order), atoms in items_of_file:
        groups.setdefault(key, []).append((order, atoms))
    for key, items in groups.items():
        items.sort(key=lambda p: p[0])
        errors = [a for _, a in items if isinstance(a, TrajectoryError)]
        if errors:
            yield ExtxyzTrajectory(key, None, errors[0])
            continue
        try:
            traj = from_ase_frames(
                [a for _, a in items], source=str(path), traj_id=key, energy_key=energy_key, forces_key=forces_key
            )
        except TrajectoryError as err:
            yield ExtxyzTrajectory(key, None, err)
            continue
        yield ExtxyzTrajectory(key, traj, None)


def _frame_key(path: Path, info: dict, trajectory_key: str | None, frame_key: str | None, index: int):
    """``(trajectory id, frame order)`` of a frame from its info line (file stem / file index without keys)."""
    key = info.get(trajectory_key) if trajectory_key else None
    order = info.get(frame_key, index) if frame_key else index
    return (file_stem(path) if key is None else str(key)), int(order)


def _comment_value(comment: str, name: str | None):
    """The value of ``name=...`` in an extxyz comment line (quotes stripped), or None."""
    if not name:
        return None
    m = re.search(rf'(?:^|\s){re.escape(name)}=("[^"]*"|\S+)', comment)
    return None if m is None else m.group(1).strip('"')


def _parse_extxyz_frames(path: Path, text: str, trajectory_key: str | None, frame_key: str | None) -> list:
    """``[((trajectory id, frame order), Atoms or TrajectoryError)]``, each frame parsed on its own so
    an unreadable frame (unknown element symbol, cut-off lines) is named by its trajectory and frame
    from its comment line while the other frames are kept. A frame-count line that is not a number
    ends the file with a ``damaged_file`` error."""
    import ase.io

    lines = text.splitlines(keepends=True)
    out, start, index = [], 0, 0
    while start < len(lines) and lines[start].strip():
        info = {}
        comment = lines[start + 1] if start + 1 < len(lines) else ""
        for name in (trajectory_key, frame_key):
            value = _comment_value(comment, name)
            if value is not None:
                info[name] = value if name == trajectory_key else _int_or(value, index)
        key = _frame_key(path, info, trajectory_key, frame_key, index)
        where = f"{path} trajectory {key[0]!r} frame {key[1]}"
        try:
            count = int(lines[start].split()[0])
        except ValueError:
            out.append((key, TrajectoryError(f"{where}: line {start + 1} should hold the atom count, got "
                                             f"{lines[start].strip()[:40]!r}", REASON_DAMAGED_FILE)))
            break
        chunk = "".join(lines[start : start + count + 2])
        try:
            with warnings.catch_warnings(), integrity.parser_errors(where, "an extended-XYZ frame"):
                warnings.simplefilter("ignore")
                atoms = ase.io.read(io.StringIO(chunk), format="extxyz")
        except TrajectoryError as err:
            atoms = err
        out.append((key, atoms))
        start += count + 2
        index += 1
    return out


def _int_or(value: str, default: int) -> int:
    try:
        return int(value)
    except ValueError:
        return default


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


def read_outcar(path: PathLike, *, traj_id: str | None = None, allow_incomplete: bool = False) -> list[Trajectory]:
    """Read a VASP ``OUTCAR`` (or ``.gz``) through ASE's ``vasp-out`` reader: ionic steps -> frames.

    An OUTCAR without VASP's final timing footer (the run was cut off) raises ``TrajectoryError``
    (reason ``incomplete``) naming its last complete frame, unless ``allow_incomplete``: then its
    complete ionic steps are kept with an ``IncompleteRunWarning`` (see
    :mod:`bptt_mlip.data.integrity`). Unknown element symbols and unparsable text raise
    ``TrajectoryError`` (``unknown_element`` / ``damaged_file``).
    """
    import ase.io

    path = Path(path)
    traj_id = traj_id or file_stem(path)
    where = f"{path} trajectory {traj_id!r}"
    text = read_text(path)
    keep = integrity.frames_to_keep(text, "outcar", where, allow_incomplete=allow_incomplete)
    with warnings.catch_warnings(), integrity.parser_errors(where, "a VASP OUTCAR", element_where=f"{where} frame 0"):
        warnings.simplefilter("ignore")
        frames = ase.io.read(_NamedStringIO(text, str(path)), index=":", format="vasp-out")
    if keep is not None:
        frames = frames[:keep]
        integrity.warn_incomplete(where, "outcar", len(frames))
    return [from_ase_frames(frames, source=str(path), traj_id=traj_id)]
