"""Configs from flag values. Each builder takes the flag values ``v`` (flag name -> value, as
``common.flag_values()`` returns them) and returns the library's config, which checks itself;
:func:`config_problems` turns what those checks refuse into sentences naming the flags.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from bptt_mlip.models import adapt, equivariant
from bptt_mlip.relax import fire, scan
from bptt_mlip.training import optim

Flags = Mapping[str, Any]

MODEL_NAMES = ("adapt", "periodic_adapt", "equivariant")
"""``--model`` choices: the published ADAPT, ADAPT with minimum-image attention, the equivariant energy model."""
MODEL_FLAGS = ("model", "d_model", "d_ff", "num_heads", "num_layers", "dropout", "embed_hidden", "input_encoding",
               "net_force", "cutoff", "channels", "max_angular")
ROLLOUT_FLAGS = ("max_frames", "stop_rms", "remat")
STEP_RULE_FLAGS = ("step_kind", "init_step", "init_step_scale", "head_max_scale", "momentum", "anneal", "noise_std",
                   "max_displacement")
BPTT_FLAGS = ("random_stopping", "max_frames", "dq_weight", "force_weight", "augment_rotation", "augment_translation")


def model_config(v: Flags) -> adapt.AdaptConfig | equivariant.EquivariantConfig:
    """The architecture ``--model`` names: ADAPT of ``--d_model`` ... ``--input_encoding`` and
    ``--net_force`` (``periodic_adapt``: minimum-image geometry within ``--cutoff`` Å), or the
    equivariant model of ``--cutoff``, ``--channels``, ``--max_angular`` and ``--num_layers``
    (interaction blocks; its neighbour capacity is fitted to the data before training)."""
    name = v.get("model", "adapt")
    if name not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}")
    if name == "equivariant":
        return equivariant.EquivariantConfig(cutoff=v.get("cutoff", 5.0), channels=v.get("channels", 16),
                                             max_angular=v.get("max_angular", 2), num_layers=v["num_layers"])
    periodic = {"geometry": "minimum_image", "cutoff": v.get("cutoff", 5.0)} if name == "periodic_adapt" else {}
    return adapt.AdaptConfig(
        d_model=v["d_model"], d_ff=v["d_ff"], num_heads=v["num_heads"], num_layers=v["num_layers"],
        dropout=v["dropout"], embed_hidden=v["embed_hidden"], input_encoding=v["input_encoding"],
        net_force=v.get("net_force", "free"), **periodic,
    )


def model_name(config: adapt.AdaptConfig | equivariant.EquivariantConfig) -> str:
    """The ``--model`` name of a config (the inverse of :func:`model_config`'s choice)."""
    if isinstance(config, equivariant.EquivariantConfig):
        return "equivariant"
    return "periodic_adapt" if config.geometry == "minimum_image" else "adapt"


def rollout_config(v: Flags, **overrides) -> scan.RolloutConfig:
    """``--max_frames``, ``--stop_rms`` and ``--remat``; ``overrides`` replace any field."""
    return scan.RolloutConfig(**{"max_frames": v["max_frames"], "stop_rms": v["stop_rms"], "remat": v["remat"],
                                 **overrides})


def step_rule_settings(v: Flags, base_step: float) -> dict[str, Any]:
    """The BPTT step rule and its per-frame modifiers in their stored (checkpoint-meta) form.

    The initial step (Å²/eV) is ``--init_step``, or ``base_step`` (the best grid step) when that
    is 0, times ``--init_step_scale``.
    """
    return {
        "kind": v["step_kind"], "init_step": (v["init_step"] or base_step) * v["init_step_scale"],
        "head_max_scale": v["head_max_scale"], "momentum": v["momentum"], "anneal": v["anneal"],
        "noise_std": v["noise_std"], "max_displacement": v["max_displacement"],
    }


def step_rule(v: Flags, base_step: float, normalizer=None):
    """``(rule, modifiers)`` of :func:`step_rule_settings` (the neural head standardises with ADAPT's
    ``normalizer``; other models' statistics leave it the identity map)."""
    from bptt_mlip.models import registry, step_head  # noqa: F401  (step_head registers the "neural" kind)
    from bptt_mlip.relax import step_rules

    return step_rules.step_rule_from_dict(step_rule_settings(v, base_step), registry.step_head_statistics(normalizer))


def bptt_settings(v: Flags) -> dict[str, Any]:
    """The objective and augmentation fields of the BPTT config set by flags; the frame limit of
    ``--random_stopping`` is drawn from [min(50, --max_frames), --max_frames]."""
    return {
        "random_stopping": v["random_stopping"], "frame_limit_range": (min(50, v["max_frames"]), v["max_frames"]),
        "dq_weight": v["dq_weight"], "force_weight": v["force_weight"],
        "augment_rotation": v["augment_rotation"], "augment_translation": v["augment_translation"],
    }


def bptt_optim_config(v: Flags) -> optim.OptimConfig:
    """Optimiser of BPTT fine-tuning: the model at ``--bptt_lr``, the step rule at ``--step_lr``."""
    return optim.OptimConfig(
        learning_rate=v["bptt_lr"], step_rule_learning_rate=v["step_lr"], clip_norm=v["clip_norm"],
        proximal_weight=v["proximal_weight"], weight_decay=v["weight_decay"], freeze_model=v["freeze_model"],
        freeze_step_rule=v["step_kind"] == "fixed",
    )


def pretrain_optim_config(v: Flags) -> optim.OptimConfig:
    """Optimiser of force pretraining (the step rule is not trained)."""
    return optim.OptimConfig(learning_rate=v["pretrain_lr"], clip_norm=1.0, freeze_step_rule=True,
                             warmup_steps=v["pretrain_warmup_steps"])


def fire_config(v: Flags) -> fire.FireConfig:
    return fire.FireConfig(fmax=v["fire_fmax"], max_steps=v["fire_max_steps"])


def _bptt_config(v: Flags):
    from bptt_mlip.training import steps

    return steps.BPTTConfig(rollout=rollout_config(v), **bptt_settings(v))


def _checked_configs(v: Flags) -> list[tuple[tuple[str, ...], Callable[[], Any]]]:
    checks = [(ROLLOUT_FLAGS, lambda: rollout_config(v)),
              (STEP_RULE_FLAGS, lambda: step_rule(v, base_step=1.0)),
              (BPTT_FLAGS, lambda: _bptt_config(v))]
    if not v.get("pretrained"):  # a loaded model brings its own architecture
        checks.insert(0, (MODEL_FLAGS, lambda: model_config(v)))
    return checks


def config_problems(v: Flags) -> list[str]:
    """What the configs built from the flag values ``v`` refuse, one sentence per config,
    starting with the flags involved (those the message names, else all that feed the config)."""
    out = []
    for names, build in _checked_configs(v):
        try:
            build()
        except ValueError as err:
            out.append(f"{flag_list(v, names, str(err))}: {err}")
    return out


# config fields whose flags have other names
FIELD_FLAGS = {"max_scale": ("head_max_scale",), "step_size": ("init_step", "init_step_scale"),
               "init_step": ("init_step", "init_step_scale")}


def flag_list(v: Flags, names: tuple[str, ...], message: str) -> str:
    """``"--a=1, --b=2"`` for the flags of ``names`` that ``message`` mentions, by name or through
    the config field they set (all of ``names`` when it mentions none)."""
    mentioned = {w for w in re.findall(r"\w+", message)}
    named = {n for n in names if n in mentioned}
    named |= {f for field in mentioned & set(FIELD_FLAGS) for f in FIELD_FLAGS[field] if f in names}
    return ", ".join(f"--{n}={v[n]}" for n in names if n in (named or set(names)))
