"""Force models: ADAPT (the paper's Transformer), reference pair potentials, and their
standardisation statistics. A force model is any ``force_fn(params, structures) -> [B, N, 3]``
(:data:`bptt_mlip.types.ForceFn`); nothing outside this room depends on which one."""

from bptt_mlip.models.adapt import (
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
