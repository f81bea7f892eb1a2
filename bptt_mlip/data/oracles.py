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


class JaxMDOracle(Oracle):
    """An oracle from a jax-md energy builder ``make_energy(displacement_fn) -> energy(R)``.

    Computes in float64 (``jax.enable_x64`` scoped to the call). The jitted value-and-gradient
    function is cached per (cell, n) on the instance, so repeated calls do not retrace.
    Requires a periodic cell (cell=None is treated as a big empty box is not supported).
    """

    def __init__(self, name: str, elements, make_energy: Callable, cutoff: float):
        self.name = name
        self.elements = tuple(int(z) for z in elements)
        self.cutoff = float(cutoff)
        self._make_energy = make_energy
        self._cache: dict = {}

    def _fn(self, cell: np.ndarray, n: int):
        key = (np.asarray(cell, np.float64).tobytes(), n)
        fn = self._cache.get(key)
        if fn is None:
            import jax
            import jax.numpy as jnp
            from jax_md import space

            displacement, _ = space.periodic_general(jnp.asarray(cell.T, jnp.float64), fractional_coordinates=False)
            energy_fn = self._make_energy(displacement)
            fn = jax.jit(jax.value_and_grad(energy_fn))
            self._cache[key] = fn
        return fn

    def forces_and_energy(self, species, positions, cell):
        import jax

        if cell is None:
            raise ValueError(f"{self.name}: needs a periodic cell [3, 3]")
        cell = np.asarray(cell, np.float64)
        self.check(species, positions, cell)
        with jax.enable_x64(True):
            fn = self._fn(cell, len(species))
            e, g = fn(np.asarray(positions, np.float64))
            return -np.asarray(g, np.float64), float(e)


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


