"""The trajectory record: one structural relaxation as a sequence of frames.

A :class:`Trajectory` is plain numpy (no JAX): it is what readers return and what the
batching code turns into padded JAX pytrees.

Units: positions and cells in Å, forces in eV/Å, energies in eV (total, not per atom).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from bptt_mlip import descriptors
from bptt_mlip.data.geometry import lattice_shifts


class TrajectoryError(ValueError):
    """A trajectory failed validation; the message names source, trajectory id and frame.

    ``reason`` is a short machine-readable category (see :func:`error_reason`).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


DEFAULT_MIN_DISTANCE = 0.5
"""Closest allowed distance between two atoms (Å) in :func:`check_relaxation`: real
structures have none closer than about 0.7 Å (H2); closer pairs mean corrupt or wrongly
unit-converted input and make force models blow up."""

REASON_NONFINITE = "nonfinite"
REASON_UNKNOWN_ELEMENT = "unknown_element"
REASON_TOO_FEW_FRAMES = "too_few_frames"
REASON_ATOMS_TOO_CLOSE = "atoms_too_close"
REASON_SHAPE = "shape_mismatch"
REASON_SPECIES_CHANGE = "species_change"
REASON_INVALID = "invalid"
REASON_INCOMPLETE = "incomplete"
"""A DFT output file cut off mid-run (no closing tags / final footer): its last frame is not the run's end point."""
REASON_DAMAGED_FILE = "damaged_file"
"""A file that cannot be decompressed or parsed (damaged gzip, broken XML, unreadable frame)."""
REASON_VARIABLE_CELL = "variable_cell"
"""A relaxation whose cell changes between frames (e.g. VASP ISIF=3): left out of datasets by default."""


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
    """One relaxation trajectory of ``T`` frames of the same ``n`` atoms.

    Attributes:
      species: [n] int32 atomic numbers Z.
      cell: [3, 3] float64 lattice vectors (rows) in Å of the first frame, or None (no cell).
      pbc: (3,) bools, periodic directions.
      positions: [T, n, 3] float64 Cartesian positions in Å.
      forces: [T, n, 3] float64 forces in eV/Å, or None.
      energies: [T] float64 total energies in eV, or None.
      source: file path or generator name the trajectory came from.
      traj_id: identifier, unique within its source.
      cells: [T, 3, 3] per-frame lattices in Å for variable-cell runs, or None when the cell
        is fixed (then ``cell`` holds it).
    """

    species: np.ndarray
    cell: Optional[np.ndarray]
    pbc: tuple
    positions: np.ndarray
    forces: Optional[np.ndarray] = None
    energies: Optional[np.ndarray] = None
    source: str = ""
    traj_id: str = ""
    cells: Optional[np.ndarray] = None

    @property
    def num_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_atoms(self) -> int:
        return int(self.species.shape[0])

    @property
    def initial_positions(self) -> np.ndarray:
        """[n, 3] first-frame positions (Å)."""
        return self.positions[0]

    @property
    def final_positions(self) -> np.ndarray:
        """[n, 3] last-frame positions (Å), the relaxed structure."""
        return self.positions[-1]

    @property
    def variable_cell(self) -> bool:
        """True when the per-frame cells differ (e.g. a VASP ISIF=3 run)."""
        return self.cells is not None and not np.allclose(self.cells, self.cells[0], atol=1e-8)

    def max_force(self) -> np.ndarray:
        """[T] largest per-atom force norm of each frame (eV/Å); requires forces."""
        if self.forces is None:
            raise TrajectoryError(f"{self.where()}: no forces")
        return np.linalg.norm(self.forces, axis=-1).max(axis=-1)

    def where(self, frame: int | None = None) -> str:
        s = f"{self.source or '<memory>'} trajectory {self.traj_id!r}"
        return s if frame is None else f"{s} frame {frame}"

    def replace(self, **changes) -> "Trajectory":
        return dataclasses.replace(self, **changes)


