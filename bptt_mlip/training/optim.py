"""Optax chains for BPTT fine-tuning and force pretraining.

The parameters are ``{"model": ..., "step_rule": ...}``; each group gets its own chain through
``optax.partition``:

* model: ``clip_by_global_norm -> proximal pull -> adam(w) -> scale(lr)``;
* step_rule: ``clip_by_global_norm -> adam -> scale(step_rule_learning_rate)``;
* a frozen group gets ``optax.set_to_zero()`` (figure 5a: train only the step size);
* the whole update is wrapped in ``optax.apply_if_finite``: a non-finite gradient leaves the
  parameters unchanged and is counted (``nonfinite_counts``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from bptt_mlip.types import Params


class ProximalState(NamedTuple):
    """The anchor (pretrained) parameters the proximal term pulls toward."""

    anchor: Params


def proximal(weight: float, anchor: Params | None = None) -> optax.GradientTransformation:
    """Add ``weight * (params - anchor)`` to the gradient: the gradient of ``weight/2 |params - anchor|^2``.

    The anchor is stored in the transform's state; by default it is the parameters passed to
    ``init`` (the pretrained weights at the start of fine-tuning).
    """

    def init_fn(params):
        source = params if anchor is None else anchor
        return ProximalState(anchor=jax.tree_util.tree_map(jnp.asarray, source))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("proximal() needs params: call optimizer.update(grads, state, params)")
        if weight == 0.0:
            return updates, state
        pulled = jax.tree_util.tree_map(lambda g, p, a: g + weight * (p - a), updates, params, state.anchor)
        return pulled, state

    return optax.GradientTransformation(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings.

    Attributes:
      learning_rate: Adam learning rate of the model group.
      step_rule_learning_rate: Adam learning rate of the step rule's parameters (a learnable eta
        or the neural step head).
      clip_norm: global-norm clip of each group's gradient (0 = off).
      proximal_weight: lambda of the proximal pull toward the initial model weights (0 = off).
      weight_decay: decoupled weight decay of the model group (AdamW; 0 = off).
      freeze_model: train only the step rule's parameters (figure 5a).
      freeze_step_rule: never change the step rule's parameters.
      warmup_steps: the model group's learning rate rises linearly from 0 to
        ``learning_rate`` over this many updates (0 = constant); deep post-LayerNorm
        Transformers often need it.
      max_consecutive_nonfinite: after this many non-finite gradients in a row,
        ``apply_if_finite`` applies the (non-finite) update; the training loop stops before that.
    """

    learning_rate: float = 1e-4
    step_rule_learning_rate: float = 1e-3
    clip_norm: float = 1.0
    proximal_weight: float = 0.0
    weight_decay: float = 0.0
    freeze_model: bool = False
    freeze_step_rule: bool = False
    warmup_steps: int = 0
    max_consecutive_nonfinite: int = 1_000_000


def _group_chain(lr: float, clip: float, prox: float = 0.0, wd: float = 0.0,
                 warmup: int = 0) -> optax.GradientTransformation:
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
    if warmup:
        lr = optax.linear_schedule(0.0, lr, warmup)
    parts = []
    if clip:
        parts.append(optax.clip_by_global_norm(clip))
    if prox:
        parts.append(proximal(prox))
    parts.append(optax.adamw(lr, weight_decay=wd) if wd else optax.adam(lr))
    return optax.chain(*parts)


def group_labels(params: Params) -> Params:
    """Label every leaf of ``{"model", "step_rule"}`` params with its group name."""
    return {k: jax.tree_util.tree_map(lambda _, k=k: k, v) for k, v in params.items()}


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """The full guarded, partitioned chain for ``{"model", "step_rule"}`` parameters."""
    model_tx = (
        optax.set_to_zero()
        if config.freeze_model
        else _group_chain(config.learning_rate, config.clip_norm, config.proximal_weight, config.weight_decay,
                          config.warmup_steps)
    )
    step_rule_tx = (optax.set_to_zero() if config.freeze_step_rule
                    else _group_chain(config.step_rule_learning_rate, config.clip_norm))
    tx = optax.partition({"model": model_tx, "step_rule": step_rule_tx}, group_labels)
    return optax.apply_if_finite(tx, max_consecutive_errors=config.max_consecutive_nonfinite)


def nonfinite_counts(opt_state: Any) -> dict[str, jnp.ndarray]:
    """Consecutive and total skipped (non-finite) updates recorded by ``apply_if_finite``."""
    return {"nonfinite_consecutive": opt_state.notfinite_count, "nonfinite_total": opt_state.total_notfinite}
