"""Step rules: how a frame turns a structure and its forces into a step size eta (Å²/eV).

A step rule is a frozen dataclass (hashable: a jit static argument and an ``lru_cache`` key)
in the init/apply shape that jax-md and optax users know:

* ``rule.init(key) -> step_params``: the rule's trainable parameters (a pytree, ``{}`` if none);
* ``rule.apply(step_params, structures, forces) -> [B]``: the step size of every structure of
  the batch for this frame (before annealing), in Å²/eV.

The rules here need nothing model-specific: :class:`FixedStep` (a constant, never trained) and
:class:`LearnableStep` (one scalar eta trained with the model). The neural step head of the
paper's appendix A lives with the force models (:mod:`bptt_mlip.models.step_head`) and plugs in
through the same interface. Per-frame modifiers (momentum, annealing, noise, a displacement cap)
are not part of a rule: they are :class:`bptt_mlip.relax.scan.FrameModifiers`.

Parameters of a whole rollout are one pytree ``{"model": model_params, "step_rule": step_params}``.
A rule and its modifiers are stored in checkpoint metadata as one flat dict
(:func:`step_rule_to_dict` / :func:`step_rule_from_dict`), the format older checkpoints used too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from bptt_mlip.relax.scan import FrameModifiers
from bptt_mlip.structures import Structures
from bptt_mlip.types import Params


@runtime_checkable
class StepRule(Protocol):
    """The interface every step rule implements (see the module docstring).

    Attributes:
      kind: the name stored in checkpoints (``"fixed"``, ``"learnable"``, ``"neural"``).
      trainable: whether ``init`` returns parameters that training updates.
    """

    kind: ClassVar[str]
    trainable: ClassVar[bool]

    def init(self, key: jax.Array | None = None) -> Params:
        """Initial step parameters (a pytree; ``{}`` for a rule without parameters)."""

    def apply(self, step_params: Params, structures: Structures, forces: jnp.ndarray) -> jnp.ndarray:
        """[B] step sizes (Å²/eV) from a padded batch and its forces [B, N, 3] (eV/Å)."""

    def scalar_step_size(self, step_params: Params) -> jnp.ndarray | None:
        """The rule's one step size (Å²/eV) as a scalar, or None when it varies per structure."""

    def describe(self, step_params: Params) -> str:
        """The rule in words, e.g. ``"learnable, eta = 0.0412 Å²/eV"``."""

    def to_dict(self) -> dict[str, Any]:
        """The rule's settings as JSON-friendly values, with ``"kind"``."""


def _batch_size(structures: Structures) -> tuple[int]:
    return structures.positions.shape[:1]


@dataclasses.dataclass(frozen=True)
class FixedStep:
    """A constant step size ``step_size`` (Å²/eV), never trained (the paper's grid-searched step).

    ``init`` gives ``{"eta": step_size}``: a frozen value that no gradient reaches
    (``stop_gradient``), held as a parameter so that it enters a compiled rollout as an input: one
    compilation serves every fixed step size (grid search, inference at another step size).
    ``apply`` with ``{}`` uses ``step_size`` as a constant.
    """

    step_size: float = 0.077

    kind: ClassVar[str] = "fixed"
    trainable: ClassVar[bool] = False

    def __post_init__(self):
        if not self.step_size > 0:
            raise ValueError(f"FixedStep.step_size must be > 0 Å²/eV, got {self.step_size}")

    def init(self, key: jax.Array | None = None) -> Params:
        return {"eta": jnp.asarray(self.step_size, jnp.float32)}

    def apply(self, step_params: Params, structures: Structures, forces: jnp.ndarray) -> jnp.ndarray:
        return jnp.broadcast_to(jax.lax.stop_gradient(self.scalar_step_size(step_params)), _batch_size(structures))

    def scalar_step_size(self, step_params: Params) -> jnp.ndarray:
        return step_params["eta"] if "eta" in step_params else jnp.asarray(self.step_size, jnp.float32)

    def describe(self, step_params: Params) -> str:
        return f"fixed, eta = {float(self.scalar_step_size(step_params)):.6g} Å²/eV"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "init_step": float(self.step_size)}


