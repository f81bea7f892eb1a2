"""bptt-mlip: fine-tune machine-learned interatomic potentials through whole relaxations (BPTT).

The package is grouped in rooms (see docs/architecture.md); data flows one way:
files -> records (:mod:`bptt_mlip.data`) -> padded batches (:mod:`bptt_mlip.structures`) ->
rollout (:mod:`bptt_mlip.relax`) -> loss and optax update (:mod:`bptt_mlip.training`);
force models live in :mod:`bptt_mlip.models`, and :mod:`bptt_mlip.workflow` uses a trained
model (relax API, ASE calculator, command line).

Public names (see docs/api.md):

* structures: :class:`Structures`, :class:`RelaxationBatch`, :class:`ForceBatch`, :func:`from_atoms`,
  :func:`from_arrays`
* models: :class:`AdaptConfig`, :class:`Normalizer`, :func:`init_params`, :func:`make_force_fn`, :func:`fit_normalizer`
* relaxation: :class:`FixedStep`, :class:`LearnableStep`, :class:`NeuralStep` (step rules), :class:`FrameModifiers`,
  :class:`RolloutConfig`, :func:`rollout`, :func:`frame`
* losses: :func:`delta_q`, :func:`position_mse`, :func:`force_rmse`, :func:`force_l2_error`
* training: :class:`OptimConfig`, :func:`make_optimizer`, :class:`BPTTConfig`, :class:`TrainState`, :class:`Trainer`,
  :func:`make_bptt_trainer`, :func:`make_pretrain_trainer`
* grid search: :func:`grid_search`, :func:`make_grid_search`
* workflow: :class:`TrainedModel`, :func:`relax_structures`, :class:`BPTTCalculator`
"""

from bptt_mlip import _moved

_moved.install()

from bptt_mlip import data, models, relax, training, workflow  # noqa: E402  (the rooms as attributes)
from bptt_mlip.losses import delta_q, force_l2_error, force_mae, force_rmse, position_mse  # noqa: E402
from bptt_mlip.models.adapt import (  # noqa: E402
    PUBLISHED,
    SMALL,
    TINY,
    AdaptConfig,
    Normalizer,
    count_params,
    fit_normalizer,
    init_params,
    make_force_fn,
    make_train_force_fn,
)
from bptt_mlip.relax.grid import GridResult, grid_search, make_grid_search  # noqa: E402
from bptt_mlip.models.step_head import NeuralStep  # noqa: E402
from bptt_mlip.relax.scan import FrameModifiers, RolloutConfig, RolloutResult, frame, rollout  # noqa: E402
from bptt_mlip.relax.step_rules import FixedStep, LearnableStep, StepRule  # noqa: E402
from bptt_mlip.structures import ForceBatch, RelaxationBatch, Structures, from_arrays, from_atoms  # noqa: E402
from bptt_mlip.training.optim import OptimConfig, make_optimizer, proximal  # noqa: E402
from bptt_mlip.training.steps import (  # noqa: E402
    BPTTConfig,
    Trainer,
    TrainState,
    make_bptt_trainer,
    make_pretrain_trainer,
)
from bptt_mlip.workflow.api import RelaxOutput, TrainedModel, relax_structures  # noqa: E402
from bptt_mlip.workflow.calculator import BPTTCalculator  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    """``bptt_mlip.fire`` and the other old flat submodules, as attributes: warn and hand the new
    module; a name that was removed raises an AttributeError naming what replaced it."""
    old = f"bptt_mlip.{name}"
    if old in _moved.MOVED:
        import importlib

        _moved.warn_moved(old, _moved.MOVED[old])
        return importlib.import_module(_moved.MOVED[old])
    if name in _moved.REMOVED:
        raise AttributeError(f"bptt_mlip.{name} was removed: {_moved.REMOVED[name]}")
    raise AttributeError(f"module 'bptt_mlip' has no attribute {name!r}")
