"""Old flat module paths of bptt-mlip, kept importable with a warning naming the new place.

Until the package was regrouped into rooms (models, relax, training, data, workflow) every
module sat directly under ``bptt_mlip``. Code written against those paths (``from
bptt_mlip.model import AdaptConfig``, ``import bptt_mlip.fire``) keeps working: the import
system finds the new module and a ``DeprecationWarning`` names it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "bptt_mlip.model": "bptt_mlip.models.adapt",
    "bptt_mlip.potentials": "bptt_mlip.models.potentials",
    "bptt_mlip.fire": "bptt_mlip.relax.fire",
    "bptt_mlip.search": "bptt_mlip.relax.grid",
    "bptt_mlip.train": "bptt_mlip.training.steps",
    "bptt_mlip.optim": "bptt_mlip.training.optim",
    "bptt_mlip.augment": "bptt_mlip.training.augment",
    "bptt_mlip.loops": "bptt_mlip.training.loops",
    "bptt_mlip.evaluate": "bptt_mlip.training.evaluate",
    "bptt_mlip.checkpoint": "bptt_mlip.training.checkpoint",
    "bptt_mlip.parallel": "bptt_mlip.training.parallel",
    "bptt_mlip.api": "bptt_mlip.workflow.api",
    "bptt_mlip.calculator": "bptt_mlip.workflow.calculator",
    "bptt_mlip.plots": "bptt_mlip.workflow.plots",
    "bptt_mlip.plots_structure": "bptt_mlip.workflow.plots_structure",
}
"""Old module path -> the module that now holds its names."""

REMOVED = {
    "StepConfig": "a step rule object (bptt_mlip.FixedStep, bptt_mlip.LearnableStep, "
                  "bptt_mlip.models.step_head.NeuralStep) and bptt_mlip.FrameModifiers for momentum, annealing, "
                  "noise and the displacement cap",
    "init_step_params": "use step_rule.init(key)",
    "make_step_size_fn": "pass the step rule itself; step_rule.apply(step_params, structures, forces) gives the steps",
    "create_train_state": "use bptt_mlip.make_bptt_trainer(...).init(params, key) (or make_pretrain_trainer)",
    "make_bptt_step": "use bptt_mlip.make_bptt_trainer(force_fn, step_rule, config, optimizer).update",
    "make_pretrain_step": "use bptt_mlip.make_pretrain_trainer(train_force_fn, optimizer).update",
}
"""Names the top-level package exported before the regrouping and no longer has -> what replaced them."""


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=stacklevel)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        warn_moved(spec.name, self.new, stacklevel=6)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__  # the import machinery overwrites __spec__ with the alias's
        return module

    def exec_module(self, module):  # the new module is already executed: put its own spec back
        module.__spec__ = self._spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Register the finder once (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
