"""Generate relaxation datasets with a reference potential.

Two kinds of starting structures:

* ``si_defects``: point defects in diamond-Si supercells (vacancy, divacancy, tetrahedral,
  hexagonal and <110>-split interstitials, Frenkel pair, di-interstitial, vacancy pair), rattled
  with seeded Gaussian noise (larger near the defect), labelled by Stillinger-Weber or Tersoff.
* ``crystals``: fcc/bcc/hcp/diamond crystals of the elements an oracle covers (EMT metals, SW Si),
  rattled and slightly strained; the cell stays fixed during relaxation.

Every structure is relaxed with ASE's FIRE (dt 0.1, maxstep 0.2 Å) until the largest per-atom
force norm is below ``fmax``; EVERY frame (positions, forces, energy) is kept. A relaxation that
explodes (non-finite or huge numbers) or does not converge within ``max_steps`` is dropped and
the structure re-seeded; the manifest counts these.

Saving and loading dataset folders is :mod:`bptt_mlip.data.store`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from bptt_mlip.data import oracles as oracles_lib
from bptt_mlip.data.geometry import pair_distances
from bptt_mlip.data.prototypes import (
    CrystalSettings,
    DefectSettings,
    crystal_prototypes,
    crystal_structure,
    resolve_kinds,
    si_defect_structure,
)
from bptt_mlip.data.store import save_dataset
from bptt_mlip.data.trajectory import Trajectory, make_trajectory
@dataclasses.dataclass(frozen=True)
class RelaxSettings:
    """FIRE settings (ASE defaults dt 0.1, maxstep 0.2 Å) and explosion guards."""

    fmax: float = 0.02  # eV/Å, converged when max_i |F_i| < fmax
    max_steps: int = 1000
    dt: float = 0.1
    maxstep: float = 0.2  # Å
    force_limit: float = 100.0  # eV/Å: larger => exploded
    displacement_limit: float = 5.0  # Å from the start: larger => exploded
    min_distance: float = 1.5  # Å: a final pair closer than this => collapsed


def _rng(seed: int, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(attempt)]))


# ----------------------------------------------------------------------------- relaxation


@dataclasses.dataclass(frozen=True)
class RelaxResult:
    positions: np.ndarray  # [T, n, 3]
    forces: np.ndarray  # [T, n, 3]
    energies: np.ndarray  # [T]
    converged: bool
    exploded: bool
    reason: str


def relax_with_oracle(
    species, positions, cell, oracle: oracles_lib.Oracle, settings: RelaxSettings = RelaxSettings()
) -> RelaxResult:
    """FIRE-relax one structure (fixed cell) with ASE, recording every frame.

    Frame 0 is the start; frame t is after t FIRE steps. Stops at convergence
    (max per-atom force norm < fmax), at ``max_steps``, or on explosion.
    """
    from ase import Atoms
    from ase.optimize import FIRE

    atoms = Atoms(numbers=species, positions=positions, cell=cell, pbc=cell is not None)
    atoms.calc = oracles_lib.ase_calculator(oracle)
    opt = FIRE(atoms, dt=settings.dt, maxstep=settings.maxstep, logfile=None)
    pos0 = np.asarray(positions, np.float64)
    xs, fs, es = [], [], []
    converged = exploded = False
    reason = "max_steps"
    for conv in opt.irun(fmax=settings.fmax, steps=settings.max_steps):
        x = atoms.get_positions()
        f = atoms.get_forces()
        e = atoms.get_potential_energy()
        xs.append(x)
        fs.append(f)
        es.append(e)
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(f)) and np.isfinite(e)):
            exploded, reason = True, "non-finite"
            break
        if np.abs(f).max() > settings.force_limit or np.abs(x - pos0).max() > settings.displacement_limit:
            exploded, reason = True, "huge forces or displacements"
            break
        if conv:
            converged, reason = True, "converged"
            break
    if converged and cell is not None and settings.min_distance > 0:
        if pair_distances(xs[-1], np.asarray(cell), pbc=True).min() < settings.min_distance:
            converged, exploded, reason = False, True, "collapsed"
    return RelaxResult(np.asarray(xs), np.asarray(fs), np.asarray(es), converged, exploded, reason)


def _relax_with_reseed(index: int, make_structure: Callable, oracle, relax_settings, seed, max_attempts, stats):
    for attempt in range(max_attempts):
        rng = _rng(seed, index, attempt)
        species, pos, cell, meta = make_structure(rng)
        res = relax_with_oracle(species, pos, cell, oracle, relax_settings)
        if res.converged:
            return species, cell, res, meta, attempt
        stats["exploded" if res.exploded else "not_converged"] += 1
        stats.setdefault("dropped_reasons", {}).setdefault(res.reason, 0)
        stats["dropped_reasons"][res.reason] += 1
    raise RuntimeError(f"structure {index}: no converged relaxation in {max_attempts} attempts")


def _generated_trajectory(index: int, make_structure: Callable, oracle, relax_settings, seed, max_attempts, stats, *,
                          kind: str, id_prefix: str, source: str) -> Trajectory:
    """Relax structure ``index`` (re-seeding as needed), count its ``kind`` in ``stats``, and keep every frame."""
    species, cell, res, _, attempt = _relax_with_reseed(index, make_structure, oracle, relax_settings, seed,
                                                        max_attempts, stats)
    stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
    return make_trajectory(
        species, res.positions, cell=cell, pbc=(True, True, True), forces=res.forces, energies=res.energies,
        source=source, traj_id=f"{id_prefix}_{index:05d}_a{attempt}",
    )


def generate_si_defects(
    num: int,
    seed: int,
    *,
    oracle: oracles_lib.Oracle | None = None,
    defect_settings: DefectSettings = DefectSettings(),
    relax_settings: RelaxSettings = RelaxSettings(),
    max_attempts: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Trajectory], dict]:
    """Relax ``num`` Si defect structures; kinds cycle through ``defect_settings.kinds``.

    Structure i uses the seed sequence (seed, i, attempt), so a dataset is reproducible and
    its i-th trajectory does not depend on ``num``. Returns (trajectories, stats).
    """
    oracle = oracle or oracles_lib.StillingerWeber()
    kinds = resolve_kinds(defect_settings, oracle)
    stats = {"exploded": 0, "not_converged": 0, "kinds": {}}
    trajs = []
    for i in range(num):
        kind = kinds[i % len(kinds)]

        def make(rng, kind=kind):
            species, pos, cell, center = si_defect_structure(kind, rng, defect_settings)
            return species, pos, cell, {"kind": kind}

        trajs.append(_generated_trajectory(i, make, oracle, relax_settings, seed, max_attempts, stats, kind=kind,
                                           id_prefix=f"si_{kind}", source=f"generator:si_defects:{oracle.name}"))
        if progress:
            progress(i + 1, num)
    return trajs, stats


def generate_crystals(
    num: int,
    seed: int,
    *,
    oracles: Sequence[oracles_lib.Oracle] | None = None,
    crystal_settings: CrystalSettings = CrystalSettings(),
    relax_settings: RelaxSettings = RelaxSettings(),
    max_attempts: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Trajectory], dict]:
    """Relax ``num`` rattled, strained crystals cycling over every (element, prototype) the oracles cover."""
    oracles = list(oracles) if oracles else [oracles_lib.EMTOracle(), oracles_lib.StillingerWeber()]
    protos = [(o, *p) for o in oracles for p in crystal_prototypes(o)]
    stats = {"exploded": 0, "not_converged": 0, "kinds": {}}
    trajs = []
    for i in range(num):
        oracle, element, proto, kwargs = protos[i % len(protos)]

        def make(rng):
            species, pos, cell = crystal_structure(element, proto, kwargs, rng, crystal_settings)
            return species, pos, cell, {}

        key = f"{element}_{proto}"
        trajs.append(_generated_trajectory(i, make, oracle, relax_settings, seed, max_attempts, stats, kind=key,
                                           id_prefix=key, source=f"generator:crystals:{oracle.name}"))
        if progress:
            progress(i + 1, num)
    return trajs, stats


def make_manifest(kind: str, seed: int, num: int, oracle_name: str, settings: dict, stats: dict, wall_s: float) -> dict:
    """The generation part of a manifest (the rest is added by :func:`save_dataset`)."""
    return {
        "kind": kind,
        "seed": int(seed),
        "num_requested": int(num),
        "oracle": oracle_name,
        "settings": settings,
        "exploded": int(stats.get("exploded", 0)),
        "not_converged": int(stats.get("not_converged", 0)),
        "reseeded": int(stats.get("exploded", 0) + stats.get("not_converged", 0)),
        "dropped_reasons": stats.get("dropped_reasons", {}),
        "kinds": stats.get("kinds", {}),
        "timing": {"wall_s": round(float(wall_s), 2)},
    }


def generate_and_save(kind: str, num: int, seed: int, out_dir, *, oracle: str = "sw", host_size: int = 64,
                      fmax: float = 0.02, max_steps: int = 1000, write_xyz: bool = True, frame_stride: int = 1,
                      progress=None) -> dict:
    """Generate a dataset of ``kind`` ('si_defects' | 'crystals') and save it; returns the manifest."""
    relax_settings = RelaxSettings(fmax=fmax, max_steps=max_steps)
    t0 = time.perf_counter()
    if kind == "si_defects":
        o = oracles_lib.get_oracle(oracle)
        ds = DefectSettings(host_size=host_size)
        ds = dataclasses.replace(ds, kinds=resolve_kinds(ds, o))
        trajs, stats = generate_si_defects(num, seed, oracle=o, defect_settings=ds, relax_settings=relax_settings,
                                           progress=progress)
        settings = {"relax": dataclasses.asdict(relax_settings), "defects": dataclasses.asdict(ds)}
        oracle_name = o.name
    elif kind == "crystals":
        names = oracle.split("+") if oracle not in ("auto", "") else ["emt", "sw"]
        os_ = [oracles_lib.get_oracle(n) for n in names]
        cs = CrystalSettings()
        trajs, stats = generate_crystals(num, seed, oracles=os_, crystal_settings=cs, relax_settings=relax_settings,
                                         progress=progress)
        settings = {"relax": dataclasses.asdict(relax_settings), "crystals": dataclasses.asdict(cs)}
        oracle_name = "+".join(o.name for o in os_)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; expected 'si_defects' or 'crystals'")
    wall = time.perf_counter() - t0
    manifest = make_manifest(kind, seed, num, oracle_name, settings, stats, wall)
    return save_dataset(trajs, out_dir, manifest=manifest, write_xyz=write_xyz, frame_stride=frame_stride)
