"""Readers: files and in-memory objects -> validated, unwrapped :class:`Trajectory` lists.

Formats: extended XYZ (``.xyz``/``.extxyz``, optionally ``.gz``), VASP ``vasprun.xml`` and
``OUTCAR`` (optionally ``.gz``), CHGNet's MPtrj JSON, and lists of ASE ``Atoms`` or pymatgen
``Structure`` objects. Every reader validates (raising ``TrajectoryError`` naming file,
trajectory and frame) and unwraps positions to be continuous with the first frame.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from bptt_mlip.data.trajectory import Trajectory, TrajectoryError, make_trajectory

PathLike = str | os.PathLike


def _read_text(path: PathLike) -> str:
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
                f"{where} frame {i}: {len(z)} atoms {_formula(z)}, expected the {len(species0)} atoms "
                f"{_formula(species0)} of frame 0"
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


def _formula(z) -> str:
    from ase.formula import Formula
    from ase.data import chemical_symbols

    return str(Formula.from_list([chemical_symbols[int(i)] for i in z]))


def read_extxyz(
    path: PathLike,
    *,
    energy_key: str = "energy",
    forces_key: str = "forces",
    trajectory_key: str | None = "traj_id",
    frame_key: str | None = "frame",
) -> list[Trajectory]:
    """Read an extended-XYZ file (``.gz`` is decompressed in memory first).

    Frames carrying ``info[trajectory_key]`` are grouped into one trajectory per value (in
    order of first appearance; within a trajectory sorted by ``info[frame_key]`` when present,
    else file order). Without the key, the whole file is one trajectory with id = file stem.
    """
    import ase.io

    path = Path(path)
    text = _read_text(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
    if not frames:
        raise TrajectoryError(f"{path}: zero frames, expected at least one")
    groups: dict[str, list[tuple[int, Any]]] = {}
    for i, atoms in enumerate(frames):
        key = atoms.info.get(trajectory_key) if trajectory_key else None
        key = _stem(path) if key is None else str(key)
        order = atoms.info.get(frame_key, i) if frame_key else i
        groups.setdefault(key, []).append((int(order), atoms))
    out = []
    for key, items in groups.items():
        items.sort(key=lambda p: p[0])
        out.append(
            from_ase_frames(
                [a for _, a in items], source=str(path), traj_id=key, energy_key=energy_key, forces_key=forces_key
            )
        )
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".xz", ".bz2"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix in (".xml", ".extxyz", ".xyz", ".json", ".traj"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def read_vasprun(path: PathLike, *, traj_id: str | None = None) -> list[Trajectory]:
    """Read a VASP ``vasprun.xml`` (or ``.gz``) through pymatgen: one trajectory, ionic steps -> frames.

    Energy per frame is ``e_fr_energy`` (free energy, eV); forces in eV/Å. Variable-cell runs keep
    per-frame cells in ``cells`` and the first frame's cell in ``cell``.
    """
    from pymatgen.io.vasp.outputs import Vasprun

    path = Path(path)
    text = _read_text(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tempfile

        # Vasprun wants a filename; give it the decompressed copy.
        with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=True) as tmp:
            tmp.write(text)
            tmp.flush()
            run = Vasprun(
                tmp.name, parse_dos=False, parse_eigen=False, parse_projected_eigen=False,
                parse_potcar_file=False, exception_on_bad_xml=False,
            )
    steps = run.ionic_steps
    if not steps:
        raise TrajectoryError(f"{path} trajectory {traj_id or _stem(path)!r}: zero ionic steps, expected at least one")
    structures = [s["structure"] for s in steps]
    forces = [np.asarray(s["forces"], np.float64) if s.get("forces") is not None else None for s in steps]
    energies = [s.get("e_fr_energy", s.get("e_0_energy")) for s in steps]
    return [
        from_pymatgen_structures(
            structures,
            forces=forces if all(f is not None for f in forces) else None,
            energies=energies if all(e is not None for e in energies) else None,
            source=str(path),
            traj_id=traj_id or _stem(path),
        )
    ]


def read_outcar(path: PathLike, *, traj_id: str | None = None) -> list[Trajectory]:
    """Read a VASP ``OUTCAR`` (or ``.gz``) through ASE's ``vasp-out`` reader: ionic steps -> frames."""
    import ase.io

    path = Path(path)
    text = _read_text(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = ase.io.read(_NamedStringIO(text, str(path)), index=":", format="vasp-out")
    return [from_ase_frames(frames, source=str(path), traj_id=traj_id or _stem(path))]


def from_pymatgen_structures(
    structures: Sequence[Any],
    forces: Sequence[np.ndarray] | np.ndarray | None = None,
    energies: Sequence[float] | np.ndarray | None = None,
    *,
    source: str = "pymatgen",
    traj_id: str = "0",
    unwrap_positions: bool = True,
) -> Trajectory:
    """One trajectory from pymatgen ``Structure`` frames, optional forces [T][n,3] (eV/Å), energies [T] (eV)."""
    where = f"{source} trajectory {traj_id!r}"
    if len(structures) == 0:
        raise TrajectoryError(f"{where}: zero frames, expected at least one")
    from bptt_mlip import descriptors

    def species_of(s, i):
        try:
            return descriptors.atomic_numbers([site.specie.symbol for site in s], where=f"{where} frame {i}")
        except (ValueError, AttributeError) as err:
            raise TrajectoryError(f"{where} frame {i}: {err}") from None

    z0 = species_of(structures[0], 0)
    positions, cells = [], []
    for i, s in enumerate(structures):
        z = species_of(s, i) if i else z0
        if len(z) != len(z0) or np.any(z != z0):
            raise TrajectoryError(
                f"{where} frame {i}: {len(z)} atoms {_formula(z)}, expected the {len(z0)} atoms "
                f"{_formula(z0)} of frame 0"
            )
        positions.append(np.asarray(s.cart_coords, np.float64))
        cells.append(np.asarray(s.lattice.matrix, np.float64))
    cells_arr = np.stack(cells)
    variable = not np.allclose(cells_arr, cells_arr[0], atol=1e-8)
    f_arr = None
    if forces is not None:
        f_list = [np.asarray(f, np.float64) for f in forces]
        if len(f_list) != len(structures):
            raise TrajectoryError(f"{where}: {len(f_list)} force arrays for {len(structures)} frames")
        for i, f in enumerate(f_list):
            if f.shape != (len(z0), 3):
                raise TrajectoryError(f"{where} frame {i}: forces have shape {f.shape}, expected ({len(z0)}, 3)")
        f_arr = np.stack(f_list)
    return make_trajectory(
        z0,
        np.stack(positions),
        cell=cells_arr[0],
        pbc=(True, True, True),
        forces=f_arr,
        energies=None if energies is None else np.asarray(energies, np.float64),
        source=source,
        traj_id=traj_id,
        cells=cells_arr if variable else None,
        unwrap_positions=unwrap_positions,
    )


MPTRJ_ENERGY_KEYS = ("uncorrected_total_energy", "corrected_total_energy", "energy_per_atom")


def read_mptrj_json(
    path: PathLike, *, energy_key: str = "uncorrected_total_energy", forces_key: str = "force"
) -> list[Trajectory]:
    """Read CHGNet's MPtrj JSON: ``{material_id: {frame_id: {"structure": dict, "force": [[..]], ...}}}``.

    One trajectory per material id (in file order); frames ordered by frame id (natural sort of
    the ``<task>-<calc>-<ionic>`` parts, so ``...-10`` comes after ``...-9``). Energy (eV, total)
    is ``energy_key``; ``energy_per_atom`` is multiplied by the atom count.
    """
    from pymatgen.core import Structure

    path = Path(path)
    data = json.loads(_read_text(path))
    if not isinstance(data, dict):
        raise TrajectoryError(f"{path}: expected a JSON object {{material_id: {{frame_id: frame}}}}")
    out = []
    for mp_id, frames in data.items():
        if not isinstance(frames, dict) or not frames:
            raise TrajectoryError(f"{path} trajectory {mp_id!r}: zero frames, expected at least one")
        ids = sorted(frames, key=_natural_key)
        structures, forces, energies = [], [], []
        for fid in ids:
            rec = frames[fid]
            where = f"{path} trajectory {mp_id!r} frame {len(structures)} ({fid})"
            if "structure" not in rec:
                raise TrajectoryError(f"{where}: no 'structure' entry")
            s = Structure.from_dict(rec["structure"])
            structures.append(s)
            forces.append(rec.get(forces_key))
            e = rec.get(energy_key)
            if e is not None and energy_key == "energy_per_atom":
                e = float(e) * len(s)
            energies.append(e)
        out.append(
            from_pymatgen_structures(
                structures,
                forces=forces if all(f is not None for f in forces) else None,
                energies=energies if all(e is not None for e in energies) else None,
                source=str(path),
                traj_id=str(mp_id),
            )
        )
    return out


def _natural_key(s: str):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(s))]


def guess_format(path: PathLike) -> str:
    """Format name from a file name: 'extxyz', 'vasprun', 'outcar' or 'mptrj'."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".xyz", ".extxyz")):
        return "extxyz"
    if "vasprun" in name or name.endswith(".xml"):
        return "vasprun"
    if "outcar" in name:
        return "outcar"
    if name.endswith(".json"):
        return "mptrj"
    raise ValueError(
        f"{path}: cannot guess the format from the file name; pass format= one of "
        "'extxyz', 'vasprun', 'outcar', 'mptrj'"
    )


_READERS = {"extxyz": read_extxyz, "vasprun": read_vasprun, "outcar": read_outcar, "mptrj": read_mptrj_json}


def read_trajectories(paths: PathLike | Iterable[PathLike], format: str | None = None, **kwargs) -> list[Trajectory]:
    """Read one or many files (format guessed from each name unless ``format`` is given)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Trajectory] = []
    for p in paths:
        fmt = format or guess_format(p)
        if fmt not in _READERS:
            raise ValueError(f"{p}: unknown format {fmt!r}, expected one of {sorted(_READERS)}")
        out.extend(_READERS[fmt](p, **kwargs))
    return out
