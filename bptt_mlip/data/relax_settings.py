"""Relaxation settings derived from the training trajectories: stop rules, step-size grid, FIRE's fmax.

Fixed defaults (stop at 1e-3 Å of RMS movement, a grid of 0.005-0.08 Å²/eV, FIRE's fmax 0.05 eV/Å)
fit relaxations that start far from their minimum. DFT defect runs start near it (largest force
0.02-0.9 eV/Å): there every rollout with those defaults stops after its first frame, FIRE after zero
steps, and the grid is flat, so nothing moves and nothing says so. The reference relaxations
themselves say at what scale their structures move and where their optimiser stopped;
:func:`derive_relax_settings` reads that off them (plain numpy, host only):

* **force scale**: the median over trajectories of the first frame's largest per-atom force norm
  (eV/Å), and of its RMS per-atom force norm;
* **per-frame movements**: the RMS over atoms of the displacement between consecutive reference
  frames (Å), for each trajectory's first and last pair of frames and over all pairs;
* **least-squares step**: for every recorded frame t the single step eta_t (Å²/eV) that best
  explains it as a frame of the rollout, ``X_{t+1} = X_t + eta_t F_t``:
  ``eta_t = sum_j F_tj . (X_{t+1,j} - X_tj) / sum_j |F_tj|^2``; its median per trajectory, then the
  median over trajectories (a long trajectory counts as one; line-search trial frames and
  quasi-Newton steps are outliers a median ignores).

The rules (each a module constant):

* ``stop_rms`` = ``STOP_RMS_FRACTION`` x the median last-frame movement: a rollout stops once it
  moves clearly less than the reference runs did when their optimiser stopped. It is capped at
  ``STOP_RMS_CAP_FRACTION`` x the median first-frame movement (a typical rollout's first frame never
  meets it) and floored at ``STOP_RMS_FLOOR`` Å (float32 positions resolve no less).
* ``stop_fmax`` = ``STOP_FMAX_FACTOR`` x the median largest force at the last reference frames (where
  the reference optimiser itself stopped), capped at ``STOP_FMAX_CAP_FRACTION`` x the force scale
  so that a typical structure is not already converged at its start; 0 (off) when the last frames
  carry no force at all.
* ``fire_fmax`` = ``stop_fmax`` (the same scale; ASE's 0.05 eV/Å is above every force of data that
  starts at 0.02), or ``FIRE_FMAX_FALLBACK_FRACTION`` x the force scale when ``stop_fmax`` is 0
  (FIRE needs a positive threshold).
* ``grid_steps`` = ``GRID_POINTS`` steps spaced geometrically from ``1/GRID_SPAN`` to ``GRID_SPAN``
  times the least-squares step: a model whose forces match the reference moves as far per frame as
  the reference did at the middle of the grid; the ends cover a model with forces ``GRID_SPAN``
  times too large or too small.

Trajectories with fewer than two frames or without forces carry no movement or no step and are left
out (counted in ``num_skipped``); when none is left, or the data give no positive step, a
:class:`ValueError` says why and which settings to give by hand instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from bptt_mlip.data.trajectory import Trajectory

STOP_RMS_FRACTION = 0.15
"""``stop_rms`` as a fraction of the median RMS movement of the reference runs' last frames."""
STOP_RMS_CAP_FRACTION = 0.5
"""``stop_rms`` is at most this fraction of the median RMS movement of their first frames."""
STOP_RMS_FLOOR = 1e-5
"""Smallest ``stop_rms`` (Å): below it a float32 rollout's movement is rounding noise."""
STOP_FMAX_FACTOR = 1.0
"""``stop_fmax`` as a multiple of the median largest force at the reference runs' last frames."""
STOP_FMAX_CAP_FRACTION = 0.5
"""``stop_fmax`` is at most this fraction of the force scale (the median first-frame largest force)."""
FIRE_FMAX_FALLBACK_FRACTION = 0.05
"""``fire_fmax`` as a fraction of the force scale when the last reference frames carry no force."""
GRID_SPAN = 10.0
"""The grid runs from the least-squares step / GRID_SPAN to the least-squares step x GRID_SPAN."""
GRID_POINTS = 11
"""Steps in the grid (odd: the least-squares step itself is the middle one)."""


