"""Use a trained model in a materials workflow: load a checkpoint, relax ASE / pymatgen structures.

    from bptt_mlip.workflow.api import TrainedModel, relax
    model = TrainedModel.load("runs/si_cpu/checkpoints/bptt_best")   # or the run directory
    out = relax([atoms, structure], model)                            # ASE Atoms and pymatgen Structures
    out.structures[0], out.num_frames, out.converged, out.max_force

Structures of any size and kind may be mixed in one call. They are grouped by atom-count bucket
(:func:`bptt_mlip.data.batching.bucket_atoms`) and relaxed in padded, jitted batches, so a
bucket compiles once per batch shape (see :func:`relax` for the row count). Results come back in
the input order and as the input kinds (copies; the inputs are not modified).

Two relaxation methods:

* ``"frame"``: the model's own relaxation map ``X <- X + eta F(X)`` (the rollout BPTT trained),
  with the step rule saved in the checkpoint (fixed, learned scalar or neural step head), its
  momentum / annealing / displacement cap, stopping when the RMS movement of a frame is below
  ``stop_rms`` Å (``converged``) or after ``max_frames`` frames.
* ``"fire"``: FIRE with ASE's semantics (:mod:`bptt_mlip.fire`), stopping when the largest
  per-atom force is below ``fire_config.fmax`` eV/Å.

Any force model works: pass ``force_fn(params, structures) -> [B, N, 3]`` and its ``params``
instead of a :class:`TrainedModel`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import structures as structures_lib
from bptt_mlip.training import checkpoint
from bptt_mlip.relax import fire
from bptt_mlip.models import adapt as model_lib
from bptt_mlip.relax.scan import RolloutConfig, StepConfig, StepSizeFn, make_step_size_fn, rollout

# (the relax *module* is imported by name, not as ``bptt_mlip.relax``: the package may export this
# module's ``relax`` function under a name that would shadow the submodule attribute)
from bptt_mlip.data.batching import DEFAULT_BUCKETS, bucket_atoms
from bptt_mlip.types import ForceFn, Params

METHODS = ("frame", "fire")


# --------------------------------------------------------------------------- the trained model


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The orbax checkpoint directory for ``path``.

    ``path`` may be a checkpoint directory (``.../checkpoints/bptt_best``, holding step folders
    such as ``0/``) or a run directory of ``experiments.finetune`` (then ``checkpoints/bptt_best``
    is used, else ``checkpoints/pretrained``). Raises FileNotFoundError naming the path.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} is not a directory")
    if not _has_steps(p):
        for sub in ("checkpoints/bptt_best", "checkpoints/pretrained", "bptt_best", "pretrained"):
            if _has_steps(p / sub):
                return p / sub
        raise FileNotFoundError(
            f"no model checkpoint in {str(p)!r}: expected step folders (e.g. '0/') written by "
            "experiments.common.save_model / checkpoint.save_checkpoint, or a run directory with "
            "checkpoints/bptt_best or checkpoints/pretrained"
        )
    return p


def _has_steps(p: Path) -> bool:
    return p.is_dir() and any(c.is_dir() and c.name.isdigit() and (c / "model").exists() for c in p.iterdir())


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """An ADAPT model ready to relax structures.

    Attributes:
      config: the architecture.
      normalizer: training-set standardisation statistics.
      params: ``{"model": ADAPT parameters, "step": step parameters}`` (``step`` may be empty for a
        pretrained-only checkpoint; then ``step_config.init_step`` is the step size).
      step_config: the frame rule the model was fine-tuned with (kind, momentum, annealing, cap).
      meta: the checkpoint's JSON metadata (empty for an in-memory model).
      source: the checkpoint directory it was loaded from, or ``None``.
    """

    config: model_lib.AdaptConfig
    normalizer: model_lib.Normalizer
    params: Params
    step_config: StepConfig = StepConfig()
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    source: str | None = None

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike, step: int | None = None) -> "TrainedModel":
        """Load a checkpoint written by ``experiments.common.save_model`` (or ``checkpoint.save_checkpoint``
        with ``model_config`` / ``step_config`` in its meta). Accepts a run directory too."""
        directory = resolve_checkpoint_dir(checkpoint_dir)
        params, normalizer, meta = checkpoint.restore_model(directory, step)
        if "model_config" not in meta:
            raise ValueError(f"checkpoint {str(directory)!r} has no 'model_config' in its meta; cannot rebuild the model")
        config = checkpoint.adapt_config_from_dict(meta["model_config"])
        step_config = checkpoint.step_config_from_dict(meta.get("step_config", {}))
        params = {"model": params["model"], "step": params.get("step", {}) or {}}
        return cls(config, normalizer, params, step_config, dict(meta), str(directory))

    @functools.cached_property
    def force_fn(self) -> ForceFn:
        """``force_fn(model_params, structures) -> [B, N, 3]`` eV/Å (one object per model, so jit caches hit)."""
        return model_lib.make_force_fn(self.config, self.normalizer)

    @property
    def model_params(self) -> Params:
        return self.params["model"]

    def step_description(self) -> str:
        """The step rule in words, e.g. ``"learnable, eta = 0.0412 Å²/eV"``."""
        sp = self.params.get("step", {}) or {}
        if self.step_config.kind == "neural":
            if "head" in sp:
                return f"neural step head ({model_lib.count_params(sp['head'])} parameters)"
            return f"neural step head (no parameters saved: fixed {self.step_config.init_step:g} Å²/eV used)"
        if "eta" in sp:
            return f"{self.step_config.kind}, eta = {float(sp['eta']):.6g} Å²/eV"
        return f"{self.step_config.kind}, eta = {self.step_config.init_step:.6g} Å²/eV (StepConfig.init_step; no step saved)"

    def num_params(self) -> int:
        return model_lib.count_params(self.params["model"])


def _step_rule(
    model: TrainedModel | None, step_size: float | None
) -> tuple[StepConfig, StepSizeFn, Params]:
    """(step config, step_size_fn, step params) for inference (noise off)."""
    if step_size is not None:
        base = model.step_config if model is not None else StepConfig()
        cfg = dataclasses.replace(base, kind="fixed", init_step=float(step_size), noise_std=0.0)
        return cfg, _step_fn(cfg, None), {"eta": jnp.asarray(step_size, jnp.float32)}
    if model is None:
        raise ValueError("relax(method='frame') with a plain force_fn needs step_size= (Å²/eV)")
    cfg = dataclasses.replace(model.step_config, noise_std=0.0)
    sp = model.params.get("step", {}) or {}
    if cfg.kind == "neural" and "head" in sp:
        return cfg, _step_fn(cfg, model.normalizer), sp
    eta = sp.get("eta", cfg.init_step)
    cfg = dataclasses.replace(cfg, kind="fixed" if cfg.kind == "neural" else cfg.kind)
    return cfg, _step_fn(dataclasses.replace(cfg, kind="fixed"), None), {"eta": jnp.asarray(eta, jnp.float32)}


@functools.lru_cache(maxsize=32)
def _step_fn(cfg: StepConfig, normalizer) -> StepSizeFn:
    return make_step_size_fn(cfg, normalizer)


# --------------------------------------------------------------------------- jitted runners (cached)


@functools.lru_cache(maxsize=64)
def _frame_runner(force_fn, step_size_fn, step_config, rollout_config):
    def run(params, s, stop_rms):  # stop_rms traced: changing it does not recompile
        res = rollout(force_fn, step_size_fn, params, s, step_config, rollout_config, stop_rms=stop_rms)
        forces = force_fn(params["model"], s.replace(positions=res.positions))
        return res, fire.max_force(forces, s.mask)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _fire_runner(force_fn, fire_config, return_trajectory):
    def run(model_params, s):
        fn = lambda x: force_fn(model_params, s.replace(positions=x))  # noqa: E731
        state, traj = fire.fire_relax(fn, s.positions, s.mask, fire_config, return_trajectory=return_trajectory)
        return state, fire.max_force(state.forces, s.mask), traj

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def jitted_forces(force_fn) -> Callable:
    """``jax.jit(force_fn)``, one per force function (used by the ASE calculator)."""
    return jax.jit(force_fn)


# --------------------------------------------------------------------------- relax


@dataclasses.dataclass
class RelaxOutput:
    """What :func:`relax` returns (per-structure arrays in input order).

    Attributes:
      structures: relaxed copies, same kinds as the inputs (ASE ``Atoms`` keep cell, pbc, info and
        constraints; pymatgen objects keep lattice, species and site properties).
      num_frames: [n] int frames applied (``"frame"``) or FIRE steps taken (``"fire"``).
      converged: [n] bool: ``"frame"``: the RMS movement of a frame fell below ``stop_rms``;
        ``"fire"``: the largest per-atom force fell below ``fmax``.
      diverged: [n] bool: a frame was non-finite or moved an atom farther than 5 Å (the structure
        is returned at its last good frame), or FIRE produced non-finite positions.
      max_force: [n] largest per-atom force norm (eV/Å) of the model at the returned positions.
      trajectories: with ``return_trajectory``, per structure a [frames + 1, n_atoms, 3] array
        (start, then the positions after each frame / FIRE step); else None.
      method: ``"frame"`` or ``"fire"``.
    """

    structures: list
    num_frames: np.ndarray
    converged: np.ndarray
    diverged: np.ndarray
    max_force: np.ndarray
    trajectories: list | None
    method: str

    def __len__(self) -> int:
        return len(self.structures)

    @property
    def structure(self):
        """The relaxed structure when exactly one was given."""
        if len(self.structures) != 1:
            raise ValueError(f"{len(self.structures)} structures were relaxed; use .structures")
        return self.structures[0]


def _is_structure(obj) -> bool:
    return (hasattr(obj, "get_atomic_numbers") and hasattr(obj, "get_positions")) or (
        hasattr(obj, "cart_coords") and hasattr(obj, "species")
    )


def _rows(count_in_bucket: int, batch_size: int) -> int:
    """Rows of a bucket's batches: ``batch_size``, or the next power of two for a small bucket."""
    if count_in_bucket >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(0, math.ceil(math.log2(max(count_in_bucket, 1)))))