@dataclasses.dataclass(frozen=True)
class LearnableStep:
    """One scalar step size ``eta`` (Å²/eV), trained with the model; starts at ``init_step``.

    ``step_params = {"eta": scalar float32}``. ``max_step`` (Å²/eV; 0 = unbounded) caps the step the
    frames use at ``min(eta, max_step)``: above the cap no gradient reaches ``eta``. A model whose
    stiffest curvature at the relaxed structures is k (eV/Å²) makes the frame map grow that mode once
    eta k > 2 (:mod:`bptt_mlip.relax.stability`), and BPTT's gradients with it; a cap clearly below
    2/k keeps a learned step on the stable side (docs/results.md: at 2/k of the DFT minima the
    gradients still exploded, at 0.9x of it they stayed bounded).
    """

    init_step: float = 0.077
    max_step: float = 0.0

    kind: ClassVar[str] = "learnable"
    trainable: ClassVar[bool] = True

    def __post_init__(self):
        if not self.init_step > 0:
            raise ValueError(f"LearnableStep.init_step must be > 0 Å²/eV, got {self.init_step}")
        if not self.max_step >= 0:
            raise ValueError(f"LearnableStep.max_step must be >= 0 Å²/eV (0 = unbounded), got {self.max_step}")
        if self.max_step and self.init_step > self.max_step:
            raise ValueError(f"LearnableStep.init_step = {self.init_step} Å²/eV is above its max_step = "
                             f"{self.max_step} Å²/eV: start the step at or below its cap")

    def init(self, key: jax.Array | None = None) -> Params:
        return {"eta": jnp.asarray(self.init_step, jnp.float32)}

    def apply(self, step_params: Params, structures: Structures, forces: jnp.ndarray) -> jnp.ndarray:
        return jnp.broadcast_to(self.scalar_step_size(step_params), _batch_size(structures))

    def scalar_step_size(self, step_params: Params) -> jnp.ndarray:
        eta = step_params["eta"]
        return jnp.minimum(eta, self.max_step) if self.max_step else eta

    def describe(self, step_params: Params) -> str:
        cap = f" (capped at {self.max_step:.6g})" if self.max_step else ""
        return f"learnable, eta = {float(self.scalar_step_size(step_params)):.6g} Å²/eV{cap}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "init_step": float(self.init_step), "max_step": float(self.max_step)}


# ----------------------------------------------------------------------------- stored form

RuleFromDict = Callable[[dict[str, Any], Any], StepRule]
"""``from_dict(settings, normalizer) -> rule``: rebuild a rule of one kind from its stored settings."""

STEP_RULE_KINDS: dict[str, RuleFromDict] = {
    "fixed": lambda d, normalizer: FixedStep(float(d.get("init_step", FixedStep.step_size))),
    "learnable": lambda d, normalizer: LearnableStep(float(d.get("init_step", LearnableStep.init_step)),
                                                     float(d.get("max_step", 0.0))),
}
"""Stored ``kind`` -> how to rebuild the rule; :mod:`bptt_mlip.models.step_head` adds ``"neural"``."""

_MODIFIER_KEYS = tuple(f.name for f in dataclasses.fields(FrameModifiers))


def register_step_rule(kind: str, from_dict: RuleFromDict) -> None:
    """Make :func:`step_rule_from_dict` rebuild rules of ``kind`` (a rule defined outside this module)."""
    STEP_RULE_KINDS[kind] = from_dict


def step_rule_to_dict(rule: StepRule, modifiers: FrameModifiers = FrameModifiers()) -> dict[str, Any]:
    """A rule and its per-frame modifiers as one flat JSON-friendly dict (checkpoint metadata)."""
    return {**rule.to_dict(), **dataclasses.asdict(modifiers)}


def step_rule_from_dict(d: dict[str, Any], normalizer: Any = None) -> tuple[StepRule, FrameModifiers]:
    """``(rule, modifiers)`` from :func:`step_rule_to_dict`'s dict, or from the ``"step_config"``
    dict of older checkpoints (keys ``kind, init_step, momentum, anneal, noise_std,
    max_displacement, head_*``; an empty dict is the old default, a fixed step of 0.077 Å²/eV).

    ``normalizer``: the force model's standardisation statistics, used by the neural step head.
    """
    kind = d.get("kind", "fixed")
    if kind not in STEP_RULE_KINDS:
        hint = " (import bptt_mlip.models.step_head to register it)" if kind == "neural" else ""
        raise ValueError(f"unknown step rule kind {kind!r}; known: {sorted(STEP_RULE_KINDS)}{hint}")
    modifiers = FrameModifiers(**{k: d[k] for k in _MODIFIER_KEYS if k in d})
    return STEP_RULE_KINDS[kind](d, normalizer), modifiers


def step_rule_from_checkpoint(
    d: dict[str, Any], step_params: Params, normalizer: Any = None
) -> tuple[StepRule, FrameModifiers, Params]:
    """``(rule, modifiers, step_params)`` of a saved model: its stored dict (see
    :func:`step_rule_from_dict`) and its ``params["step_rule"]``. Older checkpoints kept a fixed
    step's eta among the parameters (as :meth:`FixedStep.init` does) beside a stored ``init_step``
    that may differ; the parameter is what the rollouts used, so it becomes the rule's step size."""
    rule, modifiers = step_rule_from_dict(d, normalizer)
    step_params = step_params or {}
    if isinstance(rule, FixedStep) and "eta" in step_params:
        rule = FixedStep(float(step_params["eta"]))
    return rule, modifiers, step_params
