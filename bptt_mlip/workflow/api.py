"""Use a trained model in a materials workflow: load a checkpoint, relax ASE / pymatgen structures.

    from bptt_mlip.workflow.api import TrainedModel, relax_structures
    model = TrainedModel.load("runs/si_cpu/checkpoints/bptt_best")   # or the run directory
    out = relax_structures([atoms, structure], model)                 # ASE Atoms and pymatgen Structures
    out.structures[0], out.num_frames, out.converged, out.max_force

Structures of any size and kind may be mixed in one call. They are grouped by atom-count bucket
(:mod:`bptt_mlip.workflow.buckets`) and relaxed in padded, jitted batches whose stopped rows take the next
waiting structure (in flight), so a bucket compiles once per batch shape (see :func:`relax_structures` for the
row count). Results come back in the input order and as the input kinds (copies; inputs are not modified).

Two relaxation methods: ``"frame"``, the model's own map ``X <- X + eta F(X)`` (the rollout BPTT
trained) with the step rule, momentum, annealing and displacement cap saved in the checkpoint, stopping
when a frame's RMS movement is below ``stop_rms`` Å (``converged``) or after ``max_frames`` frames; and
``"fire"``, FIRE with ASE's semantics (:mod:`bptt_mlip.relax.fire`), stopping when the largest per-atom
force is below ``fire_config.fmax`` eV/Å. Any force model works: pass ``force_fn(params, structures) ->
[B, N, 3]`` and its ``params`` instead of a :class:`TrainedModel`.

Never silently wrong: structures outside the model's training domain (``TrainedModel.domain``: elements,
atom counts, cells it was trained on) raise an :class:`~bptt_mlip.data.domain.OutOfDomainWarning` before
relaxing (``on_out_of_domain="warn"``, the default; ``"error"`` refuses them, ``"ignore"`` checks nothing),
and a relaxation whose end point is unphysical (two atoms in contact, an atom moved more than 5 Å,
non-finite positions: :func:`bptt_mlip.relax.runaway.end_point_runaways`) is reported ``diverged``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import compile_cache
from bptt_mlip import structures as structures_lib
from bptt_mlip.relax import fire
from bptt_mlip.models import registry
from bptt_mlip.relax.scan import FrameModifiers, RolloutConfig, rollout
from bptt_mlip.relax.step_rules import FixedStep, StepRule, step_rule_from_checkpoint

from bptt_mlip.data import domain as domain_lib
from bptt_mlip.data.batching import DEFAULT_BUCKETS
from bptt_mlip.relax import runaway
from bptt_mlip.types import ForceFn, Params
from bptt_mlip.workflow import buckets as buckets_lib
from bptt_mlip.workflow import inflight
from bptt_mlip.workflow import model_io
from bptt_mlip.workflow.model_io import resolve_checkpoint_dir  # noqa: F401  (public here too)

METHODS = ("frame", "fire")


# --------------------------------------------------------------------------- the trained model


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained force model ready to relax structures: any kind of :mod:`bptt_mlip.models.registry`
    (ADAPT, periodic ADAPT, the equivariant energy model), told apart by its config's class.

    Attributes:
      config: the architecture (an ``AdaptConfig`` or an ``EquivariantConfig``).
      normalizer: the model's training-set statistics (ADAPT's ``Normalizer``, the equivariant
        model's ``EnergyScale``).
      params: ``{"model": model parameters, "step_rule": step-rule parameters}`` (``step_rule`` may
        be empty for a pretrained-only checkpoint; then the rule's initial step size is used).
      step_rule: the step rule the model was fine-tuned with (fixed, learnable, neural head).
      modifiers: the frame's momentum, annealing and displacement cap it was fine-tuned with.
      meta: the checkpoint's JSON metadata (empty for an in-memory model); its ``"domain"`` is :attr:`domain`.
      source: the checkpoint directory it was loaded from, or ``None``.
    """

    config: Any
    normalizer: Any
    params: Params
    step_rule: StepRule = FixedStep()
    modifiers: FrameModifiers = FrameModifiers()
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    source: str | None = None

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike, step: int | None = None) -> "TrainedModel":
        """Load a checkpoint written by :func:`bptt_mlip.workflow.model_io.save_model` (a run
        directory works too, see :func:`~bptt_mlip.workflow.model_io.resolve_checkpoint_dir`); the
        model kind is the one the checkpoint records."""
        directory = resolve_checkpoint_dir(checkpoint_dir)
        config, normalizer, params, meta = model_io.load_model(directory, step)
        rule, modifiers, step_params = step_rule_from_checkpoint(model_io.saved_step_rule(meta),
                                                                 params.get("step_rule"),
                                                                 registry.step_head_statistics(normalizer))
        params = {"model": params["model"], "step_rule": step_params}
        return cls(config, normalizer, params, rule, modifiers, dict(meta), str(directory))

    @functools.cached_property
    def force_fn(self) -> ForceFn:
        """``force_fn(model_params, structures) -> [B, N, 3]`` eV/Å (one object per model, so jit caches hit)."""
        return registry.make_force_fn(self.config, self.normalizer)

    @functools.cached_property
    def domain(self) -> domain_lib.Domain | None:
        """The training domain saved with the model (None for a model saved without one)."""
        return model_io.saved_domain(self.meta)

    @property
    def kind(self) -> str:
        """The model kind (``"adapt"``, ``"equivariant"``)."""
        return registry.kind_of(self.config)

    @functools.cached_property
    def energy_force_fn(self) -> Callable | None:
        """``fn(model_params, structures) -> (energies [B] eV, forces [B, N, 3] eV/Å)`` for an energy
        model; None for a model that predicts forces directly."""
        return registry.make_energy_force_fn(self.config, self.normalizer)

    @property
    def model_params(self) -> Params:
        return self.params["model"]

    def step_description(self) -> str:
        """The step rule in words, e.g. ``"learnable, eta = 0.0412 Å²/eV"``."""
        step_params = self.params.get("step_rule") or {}
        if self.step_rule.trainable and not step_params:
            return (f"{self.step_rule.kind} (no parameters saved: fixed {self.step_rule.init_step:g} Å²/eV, "
                    "the rule's initial step size, used)")
        return self.step_rule.describe(step_params)

    def scalar_step_size(self) -> float | None:
        """The one step (Å²/eV) relaxations use: the saved or learned eta (capped where capped), the
        initial step of a trainable rule saved without parameters, None for a per-structure head."""
        step_params = self.params.get("step_rule") or {}
        if self.step_rule.trainable and not step_params:
            return float(self.step_rule.init_step)
        eta = self.step_rule.scalar_step_size(step_params)
        return None if eta is None else float(eta)

    def num_params(self) -> int:
        return registry.count_params(self.params["model"])

    def covering(self, cells) -> "TrainedModel":
        """This model able to run structures of ``cells`` ([3, 3] lattices, Å, or None): itself, or with
        the neighbour search widened to the periodic images they need (:func:`registry.covering_cells`)."""
        config = registry.covering_cells(self.config, [np.zeros((3, 3)) if c is None else c for c in cells])
        return self if config == self.config else dataclasses.replace(self, config=config)