def _relaxed_copy(obj, positions: np.ndarray):
    """A copy of ``obj`` (ASE Atoms or pymatgen Structure/Molecule) at Cartesian ``positions`` (Å)."""
    if hasattr(obj, "get_atomic_numbers") and hasattr(obj, "set_positions"):
        new = obj.copy()
        new.set_positions(positions, apply_constraint=False)
        return new
    new = obj.copy()
    for site, xyz in zip(new, positions):  # PeriodicSite.coords setter updates frac_coords too
        site.coords = np.asarray(xyz, np.float64)
    return new


def relax(
    structures,
    model: TrainedModel | Callable,
    *,
    params: Params | None = None,
    method: str = "frame",
    step_size: float | None = None,
    max_frames: int = 75,
    stop_rms: float = 1e-3,
    fire_config: fire.FireConfig | None = None,
    batch_size: int = 16,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    return_trajectory: bool = False,
    divergence_displacement: float = 5.0,
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
      fire_config: ``"fire"`` only: :class:`bptt_mlip.fire.FireConfig` (default ASE's: fmax 0.05
        eV/Å, at most 200 steps).
      batch_size: most structures per compiled call. A bucket with fewer structures than this is
        padded to the next power of two rows, so a bucket compiles at most
        ``log2(batch_size) + 1`` shapes (one for repeated calls of the same size mix).
      buckets: atom-count buckets (padding sizes).
      return_trajectory: also return every frame of every structure.
      divergence_displacement: ``"frame"`` only: a frame moving an atom farther than this (Å)
        marks the structure diverged.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    single = _is_structure(structures)
    objs = [structures] if single else list(structures)
    for i, o in enumerate(objs):
        if not _is_structure(o):
            raise TypeError(f"structure {i}: expected an ase.Atoms or a pymatgen Structure/Molecule, got {type(o).__name__}")
        if getattr(o, "constraints", None):
            warnings.warn(f"structure {i}: ASE constraints are ignored by bptt_mlip.relax (every atom moves)")

    if isinstance(model, TrainedModel):
        if params is not None:
            raise ValueError("pass params only with a plain force_fn, not with a TrainedModel")
        force_fn, full_params, trained = model.force_fn, model.params, model
    elif callable(model):
        if params is None:
            raise ValueError("relax with a plain force_fn needs params=")
        force_fn, full_params, trained = model, {"model": params, "step": {}}, None
    else:
        raise TypeError(f"model must be a TrainedModel or a force_fn(params, structures), got {type(model).__name__}")

    if method == "frame":
        step_cfg, step_fn, step_params = _step_rule(trained, step_size)
        run_params = {"model": full_params["model"], "step": step_params}
        rollout_cfg = RolloutConfig(
            max_frames=int(max_frames), remat="none",
            divergence_displacement=float(divergence_displacement), return_trajectory=bool(return_trajectory),
        )
        runner = _frame_runner(force_fn, step_fn, step_cfg, rollout_cfg)
    else:
        if step_size is not None:
            raise ValueError("step_size applies to method='frame'; FIRE uses fire_config (dt, maxstep)")
        fire_cfg = fire_config if fire_config is not None else fire.FireConfig()
        runner = _fire_runner(force_fn, fire_cfg, bool(return_trajectory))

    n = len(objs)
    sizes = []
    for o in objs:
        sizes.append(len(o))
    num_frames = np.zeros(n, np.int64)
    converged = np.zeros(n, bool)
    diverged = np.zeros(n, bool)
    max_force = np.zeros(n, np.float64)
    positions: list[np.ndarray | None] = [None] * n
    trajectories: list | None = [None] * n if return_trajectory else None

    groups: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(bucket_atoms(size, buckets), []).append(i)
    for bucket in sorted(groups):
        idx_all = groups[bucket]
        rows = _rows(len(idx_all), batch_size)
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            batch = structures_lib.from_atoms([objs[i] for i in idx], max_atoms=bucket, batch_size=rows)
            if method == "frame":
                res, fmax = runner(run_params, batch, jnp.asarray(stop_rms, jnp.float32))
                pos, frames, conv, div = res.positions, res.num_frames, res.converged, res.diverged
                traj = res.trajectory
            else:
                state, fmax, traj = runner(full_params["model"], batch)
                pos, frames, conv = state.positions, state.n_steps, state.converged
                div = ~jnp.all(jnp.isfinite(state.positions), axis=(-1, -2))
            pos, frames, conv, div, fmax = (np.asarray(x) for x in (pos, frames, conv, div, fmax))
            traj = None if traj is None else np.asarray(traj)
            for row, i in enumerate(idx):
                k = sizes[i]
                positions[i] = pos[row, :k].astype(np.float64)
                num_frames[i], converged[i], diverged[i], max_force[i] = frames[row], conv[row], div[row], fmax[row]
                if trajectories is not None:
                    trajectories[i] = traj[: int(frames[row]) + 1, row, :k].astype(np.float64)

    relaxed = [_relaxed_copy(o, p) for o, p in zip(objs, positions)]
    return RelaxOutput(relaxed, num_frames, converged, diverged, max_force, trajectories, method)