@dataclasses.dataclass(frozen=True)
class RelaxSettings:
    """Relaxation settings derived from training trajectories, with the evidence behind them.

    Settings:
      stop_rms: RMS-movement stop of a rollout frame (Å).
      stop_fmax: largest-force stop of a rollout, checked before each frame (eV/Å; 0 = off).
      grid_steps: step sizes of the fixed-step grid search, ascending (Å²/eV).
      fire_fmax: FIRE's convergence threshold on the largest per-atom force (eV/Å).

    Evidence (medians over trajectories unless said otherwise):
      num_trajectories: trajectories used; num_skipped: left out (one frame or no forces).
      num_frames: recorded frames (pairs of consecutive positions) behind the movements and steps.
      force_scale: largest per-atom force norm at the first frame (eV/Å).
      initial_force_rms: RMS per-atom force norm at the first frame (eV/Å).
      final_fmax: largest per-atom force norm at the last frame (eV/Å), where the reference stopped.
      first_frame_rms, last_frame_rms: RMS movement of the first and of the last recorded frame (Å).
      median_frame_rms: median RMS movement over every recorded frame of every trajectory (Å).
      lsq_step: the least-squares single step (Å²/eV), median per trajectory then over trajectories.
      lsq_step_quartiles: 25th and 75th percentiles of the per-frame least-squares steps (Å²/eV).
      clamps: the caps and floors that changed a setting, in words (empty when none did).
    """

    stop_rms: float
    stop_fmax: float
    grid_steps: tuple[float, ...]
    fire_fmax: float
    num_trajectories: int
    num_skipped: int
    num_frames: int
    force_scale: float
    initial_force_rms: float
    final_fmax: float
    first_frame_rms: float
    last_frame_rms: float
    median_frame_rms: float
    lsq_step: float
    lsq_step_quartiles: tuple[float, float]
    clamps: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RelaxSettings":
        """The inverse of :meth:`to_dict`."""
        tuples = ("grid_steps", "lsq_step_quartiles", "clamps")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})

    def describe(self) -> str:
        """One plain paragraph: the settings and where each came from (for logs and results.md)."""
        fmax_rule = (f"or largest force < {self.stop_fmax:.3g} eV/Å (the median largest force at their last "
                     f"frames, {self.final_fmax:.3g})" if self.stop_fmax > 0 else
                     "(no force stop: the last frames carry no force)")
        text = (
            f"Settings derived from {self.num_trajectories} training relaxations ({self.num_frames} recorded "
            f"frames; first-frame largest force {self.force_scale:.3g} eV/Å, RMS movement per frame "
            f"{self.first_frame_rms:.2g} Å at the first and {self.last_frame_rms:.2g} Å at the last frame): "
            f"stop when RMS movement < {self.stop_rms:.2g} Å ({STOP_RMS_FRACTION:g}x the median last-frame "
            f"movement) {fmax_rule}; grid {self.grid_steps[0]:.3g}..{self.grid_steps[-1]:.3g} Å²/eV "
            f"({len(self.grid_steps)} steps) around the least-squares step {self.lsq_step:.3g} Å²/eV "
            f"(quartiles {self.lsq_step_quartiles[0]:.3g}..{self.lsq_step_quartiles[1]:.3g}); "
            f"FIRE fmax {self.fire_fmax:.3g} eV/Å."
        )
        if self.num_skipped:
            text += f" {self.num_skipped} trajectories with one frame or no forces were not used."
        if self.clamps:
            text += " Clamped: " + "; ".join(self.clamps) + "."
        return text


def lsq_steps(positions: np.ndarray, forces: np.ndarray) -> np.ndarray:
    """[T - 1] least-squares single step of each recorded frame (Å²/eV; NaN where the forces are 0).

    ``positions`` [T, n, 3] Å and ``forces`` [T, n, 3] eV/Å of one trajectory:
    ``eta_t = sum(F_t . (X_{t+1} - X_t)) / sum(F_t . F_t)`` minimises ``|X_{t+1} - X_t - eta F_t|^2``.
    """
    moves = positions[1:] - positions[:-1]
    f = forces[:-1]
    ff = np.sum(f * f, axis=(-1, -2))
    fx = np.sum(f * moves, axis=(-1, -2))
    return np.where(ff > 0, fx / np.where(ff > 0, ff, 1.0), np.nan)


def frame_movements(positions: np.ndarray) -> np.ndarray:
    """[T - 1] RMS over atoms of the displacement norms between consecutive frames (Å) of [T, n, 3]."""
    moves = positions[1:] - positions[:-1]
    return np.sqrt(np.mean(np.sum(moves * moves, axis=-1), axis=-1))


def _largest_force(forces: np.ndarray) -> float:
    """Largest per-atom force norm (eV/Å) of one frame's forces [n, 3]."""
    return float(np.max(np.linalg.norm(forces, axis=-1))) if forces.size else 0.0


def _usable(trajectories: Sequence[Trajectory]) -> tuple[list[Trajectory], int]:
    """The trajectories with >= 2 frames and forces, and how many were left out; errors when none is left."""
    if isinstance(trajectories, Trajectory):
        trajectories = [trajectories]
    trajectories = list(trajectories)
    if not trajectories:
        raise ValueError("derive_relax_settings: no trajectories given")
    usable = [t for t in trajectories if t.forces is not None and t.num_frames >= 2 and t.num_atoms > 0]
    if not usable:
        kinds = sorted({("no forces" if t.forces is None else f"{t.num_frames} frame(s)") for t in trajectories})
        raise ValueError(
            f"derive_relax_settings: none of the {len(trajectories)} trajectories has two or more frames with "
            f"forces (they have {', '.join(kinds)}, e.g. {trajectories[0].where()}); per-frame movements and "
            "steps need consecutive frames: give stop_rms, stop_fmax, grid_steps and fire_fmax by hand")
    return usable, len(trajectories) - len(usable)


