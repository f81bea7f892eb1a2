"""Generate relaxation datasets with a reference potential, and save / load them.

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

On disk a dataset is a folder: ``cache.npz`` (concatenated arrays + offsets, written with fixed
zip timestamps so equal data gives equal bytes), ``manifest.json`` and optionally
``trajectories.extxyz.gz`` (every frame, ``traj_id`` and ``frame`` in the info line).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import platform
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bptt_mlip.data import oracles as oracles_lib
from bptt_mlip.data.trajectory import Trajectory, make_trajectory, mass_weighted_distance

SI_DEFECT_KINDS = (
    "vacancy",
    "divacancy",
    "tetrahedral",
    "hexagonal",
    "split110",
    "frenkel",
    "di_interstitial",
    "vacancy_pair",
)
# need an oracle that covers carbon (e.g. 'tersoff_sic')
SI_C_DEFECT_KINDS = ("substitution_C", "vacancy_C", "di_substitution_C")
CACHE_NAME = "cache.npz"
MANIFEST_NAME = "manifest.json"
EXTXYZ_NAME = "trajectories.extxyz.gz"
FORMAT_VERSION = 1


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


@dataclasses.dataclass(frozen=True)
class DefectSettings:
    """Starting-structure settings for the silicon point-defect set."""

    host_size: int = 64  # 8 * r^3 atoms: 64 (2x2x2) or 216 (3x3x3)
    lattice_constant: float = oracles_lib.SW_LATTICE_CONSTANT
    sigma_range: tuple[float, float] = (0.04, 0.12)  # Å, global rattle sigma drawn per structure
    defect_sigma: float = 0.2  # Å, extra rattle for atoms near the defect
    defect_radius: float = 4.0  # Å
    min_start_distance: float = 1.9  # Å, push atoms apart to at least this before relaxing
    kinds: tuple[str, ...] = ()  # empty: every kind the oracle covers (see resolve_kinds)


@dataclasses.dataclass(frozen=True)
class CrystalSettings:
    """Starting-structure settings for the crystal set."""

    sigma_range: tuple[float, float] = (0.03, 0.12)  # Å
    max_strain: float = 0.02  # symmetric strain components drawn in [-max, max]
    min_width: float = 8.0  # Å, supercell width in every direction
    max_atoms: int = 128


def _rng(seed: int, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(attempt)]))


# ----------------------------------------------------------------------------- geometry helpers


def _mic(d: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Minimum-image vectors (valid for cells whose widths exceed twice the distances of interest)."""
    frac = d @ np.linalg.inv(cell)
    frac -= np.round(frac)
    return frac @ cell


def _pair_distances(pos: np.ndarray, cell: np.ndarray) -> np.ndarray:
    d = _mic(pos[None, :, :] - pos[:, None, :], cell)
    r = np.linalg.norm(d, axis=-1)
    np.fill_diagonal(r, np.inf)
    return r


def push_apart(pos: np.ndarray, cell: np.ndarray, dmin: float, iters: int = 200) -> np.ndarray:
    """Move atom pairs closer than ``dmin`` (Å) apart symmetrically until none are (or ``iters`` runs out)."""
    pos = pos.copy()
    for _ in range(iters):
        d = _mic(pos[None, :, :] - pos[:, None, :], cell)  # d[i, j] = x_j - x_i
        r = np.linalg.norm(d, axis=-1)
        np.fill_diagonal(r, 1e6)
        close = r < dmin
        if not close.any():
            break
        push = np.where(close, (dmin - r) * 0.55 / np.maximum(r, 1e-6), 0.0)
        pos -= np.einsum("ij,ijk->ik", push, d)
    return pos