def mass_weighted_distance(traj_or_species, x: np.ndarray | None = None, y: np.ndarray | None = None) -> float:
    """Dq = sqrt(sum_j m_j |X_j - Y_j|^2) in amu^0.5 Å.

    ``mass_weighted_distance(traj)`` gives initial -> final Dq of a trajectory;
    ``mass_weighted_distance(species [n], x [n,3], y [n,3])`` gives it for two position arrays.
    """
    if isinstance(traj_or_species, Trajectory):
        species, x, y = traj_or_species.species, traj_or_species.initial_positions, traj_or_species.final_positions
    else:
        species = traj_or_species
    m = descriptors.atomic_masses(species).astype(np.float64)
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return float(np.sqrt(np.sum(m[:, None] * d * d)))


def make_trajectory(
    species,
    positions,
    *,
    cell=None,
    pbc=None,
    forces=None,
    energies=None,
    source: str = "",
    traj_id: str = "",
    cells=None,
    check: bool = True,
    unwrap_positions: bool = False,
) -> Trajectory:
    """Build (and by default validate) a :class:`Trajectory` from array-likes.

    ``species`` may be symbols or atomic numbers; ``positions`` [T, n, 3] (or [n, 3] for one frame).
    """
    where = f"{source or '<memory>'} trajectory {traj_id!r}"
    try:
        z = descriptors.atomic_numbers(species, where=where)
    except ValueError as err:
        raise TrajectoryError(str(err)) from None
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim == 2:
        pos = pos[None]
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.ndim == 2:
            forces = forces[None]
    if energies is not None:
        energies = np.atleast_1d(np.asarray(energies, dtype=np.float64))
    if cell is not None:
        cell = np.asarray(cell, dtype=np.float64)
    if cells is not None:
        cells = np.asarray(cells, dtype=np.float64)
    if pbc is None:
        pbc = (cell is not None,) * 3
    pbc = tuple(bool(p) for p in np.broadcast_to(np.asarray(pbc), (3,)))
    traj = Trajectory(
        species=z, cell=cell, pbc=pbc, positions=pos, forces=forces, energies=energies,
        source=str(source), traj_id=str(traj_id), cells=cells,
    )
    if check:
        validate(traj)
    if unwrap_positions:
        traj = unwrap(traj)
    return traj


