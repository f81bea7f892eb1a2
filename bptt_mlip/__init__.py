"""bptt-mlip: fine-tune machine-learned interatomic potentials through whole relaxations (BPTT).

Public names (see docs/api.md):

* structures: :class:`Structures`, :class:`RelaxationBatch`, :class:`ForceBatch`, :func:`from_atoms`, :func:`from_arrays`
* model: :class:`AdaptConfig`, :class:`Normalizer`, :func:`init_params`, :func:`make_force_fn`, :func:`fit_normalizer`
* relaxation: :class:`StepConfig`, :class:`RolloutConfig`, :func:`rollout`, :func:`frame`, :func:`make_step_size_fn`, :func:`init_step_params`
* losses: :func:`delta_q`, :func:`position_mse`, :func:`force_rmse`, :func:`force_l2_error`
* training: :class:`OptimConfig`, :func:`make_optimizer`, :class:`BPTTConfig`, :class:`TrainState`, :func:`make_bptt_step`, :func:`make_pretrain_step`
* grid search: :func:`grid_search`, :func:`make_grid_search`
"""

from bptt_mlip.losses import delta_q, force_l2_error, force_mae, force_rmse, position_mse
from bptt_mlip.model import (
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
from bptt_mlip.optim import OptimConfig, make_optimizer, proximal
from bptt_mlip.relax import (
    RolloutConfig,
    RolloutResult,
    StepConfig,
    frame,
    init_step_params,
    make_step_size_fn,
    rollout,
)
from bptt_mlip.search import GridResult, grid_search, make_grid_search
from bptt_mlip.structures import ForceBatch, RelaxationBatch, Structures, from_arrays, from_atoms
from bptt_mlip.train import BPTTConfig, TrainState, create_train_state, make_bptt_step, make_pretrain_step

__version__ = "0.1.0"

from bptt_mlip import checkpoint, data, evaluate, fire, loops, potentials  # noqa: E402  (submodules as attributes)
from bptt_mlip.api import RelaxOutput, TrainedModel, relax as relax_structures  # noqa: E402
from bptt_mlip.calculator import BPTTCalculator  # noqa: E402
