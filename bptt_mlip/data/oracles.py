"""Reference potentials ("oracles") that label generated relaxations with forces and energies.

An oracle maps (species [n] Z, positions [n, 3] Å, cell [3, 3] Å rows) to
(forces [n, 3] eV/Å, energy eV). Implementations:

* :func:`StillingerWeber` - Stillinger-Weber silicon (jax-md's SW terms over a neighbour list),
  float64, jit cached per cell.
* :func:`Tersoff` - Tersoff silicon (LAMMPS ``Si.tersoff`` parameters), :class:`TersoffMulti` with
  one element. (jax-md's own ``tersoff`` supports one species only and gives NaN forces for some
  rattled structures in jax-md 0.2.29; it is kept as :func:`TersoffJaxMD` for comparison.)
* :class:`TersoffMulti` - Tersoff 1989 silicon/carbon (own JAX implementation, LAMMPS convention,
  checked against ASE's ``Tersoff`` calculator), for C substitutions in Si.
* :class:`EMTOracle` - ASE's effective-medium theory for Al, Cu, Ag, Au, Ni, Pd, Pt (and alloys).
* :class:`CHGNetOracle` - the universal CHGNet potential, only if ``chgnet`` is installed.

The jax-md oracles use a minimum-image displacement (``space.periodic_general``), so every cell
width must be at least twice the cutoff: build a supercell first (:func:`min_repeats`).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np

from bptt_mlip import descriptors
from bptt_mlip.data.geometry import neighbor_indices
from bptt_mlip.data.tersoff import TERSOFF_SIC_1989, tersoff_energy_fn, tersoff_tables

# LAMMPS format: e1 e2 e3 m gamma lambda3 c d costheta0 n beta lambda2 B R D lambda1 A
# Tersoff, PRB 38, 9902 (1988) / PRB 39, 5566 (1989) silicon, as in LAMMPS' Si.tersoff.
SI_TERSOFF_PARAMETERS = """\
# Tersoff silicon (LAMMPS Si.tersoff)
Si Si Si 3.0 1.0 0.0 1.0039e5 16.217 -0.59825 0.78734
         1.1000e-6 1.7322 471.18 2.85 0.15 2.4799 1830.8
"""
# (split over two lines: jax-md 0.2.29's loader only accepts entries continued on a second line)

SW_LATTICE_CONSTANT = 5.431  # Å, diamond Si equilibrium of Stillinger-Weber
EMT_ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")


def cell_widths(cell: np.ndarray) -> np.ndarray:
    """[3] perpendicular widths (Å) of a cell whose rows are lattice vectors."""
    cell = np.asarray(cell, np.float64)
    vol = abs(np.linalg.det(cell))
    return np.array([vol / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def min_repeats(cell: np.ndarray, min_width: float) -> tuple[int, int, int]:
    """Smallest (r1, r2, r3) so that the repeated cell is at least ``min_width`` Å wide in every direction."""
    w = cell_widths(cell)
    return tuple(int(max(1, np.ceil(min_width / wi - 1e-9))) for wi in w)


class Oracle:
    """Reference force field interface.

    Attributes:
      name: short identifier written into manifests.
      elements: tuple of atomic numbers the oracle covers.
    """

    name: str = "oracle"
    elements: tuple[int, ...] = ()
    cutoff: float = 0.0  # Å; a cell must be >= 2 * cutoff wide (0: no requirement)

    def covers(self, species) -> bool:
        return set(np.asarray(species).tolist()) <= set(self.elements)

    def check(self, species, positions, cell) -> None:
        species = np.asarray(species)
        if species.ndim != 1 or np.asarray(positions).shape != (species.shape[0], 3):
            raise ValueError(
                f"{self.name}: expected species [n] and positions [n, 3], got {species.shape} and "
                f"{np.asarray(positions).shape}"
            )
        extra = sorted(set(species.tolist()) - set(self.elements))
        if extra:
            raise ValueError(f"{self.name} does not cover elements Z={extra}; it covers Z={list(self.elements)}")
        if self.cutoff and cell is not None:
            w = cell_widths(cell)
            if np.any(w < 2 * self.cutoff):
                raise ValueError(
                    f"{self.name}: cell widths {np.round(w, 3).tolist()} Å are below twice the cutoff "
                    f"({2 * self.cutoff:.3f} Å); use a supercell (oracles.min_repeats)"
                )

    def forces_and_energy(self, species, positions, cell) -> tuple[np.ndarray, float]:
        """Forces [n, 3] (eV/Å, float64) and total energy (eV) of one structure."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PeriodicJaxOracle(Oracle):
    """An oracle whose energy is a JAX function over a periodic cell, differentiated for forces.

    Subclasses give ``_energy_fn(displacement) -> energy(R [n, 3], *extra)`` (``displacement`` is
    jax-md's ``space.periodic_general`` minimum image of the cell) and, when the energy takes more
    than positions, ``_extra_args``. Computes in float64 (``jax.enable_x64`` scoped to the call);
    the jitted value-and-gradient function is cached per cell on the instance, so repeated calls
    do not retrace. Needs a periodic cell.
    """

    def _energy_fn(self, displacement) -> Callable:
        raise NotImplementedError

    def _extra_args(self, species: np.ndarray, positions: np.ndarray, cell: np.ndarray) -> tuple:
        return ()

    def _value_and_grad(self, cell: np.ndarray):
        key = cell.tobytes()
        fn = self._cache.get(key)
        if fn is None:
            import jax
            import jax.numpy as jnp
            from jax_md import space

            displacement, _ = space.periodic_general(jnp.asarray(cell.T, jnp.float64), fractional_coordinates=False)
            fn = jax.jit(jax.value_and_grad(self._energy_fn(displacement)))
            self._cache[key] = fn
        return fn

    def forces_and_energy(self, species, positions, cell):
        import jax

        if cell is None:
            raise ValueError(f"{self.name}: needs a periodic cell [3, 3]")
        cell = np.asarray(cell, np.float64)
        species = np.asarray(species)
        positions = np.asarray(positions, np.float64)
        self.check(species, positions, cell)
        extra = self._extra_args(species, positions, cell)
        with jax.enable_x64(True):
            e, g = self._value_and_grad(cell)(positions, *extra)
            return -np.asarray(g, np.float64), float(e)