def validate(traj: Trajectory) -> Trajectory:
    """Check a trajectory; return it unchanged or raise :class:`TrajectoryError`.

    Checks: at least one frame; positions [T, n, 3] with n = len(species); forces (if any)
    [T, n, 3]; energies (if any) [T]; all numbers finite; known elements; cell [3, 3]
    (and per-frame cells [T, 3, 3]). Messages name the source, trajectory id and frame index.
    """
    species = np.asarray(traj.species)
    if species.ndim != 1:
        raise TrajectoryError(f"{traj.where()}: species must be a 1-d array of Z, got shape {species.shape}")
    n = species.shape[0]
    bad = np.nonzero((species < 1) | (species > descriptors.MAX_Z))[0]
    if bad.size:
        raise TrajectoryError(
            f"{traj.where()}: unknown element Z={int(species[bad[0]])} at atom {int(bad[0])}, "
            f"expected Z in 1..{descriptors.MAX_Z}"
        )
    pos = traj.positions
    if pos.ndim != 3 or pos.shape[0] < 1:
        raise TrajectoryError(
            f"{traj.where()}: positions must have shape [T>=1, n, 3], got {pos.shape} (zero frames?)"
        )
    t = pos.shape[0]
    if pos.shape[1:] != (n, 3):
        raise TrajectoryError(
            f"{traj.where(0)}: positions have shape {pos.shape[1:]} per frame, expected ({n}, 3) for {n} species"
        )
    _check_finite(traj, pos, "positions")
    if traj.forces is not None:
        f = traj.forces
        if f.ndim != 3 or f.shape[0] != t:
            raise TrajectoryError(f"{traj.where()}: forces have shape {f.shape}, expected ({t}, {n}, 3)")
        if f.shape[1:] != (n, 3):
            raise TrajectoryError(
                f"{traj.where(0)}: forces have shape {f.shape[1:]} per frame, expected ({n}, 3)"
            )
        _check_finite(traj, f, "forces")
    if traj.energies is not None:
        e = traj.energies
        if e.shape != (t,):
            raise TrajectoryError(f"{traj.where()}: energies have shape {e.shape}, expected ({t},)")
        bad = np.nonzero(~np.isfinite(e))[0]
        if bad.size:
            raise TrajectoryError(f"{traj.where(int(bad[0]))}: energy is {e[bad[0]]}, expected a finite number")
    if traj.cell is not None:
        c = np.asarray(traj.cell)
        if c.shape != (3, 3):
            raise TrajectoryError(f"{traj.where()}: cell has shape {c.shape}, expected (3, 3)")
        if not np.all(np.isfinite(c)):
            raise TrajectoryError(f"{traj.where()}: cell contains NaN or infinity")
    if traj.cells is not None:
        c = np.asarray(traj.cells)
        if c.shape != (t, 3, 3):
            raise TrajectoryError(f"{traj.where()}: per-frame cells have shape {c.shape}, expected ({t}, 3, 3)")
        _check_finite(traj, c, "cells")
    if len(traj.pbc) != 3:
        raise TrajectoryError(f"{traj.where()}: pbc must have 3 entries, got {traj.pbc}")
    if any(traj.pbc) and traj.cell is None:
        raise TrajectoryError(f"{traj.where()}: periodic directions {traj.pbc} but no cell")
    return traj


def _check_finite(traj: Trajectory, arr: np.ndarray, what: str) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        frame, atom = np.argwhere(~finite)[0][:2]
        raise TrajectoryError(
            f"{traj.where(int(frame))}: {what} of atom {int(atom)} is {arr[frame, atom].tolist()}, "
            "expected finite numbers"
        )


def unwrap(traj: Trajectory) -> Trajectory:
    """Make positions continuous with the first frame (minimum-image steps frame to frame).

    Each frame-to-frame displacement is reduced to its minimum image along the periodic
    directions (using that frame's cell when per-frame ``cells`` exist), then accumulated
    from frame 0. Removes the whole-lattice-vector jumps VASP's wrapping introduces.
    Non-periodic directions are left as they are.
    """
    if traj.cell is None or not any(traj.pbc) or traj.num_frames < 2:
        return traj
    pbc = np.asarray(traj.pbc, bool)
    pos = traj.positions
    out = pos.copy()
    images = np.zeros(pos.shape[1:], np.float64)  # [n, 3] whole-cell shifts, fractional
    for t in range(1, pos.shape[0]):
        cell = traj.cells[t] if traj.cells is not None else traj.cell
        images -= lattice_shifts(pos[t] - pos[t - 1], cell, pbc)
        if np.any(images):
            out[t] = pos[t] + images @ cell
    return traj.replace(positions=out)


def error_reason(err: Exception) -> str:
    """The category of a validation error: the ``reason`` a :class:`TrajectoryError` carries, or
    one guessed from the message of errors raised by readers (which do not set it)."""
    reason = getattr(err, "reason", None)
    if reason:
        return reason
    msg = str(err).lower()
    if "finite" in msg or "nan" in msg or "infinity" in msg:
        return REASON_NONFINITE
    if "unknown element" in msg:
        return REASON_UNKNOWN_ELEMENT
    if "zero frames" in msg or "zero ionic steps" in msg or "frames" in msg and "expected at least" in msg:
        return REASON_TOO_FEW_FRAMES
    if "expected the" in msg and "of frame 0" in msg:
        return REASON_SPECIES_CHANGE
    if "shape" in msg:
        return REASON_SHAPE
    return REASON_INVALID
