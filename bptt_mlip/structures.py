"""Padded batches of atomic structures as JAX pytrees.

Every array is batch-first and padded to a common atom count N. ``mask[b, i]`` is True
for a real atom. Padded atoms have species 0, zero features, zero mass and zero
position; the library guarantees they change nothing (no loss, no gradient, no
stopping decision).

Units: positions and cells in Å, masses in amu, forces in eV/Å.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import chex
import flax.struct
import jax.numpy as jnp
import numpy as np

from bptt_mlip import descriptors


@flax.struct.dataclass
class Structures:
    """A padded batch of B structures with at most N atoms.

    Attributes:
      positions: [B, N, 3] float32, Cartesian positions in Å.
      species: [B, N] int32 atomic numbers, 0 for padding.
      features: [B, N, 9] float32 element descriptors (``descriptors.DESCRIPTOR_NAMES``).
      masses: [B, N] float32 atomic masses in amu, 0 for padding.
      mask: [B, N] bool, True for a real atom.
      cell: [B, 3, 3] float32 lattice vectors (rows) in Å; zeros for a non-periodic structure.
    """

    positions: jnp.ndarray
    species: jnp.ndarray
    features: jnp.ndarray
    masses: jnp.ndarray
    mask: jnp.ndarray
    cell: jnp.ndarray

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def max_atoms(self) -> int:
        return self.positions.shape[1]

    def num_atoms(self) -> jnp.ndarray:
        """[B] int32 count of real atoms per structure."""
        return jnp.sum(self.mask, axis=-1).astype(jnp.int32)

    def check(self) -> None:
        """Assert consistent shapes (chex); call at public boundaries."""
        b, n = self.positions.shape[:2]
        chex.assert_shape(self.positions, (b, n, 3))
        chex.assert_shape([self.species, self.masses, self.mask], (b, n))
        chex.assert_shape(self.features, (b, n, descriptors.NUM_DESCRIPTORS))
        chex.assert_shape(self.cell, (b, 3, 3))


@flax.struct.dataclass
class RelaxationBatch:
    """Inputs and targets of BPTT: start structures and their reference relaxed positions.

    Attributes:
      initial: the structures the rollout starts from (positions = first frame).
      target_positions: [B, N, 3] reference relaxed positions in Å (zeros on padding).
      weight: [B] float32 weight of each structure in the batch mean (0 for padding rows).
    """

    initial: Structures
    target_positions: jnp.ndarray
    weight: jnp.ndarray


@flax.struct.dataclass
class ForceBatch:
    """Supervised (structure, force) pairs for force pretraining.

    Attributes:
      structures: the frames.
      forces: [B, N, 3] reference forces in eV/Å (zeros on padding).
      weight: [B] float32 weight of each frame (0 for padding rows).
    """

    structures: Structures
    forces: jnp.ndarray
    weight: jnp.ndarray


def _as_cell(cell: Any) -> np.ndarray:
    if cell is None:
        return np.zeros((3, 3), np.float32)
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
    return cell.astype(np.float32)


def from_arrays(
    species_list: Sequence[Sequence[int | str]],
    positions_list: Sequence[np.ndarray],
    cells: Sequence[Any] | None = None,
    *,
    max_atoms: int | None = None,
    batch_size: int | None = None,
) -> Structures:
    """Build a padded :class:`Structures` from per-structure numpy arrays.

    Args:
      species_list: per structure, a length-n_b sequence of symbols or atomic numbers.
      positions_list: per structure, an [n_b, 3] array of Cartesian positions in Å.
      cells: per structure, a [3, 3] lattice (rows, Å) or None.
      max_atoms: pad every structure to this many atoms (default: the largest n_b).
      batch_size: pad the batch with empty (all-masked) rows up to this size.
    """
    if len(species_list) != len(positions_list):
        raise ValueError(f"{len(species_list)} species lists but {len(positions_list)} position arrays")
    if cells is None:
        cells = [None] * len(species_list)
    sizes = [len(s) for s in species_list]
    n = max(sizes, default=0) if max_atoms is None else int(max_atoms)
    if sizes and max(sizes) > n:
        raise ValueError(f"a structure has {max(sizes)} atoms, more than max_atoms={n}")
    b = len(sizes) if batch_size is None else int(batch_size)
    if len(sizes) > b:
        raise ValueError(f"{len(sizes)} structures do not fit in batch_size={b}")
    species = np.zeros((b, n), np.int32)
    positions = np.zeros((b, n, 3), np.float32)
    cell_arr = np.zeros((b, 3, 3), np.float32)
    for i, (sp, pos, cell) in enumerate(zip(species_list, positions_list, cells)):
        z = descriptors.atomic_numbers(sp, where=f"structure {i}")
        pos = np.asarray(pos, dtype=np.float64)
        if pos.shape != (len(z), 3):
            raise ValueError(f"structure {i}: positions have shape {pos.shape}, expected ({len(z)}, 3)")
        if not np.all(np.isfinite(pos)):
            raise ValueError(f"structure {i}: positions contain NaN or infinity")
        species[i, : len(z)] = z
        positions[i, : len(z)] = pos
        cell_arr[i] = _as_cell(cell)
    return padded_structures(species, positions, cell_arr)


def padded_structures(species: np.ndarray, positions: np.ndarray, cells: np.ndarray) -> Structures:
    """:class:`Structures` from already padded numpy arrays: ``species`` [B, N] int32 (0 = padding),
    ``positions`` [B, N, 3] float32 Å, ``cells`` [B, 3, 3] float32 Å. Descriptors, masses and the
    mask follow from the species."""
    return Structures(
        positions=jnp.asarray(positions),
        species=jnp.asarray(species),
        features=jnp.asarray(descriptors.element_features(species)),
        masses=jnp.asarray(descriptors.atomic_masses(species)),
        mask=jnp.asarray(species > 0),
        cell=jnp.asarray(cells),
    )


def is_ase_atoms(obj: Any) -> bool:
    """True for an ASE ``Atoms`` (or anything with its position and number accessors)."""
    return hasattr(obj, "get_atomic_numbers") and hasattr(obj, "get_positions")


def is_atoms_like(obj: Any) -> bool:
    """True for an ASE ``Atoms`` or a pymatgen ``Structure`` / ``Molecule`` (checked by their methods,
    so neither library has to be imported)."""
    return is_ase_atoms(obj) or (hasattr(obj, "cart_coords") and hasattr(obj, "species"))


def atoms_arrays(obj: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(atomic numbers [n], Cartesian positions [n, 3] Å, cell [3, 3] Å or None) of an ASE ``Atoms``
    or a pymatgen ``Structure`` / ``Molecule``. An ASE cell counts when periodic or of full rank."""
    if is_ase_atoms(obj):
        cell = np.asarray(obj.cell.array) if np.any(obj.pbc) or obj.cell.rank == 3 else None
        return np.asarray(obj.get_atomic_numbers()), np.asarray(obj.get_positions()), cell
    if is_atoms_like(obj):
        z = np.asarray([site.specie.Z for site in obj])
        cell = np.asarray(obj.lattice.matrix) if hasattr(obj, "lattice") else None
        return z, np.asarray(obj.cart_coords), cell
    raise TypeError(f"expected an ase.Atoms or a pymatgen Structure/Molecule, got {type(obj).__name__}")


def copy_with_positions(obj: Any, positions: np.ndarray) -> Any:
    """A copy of an ASE ``Atoms`` or pymatgen ``Structure`` / ``Molecule`` at Cartesian ``positions``
    [n, 3] Å; everything else (cell, pbc, info, constraints, site properties) is kept."""
    new = obj.copy()
    if is_ase_atoms(obj):
        new.set_positions(positions, apply_constraint=False)
        return new
    for site, xyz in zip(new, positions):  # PeriodicSite.coords setter updates frac_coords too
        site.coords = np.asarray(xyz, np.float64)
    return new


def from_atoms(
    objects: Iterable[Any], *, max_atoms: int | None = None, batch_size: int | None = None
) -> Structures:
    """Build a padded batch from ASE ``Atoms`` and/or pymatgen ``Structure`` objects (may be mixed)."""
    species, positions, cells = [], [], []
    for obj in objects:
        z, pos, cell = atoms_arrays(obj)
        species.append(z)
        positions.append(pos)
        cells.append(cell)
    return from_arrays(species, positions, cells, max_atoms=max_atoms, batch_size=batch_size)
