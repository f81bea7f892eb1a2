"""Configs from flag values. Each builder takes the flag values ``v`` (flag name -> value, as
``common.flag_values()`` returns them) and returns the library's config, which checks itself;
:func:`config_problems` turns what those checks refuse into sentences naming the flags.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bptt_mlip.models import adapt, equivariant
from bptt_mlip.relax import fire, scan
from bptt_mlip.training import optim

Flags = Mapping[str, Any]

MODEL_NAMES = ("adapt", "periodic_adapt", "equivariant")
"""``--model`` choices: the published ADAPT, ADAPT with minimum-image attention, the equivariant energy model."""
MODEL_FLAGS = ("model", "d_model", "d_ff", "num_heads", "num_layers", "dropout", "embed_hidden", "input_encoding",
               "net_force", "cutoff", "channels", "max_angular")
ROLLOUT_FLAGS = ("max_frames", "stop_rms", "stop_fmax", "remat", "compact_levels")
STEP_RULE_FLAGS = ("step_kind", "init_step", "init_step_scale", "max_step", "head_max_scale", "momentum", "anneal",
                   "noise_std", "max_displacement")
BPTT_FLAGS = ("random_stopping", "max_frames", "dq_weight", "force_weight", "augment_rotation", "augment_translation",
              "relaxer", "fire_fmax", "momentum", "anneal", "noise_std", "max_displacement")


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
    """``--max_frames``, ``--stop_rms``, ``--stop_fmax``, ``--remat`` and ``--compact_levels`` (0 in runs
    recorded before it existed); ``overrides`` replace any field."""
    return scan.RolloutConfig(**{"max_frames": v["max_frames"], "stop_rms": v["stop_rms"],
                                 "stop_fmax": v.get("stop_fmax", 0.0), "remat": v["remat"],
                                 "compact_levels": v.get("compact_levels", 0), **overrides})


def step_rule_settings(v: Flags, base_step: float) -> dict[str, Any]:
    """The BPTT step rule and its per-frame modifiers in their stored (checkpoint-meta) form.

    The initial step (Å²/eV) is ``--init_step``, or ``base_step`` (the best grid step) when that
    is 0, times ``--init_step_scale``; a learnable step with ``--max_step`` (Å²/eV, 0 = unbounded;
    absent from runs recorded before it existed) starts at most at that cap.
    """
    init_step, max_step = (v["init_step"] or base_step) * v["init_step_scale"], v.get("max_step", 0.0)
    return {
        "kind": v["step_kind"], "init_step": min(init_step, max_step) if max_step > 0 else init_step,
        "max_step": max_step, "head_max_scale": v["head_max_scale"], "momentum": v["momentum"], "anneal": v["anneal"],
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
        "relaxer": v.get("relaxer", "frame"), "fire": training_fire_config(v),
    }


def training_fire_config(v: Flags) -> fire.FireConfig:
    """FIRE inside BPTT (``--relaxer=fire``): ``--fire_fmax`` eV/Å and at most ``--max_frames`` steps, the one
    knob of a training rollout's length and memory (``--fire_max_steps`` is the evaluation's limit)."""
    return fire.FireConfig(fmax=v["fire_fmax"], max_steps=v["max_frames"])


GRADIENT_FLAGS = ("gradient", "unroll_frames", "implicit_null_modes", "guidance_weight", "max_frames")
TRANSLATION_INVARIANT_MODELS = ("periodic_adapt", "equivariant")


def gradient_config(v: Flags, bptt_config):
    """How BPTT fine-tuning differentiates (``--gradient``, ``--unroll_frames``, ...) around ``bptt_config``:
    an :class:`bptt_mlip.training.implicit_steps.GradientConfig`, or None for plain BPTT."""
    from bptt_mlip.relax import implicit
    from bptt_mlip.training import implicit_steps

    if v.get("gradient", "bptt") == "bptt":
        return None
    modes = v["implicit_null_modes"]
    if modes == "auto":
        modes = "translations" if v.get("model") in TRANSLATION_INVARIANT_MODELS else "none"
    return implicit_steps.GradientConfig(bptt=bptt_config, gradient=v["gradient"], unroll_frames=v["unroll_frames"],
                                         adjoint=implicit.AdjointConfig(null_modes=modes),
                                         guidance_weight=v["guidance_weight"])


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
    """FIRE of ``--fire_fmax`` (eV/Å) and ``--fire_max_steps``."""
    return fire.FireConfig(fmax=v["fire_fmax"], max_steps=v["fire_max_steps"])


DERIVABLE_FLAGS = ("stop_rms", "stop_fmax", "grid_steps", "fire_fmax")
"""Settings that, with ``--derive_settings``, come from the training data unless given as flags."""
FROM_FLAG, FROM_DEFAULT, FROM_DATA = "flag", "flag default", "derived from data"
UNITS = {"stop_rms": "Å", "stop_fmax": "eV/Å", "grid_steps": "Å²/eV", "fire_fmax": "eV/Å"}


@dataclasses.dataclass(frozen=True)
class RelaxationSettings:
    """The stopping rule, step-size grid and FIRE threshold a run uses, and where each came from.

    Attributes:
      stop_rms: RMS movement per frame below which a rollout stops (Å).
      stop_fmax: largest per-atom force below which a rollout stops (eV/Å; 0 = off).
      grid_steps: fixed step sizes of the grid search (Å²/eV).
      fire_fmax: FIRE's convergence threshold on the largest per-atom force (eV/Å).
      sources: name -> ``"flag"`` (given), ``"flag default"`` or ``"derived from data"``.
      derived: the data-derived settings and their evidence (``RelaxSettings.to_dict()``), or None.
      description: the derivation in one plain paragraph ("" when nothing was derived).
    """

    stop_rms: float
    stop_fmax: float
    grid_steps: tuple[float, ...]
    fire_fmax: float
    sources: Mapping[str, str]
    derived: Mapping[str, Any] | None = None
    description: str = ""

    def flag_values(self, v: Flags) -> dict[str, Any]:
        """The flag values ``v`` with these settings in place (``grid_steps`` as the list of strings the flag holds)."""
        return {**v, "stop_rms": self.stop_rms, "stop_fmax": self.stop_fmax, "fire_fmax": self.fire_fmax,
                "grid_steps": [repr(x) for x in self.grid_steps]}

    def lines(self) -> list[str]:
        """One line per setting: value, unit and source."""
        def shown(name):
            value = getattr(self, name)
            return ", ".join(f"{x:.4g}" for x in value) if isinstance(value, tuple) else f"{value:.4g}"

        return [f"{name} = {shown(name)} {UNITS[name]} ({self.sources[name]})" for name in DERIVABLE_FLAGS]

    def to_dict(self) -> dict[str, Any]:
        return {"stop_rms": self.stop_rms, "stop_fmax": self.stop_fmax, "grid_steps": list(self.grid_steps),
                "fire_fmax": self.fire_fmax, "sources": dict(self.sources), "derived": self.derived,
                "description": self.description}


def relaxation_settings(v: Flags, given: Iterable[str], derived=None) -> RelaxationSettings:
    """The settings a run uses: each of :data:`DERIVABLE_FLAGS` from its flag when it is in
    ``given`` (set on the command line or a flagfile) or nothing was ``derived``, else from
    ``derived`` (``bptt_mlip.data.relax_settings.RelaxSettings`` of the training split)."""
    given = set(given)
    from_flags = {"stop_rms": float(v["stop_rms"]), "stop_fmax": float(v.get("stop_fmax", 0.0)),
                  "grid_steps": tuple(float(x) for x in v["grid_steps"]), "fire_fmax": float(v["fire_fmax"])}
    values, sources = {}, {}
    for name in DERIVABLE_FLAGS:
        if name in given or derived is None:
            values[name], sources[name] = from_flags[name], FROM_FLAG if name in given else FROM_DEFAULT
        else:
            value = getattr(derived, name)
            values[name] = tuple(float(x) for x in value) if name == "grid_steps" else float(value)
            sources[name] = FROM_DATA
    return RelaxationSettings(**values, sources=sources, derived=None if derived is None else derived.to_dict(),
                              description="" if derived is None else derived.describe())


def _bptt_config(v: Flags):
    from bptt_mlip.training import steps

    return steps.BPTTConfig(modifiers=step_rule(v, base_step=1.0)[1], rollout=rollout_config(v), **bptt_settings(v))


def _checked_configs(v: Flags) -> list[tuple[tuple[str, ...], Callable[[], Any]]]:
    checks = [(ROLLOUT_FLAGS, lambda: rollout_config(v)),
              (STEP_RULE_FLAGS, lambda: step_rule(v, base_step=1.0)),
              (BPTT_FLAGS, lambda: _bptt_config(v)),
              (GRADIENT_FLAGS, lambda: gradient_config(v, _bptt_config(v)))]
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
