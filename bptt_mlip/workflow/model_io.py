"""Save and load trained models: orbax checkpoints that carry their configs, so a model can be
rebuilt in a new process without knowing how it was trained.

    model_io.save_model("runs/x/checkpoints/bptt_best", params, normalizer, model_config,
                        step_rule_meta, {"role": "bptt_best_validation"})
    config, normalizer, params, meta = model_io.load_model("runs/x")   # run or checkpoint directory

A model checkpoint is one step folder (``0/``; a save replacing an earlier, different model writes
the next step and then deletes the older one, see ``checkpoint.save_model_checkpoint``) whose
JSON meta holds ``model_kind`` (a kind of :mod:`bptt_mlip.models.registry`; checkpoints without it
hold ADAPT), ``model_config`` (the architecture), ``step_config`` (the step rule) and, when saved
with one, ``domain`` (the training domain, :class:`bptt_mlip.data.domain.Domain`). Its
``normalizer`` item holds the model's statistics (ADAPT's ``Normalizer``, the equivariant model's
``EnergyScale``) by field name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from bptt_mlip.data.domain import META_KEY as DOMAIN_META_KEY, Domain, as_domain
from bptt_mlip.models import adapt, registry
from bptt_mlip.relax import fire
from bptt_mlip.training import checkpoint
from bptt_mlip.types import Params
from bptt_mlip.workflow.report import jsonable

MODEL_CONFIG_KEY = registry.MODEL_CONFIG_KEY
MODEL_KIND_KEY = registry.MODEL_KIND_KEY
STEP_RULE_KEY = "step_config"
DOMAIN_KEY = DOMAIN_META_KEY  # the training domain (``Domain.to_dict``)
# the settings the model is meant to relax with (stop rule, frame limit, the step-size grid's result)
RELAX_SETTINGS_KEY = "relax_settings"

# Where a run directory of ``experiments.finetune`` keeps its models, best first.
RUN_MODEL_DIRS = ("checkpoints/bptt_best", "checkpoints/pretrained", "bptt_best", "pretrained")


def saved_domain(meta: dict[str, Any]) -> Domain | None:
    """The training domain saved in a checkpoint's meta, or None (a checkpoint saved without one)."""
    return as_domain(meta.get(DOMAIN_KEY) or None)


def saved_step_rule(meta: dict[str, Any]) -> dict[str, Any]:
    """The step-rule metadata saved in a checkpoint's meta (``{}`` when none was saved); turn it
    into a rule with the step-rule module's ``from_dict`` function."""
    return dict(meta.get(STEP_RULE_KEY) or {})


def saved_relax_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The relaxation settings saved in a checkpoint's meta (``{}`` when none were saved): any of
    ``stop_rms`` (Å), ``stop_fmax`` (eV/Å, 0 = off), ``max_frames``, ``fire_fmax`` (eV/Å),
    ``grid_steps`` (Å²/eV) and ``best_grid_step`` (Å²/eV, the grid step that relaxed the training data best)."""
    return dict(meta.get(RELAX_SETTINGS_KEY) or {})


FRAME_RELAX_DEFAULTS = {"max_frames": 75, "stop_rms": 1e-3, "stop_fmax": 0.0}
"""What a frame relaxation uses when neither the caller nor the checkpoint says (frames, Å, eV/Å; 0 = off)."""


def fire_settings(meta: dict[str, Any], fmax: float | None = None, max_steps: int | None = None) -> fire.FireConfig:
    """FIRE's settings with a model of checkpoint meta ``meta``: ``fmax`` (eV/Å) as given, else the ``fire_fmax``
    its training run saved (:func:`saved_relax_settings`: derived from its data, the fmax its FIRE tables used),
    else ASE's 0.05; ``max_steps`` as given, else ASE's 200; everything else ASE's defaults."""
    default = fire.FireConfig()
    saved = saved_relax_settings(meta).get("fire_fmax")
    fmax = fmax if fmax is not None else (saved if saved is not None else default.fmax)
    return fire.FireConfig(fmax=float(fmax), max_steps=int(max_steps if max_steps is not None else default.max_steps))


def frame_stop_rule(meta: dict[str, Any], max_frames: int | None = None, stop_rms: float | None = None,
                    stop_fmax: float | None = None) -> tuple[int, float, float]:
    """``(max_frames, stop_rms Å, stop_fmax eV/Å)`` of a frame relaxation with a model of checkpoint meta
    ``meta``: each value given, else the one its training run saved (:func:`saved_relax_settings`), else
    :data:`FRAME_RELAX_DEFAULTS`."""
    saved = {**FRAME_RELAX_DEFAULTS, **{k: v for k, v in saved_relax_settings(meta).items() if v is not None}}
    given = {"max_frames": max_frames, "stop_rms": stop_rms, "stop_fmax": stop_fmax}
    value = {k: saved[k] if v is None else v for k, v in given.items()}
    return int(value["max_frames"]), float(value["stop_rms"]), float(value["stop_fmax"])