def _neighbor_indices(positions: np.ndarray, cell: np.ndarray, cutoff: float, capacity: int) -> np.ndarray:
    """[n, K] indices of neighbours within ``cutoff`` (minimum image), padded with n; K >= capacity."""
    n = len(positions)
    frac = (positions[None, :, :] - positions[:, None, :]) @ np.linalg.inv(cell)
    frac -= np.round(frac)
    r2 = np.einsum("ijx,ijx->ij", frac @ cell, frac @ cell)
    np.fill_diagonal(r2, np.inf)
    close = r2 < cutoff * cutoff
    k = max(capacity, int(close.sum(axis=1).max()))
    k = -(-k // 8) * 8  # round up: few distinct shapes, few compilations
    idx = np.full((n, k), n, np.int32)
    for i in range(n):
        nb = np.nonzero(close[i])[0]
        idx[i, : len(nb)] = nb
    return idx


class StillingerWeberNeighbors(Oracle):
    """Stillinger-Weber silicon over a neighbour list (float64, jit cached per (cell, n, K)).

    Uses jax-md's SW two- and three-body terms, so it equals ``energy.stillinger_weber``; the
    neighbour list (all pairs within the cutoff, minimum image) is rebuilt in numpy at every call,
    so it is exact for any displacement.
    """

    name = "stillinger_weber"
    elements = (14,)
    cutoff = SW_CUTOFF

    def __init__(self, three_body_strength: float = 1.0, capacity: int = 16):
        self.three_body_strength = float(three_body_strength)
        self.capacity = int(capacity)
        self._cache: dict = {}

    def _fn(self, cell: np.ndarray):
        key = cell.tobytes()
        fn = self._cache.get(key)
        if fn is None:
            import functools

            import jax
            import jax.numpy as jnp
            from jax_md import energy, space

            displacement, _ = space.periodic_general(jnp.asarray(cell.T), fractional_coordinates=False)
            sigma, a_, b_, lam, gamma, eps = 2.0951, 7.049556277, 0.6022245584, 21.0, 1.2, 2.16826
            two = functools.partial(energy._sw_radial_interaction, sigma, b_, SW_CUTOFF)
            three = functools.partial(energy._sw_angle_interaction, gamma, sigma, SW_CUTOFF)
            three = jax.vmap(jax.vmap(jax.vmap(three, (0, None)), (None, 0)))
            strength = self.three_body_strength

            def energy_fn(R, idx):
                n = R.shape[0]
                mask = idx < n
                Rj = R[jnp.minimum(idx, n - 1)]
                dR = jax.vmap(jax.vmap(displacement, (None, 0)))(R, Rj)  # [n, K, 3]
                far = jnp.array([4.0 * SW_CUTOFF, 0.0, 0.0])
                dR = jnp.where(mask[..., None], dR, far)  # padding: beyond the cutoff, no gradient
                r = jnp.sqrt(jnp.sum(dR * dR, axis=-1))
                e2 = jnp.sum(jnp.where(mask, two(r), 0.0)) / 2.0 * a_
                e3 = lam * jnp.sum(three(dR, dR)) / 2.0
                return eps * (e2 + strength * e3)

            fn = jax.jit(jax.value_and_grad(energy_fn))
            self._cache[key] = fn
        return fn

    def forces_and_energy(self, species, positions, cell):
        import jax

        if cell is None:
            raise ValueError(f"{self.name}: needs a periodic cell [3, 3]")
        cell = np.asarray(cell, np.float64)
        positions = np.asarray(positions, np.float64)
        self.check(species, positions, cell)
        idx = _neighbor_indices(positions, cell, SW_CUTOFF, self.capacity)
        with jax.enable_x64(True):
            e, g = self._fn(cell)(positions, idx)
            return -np.asarray(g, np.float64), float(e)


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


# Tersoff, PRB 39, 5566 (1989) and erratum PRB 41, 3248 (1990): silicon, carbon and their mixture,
# written per (i, j, k) triplet in the LAMMPS convention. Columns: m gamma lambda3 c d h n beta
# lambda2 B R D lambda1 A. (i, j, j) rows give the pair terms of bond ij; (i, j, k) rows give the
# angular term of k on bond ij (only m, gamma, lambda3, c, d, h, R, D are read from those).
_TERSOFF_COLUMNS = ("m", "gamma", "lam3", "c", "d", "h", "n", "beta", "lam2", "B", "R", "D", "lam1", "A")
TERSOFF_SIC_1989 = {
    ("C", "C", "C"): (3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.72751, 1.5724e-7, 2.2119, 346.7, 1.95, 0.15, 3.4879, 1393.6),
    ("Si", "Si", "Si"): (3.0, 1.0, 0.0, 100390.0, 16.217, -0.59825, 0.78734, 1.1e-6, 1.73222, 471.18, 2.85, 0.15, 2.4799, 1830.8),
    ("Si", "Si", "C"): (3.0, 1.0, 0.0, 100390.0, 16.217, -0.59825, 0.0, 0.0, 0.0, 0.0, 2.36, 0.15, 0.0, 0.0),
    ("Si", "C", "C"): (3.0, 1.0, 0.0, 100390.0, 16.217, -0.59825, 0.78734, 1.1e-6, 1.97205, 395.126, 2.36, 0.15, 2.9839, 1597.3111),
    ("C", "Si", "Si"): (3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.72751, 1.5724e-7, 1.97205, 395.126, 2.36, 0.15, 2.9839, 1597.3111),
    ("C", "Si", "C"): (3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.0, 0.0, 0.0, 0.0, 1.95, 0.15, 0.0, 0.0),
    ("C", "C", "Si"): (3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.0, 0.0, 0.0, 0.0, 2.36, 0.15, 0.0, 0.0),
    ("Si", "C", "Si"): (3.0, 1.0, 0.0, 100390.0, 16.217, -0.59825, 0.0, 0.0, 0.0, 0.0, 2.85, 0.15, 0.0, 0.0),
}


def _tersoff_tables(params: dict) -> tuple[tuple[int, ...], dict]:
    """(element Z tuple, {column: [E, E, E] float64 table}) from a triplet-keyed parameter dict."""
    symbols = sorted({e for key in params for e in key})
    z = tuple(int(v) for v in descriptors.atomic_numbers(symbols))
    index = {s: i for i, s in enumerate(symbols)}
    e = len(symbols)
    tables = {c: np.zeros((e, e, e)) for c in _TERSOFF_COLUMNS}
    for (a, b, c_), row in params.items():
        for name, value in zip(_TERSOFF_COLUMNS, row):
            tables[name][index[a], index[b], index[c_]] = value
    missing = [(a, b, c) for a in symbols for b in symbols for c in symbols if (a, b, c) not in params]
    if missing:
        raise ValueError(f"Tersoff parameters missing for triplets {missing}")
    return z, tables


def tersoff_energy_fn(displacement, tables: dict):
    """Multi-element Tersoff energy ``E(R [n, 3], type_index [n] int) -> eV`` (LAMMPS convention).

    ``type_index`` indexes the element axis of ``tables``; it is a traced argument, so one
    compilation serves every arrangement of species with the same atom count.

    E = 1/2 sum_{i != j} fc(r_ij) [A e^{-lam1 r_ij} - b_ij B e^{-lam2 r_ij}],
    b_ij = (1 + (beta zeta_ij)^n)^(-1/2n),
    zeta_ij = sum_{k != i, j} fc(r_ik) g_ijk(theta_ijk) exp((lam3 (r_ij - r_ik))^m).
    Dense over all triplets (fine for ~100 atoms); minimum image, so cell widths must exceed
    twice the largest cutoff. Safe at r = 0 and zeta = 0 (finite gradients).
    """
    import jax.numpy as jnp
    from jax_md import space

    tables = {k: jnp.asarray(v) for k, v in tables.items()}

    def fc(r, R, D):
        mid = 0.5 * (1.0 - jnp.sin(jnp.pi * (r - R) / (2.0 * D)))
        return jnp.where(r < R - D, 1.0, jnp.where(r > R + D, 0.0, mid))

    def energy(R, t):
        n = R.shape[0]
        pair = {k: v[t[:, None], t[None, :], t[None, :]] for k, v in tables.items()}  # [n, n]
        trip = {k: v[t[:, None, None], t[None, :, None], t[None, None, :]] for k, v in tables.items()}  # [n, n, n]
        eye = jnp.eye(n, dtype=bool)
        not_jk = ~(eye[None, :, :] | eye[:, :, None] | eye[:, None, :])  # k != j, k != i, j != i
        dR = space.map_product(displacement)(R, R)  # [n, n, 3]
        dR = jnp.where(eye[:, :, None], 1.0, dR)  # keep norms off zero for the gradient
        r = jnp.sqrt(jnp.sum(dR * dR, axis=-1))
        fc_ij = jnp.where(eye, 0.0, fc(r, pair["R"], pair["D"]))
        fc_ik = fc(r[:, None, :], trip["R"], trip["D"])  # [i, j, k] uses r_ik
        cos = jnp.einsum("ijx,ikx->ijk", dR, dR) / (r[:, :, None] * r[:, None, :])
        c2, d2 = trip["c"] ** 2, trip["d"] ** 2
        g = trip["gamma"] * (1.0 + c2 / d2 - c2 / (d2 + (trip["h"] - cos) ** 2))
        arg = trip["lam3"] * (r[:, :, None] - r[:, None, :])
        arg = jnp.where(trip["m"] == 3.0, arg * arg * arg, arg)
        zeta = jnp.sum(jnp.where(not_jk, fc_ik * g * jnp.exp(arg), 0.0), axis=-1)  # [i, j]
        pos = zeta > 1e-12
        bz = pair["beta"] * jnp.where(pos, zeta, 1.0)
        nn = jnp.where(pair["n"] > 0, pair["n"], 1.0)
        b = jnp.where(pos & (pair["beta"] > 0), (1.0 + jnp.exp(nn * jnp.log(bz))) ** (-0.5 / nn), 1.0)
        rep = pair["A"] * jnp.exp(-pair["lam1"] * r)
        att = pair["B"] * jnp.exp(-pair["lam2"] * r)
        return 0.5 * jnp.sum(fc_ij * (rep - b * att))

    return energy


class TersoffMulti(Oracle):
    """Multi-element Tersoff (default: Si/C, Tersoff 1989) in JAX, float64, jit cached per (cell, n).

    jax-md's own ``tersoff`` handles one species only; this implementation follows the LAMMPS
    triplet convention and is checked against ASE's ``Tersoff`` calculator in the tests.
    """

    def __init__(self, params: dict | None = None, name: str = "tersoff_sic"):
        self.name = name
        self.elements, self._tables = _tersoff_tables(params or TERSOFF_SIC_1989)
        self.cutoff = float(np.max(self._tables["R"] + self._tables["D"]))
        self._cache: dict = {}

    def forces_and_energy(self, species, positions, cell):
        import jax
        import jax.numpy as jnp
        from jax_md import space

        if cell is None:
            raise ValueError(f"{self.name}: needs a periodic cell [3, 3]")
        cell = np.asarray(cell, np.float64)
        species = np.asarray(species)
        self.check(species, positions, cell)
        with jax.enable_x64(True):
            key = (cell.tobytes(), len(species))
            fn = self._cache.get(key)
            if fn is None:
                displacement, _ = space.periodic_general(jnp.asarray(cell.T), fractional_coordinates=False)
                fn = jax.jit(jax.value_and_grad(tersoff_energy_fn(displacement, self._tables)))
                self._cache[key] = fn
            type_index = np.searchsorted(np.asarray(self.elements), species).astype(np.int32)
            e, g = fn(np.asarray(positions, np.float64), type_index)
            return -np.asarray(g, np.float64), float(e)


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
