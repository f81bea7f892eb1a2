"""Checks that a relaxation trajectory can be trained on, with errors naming file, trajectory and
frame: finite numbers, known elements, at least two frames, no atoms closer than a minimum
distance (minimum image along periodic directions), the same species in initial and reference
structures. ``check_relaxations`` keeps or skips invalid records and counts them by reason.

Variable-cell relaxations (the lattice changes between frames, e.g. VASP ISIF=3) are valid
records, but the force models here take Cartesian positions in a fixed box and cannot follow a
strain, so a dataset leaves them out by default: ``split_variable_cell`` separates them, each with
the reason ``variable_cell`` and its largest lattice change and volume change.
"""

from __future__ import annotations

import numpy as np

from bptt_mlip.data.geometry import pair_distances
from bptt_mlip.data.trajectory import (
    DEFAULT_MIN_DISTANCE,
    REASON_ATOMS_TOO_CLOSE,
    REASON_SPECIES_CHANGE,
    REASON_TOO_FEW_FRAMES,
    REASON_VARIABLE_CELL,
    Trajectory,
    TrajectoryError,
    error_reason,
    validate,
)

DEFAULT_CELL_TOLERANCE = 1e-3
"""Largest change (Å) of any lattice-vector component from the first frame that still counts as a
fixed cell: well above the 1e-8 Å printing noise of a fixed-cell VASP run, well below any real
strain (1e-3 Å on a 10 Å cell is a 1e-4 strain)."""


def max_cell_change(traj: Trajectory) -> float:
    """Largest change (Å) of any lattice-vector component from frame 0 over the run; 0 for a fixed cell."""
    if traj.cells is None:
        return 0.0
    cells = np.asarray(traj.cells, np.float64)
    return float(np.max(np.abs(cells - cells[0])))


def split_variable_cell(trajs, *, tolerance: float = DEFAULT_CELL_TOLERANCE):
    """``(fixed, skipped)``: trajectories whose cell changes by at most ``tolerance`` Å (see
    :func:`max_cell_change`) in input order, and ``{"where", "reason": "variable_cell", "message"}``
    dicts for the others (the message gives the lattice and volume change)."""
    fixed, skipped = [], []
    for traj in trajs:
        change = max_cell_change(traj)
        if change <= tolerance:
            fixed.append(traj)
            continue
        v0, v1 = (abs(float(np.linalg.det(traj.cells[k]))) for k in (0, -1))
        skipped.append({
            "where": traj.where(),
            "reason": REASON_VARIABLE_CELL,
            "message": (
                f"{traj.where()}: variable cell: the lattice changes by up to {change:.3g} Å between frames "
                f"(volume {v0:.4g} -> {v1:.4g} Å^3, {100 * (v1 - v0) / v0:+.2f}%); the force models have no cell "
                "input and cannot follow the strain. Pass keep_variable_cell=True (--keep_variable_cell) to "
                "train on it anyway"
            ),
        })
    return fixed, skipped


def min_pair_distance(positions: np.ndarray, cell: np.ndarray | None = None, pbc=(False, False, False)):
    """``(d, i, j)``: the smallest distance (Å) between two atoms and their indices.

    Along periodic directions the minimum image is used (:func:`bptt_mlip.data.geometry.pair_distances`,
    exact for any cell). Fewer than two atoms give ``(inf, -1, -1)``.
    """
    n = np.asarray(positions).shape[0]
    if n < 2:
        return float("inf"), -1, -1
    r = pair_distances(positions, cell, pbc)
    flat = int(np.argmin(r))
    i, j = divmod(flat, n)
    return float(r[i, j]), int(min(i, j)), int(max(i, j))


