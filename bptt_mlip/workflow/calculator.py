"""ASE glue: the trained model as an ASE calculator, and any ASE calculator as a data-generator oracle.

``BPTTCalculator`` computes what the model has. An energy model (the equivariant potential of
:mod:`bptt_mlip.models.equivariant`, forces = -dE/dX) gives ``energy``, ``free_energy`` (the same
number: the model has no electronic entropy) and ``forces``, so every ASE optimiser runs with it,
``BFGS`` and the line-search ones included::

    atoms.calc = BPTTCalculator(TrainedModel.load("runs/equivariant/checkpoints/bptt_best"))
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)

ADAPT (either geometry) predicts forces directly: it has **forces only**, no energy (and no
stress), so asking for either raises ``PropertyNotImplementedError``.

ASE optimisers and energies of a forces-only model: in ASE 3.29 every ``Optimizer`` logs an energy after each step
(``Optimizer.log`` calls ``optimizable.get_value()``, i.e. ``atoms.get_potential_energy()``,
even with ``logfile=None``), so ``FIRE(atoms).run()`` on atoms with a forces-only calculator
stops with that error at its first log line. Wrap the atoms with :func:`forces_only`::

    from ase.optimize import FIRE
    from bptt_mlip.workflow.calculator import BPTTCalculator, forces_only

    atoms.calc = BPTTCalculator(model)
    FIRE(forces_only(atoms), logfile=None).run(fmax=0.05, steps=200)   # moves ``atoms`` in place

``forces_only`` reports the energy to the optimiser as NaN (the log's "Energy" column shows
``nan``), so use it only with optimisers that move on forces alone: ``FIRE`` with its default
``downhill_check=False`` (tested against :func:`bptt_mlip.relax_structures` with ``method="fire"``), and,
reading ASE's code, ``BFGS``, ``LBFGS`` without line search and ``MDMin``. Optimisers that compare
energies (``BFGSLineSearch``, ``LBFGS(use_line_search=True)``, ``GPMin``,
``FIRE(downhill_check=True)``) would silently misbehave on NaN energies: do not use them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.optimize.optimize import OptimizableAtoms

from bptt_mlip import structures as structures_lib
from bptt_mlip.workflow import api
from bptt_mlip.data import domain as domain_lib
from bptt_mlip.data.batching import DEFAULT_BUCKETS, bucket_atoms
from bptt_mlip.data.oracles import Oracle

NO_ENERGY = (
    "BPTTCalculator does not compute {name!r}: this model predicts forces directly and has no "
    "energy (and no stress). Ask for forces (atoms.get_forces()). To run an ASE optimiser, which "
    "logs an energy every step, wrap the atoms: FIRE(bptt_mlip.workflow.calculator.forces_only(atoms)).run(...)."
)


class BPTTCalculator(Calculator):
    """ASE calculator of a trained model: forces (eV/Å), and the energy (eV) of energy models; no stress.

    Args:
      model: a :class:`bptt_mlip.workflow.api.TrainedModel`, or any ``force_fn(params, structures)``
        (then pass ``params``; forces only).
      params: the force function's parameters (only with a plain ``force_fn``).
      buckets: atom-count padding sizes; a structure is padded to the smallest bucket that fits,
        so calls on structures of the same bucket reuse one compiled function.
      on_out_of_domain: a structure outside the model's training domain (``domain``, default the
        model's ``TrainedModel.domain``; none for a plain ``force_fn``) gives one
        :class:`~bptt_mlip.data.domain.OutOfDomainWarning` (``"warn"``, default), an
        ``OutOfDomainError`` (``"error"``) or nothing (``"ignore"``). It is checked once per new
        structure (new elements, atom count, cell or periodicity), not at every optimiser step.

    The force function is jitted once per model (shared with :func:`bptt_mlip.relax_structures`); it
    runs in float32, and ASE's float64 positions are rounded to float32 on the way in (so a central
    finite difference of the energy matches the forces to about 1e-3 eV/Å, not to float64 precision).
    """

    implemented_properties = ["forces"]  # per instance: energy models add "energy" and "free_energy"

    def __init__(self, model, *, params=None, buckets: Sequence[int] = DEFAULT_BUCKETS, on_out_of_domain: str = "warn",
                 domain: domain_lib.Domain | None = None, **kwargs):
        super().__init__(**kwargs)
        if on_out_of_domain not in domain_lib.ON_OUT_OF_DOMAIN:
            raise ValueError(f"on_out_of_domain must be one of {domain_lib.ON_OUT_OF_DOMAIN}, got {on_out_of_domain!r}")
        self._force_fn, full_params, trained = api.resolve_model(model, params, caller="BPTTCalculator")
        self.domain = domain if domain is not None else (trained.domain if trained is not None else None)
        self.on_out_of_domain = on_out_of_domain
        self._screened: set = set()
        self._params = full_params["model"]
        self.model = model
        self.buckets = tuple(buckets)
        self._trained = trained
        energy_force_fn = None if trained is None else trained.energy_force_fn
        self.has_energy = energy_force_fn is not None
        self.implemented_properties = ["energy", "free_energy", "forces"] if self.has_energy else ["forces"]
        self._jitted = api.jitted_forces(energy_force_fn if self.has_energy else self._force_fn)

    def _cover_cell(self, atoms) -> None:
        """Widen the model's neighbour search when ``atoms``' cell needs more periodic images
        (:meth:`~bptt_mlip.workflow.api.TrainedModel.covering`); recompiles only then."""
        if self._trained is None:
            return
        covering = self._trained.covering([structures_lib.atoms_arrays(atoms)[2]])
        if covering is not self._trained:
            self._trained = covering
            self._force_fn = covering.force_fn
            self._jitted = api.jitted_forces(covering.energy_force_fn if self.has_energy else covering.force_fn)

    def get_property(self, name, atoms=None, allow_calculation=True):
        if name not in self.implemented_properties:
            raise PropertyNotImplementedError(NO_ENERGY.format(name=name))
        return super().get_property(name, atoms, allow_calculation)

    def calculate(self, atoms=None, properties=("forces",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self._screen(self.atoms)
        self._cover_cell(self.atoms)
        n = len(self.atoms)
        batch = structures_lib.from_atoms([self.atoms], max_atoms=bucket_atoms(n, self.buckets), batch_size=1)
        if not self.has_energy:
            forces = np.asarray(self._jitted(self._params, batch))[0, :n].astype(np.float64)
            self.results = {"forces": forces}
            return
        energies, forces = self._jitted(self._params, batch)
        energy = float(np.asarray(energies)[0])
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": np.asarray(forces)[0, :n].astype(np.float64)}


    def _screen(self, atoms) -> None:
        """Check a structure not met before (elements, atom count, cell, periodicity) against the domain."""
        if self.domain is None or self.on_out_of_domain == "ignore":
            return
        key = (atoms.numbers.tobytes(), np.round(atoms.cell.array, 6).tobytes(), tuple(bool(p) for p in atoms.pbc))
        if key not in self._screened:
            domain_lib.screen(self.domain, [atoms], self.on_out_of_domain, what="BPTTCalculator's model")
            self._screened.add(key)  # after the check: a refused structure is refused again


class _ForcesOnlyOptimizable(OptimizableAtoms):
    """ASE's optimisable view of atoms, with the energy reported as NaN (never computed)."""

    def get_value(self):
        return float("nan")


