"""Force models: ADAPT (the paper's Transformer) and its periodic variant
(``AdaptConfig(geometry="minimum_image")``), reference pair potentials, their standardisation
statistics, and constraints that wrap any force model (zero net force). A force model is any
``force_fn(params, structures) -> [B, N, 3]`` (:data:`bptt_mlip.types.ForceFn`); nothing outside
this room depends on which one, except checkpoints, the command line and the experiment scripts,
which name a model by its kind in :mod:`bptt_mlip.models.registry` (``"adapt"``, ``"equivariant"``)."""

from bptt_mlip.models.adapt import (
    PUBLISHED,
    SMALL,
    SMALL_PERIODIC,
    TINY,
    AdaptConfig,
    Normalizer,
    count_params,
    fit_normalizer,
    init_params,
    make_force_fn,
    make_train_force_fn,
)
from bptt_mlip.models.constraints import remove_net_force, zero_net_force
from bptt_mlip.models import registry  # noqa: E402,F401  (model kinds by name; imports every model)
