"""In-flight batching: a fixed-size compiled batch whose stopped rows are refilled with waiting structures.

A batch of B rows (one atom-count bucket, one compiled shape) advances frame by frame inside a
``lax.while_loop`` that returns to the host as soon as ``min_free`` rows are free (their structure
stopped: converged, diverged or out of frames) or after ``max_iterations`` frames. The host
(:func:`bptt_mlip.workflow.buckets.relax_in_flight`) takes the finished structures out and puts the next
waiting ones into the free rows, resetting those rows' state, so many structures cost about the mean,
not the maximum, number of frames of a batch.

Each row relaxes exactly as it would alone: every row keeps its own frame counter and frame limit
(:func:`bptt_mlip.relax.forward.forward_frame`; FIRE's per-structure state, :func:`bptt_mlip.relax.fire.fire_step`),
and rows of a batch never mix. One force evaluation of the batch is one iteration; a structure takes its
frames plus one evaluation at its end point (its reported largest force, as the fixed-batch path
computes it).

Two engines with the same host interface: :class:`FrameEngine` (the model's frame map with its step
rule) and :class:`FireEngine` (FIRE, ASE semantics).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip.relax import fire, forward
from bptt_mlip.relax.scan import FrameModifiers, RolloutConfig
from bptt_mlip.relax.step_rules import StepRule
from bptt_mlip.structures import Structures, padded_structures
from bptt_mlip.types import ForceFn, Params

# FIRE's own step limit is switched off in flight: every row has its own limit in ``Slots.limit``
_UNBOUNDED_STEPS = 2**30


class Slots(NamedTuple):
    """The rows of an in-flight batch ([B] leading axis everywhere).

    Attributes:
      state: the method's per-row state: the rollout carry (:func:`bptt_mlip.relax.forward.start_carry`)
        or a :class:`bptt_mlip.relax.fire.FireState`.
      limit: [B] int32 most frames (FIRE steps) of the row's structure.
      occupied: [B] bool, the row holds a structure (False: an empty padding row that never moves).
      finished: [B] bool, the row's structure has stopped and its end-point force is known.
      fresh: [B] bool, FIRE only: the row's start forces are not computed yet.
      max_force: [B] float32 largest per-atom force norm (eV/Å) at the end point of a finished row.
    """

    state: Any
    limit: np.ndarray
    occupied: np.ndarray
    finished: np.ndarray
    fresh: np.ndarray
    max_force: np.ndarray


def set_rows(tree, rows: np.ndarray, values):
    """A copy of the numpy pytree ``tree`` with ``rows`` replaced by the matching leaves of ``values``."""

    def put(a, v):
        a = np.array(a)  # device_get may hand back read-only arrays
        a[rows] = v
        return a

    return jax.tree.map(put, tree, values)


def start_rows(slots: Slots, rows: np.ndarray, state_rows, limits: np.ndarray) -> Slots:
    """``slots`` with structures put into ``rows`` [k] (their start state ``state_rows`` [k, ...], frame limits
    ``limits`` [k])."""
    k = len(rows)
    return Slots(state=set_rows(slots.state, rows, state_rows),
                 limit=set_rows(slots.limit, rows, np.asarray(limits, np.int32)),
                 occupied=set_rows(slots.occupied, rows, np.ones(k, bool)),
                 finished=set_rows(slots.finished, rows, np.zeros(k, bool)),
                 fresh=set_rows(slots.fresh, rows, np.ones(k, bool)),
                 max_force=set_rows(slots.max_force, rows, np.zeros(k, np.float32)))


def empty_rows(slots: Slots, rows: np.ndarray, idle_state_rows) -> Slots:
    """``slots`` with ``rows`` emptied (an idle state that never moves, not occupied)."""
    k = len(rows)
    return slots._replace(state=set_rows(slots.state, rows, idle_state_rows),
                          occupied=set_rows(slots.occupied, rows, np.zeros(k, bool)),
                          finished=set_rows(slots.finished, rows, np.zeros(k, bool)),
                          fresh=set_rows(slots.fresh, rows, np.zeros(k, bool)))


def _until_rows_free(step, slots: Slots, max_iterations, min_free):
    """Repeat ``step(slots) -> slots`` until ``min_free`` rows are free or after ``max_iterations``:
    (slots, iterations run, int32)."""

    def cond(carry):
        s, i = carry
        free = jnp.sum(jnp.logical_not(s.occupied) | s.finished)
        return (i < max_iterations) & (free < min_free)

    def body(carry):
        s, i = carry
        return step(s), i + 1

    return jax.lax.while_loop(cond, body, (slots, jnp.int32(0)))


def _numpy_slots(rows: int, state) -> Slots:
    return Slots(state=jax.tree.map(np.array, state), limit=np.zeros(rows, np.int32), occupied=np.zeros(rows, bool),
                 finished=np.zeros(rows, bool), fresh=np.zeros(rows, bool), max_force=np.zeros(rows, np.float32))


# --------------------------------------------------------------------------- the frame map


@functools.lru_cache(maxsize=64)
def _frame_chunk(force_fn: ForceFn, step_rule: StepRule, modifiers: FrameModifiers, rollout_config: RolloutConfig):
    def step(params, structures, stop_rms, slots: Slots) -> Slots:
        running = slots.occupied & jnp.logical_not(slots.finished)
        carry, forces = forward.forward_frame(force_fn, step_rule, params, structures, slots.state, slots.limit,
                                           modifiers, rollout_config, stop_rms=stop_rms)
        moved = carry.num_frames > slots.state.num_frames
        # a row that did not move and has stopped (or is out of frames) sits at its end point now
        finishing = running & jnp.logical_not(moved) & (carry.done | (carry.num_frames >= slots.limit))
        max_force = jnp.where(finishing, fire.max_force(forces, structures.mask), slots.max_force)
        return slots._replace(state=carry, finished=slots.finished | finishing, max_force=max_force)

    def run(params, structures, stop_rms, slots, max_iterations, min_free):
        return _until_rows_free(functools.partial(step, params, structures, stop_rms), slots, max_iterations, min_free)

    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _start_carry_row(n_atoms: int):
    """:func:`bptt_mlip.relax.forward.start_carry` of one row of ``n_atoms`` atoms, as numpy (positions zero)."""
    one_row = padded_structures(np.zeros((1, n_atoms), np.int32), np.zeros((1, n_atoms, 3), np.float32),
                                np.zeros((1, 3, 3), np.float32))
    return jax.tree.map(np.array, forward.start_carry(one_row))


@dataclasses.dataclass(frozen=True)
class FrameEngine:
    """In-flight rows relaxed by the frame map ``X <- X + eta F(X)`` (:func:`bptt_mlip.relax.scan.rollout`
    forward, exploration noise off).

    Attributes:
      force_fn, step_rule, modifiers, rollout_config: as for the rollout (``rollout_config.max_frames`` is
        the default frame limit; ``return_trajectory`` and ``remat`` do not apply).
      params: ``{"model": ..., "step_rule": ...}``.
      stop_rms: the RMS-movement stop (Å), traced (changing it does not recompile).
    """

    force_fn: ForceFn
    step_rule: StepRule
    modifiers: FrameModifiers
    rollout_config: RolloutConfig
    params: Params
    stop_rms: float
    name: str = "frame"

    @property
    def default_limit(self) -> int:
        return self.rollout_config.max_frames

    def _runner(self):
        return _frame_chunk(self.force_fn, self.step_rule, self.modifiers, self.rollout_config)

    def start_state(self, structures: Structures):
        """Start state of the rows of ``structures`` (numpy leaves): the rollout's, positions = the rows' own."""
        b, n = structures.mask.shape
        template = _start_carry_row(n)  # built on the host, no device call per refill
        state = jax.tree.map(lambda a: np.repeat(a, b, axis=0), template)
        return state._replace(positions=np.array(structures.positions, template.positions.dtype))

    def idle_state(self, structures: Structures):
        """State of empty rows: stopped, so they never move."""
        state = self.start_state(structures)
        return state._replace(done=np.ones_like(state.done))

    def empty_slots(self, structures: Structures) -> Slots:
        return _numpy_slots(structures.batch_size, self.idle_state(structures))

    def run(self, structures: Structures, slots: Slots, max_iterations: int, min_free: int) -> tuple[Slots, int]:
        """Advance every occupied row until ``min_free`` rows are free or ``max_iterations`` frames ran:
        (slots as numpy, iterations run)."""
        out, iterations = self._runner()(self.params, structures, jnp.float32(self.stop_rms), slots,
                                         jnp.int32(max_iterations), jnp.int32(min_free))
        return jax.device_get((out, iterations))

    def results(self, slots: Slots) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(positions [B, N, 3] Å, frames [B], converged [B], diverged [B]) of every row."""
        c = slots.state
        return c.positions, c.num_frames, c.converged, c.diverged

    def compiled_shapes(self) -> int:
        """Batch shapes compiled so far by this engine's jitted chunk (shared by engines with the same settings)."""
        return self._runner()._cache_size()