class forces_only:  # noqa: N801  (reads like a function at the call site)
    """Wrap ``atoms`` so an ASE optimiser runs on forces alone (see the module docstring).

    ``FIRE(forces_only(atoms)).run(fmax, steps)`` moves ``atoms`` itself; everything else
    (``len``, ``get_positions``, trajectories, observers) is forwarded to ``atoms``.
    """

    def __init__(self, atoms):
        self.atoms = atoms

    def __ase_optimizable__(self):
        return _ForcesOnlyOptimizable(self.atoms)

    def __len__(self):
        return len(self.atoms)

    def __getattr__(self, name):
        return getattr(self.atoms, name)


# --------------------------------------------------------------------------- calculator -> oracle


class CalculatorOracle(Oracle):
    """An :class:`~bptt_mlip.data.oracles.Oracle` backed by an ASE calculator (see :func:`oracle_from_calculator`)."""

    def __init__(self, calc, *, name: str, elements: Sequence[int], cutoff: float = 0.0, require_energy: bool = True):
        self.calc = calc
        self.name = name
        self.elements = tuple(int(z) for z in elements)
        self.cutoff = float(cutoff)
        self.require_energy = require_energy

    def forces_and_energy(self, species, positions, cell):
        from ase import Atoms

        self.check(species, positions, cell)
        atoms = Atoms(numbers=np.asarray(species), positions=np.asarray(positions, np.float64), cell=cell,
                      pbc=cell is not None)
        atoms.calc = self.calc
        forces = np.asarray(atoms.get_forces(), np.float64)
        try:
            energy = float(atoms.get_potential_energy())
        except PropertyNotImplementedError as err:
            if self.require_energy:
                raise PropertyNotImplementedError(
                    f"oracle {self.name!r}: the calculator gives no energy, and the data generator needs one "
                    "(it rejects non-finite energies); pass require_energy=False to get NaN energies"
                ) from err
            energy = float("nan")
        return forces, energy


def oracle_from_calculator(
    calc,
    *,
    name: str | None = None,
    elements: Sequence[int | str] | None = None,
    cutoff: float = 0.0,
    require_energy: bool = True,
) -> CalculatorOracle:
    """Wrap any ASE calculator as an oracle for :mod:`bptt_mlip.data.generator` (e.g. ``generator.relax_with_oracle``).

    Args:
      calc: an ASE calculator instance (reused for every structure; ASE calculators recompute when
        the atoms change).
      name: written into dataset manifests (default: the calculator's class name, lower case).
      elements: atomic numbers or symbols it covers (default: every element, Z = 1..103; the
        calculator itself then decides what it accepts).
      cutoff: interaction range (Å); a cell narrower than twice this is refused (0: no check).
      require_energy: raise if the calculator has no energy (the generator needs energies).
    """
    from bptt_mlip import descriptors

    z = tuple(range(1, 104)) if elements is None else tuple(int(v) for v in descriptors.atomic_numbers(list(elements)))
    return CalculatorOracle(calc, name=name or type(calc).__name__.lower(), elements=z, cutoff=cutoff,
                            require_energy=require_energy)
