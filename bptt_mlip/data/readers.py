"""Readers: files and in-memory objects -> validated, unwrapped :class:`Trajectory` lists.

Formats: extended XYZ (``.xyz``/``.extxyz``, optionally ``.gz``), VASP ``vasprun.xml`` and
``OUTCAR`` (optionally ``.gz``), CHGNet's MPtrj JSON, and lists of ASE ``Atoms`` or pymatgen
``Structure`` objects. Every reader validates (raising ``TrajectoryError`` naming file,
trajectory and frame) and unwraps positions to be continuous with the first frame.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from bptt_mlip.data.ase_readers import (
    ExtxyzTrajectory,
    from_ase_frames,
    iter_extxyz_trajectories,
    read_extxyz,
    read_outcar,
)
from bptt_mlip.data.pymatgen_readers import (
    MPTRJ_ENERGY_KEYS,
    from_pymatgen_structures,
    read_mptrj_json,
    read_vasprun,
)
from bptt_mlip.data.trajectory import Trajectory

PathLike = str | os.PathLike

__all__ = [
    "ExtxyzTrajectory", "MPTRJ_ENERGY_KEYS", "from_ase_frames", "from_pymatgen_structures", "guess_format",
    "iter_extxyz_trajectories", "read_extxyz", "read_mptrj_json", "read_outcar", "read_trajectories", "read_vasprun",
]


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


_RUN_READERS = ("vasprun", "outcar")
"""Formats written by a running DFT code, whose files can be cut off mid-run."""


def read_trajectories(
    paths: PathLike | Iterable[PathLike], format: str | None = None, *, allow_incomplete: bool = False, **kwargs
) -> list[Trajectory]:
    """Read one or many files (format guessed from each name unless ``format`` is given).

    A vasprun.xml / OUTCAR cut off mid-run raises ``TrajectoryError`` (reason ``incomplete``)
    unless ``allow_incomplete`` (then its complete frames are kept with a warning naming the last);
    damaged files and unknown element symbols raise ``TrajectoryError`` naming file, trajectory and
    frame (reasons ``damaged_file``, ``unknown_element``). Other keywords go to the reader.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Trajectory] = []
    for p in paths:
        fmt = format or guess_format(p)
        if fmt not in _READERS:
            raise ValueError(f"{p}: unknown format {fmt!r}, expected one of {sorted(_READERS)}")
        extra = {"allow_incomplete": allow_incomplete} if fmt in _RUN_READERS else {}
        out.extend(_READERS[fmt](p, **kwargs, **extra))
    return out