class JaxMDOracle(PeriodicJaxOracle):
    """An oracle from a jax-md energy builder ``make_energy(displacement_fn) -> energy(R)``."""

    def __init__(self, name: str, elements, make_energy: Callable, cutoff: float):
        self.name = name
        self.elements = tuple(int(z) for z in elements)
        self.cutoff = float(cutoff)
        self._make_energy = make_energy
        self._cache: dict = {}

    def _energy_fn(self, displacement) -> Callable:
        return self._make_energy(displacement)


def StillingerWeber(three_body_strength: float = 1.0, *, dense: bool = False) -> Oracle:
    """Stillinger-Weber silicon (original 1985 parameters, jax-md's SW terms).

    Default: :class:`StillingerWeberNeighbors` (neighbour list rebuilt in numpy each call, O(N K^2)
    triplets; ~5x faster at 64 atoms, ~50x at 216). ``dense=True``: jax-md's
    ``energy.stillinger_weber`` over all N^3 triplets (same energy to ~1e-12 eV).
    """
    from jax_md import energy

    if dense:
        return JaxMDOracle(
            "stillinger_weber_dense",
            (14,),
            lambda d: energy.stillinger_weber(d, three_body_strength=three_body_strength),
            cutoff=SW_CUTOFF,
        )
    return StillingerWeberNeighbors(three_body_strength)


SW_CUTOFF = 3.77118  # Å


class StillingerWeberNeighbors(PeriodicJaxOracle):
    """Stillinger-Weber silicon over a neighbour list (float64, jit cached per cell and shape).

    The energy is jax-md's ``energy.stillinger_weber_neighbor_list`` (so it equals
    ``energy.stillinger_weber``); the dense neighbour list it reads (all pairs within the cutoff,
    minimum image, :func:`bptt_mlip.data.geometry.neighbor_indices`) is rebuilt in numpy at every
    call, so it is exact for any displacement.
    """

    name = "stillinger_weber"
    elements = (14,)
    cutoff = SW_CUTOFF

    def __init__(self, three_body_strength: float = 1.0, capacity: int = 16):
        self.three_body_strength = float(three_body_strength)
        self.capacity = int(capacity)
        self._cache: dict = {}

    def _energy_fn(self, displacement) -> Callable:
        import jax.numpy as jnp
        from jax_md import energy, partition

        # box_size only sizes the neighbour function jax-md builds beside the energy; it is not used
        _, sw_energy = energy.stillinger_weber_neighbor_list(
            displacement, 1.0, three_body_strength=self.three_body_strength, cutoff=SW_CUTOFF,
            dr_threshold=0.0, fractional_coordinates=False, disable_cell_list=True,
        )

        def energy_fn(R, idx):
            # the neighbour list is built on the host (exact at every call); jax-md reads only its
            # dense indices (padding = n) and format
            neighbors = partition.NeighborList(
                idx=idx, reference_position=R, error=partition.PartitionError(jnp.zeros((), jnp.uint8)),
                cell_list_capacity=None, max_occupancy=idx.shape[1], format=partition.Dense, cell_size=None,
                cell_list_fn=None, update_fn=None,
            )
            return sw_energy(R, neighbors)

        return energy_fn

    def _extra_args(self, species, positions, cell) -> tuple:
        return (neighbor_indices(positions, cell, SW_CUTOFF, self.capacity),)