def _inference_rule(model: TrainedModel | None, step_size: float | None) -> tuple[StepRule, FrameModifiers, Params]:
    """(step rule, frame modifiers with the noise off, step-rule parameters) for inference. A scalar
    step size (given, saved as a fixed rule, or learned: :meth:`TrainedModel.scalar_step_size`) runs as
    a fixed rule whose step size is the traced parameter ``eta``, so changing it does not recompile."""
    if step_size is not None:
        modifiers = model.modifiers if model is not None else FrameModifiers()
        return FixedStep(), dataclasses.replace(modifiers, noise_std=0.0), {"eta": jnp.float32(step_size)}
    if model is None:
        raise ValueError("relax(method='frame') with a plain force_fn needs step_size= (Å²/eV)")
    modifiers = dataclasses.replace(model.modifiers, noise_std=0.0)
    eta = model.scalar_step_size()
    if eta is None:
        return model.step_rule, modifiers, model.params.get("step_rule") or {}
    return FixedStep(), modifiers, {"eta": jnp.asarray(eta, jnp.float32)}


# --------------------------------------------------------------------------- jitted runners (cached)


@functools.lru_cache(maxsize=64)
def _frame_runner(force_fn, step_rule, modifiers, rollout_config):
    def run(params, s, stop_rms):  # stop_rms traced: changing it does not recompile
        res = rollout(force_fn, step_rule, params, s, modifiers, rollout_config, stop_rms=stop_rms)
        forces = force_fn(params["model"], s.replace(positions=res.positions))
        return res, fire.max_force(forces, s.mask)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def jitted_forces(force_fn) -> Callable:
    """``jax.jit(force_fn)``, one per force function (used by the ASE calculator)."""
    return jax.jit(force_fn)