def resolve_kinds(settings: DefectSettings, oracle: oracles_lib.Oracle) -> tuple[str, ...]:
    """The defect kinds to cycle through: ``settings.kinds`` or, if empty, all the oracle covers."""
    if settings.kinds:
        if any(k in SI_C_DEFECT_KINDS for k in settings.kinds) and 6 not in oracle.elements:
            raise ValueError(f"carbon defect kinds need an oracle covering C; {oracle.name} covers Z={oracle.elements}")
        return tuple(settings.kinds)
    return SI_DEFECT_KINDS + (SI_C_DEFECT_KINDS if 6 in oracle.elements else ())


def si_defect_structure(kind: str, rng: np.random.Generator, settings: DefectSettings):
    """One rattled Si defect supercell.

    Returns (species [n] int32, positions [n, 3] Å, cell [3, 3] Å, center [3] Å of the defect).
    """
    from ase.build import bulk

    reps = round((settings.host_size / 8) ** (1 / 3))
    if 8 * reps**3 != settings.host_size:
        raise ValueError(f"host_size must be 8 * r^3 (64, 216, 512, ...), got {settings.host_size}")
    a = settings.lattice_constant
    host = bulk("Si", "diamond", a=a, cubic=True).repeat(reps)
    pos = host.get_positions()
    cell = np.asarray(host.cell.array)
    n = len(pos)
    # fcc sublattice A = atoms at integer multiples of a/2 on all coordinates
    frac_a = np.round(pos / (a / 2), 6)
    sub_a = np.nonzero(np.all(frac_a == np.round(frac_a), axis=1))[0]

    def t_site():
        base = pos[rng.choice(sub_a)]
        shift = (0.5 if rng.random() < 0.5 else 0.75) * a
        return base + shift * np.ones(3)

    def neighbours(i, k=4):
        r = np.linalg.norm(_mic(pos - pos[i], cell), axis=1)
        return np.argsort(r)[1 : k + 1]

    remove: list[int] = []
    sub: list[int] = []  # Si sites that become C
    add: list[np.ndarray] = []
    i0 = int(rng.integers(n))
    center = pos[i0].copy()
    if kind == "vacancy":
        remove = [i0]
    elif kind == "divacancy":
        remove = [i0, int(rng.choice(neighbours(i0)))]
        center = pos[i0] + 0.5 * _mic(pos[remove[1]] - pos[i0], cell)
    elif kind == "vacancy_pair":
        r = np.linalg.norm(_mic(pos - pos[i0], cell), axis=1)
        far = np.nonzero(r > 4.0)[0]
        remove = [i0, int(rng.choice(far))]
    elif kind == "tetrahedral":
        center = t_site()
        add = [center]
    elif kind == "hexagonal":
        base = pos[rng.choice(sub_a)]
        center = base + 0.625 * a * np.ones(3)
        add = [center]
    elif kind == "split110":
        dirs = np.array([[1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1]], float)
        u = dirs[rng.integers(len(dirs))] / np.sqrt(2.0)
        remove = [i0]
        add = [pos[i0] + 1.15 * u, pos[i0] - 1.15 * u]
    elif kind == "frenkel":
        center = t_site()
        add = [center]
        r = np.linalg.norm(_mic(pos - center, cell), axis=1)
        remove = [int(rng.choice(np.nonzero(r > 4.0)[0]))]
    elif kind == "substitution_C":
        sub = [i0]
    elif kind == "di_substitution_C":
        sub = [i0, int(rng.choice(neighbours(i0, 16)[4:]))]  # second or third shell
    elif kind == "vacancy_C":
        j = int(rng.choice(neighbours(i0)))
        remove, sub = [i0], [j]
        center = pos[i0] + 0.5 * _mic(pos[j] - pos[i0], cell)
    elif kind == "di_interstitial":
        c1 = t_site()
        c2 = c1 + rng.choice([-1.0, 1.0], size=3) * (a / 2)  # a neighbouring T site
        add = [c1, c2]
        center = 0.5 * (c1 + c2)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {SI_DEFECT_KINDS + SI_C_DEFECT_KINDS}")
    keep = np.setdiff1d(np.arange(n), remove)
    species = np.full(n, 14, np.int32)
    species[sub] = 6
    species = np.concatenate([species[keep], np.full(len(add), 14, np.int32)])
    pos_new = np.concatenate([pos[keep]] + ([np.asarray(add)] if add else []), axis=0)
    # rattle: global sigma plus extra near the defect
    sigma = rng.uniform(*settings.sigma_range)
    r_c = np.linalg.norm(_mic(pos_new - center, cell), axis=1)
    local = np.where(r_c < settings.defect_radius, settings.defect_sigma, 0.0)
    noise = rng.normal(size=pos_new.shape) * np.sqrt(sigma**2 + local**2)[:, None]
    pos_new = push_apart(pos_new + noise, cell, settings.min_start_distance)
    return species, pos_new, cell, center