# --------------------------------------------------------------------------- FIRE


@functools.lru_cache(maxsize=64)
def _fire_chunk(force_fn: ForceFn, config: fire.FireConfig):
    unbounded = dataclasses.replace(config, max_steps=_UNBOUNDED_STEPS)

    def step(model_params, structures, slots: Slots) -> Slots:
        state, mask = slots.state, structures.mask
        running = slots.occupied & jnp.logical_not(slots.finished)
        fn = lambda x: force_fn(model_params, structures.replace(positions=x))  # noqa: E731
        # rows not running look converged to fire_step, which returns them bit for bit; a fresh row (zero
        # velocity and force) takes a null first step that only computes its start forces: fire_init's state
        new = fire.fire_step(fn, state.replace(converged=state.converged | jnp.logical_not(running)), mask, unbounded)
        new = new.replace(converged=jnp.where(running, new.converged, state.converged),
                          num_frames=new.num_frames - slots.fresh.astype(jnp.int32))
        # non-finite positions stay non-finite: such a row is finished (diverged) at once
        finite = jnp.all(jnp.isfinite(new.positions), axis=(-1, -2))
        finishing = running & (new.converged | (new.num_frames >= slots.limit) | jnp.logical_not(finite))
        max_force = jnp.where(finishing, fire.max_force(new.forces, mask), slots.max_force)
        return slots._replace(state=new, finished=slots.finished | finishing, max_force=max_force,
                              fresh=jnp.zeros_like(slots.fresh))

    def run(model_params, structures, slots, max_iterations, min_free):
        return _until_rows_free(functools.partial(step, model_params, structures), slots, max_iterations, min_free)

    return jax.jit(run)