# --------------------------------------------------------------------------- relax


@dataclasses.dataclass
class RelaxOutput:
    """What :func:`relax_structures` returns (per-structure arrays in input order).

    Attributes:
      structures: relaxed copies, same kinds as the inputs (ASE ``Atoms`` keep cell, pbc, info and
        constraints; pymatgen objects keep lattice, species and site properties).
      num_frames: [n] int frames applied (``"frame"``) or FIRE steps taken (``"fire"``).
      converged: [n] bool: ``"frame"``: the RMS movement of a frame fell below ``stop_rms`` or the
        largest force below ``stop_fmax``;
        ``"fire"``: the largest per-atom force fell below ``fmax``.
      diverged: [n] bool: a frame was non-finite or moved an atom farther than 5 Å (the structure
        is returned at its last good frame), or the end point is a runaway (two atoms in contact, an
        atom moved farther than ``max_total_displacement``, non-finite: ``relax.runaway``; for FIRE
        too), so an unphysical end point never counts as a relaxed structure (nor as ``converged``).
      max_force: [n] largest per-atom force norm (eV/Å) of the model at the returned positions.
      trajectories: with ``return_trajectory``, per structure a [frames + 1, n_atoms, 3] array
        (start, then the positions after each frame / FIRE step); else None.
      method: ``"frame"`` or ``"fire"``.
      domain_problems: per structure, how it lies outside the model's training domain (empty lists
        when inside, when the model has no domain, or with ``on_out_of_domain="ignore"``).
      work: counts of what was computed (:mod:`bptt_mlip.workflow.buckets`): ``batch_calls``, ``batch_frames``,
        ``slot_frames`` (structure-frames), ``frames_needed``, ``compiled_shapes`` (so far, for these settings).
    """

    structures: list
    num_frames: np.ndarray
    converged: np.ndarray
    diverged: np.ndarray
    max_force: np.ndarray
    trajectories: list | None
    method: str
    domain_problems: list = dataclasses.field(default_factory=list)
    work: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.structures)

    @property
    def structure(self):
        """The relaxed structure when exactly one was given."""
        if len(self.structures) != 1:
            raise ValueError(f"{len(self.structures)} structures were relaxed; use .structures")
        return self.structures[0]


def resolve_model(
    model: TrainedModel | ForceFn, params: Params | None = None, *, caller: str = "relax_structures"
) -> tuple[ForceFn, Params, TrainedModel | None]:
    """(force_fn, ``{"model": ..., "step_rule": ...}`` parameters, the :class:`TrainedModel` or None) of
    either a :class:`TrainedModel` (then ``params`` must be None) or a plain
    ``force_fn(params, structures) -> [B, N, 3]`` eV/Å with its ``params``. ``caller`` names the
    function in the error messages."""
    if isinstance(model, TrainedModel):
        if params is not None:
            raise ValueError(f"{caller}: pass params only with a plain force_fn, not with a TrainedModel")
        return model.force_fn, model.params, model
    if callable(model):
        if params is None:
            raise ValueError(f"{caller} with a plain force_fn needs params=")
        return model, {"model": params, "step_rule": {}}, None
    raise TypeError(f"model must be a TrainedModel or a force_fn(params, structures), got {type(model).__name__}")


