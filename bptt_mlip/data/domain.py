"""The training domain of a model: what its training structures covered, and a check of new ones against it.

A force model knows only the elements, sizes and densities it was trained on. Outside them it still
returns numbers (an element never seen has no learned response; a cell of 216 atoms for a model trained
on 64 gives forces of several eV/Å in a perfect crystal), so a relaxation there is silently wrong. A
:class:`Domain` records, from the training trajectories:

* the elements seen (atomic numbers), the atom-count range and whether cells were periodic;
* the lattice-vector lengths (Å) and volumes per atom (Å³/atom) of periodic cells;
* the closest pair distance (Å) in the first and last frames;
* the force scale: the 99th percentile of per-atom force norms over every frame (eV/Å).

``domain.check(structures)`` lists plain problems (an unseen element named, an atom count outside the
range, a volume per atom more than 25% outside the range, ...); :func:`screen` turns them into an
:class:`OutOfDomainWarning` or an :class:`OutOfDomainError`. A domain is saved with every model
(``workflow.model_io.save_model(..., domain=...)``, meta key ``"domain"``) as the plain dict of
:meth:`Domain.to_dict`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np

from bptt_mlip import structures as structures_lib
from bptt_mlip.data.geometry import pair_distances, short_pair_distances
from bptt_mlip.data.trajectory import Trajectory

META_KEY = "domain"
"""Where a model checkpoint's meta keeps its domain."""

MARGIN = 0.25
"""Relative margin beyond the training range before a cell length or a volume per atom is flagged
(a strained or differently packed cell of the same material stays inside; another phase or a
vacuum slab does not)."""

CLOSE_PAIR_FRACTION = 0.75
"""A pair closer than this fraction of the closest pair seen in training is flagged (atoms that
overlap in the input, or a unit mix-up)."""

FORCE_PERCENTILE = 99.0
"""The percentile of per-atom force norms (eV/Å) kept as the training force scale."""

ON_OUT_OF_DOMAIN = ("warn", "error", "ignore")
"""What :func:`screen` does with structures outside the domain."""


class OutOfDomainWarning(UserWarning):
    """Structures given to a model lie outside its training domain (its forces there are extrapolations)."""


class OutOfDomainError(ValueError):
    """Structures outside a model's training domain were refused (``on_out_of_domain="error"``)."""


