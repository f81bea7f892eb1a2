"""Parts of the GaN example (``experiments.example_gan``): read the DFT relaxations and hold one
out; use the saved models on a structure they never saw; draw the held-out defect as the tuned
model relaxes it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bptt_mlip import descriptors
from bptt_mlip.data import curation, readers
from bptt_mlip.relax import fire
from bptt_mlip.workflow import api, plots_structure


def trajectory_name(t) -> str:
    """The file-name stem of a trajectory's source (``GaN_v_N_q1`` for ``GaN_v_N_q1.vasprun.xml.gz``)."""
    return Path(t.source).name.split(".")[0]


def load_gan(data_dir: str, test_name: str, log=print):
    """``(files, train, test)``: the curated ``GaN_*.vasprun.xml.gz`` relaxations of ``data_dir``,
    ``test`` the one named ``test_name``. Raises SystemExit naming what is missing."""
    files = sorted(Path(data_dir).glob("GaN_*.vasprun.xml.gz"))
    if not files:
        raise SystemExit(f"no GaN_*.vasprun.xml.gz in {data_dir!r} (set --data_dir)")
    trajs, report = curation.curate(readers.read_trajectories(files), min_frames=3)
    log(f"read {len(files)} files: {report}")
    test = [t for t in trajs if trajectory_name(t) == test_name]
    if len(test) != 1:
        raise SystemExit(f"--test_name={test_name!r} matches {len(test)} trajectories; "
                         f"names: {[trajectory_name(t) for t in trajs]}")
    for t in trajs:
        log(f"  {trajectory_name(t):<16} {t.num_atoms} atoms, {t.num_frames} frames, max force "
            f"{t.max_force()[0]:.3f} -> {t.max_force()[-1]:.3f} eV/Å {'(test)' if t in test else ''}")
    return files, [t for t in trajs if trajectory_name(t) != test_name], test


def ideal_gan_supercell(a: float, c: float, u: float = 0.377):
    """32-atom 2x2x2 wurtzite GaN with lattice constants ``a``, ``c`` (Å)."""
    from ase.build import bulk

    return bulk("GaN", "wurtzite", a=a, c=c, u=u) * (2, 2, 2)


def distance_to(positions: np.ndarray, ideal: np.ndarray, masses: np.ndarray) -> tuple[float, float]:
    """(RMS distance Å, Dq amu^0.5 Å) to the ideal positions after removing the mean translation."""
    d = positions - ideal
    d = d - d.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(d * d, -1)))), float(np.sqrt(np.sum(masses[:, None] * d * d)))


def first_frame_atoms(t):
    """The first frame of a trajectory as ASE Atoms."""
    from ase import Atoms

    return Atoms(numbers=t.species, positions=t.initial_positions, cell=t.cell, pbc=t.pbc)


def relax_new_supercell(models: dict, ref_cell: np.ndarray, *, rattle: float, seed: int, stop_rms: float):
    """Relax a rattled ideal wurtzite supercell (lattice from the 2x2x2 DFT cell ``ref_cell``) with
    each of ``models`` ({label: TrainedModel}), by its own frame map and by FIRE.

    Returns (rows with RMS distance and Dq to the ideal crystal per model and method, largest
    force (eV/Å) the last model predicts on the ideal crystal, lattice {"a", "c"} in Å).
    """
    a, c = float(np.linalg.norm(ref_cell[0])) / 2, float(np.linalg.norm(ref_cell[2])) / 2
    ideal = ideal_gan_supercell(a, c)
    rattled = ideal.copy()
    rattled.rattle(rattle, seed=seed)
    masses = descriptors.atomic_masses(ideal.numbers)
    start_rms, start_dq = distance_to(rattled.positions, ideal.positions, masses)
    rows = [{"model": "start (rattled)", "rms_to_ideal_A": start_rms, "dq_to_ideal": start_dq}]
    methods = {"frame": dict(max_frames=200, stop_rms=stop_rms),
               "fire": dict(fire_config=fire.FireConfig(fmax=0.05, max_steps=300))}
    for label, m in models.items():
        for method, kw in methods.items():
            t0 = time.time()
            out = api.relax(rattled, m, method=method, **kw)
            rms, dq = distance_to(out.structure.positions, ideal.positions, masses)
            rows.append({"model": label, "method": method, "rms_to_ideal_A": rms, "dq_to_ideal": dq,
                         "frames": int(out.num_frames[0]), "converged": bool(out.converged[0]),
                         "max_force": float(out.max_force[0]), "wall_s": time.time() - t0})
    ideal_force = float(api.relax(ideal, m, max_frames=1).max_force[0])
    return rows, ideal_force, {"a": a, "c": c}


def draw_defect(t, model: api.TrainedModel, max_frames: int, path: Path) -> None:
    """The neighbourhood of trajectory ``t``'s defect: start, the model's end point and DFT's."""
    pred = api.relax(first_frame_atoms(t), model, max_frames=max_frames).structure.positions
    plots_structure.defect_neighbourhood(t.initial_positions, pred, t.final_positions, path,
                                         species=t.species, cell=t.cell, radius=4.0)