def _structure_list(structures) -> list:
    """One ASE / pymatgen object or a sequence of them as a list; warns about ignored ASE constraints."""
    objs = [structures] if structures_lib.is_atoms_like(structures) else list(structures)
    for i, o in enumerate(objs):
        if not structures_lib.is_atoms_like(o):
            raise TypeError(
                f"structure {i}: expected an ase.Atoms or a pymatgen Structure/Molecule, got {type(o).__name__}")
        if getattr(o, "constraints", None):
            warnings.warn(f"structure {i}: ASE constraints are ignored by relax_structures (every atom moves)")
    return objs


def relax_structures(
    structures,
    model: TrainedModel | Callable,
    *,
    params: Params | None = None,
    method: str = "frame",
    step_size: float | None = None,
    max_frames: int | None = None,
    stop_rms: float | None = None,
    stop_fmax: float | None = None,
    fire_config: fire.FireConfig | None = None,
    batch_size: int = 16,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    return_trajectory: bool = False,
    divergence_displacement: float = 5.0,
    max_total_displacement: float = runaway.MAX_TOTAL_DISPLACEMENT,
    on_out_of_domain: str = "warn",
    domain: domain_lib.Domain | None = None,
    in_flight: bool | None = None,
    progress: bool | None = None,
) -> RelaxOutput:
    """Relax one or many ASE ``Atoms`` / pymatgen ``Structure`` objects with a trained model.

    Args:
      structures: one object or a sequence (kinds and sizes may be mixed). Fixed cell; positions
        are not wrapped into the cell. ASE constraints are not applied (a warning says so).
      model: a :class:`TrainedModel`, or any ``force_fn(params, structures) -> [B, N, 3]`` (then
        pass ``params``, and ``step_size`` for ``method="frame"``).
      params: the force function's parameters (only with a plain ``force_fn``).
      method: ``"frame"`` (the model's BPTT relaxation map) or ``"fire"`` (FIRE, ASE semantics).
      step_size: ``"frame"`` only: a fixed eta (Å²/eV) overriding the model's saved step rule
        (default: the learned / fixed step of the checkpoint; its momentum, annealing and
        displacement cap are kept).
      max_frames, stop_rms: ``"frame"`` only: most frames, and the RMS-movement stop (Å).
      stop_fmax: ``"frame"`` only: also stop a structure once its largest per-atom force is below
        this (eV/Å, checked before each frame as ASE's ``fmax``; 0 = off). None (these three): the
        value the model's training run saved, else 75, 1e-3 Å, 0 (``model_io.frame_stop_rule``).
      fire_config: ``"fire"`` only: :class:`bptt_mlip.relax.fire.FireConfig`. None: ASE's defaults (at
        most 200 steps) with the fmax the model's training run saved (its ``fire_fmax``), else ASE's 0.05
        eV/Å (``model_io.fire_settings``; the CLI's ``relax --method=fire`` uses the same).
      batch_size: most structures per compiled call. A bucket with fewer structures than this is
        padded to the next power of two rows, so a bucket compiles at most
        ``log2(batch_size) + 1`` shapes (one for repeated calls of the same size mix).
      buckets: atom-count buckets (padding sizes).
      return_trajectory: also return every frame of every structure.
      divergence_displacement: ``"frame"`` only: a frame moving an atom farther than this (Å)
        marks the structure diverged.
      max_total_displacement: an atom ending farther than this (Å) from its start marks the structure
        diverged, as do two atoms closer than half their covalent radii sum (both methods).
      on_out_of_domain: structures outside the model's training domain (``domain``, default the
        model's :attr:`TrainedModel.domain`): ``"warn"`` (an ``OutOfDomainWarning`` listing them; the
        default: relaxing them may still be what you want), ``"error"`` (``OutOfDomainError``, nothing
        relaxed) or ``"ignore"``. Models saved without a domain are not checked.
      in_flight: refill a bucket's batch rows as structures stop (:func:`~bptt_mlip.workflow.buckets.relax_in_flight`:
        a call costs about the mean, not the slowest, frames per batch), each structure ending as relaxed alone
        (positions to float32 rounding; FIRE stops a structure at non-finite positions). False: fixed batches run
        to their slowest member. None (default): in flight unless ``return_trajectory``.
      progress: a bar of structures done (in flight); None: shown for more structures than ``batch_size``.

    Compiled programs go to JAX's persistent compilation cache unless this process chose its own
    (:func:`bptt_mlip.compile_cache.enable_unless_configured`; ``BPTT_MLIP_CACHE_DIR=off`` disables it).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    compile_cache.enable_unless_configured()
    objs = _structure_list(structures)
    if isinstance(model, TrainedModel):
        model = model.covering([structures_lib.atoms_arrays(o)[2] for o in objs])
    force_fn, full_params, trained = resolve_model(model, params)
    domain = domain if domain is not None else (trained.domain if trained is not None else None)
    problems = domain_lib.screen(domain, objs, on_out_of_domain)

    if method == "frame":
        run_batch, engine = _frame_method(force_fn, full_params, trained, step_size, max_frames, stop_rms, stop_fmax,
                                          divergence_displacement, return_trajectory)
    else:
        if step_size is not None:
            raise ValueError("step_size applies to method='frame'; FIRE uses fire_config (dt, maxstep)")
        if fire_config is None:
            fire_config = model_io.fire_settings(trained.meta if trained else {})
        run_batch, engine = _fire_method(force_fn, full_params, fire_config, return_trajectory)
    in_flight = not return_trajectory if in_flight is None else bool(in_flight)
    if in_flight and return_trajectory:
        raise ValueError("return_trajectory needs in_flight=False (trajectories come from fixed batches)")
    work: dict = {}
    if in_flight:
        show = len(objs) > batch_size if progress is None else bool(progress)
        out = buckets_lib.relax_in_flight(objs, engine, batch_size, buckets, float(max_total_displacement),
                                          progress=show, work=work)
        work["compiled_shapes"] = engine.compiled_shapes()
    else:
        out = buckets_lib.relax_in_buckets(objs, run_batch, batch_size, buckets, bool(return_trajectory),
                                           float(max_total_displacement), work=work)
        work["compiled_shapes"] = run_batch.runner._cache_size()
    return RelaxOutput(**out, method=method, domain_problems=problems, work=work)


def _frame_method(force_fn, full_params, trained, step_size, max_frames, stop_rms, stop_fmax,
                  divergence_displacement, return_trajectory) -> tuple[Callable, inflight.FrameEngine]:
    """(fixed-batch ``run_batch``, in-flight engine) of :func:`relax_structures` with ``method="frame"``."""
    step_rule, modifiers, step_params = _inference_rule(trained, step_size)
    run_params = {"model": full_params["model"], "step_rule": step_params}
    max_frames, stop_rms, stop_fmax = model_io.frame_stop_rule(trained.meta if trained else {}, max_frames,
                                                                stop_rms, stop_fmax)
    rollout_cfg = RolloutConfig(
        max_frames=int(max_frames), stop_fmax=float(stop_fmax), remat="none",
        divergence_displacement=float(divergence_displacement), return_trajectory=bool(return_trajectory),
    )
    runner = _frame_runner(force_fn, step_rule, modifiers, rollout_cfg)
    stop = jnp.asarray(stop_rms, jnp.float32)  # traced: changing it does not recompile

    def run_batch(batch):
        res, fmax = runner(run_params, batch, stop)
        return res.positions, res.num_frames, res.converged, res.diverged, fmax, res.trajectory

    run_batch.runner = runner
    engine_cfg = dataclasses.replace(rollout_cfg, return_trajectory=False)  # one compile with or without
    return run_batch, inflight.FrameEngine(force_fn, step_rule, modifiers, engine_cfg, run_params, float(stop_rms))


def _fire_method(force_fn, full_params, fire_config, return_trajectory) -> tuple[Callable, inflight.FireEngine]:
    """(fixed-batch ``run_batch``, in-flight engine) of :func:`relax_structures` with ``method="fire"``."""
    runner = fire.make_fire_runner(force_fn, fire_config, bool(return_trajectory))

    def run_batch(batch):
        end = runner(full_params["model"], batch)
        state = end.state
        return state.positions, state.num_frames, state.converged, end.diverged, end.max_force, end.trajectory

    run_batch.runner = runner
    return run_batch, inflight.FireEngine(force_fn, fire_config, full_params["model"])


# ``bptt_mlip.workflow.api.relax`` as the quickstart shows it
relax = relax_structures