def check_same_species(initial_species, reference_species, where: str) -> None:
    """Raise :class:`TrajectoryError` unless a reference (target) structure has exactly the
    atoms of the initial one, in the same order (Dq compares atom j with atom j)."""
    a = np.asarray(initial_species)
    b = np.asarray(reference_species)
    if a.shape != b.shape:
        raise TrajectoryError(
            f"{where}: the reference structure has {b.size} atoms, the initial structure {a.size}; "
            "a relaxation target must have the same atoms in the same order",
            REASON_SPECIES_CHANGE,
        )
    bad = np.nonzero(a != b)[0]
    if bad.size:
        k = int(bad[0])
        raise TrajectoryError(
            f"{where}: the reference structure has Z={int(b[k])} at atom {k} where the initial structure has "
            f"Z={int(a[k])} ({bad.size} atoms differ); a relaxation target must have the same species in the "
            "same order",
            REASON_SPECIES_CHANGE,
        )


def check_relaxation(
    traj: Trajectory,
    *,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    min_frames: int = 2,
    distance_frames: str = "ends",
    reference_species=None,
) -> Trajectory:
    """Validate ``traj`` as a relaxation usable for training; return it or raise :class:`TrajectoryError`.

    On top of :func:`validate` (shapes and atom counts per frame, finite positions / forces /
    energies / cells, known elements): at least ``min_frames`` frames (a relaxation needs an
    initial and a reference frame, so the default is 2); no two atoms closer than
    ``min_distance`` Å (minimum image in periodic directions; ``0`` disables the check) in the
    first and last frames (``distance_frames="ends"``) or in every frame (``"all"``); and, when
    ``reference_species`` is given (a separately supplied target structure), the same species in
    the same order. Errors carry ``reason`` (``REASON_*``) and name source, trajectory and frame.
    """
    try:
        validate(traj)
    except TrajectoryError as err:
        if err.reason is None:
            err.reason = error_reason(err)
        raise
    t = traj.num_frames
    if t < min_frames:
        raise TrajectoryError(
            f"{traj.where()}: {t} frame{'s' if t != 1 else ''}, expected at least {min_frames} "
            "(a relaxation needs an initial frame and a relaxed reference frame)",
            REASON_TOO_FEW_FRAMES,
        )
    if reference_species is not None:
        check_same_species(traj.species, reference_species, traj.where())
    if min_distance and min_distance > 0 and traj.num_atoms > 1:
        if distance_frames == "ends":
            frames = sorted({0, t - 1})
        elif distance_frames == "all":
            frames = range(t)
        else:
            raise ValueError(f"distance_frames must be 'ends' or 'all', got {distance_frames!r}")
        for f in frames:
            cell = traj.cells[f] if traj.cells is not None else traj.cell
            d, i, j = min_pair_distance(traj.positions[f], cell, traj.pbc)
            if d < min_distance:
                raise TrajectoryError(
                    f"{traj.where(f)}: atoms {i} and {j} are {d:.3g} Å apart"
                    f"{' (minimum image)' if cell is not None and any(traj.pbc) else ''}, closer than the minimum "
                    f"distance {min_distance:g} Å (corrupt positions or wrong units?)",
                    REASON_ATOMS_TOO_CLOSE,
                )
    return traj


def check_relaxations(
    trajs,
    *,
    skip_bad: bool = False,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    min_frames: int = 2,
    distance_frames: str = "ends",
):
    """:func:`check_relaxation` on every trajectory: ``(kept, skipped)``.

    Without ``skip_bad`` the first invalid trajectory raises its :class:`TrajectoryError`; with it,
    invalid trajectories are left out and listed in ``skipped`` as
    ``{"where", "reason", "message"}`` dicts (in input order).
    """
    kept, skipped = [], []
    for traj in trajs:
        try:
            kept.append(
                check_relaxation(traj, min_distance=min_distance, min_frames=min_frames,
                                 distance_frames=distance_frames)
            )
        except TrajectoryError as err:
            if not skip_bad:
                raise
            skipped.append({"where": traj.where(), "reason": error_reason(err), "message": str(err)})
    return kept, skipped


def skipped_summary(skipped) -> dict:
    """``{"num_skipped", "by_reason": {reason: count}, "records": skipped}`` for logs and results."""
    by_reason: dict[str, int] = {}
    for s in skipped:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    return {"num_skipped": len(skipped), "by_reason": by_reason, "records": list(skipped)}