def save_model(
    directory: str | os.PathLike,
    params: Params,
    normalizer: Any,
    model_config: Any,
    step_rule_meta: dict[str, Any],
    extra_meta: dict[str, Any] | None = None,
    *,
    domain: "Domain | dict | None" = None,
) -> Path:
    """Save an evaluation-ready model as an orbax checkpoint in ``directory`` (step 0; an identical
    earlier save is kept, a different one replaced safely, see ``checkpoint.save_model_checkpoint``).

    ``params`` is ``{"model": model parameters, <step group>: step-rule parameters}`` (the step group may be
    ``{}``). ``normalizer`` is the model's statistics and ``model_config`` the config of any registered kind
    (:mod:`bptt_mlip.models.registry`; the kind is recorded). ``step_rule_meta`` is the step rule as the step-rule
    module's ``to_dict`` function writes it (read back with :func:`saved_step_rule`). The meta holds the model kind
    and config, the step rule and ``extra_meta`` (made JSON-friendly: numpy numbers become Python numbers,
    non-finite floats strings). ``domain`` (:class:`bptt_mlip.data.domain.Domain` of the training set, or its
    dict) is stored under meta key ``"domain"`` and read back as ``TrainedModel.domain`` / :func:`saved_domain`.
    Returns the step folder written.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from bptt_mlip.training import steps

    # a model checkpoint holds a TrainState like a training checkpoint, with an empty optimiser state
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optax.identity().init(params),
                             key=jax.random.PRNGKey(0))
    meta = {
        **registry.config_to_dict(registry.kind_of(model_config), model_config),
        STEP_RULE_KEY: jsonable(dict(step_rule_meta)),
        **jsonable(extra_meta or {}),
    }
    if domain is not None:
        meta[DOMAIN_KEY] = jsonable(as_domain(domain).to_dict())
    return checkpoint.save_model_checkpoint(directory, state, normalizer, meta)


def load_model(
    path: str | os.PathLike, step: int | None = None
) -> tuple[Any, Any, Params, dict[str, Any]]:
    """``(model_config, normalizer, params, meta)`` of any registered model kind from a model checkpoint or a run
    directory (see :func:`resolve_checkpoint_dir`); ``params`` is the saved pytree, ``{"model": ..., <step group>:
    ...}``, with a step group saved empty given back as ``{}``. Raises FileNotFoundError naming a path that holds no
    checkpoint and ValueError for a checkpoint whose meta has no model config.
    """
    directory = resolve_checkpoint_dir(path)
    saved, normalizer, meta = restore_model(directory, step)
    if MODEL_CONFIG_KEY not in meta:
        raise ValueError(
            f"checkpoint {str(directory)!r} has no {MODEL_CONFIG_KEY!r} in its meta; cannot rebuild the model "
            "(was it written by bptt-mlip's model_io.save_model?)"
        )
    _, config = registry.config_from_dict(meta)
    params = {group: ({} if tree is None else tree) for group, tree in saved.items()}
    return config, normalizer, params, dict(meta)


def restore_model(
    directory: str | os.PathLike, step: int | None = None
) -> tuple[dict[str, Any], Any, dict]:
    """Restore ``(params, normalizer, meta)`` without knowing the training set-up; ``normalizer``
    is the statistics of the kind the meta names (ADAPT's ``Normalizer`` when it names none).

    ``params`` is ``{"model": ..., "step_rule": ...}``; checkpoints written before the step rule
    had its own name store the step parameters under ``"step"``, which is renamed here.
    """
    mngr = checkpoint.manager(directory, None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    out = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    mngr.close()
    model = jax.tree_util.tree_map(jnp.asarray, out["model"])
    params = dict(model["params"])
    if "step" in params and "step_rule" not in params:
        params["step_rule"] = params.pop("step")
    params["step_rule"] = params.get("step_rule") or {}
    meta = out["meta"]
    kind = meta.get(MODEL_KIND_KEY) or registry.DEFAULT_KIND
    return params, registry.statistics_from_arrays(kind, model["normalizer"]), meta


def adapt_config_from_dict(d: dict[str, Any]) -> adapt.AdaptConfig:
    """An :class:`~bptt_mlip.models.adapt.AdaptConfig` from its saved dict (lists become tuples;
    fields added since the checkpoint was written take their defaults)."""
    return adapt.AdaptConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The orbax checkpoint directory for ``path``.

    ``path`` may be a checkpoint directory (``.../checkpoints/bptt_best``, holding step folders
    such as ``0/``) or a run directory of ``experiments.finetune`` (then ``checkpoints/bptt_best``
    is used, else ``checkpoints/pretrained``). Raises FileNotFoundError naming the path; never
    creates it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} is not a directory")
    if has_model_steps(p):
        return p
    for sub in RUN_MODEL_DIRS:
        if has_model_steps(p / sub):
            return p / sub
    raise FileNotFoundError(
        f"no model checkpoint in {str(p)!r}: expected step folders (e.g. '0/') written by "
        "bptt_mlip.workflow.model_io.save_model, or a run directory with checkpoints/bptt_best or "
        "checkpoints/pretrained"
    )


def has_model_steps(directory: Path) -> bool:
    """True when ``directory`` holds at least one step folder with a saved model."""
    return directory.is_dir() and any(
        c.is_dir() and c.name.isdigit() and (c / "model").exists() for c in directory.iterdir()
    )
