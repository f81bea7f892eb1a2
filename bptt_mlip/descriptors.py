"""Element descriptors (the nine per-atom chemistry inputs of ADAPT) and atomic masses.

The table is built once from pymatgen's periodic table (and ASE's covalent radii,
which pymatgen does not carry) and indexed by atomic number Z. Row 0 is reserved
for padding atoms and is all zeros.

Columns, in order (``DESCRIPTOR_NAMES``):

=====  ===========================  ==========================================
col    name                         unit / meaning
=====  ===========================  ==========================================
0      group                        periodic-table group 1..18
1      period                       periodic-table row 1..7
2      electronegativity            Pauling scale (0 where undefined, e.g. He)
3      covalent_radius              Å (Cordero et al. 2008, via ASE)
4      valence_electrons            electrons outside the noble-gas core
5      first_ionisation_energy      eV
6      electron_affinity            eV
7      atomic_radius                Å (empirical, pymatgen; calculated if absent)
8      molar_volume                 cm^3/mol (0 where unknown)
=====  ===========================  ==========================================
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Iterable, Sequence

import numpy as np

DESCRIPTOR_NAMES: tuple[str, ...] = (
    "group",
    "period",
    "electronegativity",
    "covalent_radius",
    "valence_electrons",
    "first_ionisation_energy",
    "electron_affinity",
    "atomic_radius",
    "molar_volume",
)
NUM_DESCRIPTORS = len(DESCRIPTOR_NAMES)
MAX_Z = 103  # up to lawrencium; pymatgen has data for all of these


def _finite_or_zero(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def _valence_electrons(element) -> float:
    """Electrons outside the preceding noble-gas core, from pymatgen's configuration string."""
    structure = element.electronic_structure  # e.g. "[Ne].3s2.3p2"
    total = 0
    for orbital in structure.split("."):
        if orbital.startswith("["):
            continue
        match = re.fullmatch(r"\d+[spdf](\d+)", orbital.strip())
        if match:
            total += int(match.group(1))
    return float(total)


@functools.lru_cache(maxsize=1)
def descriptor_table() -> np.ndarray:
    """Return the element descriptor table, shape [MAX_Z + 1, 9], float32.

    Row Z holds the descriptors of the element with atomic number Z; row 0 (padding) is zeros.
    """
    from ase.data import covalent_radii
    from pymatgen.core.periodic_table import Element

    table = np.zeros((MAX_Z + 1, NUM_DESCRIPTORS), dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about missing data for heavy elements
        for z in range(1, MAX_Z + 1):
            el = Element.from_Z(z)
            ionisation = el.ionization_energies
            radius = el.atomic_radius if el.atomic_radius is not None else el.atomic_radius_calculated
            table[z] = [
                _finite_or_zero(el.group),
                _finite_or_zero(el.row),
                _finite_or_zero(el.X),
                _finite_or_zero(covalent_radii[z]),
                _valence_electrons(el),
                _finite_or_zero(ionisation[0] if ionisation else None),
                _finite_or_zero(el.electron_affinity),
                _finite_or_zero(radius),
                _finite_or_zero(el.molar_volume),
            ]
    table.setflags(write=False)
    return table.astype(np.float32)


@functools.lru_cache(maxsize=1)
def mass_table() -> np.ndarray:
    """Atomic masses in amu indexed by Z, shape [MAX_Z + 1]; entry 0 (padding) is 0."""
    from pymatgen.core.periodic_table import Element

    masses = np.zeros(MAX_Z + 1, dtype=np.float64)
    for z in range(1, MAX_Z + 1):
        masses[z] = float(Element.from_Z(z).atomic_mass)
    return masses.astype(np.float32)


def atomic_numbers(symbols: Iterable[str | int], *, where: str = "") -> np.ndarray:
    """Convert element symbols (or atomic numbers) to an int32 array of Z.

    Raises ``ValueError`` naming the offending entry (and ``where``) for unknown elements.
    """
    from ase.data import atomic_numbers as ase_numbers

    out = []
    for i, s in enumerate(symbols):
        if isinstance(s, (int, np.integer)):
            z = int(s)
        else:
            z = ase_numbers.get(str(s).strip(), -1)
        if not 1 <= z <= MAX_Z:
            loc = f" in {where}" if where else ""
            raise ValueError(f"unknown element {s!r} at atom {i}{loc}: expected a symbol or Z in 1..{MAX_Z}")
        out.append(z)
    return np.asarray(out, dtype=np.int32)


def element_features(species: np.ndarray | Sequence[int]) -> np.ndarray:
    """Descriptor rows for an array of atomic numbers; any leading shape, trailing dim 9."""
    return descriptor_table()[np.asarray(species, dtype=np.int32)]


def atomic_masses(species: np.ndarray | Sequence[int]) -> np.ndarray:
    """Atomic masses (amu) for an array of atomic numbers; padding (Z=0) gets mass 0."""
    return mass_table()[np.asarray(species, dtype=np.int32)]
