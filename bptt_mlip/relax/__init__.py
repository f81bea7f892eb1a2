"""Relaxation: step rules, the masked ``lax.scan`` rollout of frames, its forward-only twin that stops
when every structure has stopped, FIRE, the vmapped grid search, and (``stability``) the stiffest
mode of a model against its fixed step.

Generic over the force model: every function takes a ``force_fn(params, structures)``."""

from bptt_mlip.relax.forward import forward_frame, relax_forward, relax_until_done, start_carry
from bptt_mlip.relax.scan import (
    FrameModifiers,
    RolloutConfig,
    RolloutResult,
    displacement,
    frame,
    rms_displacement,
    rollout,
)
from bptt_mlip.relax.step_rules import (
    FixedStep,
    LearnableStep,
    StepRule,
    register_step_rule,
    step_rule_from_checkpoint,
    step_rule_from_dict,
    step_rule_to_dict,
)
