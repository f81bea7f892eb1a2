"""The force models a checkpoint, the command line or an experiment script can name, by kind.

    kind = registry.kind_of(config)                       # "adapt" or "equivariant"
    force_fn = registry.make_force_fn(config, statistics)
    meta.update(registry.config_to_dict(kind, config))    # {"model_kind": ..., "model_config": {...}}
    kind, config = registry.config_from_dict(meta)        # a meta without "model_kind" holds ADAPT

Each kind brings its config class, its standardisation statistics (ADAPT's
:class:`~bptt_mlip.models.adapt.Normalizer`, the equivariant model's
:class:`~bptt_mlip.models.equivariant.EnergyScale`; both are dataclass pytrees of arrays, saved by
name in a checkpoint's ``normalizer`` item) and its builders. ``"adapt"`` covers the published
model and the periodic ADAPT (``AdaptConfig(geometry="minimum_image")``); ``"equivariant"`` is the
conservative energy model, the only kind with an energy.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip.models import adapt, equivariant
from bptt_mlip.types import ForceFn, Params, TrainForceFn

if TYPE_CHECKING:
    from bptt_mlip.data.trajectory import Trajectory

MODEL_KIND_KEY = "model_kind"
MODEL_CONFIG_KEY = "model_config"
DEFAULT_KIND = "adapt"
"""What a checkpoint whose meta names no model kind holds (everything saved before there was a choice)."""


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One force model as the registry knows it.

    Attributes:
      name: the kind's name (``"adapt"``, ``"equivariant"``).
      config_class: its frozen config dataclass.
      statistics_class: its standardisation statistics (a dataclass pytree of float arrays).
      init_params: ``(config, key, max_atoms) -> params``.
      make_force_fn: ``(config, statistics) -> force_fn(params, structures) -> [B, N, 3]`` eV/Å.
      make_train_force_fn: ``(config, statistics) -> force_fn(params, structures, key)`` (dropout key).
      fit_statistics: ``(trajectories) -> statistics`` fitted on training trajectories (every frame).
      fit_config: ``(config, trajectories) -> config`` adjusted to the data before training (the
        equivariant model's periodic images and neighbour capacity); raises ValueError for data
        the model cannot run.
      make_energy_force_fn: ``(config, statistics) -> fn(params, structures) -> (energies [B] eV,
        forces [B, N, 3] eV/Å)``, or None for a model that predicts forces directly.
    """

    name: str
    config_class: type
    statistics_class: type
    init_params: Callable[..., Params]
    make_force_fn: Callable[[Any, Any], ForceFn]
    make_train_force_fn: Callable[[Any, Any], TrainForceFn]
    fit_statistics: Callable[[Sequence["Trajectory"]], Any]
    fit_config: Callable[[Any, Sequence["Trajectory"]], Any]
    make_energy_force_fn: Callable[[Any, Any], Callable] | None = None

    @property
    def has_energy(self) -> bool:
        return self.make_energy_force_fn is not None


def _equivariant_builder(make: Callable) -> Callable:
    """``make(config, scale)`` taking any statistics :func:`equivariant.as_energy_scale` accepts."""
    return lambda config, statistics: make(config, equivariant.as_energy_scale(statistics))


def energy_scale_from_trajectories(trajs: Sequence["Trajectory"]) -> equivariant.EnergyScale:
    """:func:`equivariant.fit_energy_scale` over every frame of ``trajs`` (padded to the largest
    atom count); energies are used for the element offsets only when every frame has a finite one."""
    if not trajs:
        raise ValueError("no training trajectories to fit the energy scale on")
    n = max(t.num_atoms for t in trajs)
    species, forces, mask, energies = [], [], [], []
    for t in trajs:
        if t.forces is None:
            raise ValueError(f"{t.where()}: no forces; the energy scale needs them")
        pad = n - t.num_atoms
        species.append(np.broadcast_to(np.pad(t.species, (0, pad)), (t.num_frames, n)))
        forces.append(np.pad(t.forces, ((0, 0), (0, pad), (0, 0))))
        mask.append(np.broadcast_to(np.arange(n) < t.num_atoms, (t.num_frames, n)))
        energies.append(np.full(t.num_frames, np.nan) if t.energies is None else np.asarray(t.energies, np.float64))
    energies = np.concatenate(energies)
    return equivariant.fit_energy_scale(np.concatenate(species), np.concatenate(forces), np.concatenate(mask),
                                        energies if np.all(np.isfinite(energies)) else None)


def fit_equivariant_neighbours(config: equivariant.EquivariantConfig, trajs: Sequence["Trajectory"],
                               batch_size: int = 32) -> equivariant.EquivariantConfig:
    """``config`` with the periodic image shifts that every training cell needs at its cutoff and
    the smallest neighbour capacity holding every frame of ``trajs`` (plus the margin of
    :func:`equivariant.choose_capacity`)."""
    from bptt_mlip.data import batching

    batches = [b.structures for b in batching.force_batches(trajs, batch_size)]
    cells = np.concatenate([np.asarray(b.cell) for b in batches]) if batches else np.zeros((0, 3, 3))
    fitted = equivariant.choose_capacity(equivariant.choose_periodic_images(config, cells), batches)
    for i, structures in enumerate(batches):
        equivariant.check_structures(fitted, structures, where=f"training frames (batch {i})")
    return fitted