def crystal_prototypes(oracle: oracles_lib.Oracle) -> list[tuple[str, str, dict]]:
    """(element, prototype, ase.build.bulk kwargs) covered by an oracle."""
    from ase.data import reference_states, atomic_numbers

    out = []
    for z in oracle.elements:
        sym = descriptors_symbol(z)
        if sym == "Si":
            out.append((sym, "diamond", {"a": oracles_lib.SW_LATTICE_CONSTANT, "cubic": True}))
            continue
        if sym == "C":
            out.append((sym, "diamond", {"a": 3.566, "cubic": True}))
            if 14 in oracle.elements:
                out.append(("SiC", "zincblende", {"a": 4.32, "cubic": True}))
            continue
        ref = reference_states[atomic_numbers[sym]]
        if ref is None or ref.get("symmetry") != "fcc":
            continue
        a = ref["a"]
        out.append((sym, "fcc", {"a": a, "cubic": True}))
        out.append((sym, "bcc", {"a": a / 2 ** (1 / 3), "cubic": True}))  # same volume per atom
        out.append((sym, "hcp", {"a": a / np.sqrt(2), "c": a / np.sqrt(2) * np.sqrt(8 / 3)}))
    return out


def descriptors_symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]


def crystal_structure(element: str, prototype: str, kwargs: dict, rng: np.random.Generator, settings: CrystalSettings):
    """A rattled, strained supercell; returns (species [n], positions [n, 3] Å, cell [3, 3] Å)."""
    from ase.build import bulk

    atoms = bulk(element, prototype, **kwargs)
    strain = rng.uniform(-settings.max_strain, settings.max_strain, size=(3, 3))
    strain = 0.5 * (strain + strain.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    reps = oracles_lib.min_repeats(atoms.cell.array, settings.min_width)
    atoms = atoms.repeat(reps)
    if len(atoms) > settings.max_atoms:
        raise ValueError(f"{element} {prototype}: {len(atoms)} atoms exceed max_atoms={settings.max_atoms}")
    sigma = rng.uniform(*settings.sigma_range)
    pos = atoms.get_positions() + rng.normal(size=(len(atoms), 3)) * sigma
    return atoms.get_atomic_numbers().astype(np.int32), pos, np.asarray(atoms.cell.array)


# ----------------------------------------------------------------------------- relaxation


@dataclasses.dataclass(frozen=True)
class RelaxResult:
    positions: np.ndarray  # [T, n, 3]
    forces: np.ndarray  # [T, n, 3]
    energies: np.ndarray  # [T]
    converged: bool
    exploded: bool
    reason: str


def relax(species, positions, cell, oracle: oracles_lib.Oracle, settings: RelaxSettings = RelaxSettings()) -> RelaxResult:
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
        if _pair_distances(xs[-1], np.asarray(cell)).min() < settings.min_distance:
            converged, exploded, reason = False, True, "collapsed"
    return RelaxResult(np.asarray(xs), np.asarray(fs), np.asarray(es), converged, exploded, reason)


def _relax_with_reseed(index: int, make_structure: Callable, oracle, relax_settings, seed, max_attempts, stats):
    for attempt in range(max_attempts):
        rng = _rng(seed, index, attempt)
        species, pos, cell, meta = make_structure(rng)
        res = relax(species, pos, cell, oracle, relax_settings)
        if res.converged:
            return species, cell, res, meta, attempt
        stats["exploded" if res.exploded else "not_converged"] += 1
        stats.setdefault("dropped_reasons", {}).setdefault(res.reason, 0)
        stats["dropped_reasons"][res.reason] += 1
    raise RuntimeError(f"structure {index}: no converged relaxation in {max_attempts} attempts")


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

        species, cell, res, meta, attempt = _relax_with_reseed(i, make, oracle, relax_settings, seed, max_attempts, stats)
        stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
        trajs.append(
            make_trajectory(
                species, res.positions, cell=cell, pbc=(True, True, True), forces=res.forces, energies=res.energies,
                source=f"generator:si_defects:{oracle.name}", traj_id=f"si_{kind}_{i:05d}_a{attempt}",
            )
        )
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

        species, cell, res, _, attempt = _relax_with_reseed(i, make, oracle, relax_settings, seed, max_attempts, stats)
        key = f"{element}_{proto}"
        stats["kinds"][key] = stats["kinds"].get(key, 0) + 1
        trajs.append(
            make_trajectory(
                species, res.positions, cell=cell, pbc=(True, True, True), forces=res.forces, energies=res.energies,
                source=f"generator:crystals:{oracle.name}", traj_id=f"{key}_{i:05d}_a{attempt}",
            )
        )
        if progress:
            progress(i + 1, num)
    return trajs, stats


# ----------------------------------------------------------------------------- statistics


def dataset_statistics(trajs: Sequence[Trajectory]) -> dict:
    """Frame-count and initial -> final Dq (amu^0.5 Å) statistics, plus atom counts and max forces."""
    frames = np.array([t.num_frames for t in trajs])
    dq = np.array([mass_weighted_distance(t) for t in trajs])
    atoms = np.array([t.num_atoms for t in trajs])
    out = {
        "num_trajectories": len(trajs),
        "num_frames": int(frames.sum()),
        "frames_per_trajectory": {"mean": float(frames.mean()), "median": float(np.median(frames)),
                                  "min": int(frames.min()), "max": int(frames.max())},
        "atoms_per_structure": {"min": int(atoms.min()), "max": int(atoms.max())},
        "dq_initial_final": {"mean": float(dq.mean()), "median": float(np.median(dq)),
                             "min": float(dq.min()), "max": float(dq.max())},
    }
    if all(t.forces is not None for t in trajs):
        f0 = np.array([t.max_force()[0] for t in trajs])
        f1 = np.array([t.max_force()[-1] for t in trajs])
        out["max_force_first"] = {"mean": float(f0.mean()), "max": float(f0.max())}
        out["max_force_last"] = {"mean": float(f1.mean()), "max": float(f1.max())}
    return out


# ----------------------------------------------------------------------------- storage


def _write_npz(path: Path, arrays: dict) -> None:
    """``np.savez_compressed``-compatible file with fixed zip timestamps (equal arrays => equal bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def to_arrays(trajs: Sequence[Trajectory], dtype=np.float32) -> dict:
    """Concatenate trajectories into flat arrays with offsets (the ``cache.npz`` layout).

    Keys: species [sum n] int32, atom_offsets [K+1], frame_counts [K], frame_offsets [K+1]
    (into the frame axis), positions/forces [sum_k T_k n_k, 3] ``dtype``, energies [sum T] float64,
    cells [K, 3, 3], pbc [K, 3], traj_ids [K] str, sources [K] str.
    """
    n = np.array([t.num_atoms for t in trajs], np.int64)
    tt = np.array([t.num_frames for t in trajs], np.int64)
    has_f = all(t.forces is not None for t in trajs)
    has_e = all(t.energies is not None for t in trajs)
    arrays = {
        "format_version": np.array(FORMAT_VERSION, np.int32),
        "species": np.concatenate([t.species for t in trajs]).astype(np.int32),
        "atom_offsets": np.concatenate([[0], np.cumsum(n)]).astype(np.int64),
        "frame_offsets": np.concatenate([[0], np.cumsum(tt)]).astype(np.int64),
        "positions": np.concatenate([t.positions.reshape(-1, 3) for t in trajs]).astype(dtype),
        "cells": np.stack([t.cell if t.cell is not None else np.zeros((3, 3)) for t in trajs]).astype(np.float64),
        "pbc": np.array([t.pbc for t in trajs], bool),
        "traj_ids": np.array([t.traj_id for t in trajs], dtype=np.str_),
        "sources": np.array([t.source for t in trajs], dtype=np.str_),
    }
    if has_f:
        arrays["forces"] = np.concatenate([t.forces.reshape(-1, 3) for t in trajs]).astype(dtype)
    if has_e:
        arrays["energies"] = np.concatenate([t.energies for t in trajs]).astype(np.float64)
    return arrays


def from_arrays(arrays, source: str | None = None) -> list[Trajectory]:
    """Inverse of :func:`to_arrays` (positions/forces come back as float64)."""
    ao, fo = arrays["atom_offsets"], arrays["frame_offsets"]
    pos = arrays["positions"]
    forces = arrays["forces"] if "forces" in arrays else None
    energies = arrays["energies"] if "energies" in arrays else None
    out, row = [], 0
    for k in range(len(ao) - 1):
        n, t = int(ao[k + 1] - ao[k]), int(fo[k + 1] - fo[k])
        sl = slice(row, row + t * n)
        row += t * n
        cell = np.asarray(arrays["cells"][k], np.float64)
        out.append(
            make_trajectory(
                arrays["species"][ao[k] : ao[k + 1]],
                pos[sl].reshape(t, n, 3),
                cell=cell if np.any(cell) else None,
                pbc=tuple(arrays["pbc"][k]),
                forces=None if forces is None else forces[sl].reshape(t, n, 3),
                energies=None if energies is None else energies[fo[k] : fo[k + 1]],
                source=str(arrays["sources"][k]) if source is None else source,
                traj_id=str(arrays["traj_ids"][k]),
            )
        )
    return out


def write_extxyz(trajs: Sequence[Trajectory], path: Path) -> None:
    """Every frame to an extended XYZ file (gzip with mtime 0 if the name ends in .gz)."""
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    buf = io.StringIO()
    for t in trajs:
        for i in range(t.num_frames):
            atoms = Atoms(numbers=t.species, positions=t.positions[i], cell=t.cell, pbc=t.pbc)
            atoms.info["traj_id"] = t.traj_id
            atoms.info["frame"] = i
            atoms.calc = SinglePointCalculator(
                atoms,
                energy=None if t.energies is None else float(t.energies[i]),
                forces=None if t.forces is None else t.forces[i],
            )
            ase.io.write(buf, atoms, format="extxyz")
    data = buf.getvalue().encode()
    path = Path(path)
    if path.suffix == ".gz":
        with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
            gz.write(data)
    else:
        path.write_bytes(data)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _versions() -> dict:
    import ase
    import jax

    try:
        import jax_md

        jmd = getattr(jax_md, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        jmd = None
    return {"python": platform.python_version(), "numpy": np.__version__, "ase": ase.__version__,
            "jax": jax.__version__, "jax_md": jmd}


def subsample_frames(traj: Trajectory, stride: int) -> Trajectory:
    """Keep frames 0, stride, 2*stride, ... and always the last frame (the relaxed target)."""
    if stride <= 1 or traj.num_frames <= 2:
        return traj
    idx = np.unique(np.concatenate([np.arange(0, traj.num_frames, stride), [traj.num_frames - 1]]))
    return traj.replace(
        positions=traj.positions[idx],
        forces=None if traj.forces is None else traj.forces[idx],
        energies=None if traj.energies is None else traj.energies[idx],
        cells=None if traj.cells is None else traj.cells[idx],
    )


def save_dataset(
    trajs: Sequence[Trajectory], out_dir, *, manifest: dict, write_xyz: bool = True, dtype=np.float32,
    frame_stride: int = 1,
) -> dict:
    """Write ``cache.npz`` (+ ``trajectories.extxyz.gz``) and ``manifest.json`` into ``out_dir``.

    ``manifest`` holds generation settings; counts, statistics (of the full trajectories),
    file hashes and library versions are added. ``frame_stride`` > 1 stores only every
    stride-th frame plus the last (to keep shipped files small; first and last frames are
    always exact). Returns the full manifest.
    """
    out = Path(out_dir)
    full_stats = dataset_statistics(trajs)
    trajs = [subsample_frames(t, frame_stride) for t in trajs]
    out.mkdir(parents=True, exist_ok=True)
    _write_npz(out / CACHE_NAME, to_arrays(trajs, dtype))
    files = {CACHE_NAME: _sha256(out / CACHE_NAME)}
    if write_xyz:
        write_extxyz(trajs, out / EXTXYZ_NAME)
        files[EXTXYZ_NAME] = _sha256(out / EXTXYZ_NAME)
    full = dict(manifest)
    full.update(
        format_version=FORMAT_VERSION,
        dtype=np.dtype(dtype).name,
        statistics=full_stats,
        stored={"frame_stride": int(frame_stride), "num_frames": int(sum(t.num_frames for t in trajs))},
        files=files,
        sizes_bytes={k: (out / k).stat().st_size for k in files},
        versions=_versions(),
    )
    (out / MANIFEST_NAME).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def load_dataset(directory) -> list[Trajectory]:
    """Load a dataset folder: the ``cache.npz`` when it matches the manifest's hash and counts,
    else the extxyz file. Raises ``FileNotFoundError`` / ``ValueError`` naming the folder."""
    from bptt_mlip.data.readers import read_extxyz

    d = Path(directory)
    manifest_path = d / MANIFEST_NAME
    if not manifest_path.exists():
        raise FileNotFoundError(f"{d}: no {MANIFEST_NAME}; not a dataset folder")
    manifest = json.loads(manifest_path.read_text())
    stats = manifest.get("statistics", {})
    cache = d / CACHE_NAME
    problems = []
    if cache.exists():
        want = manifest.get("files", {}).get(CACHE_NAME)
        if want is None or _sha256(cache) == want:
            with np.load(cache, allow_pickle=False) as z:
                trajs = from_arrays({k: z[k] for k in z.files}, source=str(cache))
            stored = manifest.get("stored", {}).get("num_frames", stats.get("num_frames"))
            total = sum(t.num_frames for t in trajs)
            if len(trajs) == stats.get("num_trajectories", len(trajs)) and total == (stored or total):
                return trajs
            problems.append("cache counts differ from the manifest")
        else:
            problems.append("cache hash differs from the manifest")
    xyz = d / EXTXYZ_NAME
    if xyz.exists():
        return read_extxyz(xyz)
    raise ValueError(f"{d}: cannot load ({'; '.join(problems) or 'no cache.npz and no extxyz'})")


def default_dataset_dir():
    """Path of the shipped datasets (``bptt_mlip/data/default``)."""
    import importlib.resources

    return importlib.resources.files("bptt_mlip.data") / "default"


def load_default_dataset(name: str = "si_defects") -> list[Trajectory]:
    """Load a shipped dataset: 'si_defects' (Si point defects, 64-atom host, SW) or 'crystals'."""
    import importlib.resources

    base = default_dataset_dir()
    folder = base / name
    if not folder.is_dir():
        available = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise FileNotFoundError(f"no shipped dataset {name!r} in {base}; available: {available}")
    with importlib.resources.as_file(folder) as path:
        return load_dataset(path)


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
