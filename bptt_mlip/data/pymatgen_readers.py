"""Readers built on pymatgen: VASP ``vasprun.xml`` (optionally ``.gz``), CHGNet's MPtrj JSON and
lists of pymatgen ``Structure`` objects, validated and unwrapped like every reader (see
:mod:`bptt_mlip.data.readers`)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bptt_mlip.data import integrity
from bptt_mlip.data.ase_readers import chemical_formula, file_stem, read_text
from bptt_mlip.data.trajectory import Trajectory, TrajectoryError, make_trajectory

PathLike = str | os.PathLike




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
                f"{where} frame {i}: {len(z)} atoms {chemical_formula(z)}, expected the {len(z0)} atoms "
                f"{chemical_formula(z0)} of frame 0"
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


def read_vasprun(path: PathLike, *, traj_id: str | None = None, allow_incomplete: bool = False) -> list[Trajectory]:
    """Read a VASP ``vasprun.xml`` (or ``.gz``) through pymatgen: one trajectory, ionic steps -> frames.

    Energy per frame is ``e_fr_energy`` (free energy, eV); forces in eV/Å. Variable-cell runs keep
    per-frame cells in ``cells`` and the first frame's cell in ``cell``. A file that does not end
    with ``</modeling>`` (the run was cut off) raises ``TrajectoryError`` (reason ``incomplete``)
    naming its last complete frame, unless ``allow_incomplete``: then its complete ionic steps are
    kept with an ``IncompleteRunWarning`` (see :mod:`bptt_mlip.data.integrity`). Unknown element
    symbols and unparsable XML raise ``TrajectoryError`` (``unknown_element`` / ``damaged_file``).
    """
    import tempfile

    from pymatgen.io.vasp.outputs import Vasprun

    path = Path(path)
    traj_id = traj_id or file_stem(path)
    where = f"{path} trajectory {traj_id!r}"
    text = read_text(path)
    keep = integrity.frames_to_keep(text, "vasprun", where, allow_incomplete=allow_incomplete)
    with warnings.catch_warnings(), integrity.parser_errors(where, "a vasprun.xml", element_where=f"{where} frame 0"):
        warnings.simplefilter("ignore")
        # Vasprun wants a filename; give it the decompressed copy.
        with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=True) as tmp:
            tmp.write(text)
            tmp.flush()
            run = Vasprun(
                tmp.name, parse_dos=False, parse_eigen=False, parse_projected_eigen=False,
                parse_potcar_file=False, exception_on_bad_xml=False,
            )
        steps = run.ionic_steps[:keep]
    if not steps:
        raise TrajectoryError(f"{where}: zero ionic steps, expected at least one")
    if keep is not None:
        integrity.warn_incomplete(where, "vasprun", len(steps))
    structures = [s["structure"] for s in steps]
    forces = [np.asarray(s["forces"], np.float64) if s.get("forces") is not None else None for s in steps]
    energies = [s.get("e_fr_energy", s.get("e_0_energy")) for s in steps]
    return [
        from_pymatgen_structures(
            structures,
            forces=forces if all(f is not None for f in forces) else None,
            energies=energies if all(e is not None for e in energies) else None,
            source=str(path),
            traj_id=traj_id,
        )
    ]


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
    with integrity.parser_errors(str(path), "an MPtrj JSON file"):
        data = json.loads(read_text(path))
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
            with integrity.parser_errors(where, "an MPtrj structure"):
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