@dataclasses.dataclass(frozen=True)
class FireEngine:
    """In-flight rows relaxed by FIRE (:mod:`bptt_mlip.relax.fire`, ASE semantics); ``config.max_steps`` is
    the default step limit. A structure whose positions turn non-finite stops there (diverged; the
    fixed-batch path keeps stepping it to ``max_steps``)."""

    force_fn: ForceFn
    config: fire.FireConfig
    model_params: Params
    name: str = "fire"

    @property
    def default_limit(self) -> int:
        return self.config.max_steps

    def _runner(self):
        return _fire_chunk(self.force_fn, self.config)

    def start_state(self, structures: Structures) -> fire.FireState:
        b, n = structures.mask.shape
        zeros = np.zeros((b, n, 3), np.float32)
        return fire.FireState(positions=np.array(structures.positions, np.float32), velocities=zeros, forces=zeros,
                              dt=np.full(b, self.config.dt, np.float32), a=np.full(b, self.config.a_start, np.float32),
                              n_pos=np.zeros(b, np.int32), converged=np.zeros(b, bool),
                              num_frames=np.zeros(b, np.int32))

    def idle_state(self, structures: Structures) -> fire.FireState:
        return self.start_state(structures)  # never running, so never stepped

    def empty_slots(self, structures: Structures) -> Slots:
        return _numpy_slots(structures.batch_size, self.idle_state(structures))

    def run(self, structures: Structures, slots: Slots, max_iterations: int, min_free: int) -> tuple[Slots, int]:
        out, iterations = self._runner()(self.model_params, structures, slots, jnp.int32(max_iterations),
                                         jnp.int32(min_free))
        return jax.device_get((out, iterations))

    def results(self, slots: Slots) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        s = slots.state
        diverged = ~np.all(np.isfinite(s.positions), axis=(-1, -2))
        return s.positions, s.num_frames, s.converged, diverged

    def compiled_shapes(self) -> int:
        return self._runner()._cache_size()
