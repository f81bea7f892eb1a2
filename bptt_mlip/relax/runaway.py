"""Runaway relaxations judged by physics at their end points (host numpy, after a rollout or FIRE).

A relaxation can end finite and still be nonsense: two atoms on top of each other (forces that
pull atoms together, as an untrained or out-of-domain model may give, "converge" there), or atoms
flown tens of Å away (a direct-force model whose forces do not sum to zero keeps FIRE accelerating).
The per-frame checks inside the rollout (non-finite values, one frame moving an atom farther than
``divergence_displacement``) see neither. :func:`end_point_runaways` flags an end point when

* any real atom's position is not finite;
* two atoms are closer than ``contact_fraction`` x the sum of their covalent radii (ASE's
  ``ase.data.covalent_radii``; minimum image in a periodic cell). The default 0.5 sits far below
  any real bond (H-H 0.74 Å against 0.31 Å; Si-Si 2.35 Å against 1.11 Å; the closest pairs in the
  shipped and DFT data are 0.94 x the radii sum) and far above overlapping atoms;
* an atom ended farther than ``max_total_displacement`` Å from where it started (positions are
  not wrapped during a relaxation, so the plain difference is the distance travelled). The default
  5 Å is 1.7 x the largest movement of any atom in the shipped Si-defect relaxations (2.9 Å; crystal
  and DFT defect runs move atoms at most 0.7 Å) and twice the Si-Si bond: no local relaxation moves
  an atom that far.
"""

from __future__ import annotations

import numpy as np
from ase.data import chemical_symbols, covalent_radii

from bptt_mlip.data.geometry import short_pair_distances

CONTACT_FRACTION = 0.5
"""Two atoms closer than this fraction of their covalent radii sum have collapsed onto each other."""

MAX_TOTAL_DISPLACEMENT = 5.0
"""Å an atom may move over a whole relaxation before the relaxation counts as a runaway."""


def end_point_runaways(
    initial_positions,
    final_positions,
    species,
    cell,
    mask=None,
    *,
    contact_fraction: float = CONTACT_FRACTION,
    max_total_displacement: float = MAX_TOTAL_DISPLACEMENT,
) -> tuple[np.ndarray, list[str]]:
    """Which relaxations ended in an unphysical structure (see the module docstring for the rules).

    Args:
      initial_positions, final_positions: [B, N, 3] Å (or [N, 3] for one structure), start and end.
      species: [B, N] atomic numbers (0 on padding).
      cell: [B, 3, 3] lattice vectors (rows) in Å, zeros for a structure without a periodic cell,
        or None (no structure periodic); a periodic cell counts all three directions.
      mask: [B, N] bool, True for a real atom (default: ``species > 0``).
      contact_fraction: the contact rule's fraction of the covalent radii sum.
      max_total_displacement: the most an atom may move over the relaxation, Å.

    Returns:
      (diverged [B] bool, reasons: one string per structure, ``""`` for one that did not run away,
      else every rule it broke in words).
    """
    x0, x1 = np.asarray(initial_positions, np.float64), np.asarray(final_positions, np.float64)
    single = x1.ndim == 2
    if single:
        x0, x1 = x0[None], x1[None]
        species = np.asarray(species)[None]
        mask = None if mask is None else np.asarray(mask)[None]
        cell = None if cell is None else np.asarray(cell)[None]
    species = np.asarray(species, np.int64)
    mask = species > 0 if mask is None else np.asarray(mask, bool)
    if x0.shape != x1.shape or x1.ndim != 3 or x1.shape[-1] != 3 or species.shape != x1.shape[:2] \
            or mask.shape != x1.shape[:2]:
        raise ValueError(f"end_point_runaways: expected initial and final positions [B, N, 3] with species and mask "
                         f"[B, N]; got {x0.shape}, {x1.shape}, {species.shape}, {mask.shape}")
    cells = np.zeros((x1.shape[0], 3, 3)) if cell is None else np.broadcast_to(np.asarray(cell, np.float64),
                                                                                (x1.shape[0], 3, 3))
    reasons = []
    for b in range(x1.shape[0]):
        real = mask[b]
        periodic = abs(np.linalg.det(cells[b])) > 1e-6
        reasons.append("; ".join(_broken_rules(x0[b, real], x1[b, real], species[b, real],
                                               cells[b] if periodic else None, contact_fraction,
                                               max_total_displacement)))
    return np.array([bool(r) for r in reasons], bool), reasons


def _broken_rules(start: np.ndarray, end: np.ndarray, z: np.ndarray, cell: np.ndarray | None,
                  contact_fraction: float, max_total_displacement: float) -> list[str]:
    """The runaway rules one structure ([n, 3] Å start and end, [n] species) breaks, in words."""
    if end.size == 0:
        return []
    if not np.all(np.isfinite(end)):
        return [f"{int(np.sum(~np.all(np.isfinite(end), axis=-1)))} atom(s) with non-finite positions"]
    rules = []
    moved = np.linalg.norm(end - start, axis=-1)
    far = moved > max_total_displacement
    if far.any():
        i = int(np.argmax(moved))
        rules.append(f"atom {i} ({_symbol(z[i])}) moved {moved[i]:.3g} Å from its start (more than "
                     f"{max_total_displacement:g} Å; {int(far.sum())} atom(s) did)")
    if len(end) > 1:
        contact = contact_fraction * (covalent_radii[z][:, None] + covalent_radii[z][None, :])
        ratio = short_pair_distances(end, cell, float(contact.max())) / contact
        if ratio.min() < 1.0:
            i, j = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
            i, j = int(min(i, j)), int(max(i, j))
            rules.append(f"atoms {i} ({_symbol(z[i])}) and {j} ({_symbol(z[j])}) ended "
                         f"{ratio[i, j] * contact[i, j]:.3g} Å apart (closer than {contact_fraction:g} x their "
                         f"covalent radii sum, {contact[i, j]:.3g} Å)")
    return rules


def _symbol(z) -> str:
    z = int(z)
    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"
