"""Relaxation: step rules, the masked ``lax.scan`` rollout of frames, FIRE, the vmapped grid search.

Generic over the force model: every function takes a ``force_fn(params, structures)``."""

from bptt_mlip.relax.scan import (
    RolloutConfig,
    RolloutResult,
    StepConfig,
    StepSizeFn,
    displacement,
    frame,
    init_step_params,
    make_step_size_fn,
    rms_displacement,
    rollout,
)