def _evidence(usable: list[Trajectory]) -> dict[str, Any]:
    """The medians the rules use (see :class:`RelaxSettings` for each name's meaning)."""
    per_traj_steps, all_steps, all_moves = [], [], []
    first_fmax, first_frms, last_fmax, first_move, last_move = [], [], [], [], []
    for t in usable:
        steps = lsq_steps(t.positions, t.forces)
        steps = steps[np.isfinite(steps)]
        if steps.size:
            per_traj_steps.append(float(np.median(steps)))
            all_steps.append(steps)
        moves = frame_movements(t.positions)
        all_moves.append(moves)
        first_move.append(moves[0])
        last_move.append(moves[-1])
        first_fmax.append(_largest_force(t.forces[0]))
        first_frms.append(float(np.sqrt(np.mean(np.sum(t.forces[0] ** 2, axis=-1)))))
        last_fmax.append(_largest_force(t.forces[-1]))
    if not per_traj_steps:
        raise ValueError(
            f"derive_relax_settings: every force of the {len(usable)} trajectories (e.g. {usable[0].where()}) "
            "is zero before its last frame, so no step explains their movement: give grid_steps by hand")
    steps = np.concatenate(all_steps)
    return dict(
        num_trajectories=len(usable),
        num_frames=int(sum(m.size for m in all_moves)),
        force_scale=float(np.median(first_fmax)),
        initial_force_rms=float(np.median(first_frms)),
        final_fmax=float(np.median(last_fmax)),
        first_frame_rms=float(np.median(first_move)),
        last_frame_rms=float(np.median(last_move)),
        median_frame_rms=float(np.median(np.concatenate(all_moves))),
        lsq_step=float(np.median(per_traj_steps)),
        lsq_step_quartiles=(float(np.percentile(steps, 25)), float(np.percentile(steps, 75))),
    )


def step_grid(center: float, span: float = GRID_SPAN, points: int = GRID_POINTS) -> tuple[float, ...]:
    """``points`` step sizes (Å²/eV) spaced geometrically from ``center / span`` to ``center * span``."""
    if not (np.isfinite(center) and center > 0):
        raise ValueError(f"step_grid: the centre step must be a positive finite step size (Å²/eV), got {center}")
    if span <= 1 or points < 2:
        raise ValueError(f"step_grid: need span > 1 and points >= 2, got span={span}, points={points}")
    return tuple(float(x) for x in np.geomspace(center / span, center * span, points))


def derive_relax_settings(trajectories: Sequence[Trajectory]) -> RelaxSettings:
    """Stop rules, step-size grid and FIRE fmax from training relaxations (rules in the module docstring).

    Args:
      trajectories: the training :class:`~bptt_mlip.data.trajectory.Trajectory` records (positions
        [T, n, 3] Å, forces [T, n, 3] eV/Å). Those with one frame or without forces are left out.

    Raises:
      ValueError: no trajectories, none with two frames and forces, all forces zero, or a median
        least-squares step that is not positive (frames that do not move along the forces); the
        message says which settings to give by hand.
    """
    usable, skipped = _usable(trajectories)
    ev = _evidence(usable)
    if not ev["lsq_step"] > 0:
        raise ValueError(
            f"derive_relax_settings: the median least-squares step of {len(usable)} trajectories is "
            f"{ev['lsq_step']:.3g} Å²/eV: their frames do not move along the recorded forces (forces of "
            "the wrong sign or frames out of order?); give grid_steps by hand")
    clamps = []
    stop_rms = STOP_RMS_FRACTION * ev["last_frame_rms"]
    cap = STOP_RMS_CAP_FRACTION * ev["first_frame_rms"]
    if stop_rms > cap:
        clamps.append(f"stop_rms capped at {STOP_RMS_CAP_FRACTION:g}x the first-frame movement ({cap:.2g} Å)")
        stop_rms = cap
    if stop_rms < STOP_RMS_FLOOR:
        clamps.append(f"stop_rms raised to the floor {STOP_RMS_FLOOR:g} Å")
        stop_rms = STOP_RMS_FLOOR
    stop_fmax = STOP_FMAX_FACTOR * ev["final_fmax"]
    fmax_cap = STOP_FMAX_CAP_FRACTION * ev["force_scale"]
    if stop_fmax > fmax_cap:
        clamps.append(f"stop_fmax capped at {STOP_FMAX_CAP_FRACTION:g}x the first-frame largest force "
                      f"({fmax_cap:.3g} eV/Å)")
        stop_fmax = fmax_cap
    fire_fmax = stop_fmax if stop_fmax > 0 else FIRE_FMAX_FALLBACK_FRACTION * ev["force_scale"]
    if not fire_fmax > 0:
        raise ValueError("derive_relax_settings: every first frame has zero force: give fire_fmax by hand")
    return RelaxSettings(stop_rms=float(stop_rms), stop_fmax=float(stop_fmax), grid_steps=step_grid(ev["lsq_step"]),
                         fire_fmax=float(fire_fmax), num_skipped=skipped, clamps=tuple(clamps), **ev)
