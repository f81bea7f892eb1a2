"""Starting structures of the generated datasets: rattled point defects in diamond-Si
supercells and rattled, strained crystals of the elements an oracle covers (positions Å, cells
with lattice vectors as rows, species as atomic numbers)."""

from __future__ import annotations

import dataclasses

import numpy as np

from bptt_mlip.data import oracles as oracles_lib
from bptt_mlip.data.geometry import minimum_image

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


def push_apart(pos: np.ndarray, cell: np.ndarray, dmin: float, iters: int = 200) -> np.ndarray:
    """Move atom pairs closer than ``dmin`` (Å) apart symmetrically until none are (or ``iters`` runs out)."""
    pos = pos.copy()
    for _ in range(iters):
        d = minimum_image(pos[None, :, :] - pos[:, None, :], cell)  # d[i, j] = x_j - x_i
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

    i0 = int(rng.integers(n))
    remove, sub, add, center = _place_defect(kind, rng, i0, pos, cell, sub_a, a)
    keep = np.setdiff1d(np.arange(n), remove)
    species = np.full(n, 14, np.int32)
    species[sub] = 6
    species = np.concatenate([species[keep], np.full(len(add), 14, np.int32)])
    pos_new = np.concatenate([pos[keep]] + ([np.asarray(add)] if add else []), axis=0)
    # rattle: global sigma plus extra near the defect
    sigma = rng.uniform(*settings.sigma_range)
    r_c = np.linalg.norm(minimum_image(pos_new - center, cell), axis=1)
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


def _place_defect(kind: str, rng: np.random.Generator, i0: int, pos: np.ndarray, cell: np.ndarray,
                  sub_a: np.ndarray, a: float):
    """Where a defect of ``kind`` goes in the perfect host (positions ``pos`` [n, 3] Å, lattice
    constant ``a`` Å, fcc sublattice indices ``sub_a``) around atom ``i0``: (indices removed,
    indices that become C, positions [k, 3] Å added, defect centre [3] Å)."""
    def t_site():
        base = pos[rng.choice(sub_a)]
        shift = (0.5 if rng.random() < 0.5 else 0.75) * a
        return base + shift * np.ones(3)

    def neighbours(i, k=4):
        r = np.linalg.norm(minimum_image(pos - pos[i], cell), axis=1)
        return np.argsort(r)[1 : k + 1]

    remove: list[int] = []
    sub: list[int] = []  # Si sites that become C
    add: list[np.ndarray] = []
    center = pos[i0].copy()
    if kind == "vacancy":
        remove = [i0]
    elif kind == "divacancy":
        remove = [i0, int(rng.choice(neighbours(i0)))]
        center = pos[i0] + 0.5 * minimum_image(pos[remove[1]] - pos[i0], cell)
    elif kind == "vacancy_pair":
        r = np.linalg.norm(minimum_image(pos - pos[i0], cell), axis=1)
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
        r = np.linalg.norm(minimum_image(pos - center, cell), axis=1)
        remove = [int(rng.choice(np.nonzero(r > 4.0)[0]))]
    elif kind == "substitution_C":
        sub = [i0]
    elif kind == "di_substitution_C":
        sub = [i0, int(rng.choice(neighbours(i0, 16)[4:]))]  # second or third shell
    elif kind == "vacancy_C":
        j = int(rng.choice(neighbours(i0)))
        remove, sub = [i0], [j]
        center = pos[i0] + 0.5 * minimum_image(pos[j] - pos[i0], cell)
    elif kind == "di_interstitial":
        c1 = t_site()
        c2 = c1 + rng.choice([-1.0, 1.0], size=3) * (a / 2)  # a neighbouring T site
        add = [c1, c2]
        center = 0.5 * (c1 + c2)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {SI_DEFECT_KINDS + SI_C_DEFECT_KINDS}")
    return remove, sub, add, center