@dataclasses.dataclass(frozen=True)
class Domain:
    """What a model's training structures covered.

    Attributes:
      species: sorted atomic numbers seen in training.
      num_atoms: (fewest, most) atoms in a training structure.
      periodic: the kinds of structure seen: ``(True,)`` every one periodic, ``(False,)`` none,
        ``(False, True)`` both.
      cell_length: (shortest, longest) lattice-vector length of a periodic training cell, Å; None
        when none was periodic.
      volume_per_atom: (smallest, largest) cell volume per atom of a periodic training cell, Å³;
        None when none was periodic.
      min_pair_distance: the closest pair of atoms in the first and last training frames, Å
        (minimum image); None for single-atom structures only.
      force_scale: 99th percentile of per-atom force norms over every training frame, eV/Å; None
        when the trajectories carry no forces.
      num_trajectories: how many trajectories the domain was built from.
    """

    species: tuple[int, ...]
    num_atoms: tuple[int, int]
    periodic: tuple[bool, ...] = (True,)
    cell_length: tuple[float, float] | None = None
    volume_per_atom: tuple[float, float] | None = None
    min_pair_distance: float | None = None
    force_scale: float | None = None
    num_trajectories: int = 0

    @property
    def symbols(self) -> tuple[str, ...]:
        """Chemical symbols of :attr:`species`."""
        return tuple(_symbol(z) for z in self.species)

    @classmethod
    def from_trajectories(cls, trajs: Sequence[Trajectory]) -> "Domain":
        """The domain covered by training trajectories (:class:`~bptt_mlip.data.trajectory.Trajectory`)."""
        trajs = list(trajs)
        if not trajs:
            raise ValueError("Domain.from_trajectories: no trajectories (the training set is empty)")
        lengths, volumes, closest, norms = [], [], [], []
        for t in trajs:
            if any(t.pbc) and t.cell is not None:
                cells = t.cells if t.cells is not None else t.cell[None]
                lengths.append(np.linalg.norm(cells, axis=-1).ravel())
                volumes.append(np.abs(np.linalg.det(cells)) / t.num_atoms)
            for frame in (0, t.num_frames - 1):
                cell = (t.cells[frame] if t.cells is not None else t.cell) if any(t.pbc) else None
                closest.append(_closest_pair(t.positions[frame], cell))
            if t.forces is not None:
                norms.append(np.linalg.norm(t.forces, axis=-1).ravel())
        sizes = [t.num_atoms for t in trajs]
        finite_closest = [c for c in closest if np.isfinite(c)]
        return cls(
            species=tuple(sorted({int(z) for t in trajs for z in np.unique(t.species)})),
            num_atoms=(min(sizes), max(sizes)),
            periodic=tuple(sorted({bool(any(t.pbc) and t.cell is not None) for t in trajs})),
            cell_length=_range(lengths),
            volume_per_atom=_range(volumes),
            min_pair_distance=float(min(finite_closest)) if finite_closest else None,
            force_scale=float(np.percentile(np.concatenate(norms), FORCE_PERCENTILE)) if norms else None,
            num_trajectories=len(trajs),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``symbols`` added for readers; :meth:`from_dict` ignores it)."""
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["symbols"] = list(self.symbols)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Domain":
        """A domain from :meth:`to_dict`'s dict; keys added by later versions are ignored."""
        missing = [k for k in ("species", "num_atoms") if k not in d]
        if missing:
            raise ValueError(f"domain dict lacks {missing}; got keys {sorted(d)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        kw["species"] = tuple(int(z) for z in kw["species"])
        kw["num_atoms"] = tuple(int(n) for n in kw["num_atoms"])
        kw["periodic"] = tuple(bool(p) for p in kw.get("periodic", (True,)))
        return cls(**kw)

    def describe(self) -> str:
        """One line, e.g. ``"Si; 63-65 atoms; periodic; volume 19.6-20.9 Å³/atom; force scale 1.2 eV/Å"``."""
        parts = [", ".join(self.symbols), _span(self.num_atoms, "atoms", "d"),
                 "/".join("periodic" if p else "no cell" for p in self.periodic)]
        if self.volume_per_atom is not None:
            parts.append("volume " + _span(self.volume_per_atom, "Å³/atom", ".3g"))
        if self.force_scale is not None:
            parts.append(f"force scale {self.force_scale:.3g} eV/Å")
        return "; ".join(parts)

    def check_each(self, structures) -> list[list[str]]:
        """Per structure (ASE ``Atoms``, pymatgen ``Structure`` / ``Molecule``, or a ``Trajectory``
        record, whose first frame is checked; one object or a sequence), its problems in words;
        an empty list for a structure inside the domain."""
        return [self._problems(*_arrays(obj, i)) for i, obj in enumerate(_as_list(structures))]

    def check(self, structures) -> list[str]:
        """Every problem of :meth:`check_each`, each prefixed by its structure, e.g.
        ``"structure 2 (Cu4): element Cu never seen in training (trained on Si)"``."""
        objs = _as_list(structures)
        return [f"structure {i} ({_formula(obj)}): {p}" for i, (obj, ps) in enumerate(zip(objs, self.check_each(objs)))
                for p in ps]

    def _problems(self, z: np.ndarray, positions: np.ndarray, cell: np.ndarray | None) -> list[str]:
        problems = []
        unseen = sorted(set(int(v) for v in z) - set(self.species))
        if unseen:
            names = ", ".join(_symbol(v) for v in unseen)
            problems.append(f"element{'s' if len(unseen) > 1 else ''} {names} never seen in training "
                            f"(trained on {', '.join(self.symbols)})")
        lo, hi = self.num_atoms
        if not lo <= len(z) <= hi:
            seen = f"the {hi} seen" if lo == hi else f"the {lo}-{hi} seen"
            problems.append(f"{len(z)} atoms, {'above' if len(z) > hi else 'below'} {seen} in training")
        if (cell is not None) not in self.periodic:
            problems.append("a periodic cell, but no training structure had one" if cell is not None
                            else "no periodic cell, but every training structure had one")
        if cell is not None:
            problems += _outside("cell vector", np.linalg.norm(cell, axis=-1), self.cell_length, "Å")
            volume = abs(float(np.linalg.det(cell))) / max(len(z), 1)
            problems += _outside("volume per atom", np.array([volume]), self.volume_per_atom, "Å³")
        if self.min_pair_distance is not None:
            closest = _closest_pair(positions, cell)
            if closest < CLOSE_PAIR_FRACTION * self.min_pair_distance:
                problems.append(f"two atoms {closest:.3g} Å apart, closer than {CLOSE_PAIR_FRACTION:g} x the "
                                f"closest pair seen in training ({self.min_pair_distance:.3g} Å)")
        return problems


def screen(domain: Domain | None, structures, on_out_of_domain: str = "warn", *,
           what: str = "the model") -> list[list[str]]:
    """Check ``structures`` (as :meth:`Domain.check_each` takes them) against ``domain`` and act.

    ``on_out_of_domain``: ``"warn"`` issues one :class:`OutOfDomainWarning` listing every problem,
    ``"error"`` raises :class:`OutOfDomainError` with that list, ``"ignore"`` checks nothing. With
    ``domain`` None (a model saved without one) nothing is checked. Returns the problems of each
    structure (empty lists when nothing was checked). ``what`` names the model in the message.
    """
    if on_out_of_domain not in ON_OUT_OF_DOMAIN:
        raise ValueError(f"on_out_of_domain must be one of {ON_OUT_OF_DOMAIN}, got {on_out_of_domain!r}")
    objs = _as_list(structures)
    if domain is None or on_out_of_domain == "ignore":
        return [[] for _ in objs]
    each = domain.check_each(objs)
    lines = [f"structure {i} ({_formula(obj)}): {p}" for i, (obj, ps) in enumerate(zip(objs, each)) for p in ps]
    if lines:
        message = (f"{sum(map(bool, each))} of {len(objs)} structure(s) outside the training domain of {what} "
                   f"({domain.describe()}); its forces there are extrapolations:\n  " + "\n  ".join(lines))
        if on_out_of_domain == "error":
            raise OutOfDomainError(message + "\n(on_out_of_domain='warn' or 'ignore' relaxes them anyway)")
        warnings.warn(message, OutOfDomainWarning, stacklevel=3)
    return each


def as_domain(domain: "Domain | dict | None") -> Domain | None:
    """A :class:`Domain` from itself, its dict, or None."""
    if domain is None or isinstance(domain, Domain):
        return domain
    if isinstance(domain, dict):
        return Domain.from_dict(domain)
    raise TypeError(f"domain must be a Domain, its dict or None, got {type(domain).__name__}")


# --------------------------------------------------------------------------- helpers


def _as_list(structures) -> list:
    if isinstance(structures, Trajectory) or structures_lib.is_atoms_like(structures):
        return [structures]
    return list(structures)


def _arrays(obj, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(atomic numbers [n], positions [n, 3] Å, periodic cell [3, 3] Å or None) of one structure."""
    if isinstance(obj, Trajectory):
        return obj.species, obj.initial_positions, obj.cell if any(obj.pbc) else None
    if not structures_lib.is_atoms_like(obj):
        raise TypeError(f"structure {index}: expected an ase.Atoms, a pymatgen Structure/Molecule or a Trajectory, "
                        f"got {type(obj).__name__}")
    z, positions, cell = structures_lib.atoms_arrays(obj)
    if structures_lib.is_ase_atoms(obj) and not np.any(obj.pbc):
        cell = None  # a molecule in a box: the box is not a periodic cell
    return z, positions, cell


def _closest_pair(positions: np.ndarray, cell: np.ndarray | None, reach: float = 3.0) -> float:
    """Closest pair distance (Å, minimum image for a cell); inf for fewer than two atoms. The fast
    search is exact below ``reach`` Å (where real closest pairs lie); beyond it ASE's exact one decides."""
    if len(positions) < 2:
        return float("inf")
    closest = float(np.min(short_pair_distances(positions, cell, reach)))
    if closest >= reach:
        closest = float(np.min(pair_distances(positions, cell, pbc=cell is not None)))
    return closest


def _range(chunks: list[np.ndarray]) -> tuple[float, float] | None:
    if not chunks:
        return None
    v = np.concatenate([np.ravel(c) for c in chunks])
    return float(v.min()), float(v.max())


def _outside(what: str, values: np.ndarray, seen: tuple[float, float] | None, unit: str) -> list[str]:
    """A problem when a value lies more than :data:`MARGIN` outside the ``seen`` range."""
    if seen is None:
        return []
    lo, hi = seen
    far = [v for v in values if v < lo * (1 - MARGIN) or v > hi * (1 + MARGIN)]
    if not far:
        return []
    return [f"{what} {far[0]:.4g} {unit}, more than {MARGIN:.0%} outside the {_span(seen, unit, '.4g')} seen in "
            "training"]


def _span(bounds, unit: str, fmt: str) -> str:
    lo, hi = bounds
    return f"{lo:{fmt}} {unit}" if lo == hi else f"{lo:{fmt}}-{hi:{fmt}} {unit}"


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


def _formula(obj) -> str:
    z = obj.species if isinstance(obj, Trajectory) else structures_lib.atoms_arrays(obj)[0]
    symbols, counts = np.unique(np.asarray(z), return_counts=True)
    return "".join(f"{_symbol(int(s))}{c if c > 1 else ''}" for s, c in zip(symbols, counts))