def TersoffJaxMD() -> JaxMDOracle:
    """Tersoff silicon through jax-md's ``energy.tersoff`` (LAMMPS ``Si.tersoff`` parameters).

    Kept for comparison only: with jax-md 0.2.29 it returns NaN forces for some rattled
    structures (0.1 Å noise) and its energy differs from LAMMPS/ASE by ~0.05 eV per 64 atoms.
    Use :func:`Tersoff` instead.
    """
    import jax
    from jax_md import energy

    with jax.enable_x64(True):  # keep the parameters in float64
        params = energy.load_lammps_tersoff_parameters(io.StringIO(SI_TERSOFF_PARAMETERS))
    cutoff = float(params[0]["R"] + params[0]["D"])
    return JaxMDOracle("tersoff_jaxmd", (14,), lambda d: energy.tersoff(d, params), cutoff=cutoff)


def Tersoff() -> "TersoffMulti":
    """Tersoff silicon (PRB 38, 9902 / 39, 5566; LAMMPS ``Si.tersoff``), own JAX implementation."""
    return TersoffMulti({("Si", "Si", "Si"): TERSOFF_SIC_1989[("Si", "Si", "Si")]}, name="tersoff")


class TersoffMulti(PeriodicJaxOracle):
    """Multi-element Tersoff (default: Si/C, Tersoff 1989) in JAX, float64, jit cached per (cell, n).

    jax-md's own ``tersoff`` handles one species only; this implementation follows the LAMMPS
    triplet convention and is checked against ASE's ``Tersoff`` calculator in the tests.
    """

    def __init__(self, params: dict | None = None, name: str = "tersoff_sic"):
        self.name = name
        self.elements, self._tables = tersoff_tables(params or TERSOFF_SIC_1989)
        self.cutoff = float(np.max(self._tables["R"] + self._tables["D"]))
        self._cache: dict = {}

    def _energy_fn(self, displacement) -> Callable:
        return tersoff_energy_fn(displacement, self._tables)

    def _extra_args(self, species, positions, cell) -> tuple:
        return (np.searchsorted(np.asarray(self.elements), species).astype(np.int32),)


class EMTOracle(Oracle):
    """ASE's EMT for fcc metals (Al, Cu, Ag, Au, Ni, Pd, Pt) and their alloys."""

    name = "emt"

    def __init__(self):
        self.elements = tuple(int(z) for z in descriptors.atomic_numbers(EMT_ELEMENTS))

    def forces_and_energy(self, species, positions, cell):
        from ase import Atoms
        from ase.calculators.emt import EMT

        self.check(species, positions, cell)
        atoms = Atoms(numbers=species, positions=positions, cell=cell, pbc=cell is not None)
        atoms.calc = EMT()
        return np.asarray(atoms.get_forces(), np.float64), float(atoms.get_potential_energy())


class CHGNetOracle(Oracle):
    """CHGNet universal potential (needs ``pip install chgnet``, which pulls in PyTorch)."""

    name = "chgnet"

    def __init__(self, model=None):
        try:
            from chgnet.model import CHGNet  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "the CHGNet oracle needs the 'chgnet' package (and PyTorch): pip install chgnet"
            ) from err
        from chgnet.model import CHGNet

        self._model = model if model is not None else CHGNet.load()
        self.elements = tuple(range(1, 95))

    def forces_and_energy(self, species, positions, cell):
        from pymatgen.core import Lattice, Structure

        self.check(species, positions, cell)
        s = Structure(Lattice(cell), [int(z) for z in species], positions, coords_are_cartesian=True)
        pred = self._model.predict_structure(s, task="ef")
        return np.asarray(pred["f"], np.float64), float(pred["e"]) * len(species)


def get_oracle(name: str) -> Oracle:
    """Oracle by name: 'sw' / 'stillinger_weber', 'tersoff' (Si, jax-md), 'tersoff_sic' (Si/C), 'emt', 'chgnet'."""
    key = name.lower().replace("-", "_")
    if key in ("sw", "stillinger_weber"):
        return StillingerWeber()
    if key == "tersoff":
        return Tersoff()
    if key in ("tersoff_sic", "tersoff_multi"):
        return TersoffMulti()
    if key == "emt":
        return EMTOracle()
    if key == "chgnet":
        return CHGNetOracle()
    raise ValueError(f"unknown oracle {name!r}; expected one of 'sw', 'tersoff', 'tersoff_sic', 'emt', 'chgnet'")


def ase_calculator(oracle: Oracle):
    """Wrap an oracle as an ASE ``Calculator`` (energy, forces)."""
    from ase.calculators.calculator import Calculator, all_changes

    class _OracleCalculator(Calculator):
        implemented_properties = ["energy", "forces", "free_energy"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            cell = np.asarray(self.atoms.cell.array) if self.atoms.cell.rank == 3 else None
            f, e = oracle.forces_and_energy(self.atoms.get_atomic_numbers(), self.atoms.get_positions(), cell)
            self.results = {"energy": e, "free_energy": e, "forces": f}

    return _OracleCalculator()