KINDS: dict[str, ModelKind] = {
    "adapt": ModelKind("adapt", adapt.AdaptConfig, adapt.Normalizer, adapt.init_params, adapt.make_force_fn,
                       adapt.make_train_force_fn, adapt.normalizer_from_trajectories, lambda config, trajs: config),
    "equivariant": ModelKind(
        "equivariant", equivariant.EquivariantConfig, equivariant.EnergyScale, equivariant.init_params,
        _equivariant_builder(equivariant.make_force_fn), _equivariant_builder(equivariant.make_train_force_fn),
        energy_scale_from_trajectories, fit_equivariant_neighbours,
        _equivariant_builder(equivariant.make_energy_force_fn)),
}


def get(kind: str) -> ModelKind:
    """The registered kind ``kind``; ValueError naming the known kinds otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {sorted(KINDS)}")
    return KINDS[kind]


def covering_cells(config: Any, cells) -> Any:
    """``config`` able to run structures of these cells (an iterable of [3, 3] lattices, Å): the
    equivariant model's neighbour search widened to the periodic images they need (its parameters
    and its function of the positions unchanged); other kinds' configs as they are."""
    if isinstance(config, equivariant.EquivariantConfig):
        return equivariant.choose_periodic_images(config, cells)
    return config


def kind_of(config: Any) -> str:
    """The kind whose config class ``config`` is an instance of."""
    for name, kind in KINDS.items():
        if isinstance(config, kind.config_class):
            return name
    raise TypeError(f"no registered model kind has config class {type(config).__name__}")


def make_force_fn(config: Any, statistics: Any) -> ForceFn:
    """``force_fn(params, structures) -> [B, N, 3]`` eV/Å of whichever model ``config`` describes."""
    return get(kind_of(config)).make_force_fn(config, statistics)


def make_train_force_fn(config: Any, statistics: Any) -> TrainForceFn:
    """``force_fn(params, structures, key)`` (dropout active where the model has it)."""
    return get(kind_of(config)).make_train_force_fn(config, statistics)


def make_energy_force_fn(config: Any, statistics: Any) -> Callable | None:
    """``fn(params, structures) -> (energies [B] eV, forces [B, N, 3] eV/Å)``; None for direct-force models."""
    kind = get(kind_of(config))
    return kind.make_energy_force_fn(config, statistics) if kind.has_energy else None


def fit_statistics(config: Any, trajs: Sequence["Trajectory"]) -> Any:
    """The statistics of ``config``'s kind fitted on every frame of the training trajectories."""
    return get(kind_of(config)).fit_statistics(trajs)


def fit_config(config: Any, trajs: Sequence["Trajectory"]) -> Any:
    """``config`` adjusted to the training data (the equivariant model's periodic images and
    neighbour capacity)."""
    return get(kind_of(config)).fit_config(config, trajs)


def init_params(config: Any, key: jax.Array, max_atoms: int = 8) -> Params:
    return get(kind_of(config)).init_params(config, key, max_atoms)


def config_to_dict(kind: str, config: Any) -> dict[str, Any]:
    """``{"model_kind": kind, "model_config": fields}`` (JSON-friendly: tuples become lists), the
    part of a checkpoint's meta that names the model."""
    if not isinstance(config, get(kind).config_class):
        raise TypeError(f"model kind {kind!r} expects a {get(kind).config_class.__name__}, got {type(config).__name__}")
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    return {MODEL_KIND_KEY: kind, MODEL_CONFIG_KEY: fields}


def config_from_dict(d: dict[str, Any]) -> tuple[str, Any]:
    """``(kind, config)`` from a dict :func:`config_to_dict` wrote (or a checkpoint meta holding it).

    A dict without ``"model_kind"`` holds ADAPT. Lists become tuples; fields added to a config
    since it was saved take their defaults. KeyError if there is no ``"model_config"``.
    """
    kind = d.get(MODEL_KIND_KEY) or DEFAULT_KIND
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d[MODEL_CONFIG_KEY].items()}
    return kind, get(kind).config_class(**fields)


def statistics_from_arrays(kind: str, arrays: dict[str, Any]) -> Any:
    """A kind's statistics from their saved arrays (the dataclass fields by name), as float32."""
    return get(kind).statistics_class(**{k: jnp.asarray(np.asarray(v), jnp.float32) for k, v in arrays.items()})


def step_head_statistics(statistics: Any) -> adapt.Normalizer | None:
    """The statistics a neural step head standardises with: ADAPT's :class:`Normalizer`, or None
    (the identity map) for a model with other statistics."""
    return statistics if isinstance(statistics, adapt.Normalizer) else None


def count_params(params: Params) -> int:
    """Number of scalar parameters of any model."""
    return adapt.count_params(params)
