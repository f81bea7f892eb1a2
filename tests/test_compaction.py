"""Compaction of the rollout's force calls (``RolloutConfig.compact_levels``): only the rows still
running are evaluated, in the smallest sub-batch that holds them, and results and gradients equal
those of the whole batch to float32 rounding, with frames and flags exact."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_mlip as bm
from bptt_mlip import losses, relax
from bptt_mlip.models import potentials
from bptt_mlip.relax import compaction, forward

MAX_FRAMES = 60


SPACING = 2.35  # Å


def _clusters(noise_per_row=(0.02, 0.3, 0.1, 0.05, 0.2, 0.15), n_atoms=6, seed=4):
    """Six 6-atom Si clusters on a grid of ``SPACING``, displaced by a different noise each so that they
    stop at different frames, padded to 8 rows and 8 atoms; and their grid positions."""
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float)[:n_atoms] * SPACING
    starts = [grid + rng.normal(0.0, s, grid.shape) for s in noise_per_row]
    s = bm.from_arrays([["Si"] * n_atoms] * len(starts), starts, max_atoms=8, batch_size=8)
    target = np.zeros(s.positions.shape, np.float32)
    target[: len(starts), :n_atoms] = grid
    return s, jnp.asarray(target)


def wells(params, structures):
    """Harmonic wells at the nearest grid point, F = -k (x - a round(x / a)) (k learnable, eV/Å²): a row's
    forces depend on that row only, and a structure converges at a pace set by its start displacement."""
    x = structures.positions
    centre = jax.lax.stop_gradient(SPACING * jnp.round(x / SPACING))
    return jnp.where(structures.mask[..., None], -params["k"] * (x - centre), 0.0)


def _shape_recording(force_fn, shapes: list):
    """``force_fn``, recording the batch size of each executed call."""

    def recording(params, structures):
        jax.debug.callback(lambda b: shapes.append(int(b)), structures.positions.shape[0])
        return force_fn(params, structures)

    return recording


PARAMS = {"model": {"k": jnp.asarray(2.0)}, "step_rule": relax.LearnableStep(0.1).init()}
MORSE = potentials.init_morse_params()


def test_sub_batch_sizes():
    assert compaction.sub_batch_sizes(8, 0) == (8,)
    assert compaction.sub_batch_sizes(8, 2) == (2, 4, 8)
    assert compaction.sub_batch_sizes(8, 5) == (1, 2, 4, 8)
    assert compaction.sub_batch_sizes(5, 3) == (1, 2, 3, 5)
    with pytest.raises(ValueError, match="levels must be >= 0"):
        compaction.sub_batch_sizes(8, -1)
    with pytest.raises(ValueError, match="compact_levels must be >= 0"):
        relax.RolloutConfig(compact_levels=-1)


@pytest.mark.parametrize("running_rows, expected_size", [((0, 3, 5, 6, 7), 8), ((1, 6), 2), ((2, 4, 7), 4), ((5,), 2),
                                                         ((), 2)])
def test_running_row_forces_match_the_whole_batch_on_the_smallest_sub_batch(running_rows, expected_size):
    s, _ = _clusters()
    running = np.zeros(8, bool)
    running[list(running_rows)] = True
    shapes = []
    force_fn = _shape_recording(potentials.morse_force_fn, shapes)
    got = jax.jit(lambda p, st, r: compaction.running_row_forces(force_fn, p, st, r, 2))(MORSE, s, jnp.asarray(running))
    jax.block_until_ready(got)
    assert shapes == [expected_size]
    full = np.asarray(potentials.morse_force_fn(MORSE, s))
    np.testing.assert_allclose(np.asarray(got)[running], full[running], rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got)[~running])


def _loss_and_grad(config: relax.RolloutConfig, shapes: list):
    structures, target = _clusters()
    force_fn = _shape_recording(wells, shapes)

    def loss(params):
        res = relax.rollout(force_fn, relax.LearnableStep(0.1), params, structures, relax.FrameModifiers(), config)
        dq = losses.delta_q(res.positions, target + 0.05, structures.masses, structures.mask)
        return jnp.sum(dq), res

    (value, res), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS)
    return value, res, jax.block_until_ready(grads)


@pytest.mark.parametrize("remat", ["none", "frame", "segment"])
@pytest.mark.parametrize("stop_fmax", [0.0, 0.05])
def test_compacted_rollout_equals_the_whole_batch_and_computes_fewer_rows(remat, stop_fmax):
    config = relax.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-3, stop_fmax=stop_fmax, remat=remat)
    shapes_on, shapes_off = [], []
    value, res, grads = _loss_and_grad(dataclasses.replace(config, compact_levels=2), shapes_on)
    value_off, res_off, grads_off = _loss_and_grad(config, shapes_off)
    frames = np.asarray(res.num_frames)[:6]
    assert np.all(np.asarray(res.converged)[:6]), "the test needs every real structure to stop"
    assert len(set(frames.tolist())) >= 4, f"the test needs structures stopping at different frames: {frames}"
    for field in ("num_frames", "converged", "diverged"):
        np.testing.assert_array_equal(np.asarray(getattr(res, field)), np.asarray(getattr(res_off, field)))
    np.testing.assert_allclose(np.asarray(res.positions), np.asarray(res_off.positions), atol=2e-6)
    np.testing.assert_allclose(float(value), float(value_off), rtol=1e-5)
    for g, g_off in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_off)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_off), rtol=2e-4, atol=1e-6)
    # rows computed: without compaction 8 per call; with it, the sub-batches shrink as structures stop
    assert set(shapes_off) == {8}
    assert set(shapes_on) <= {2, 4, 8} and min(shapes_on) == 2
    assert len(shapes_on) == len(shapes_off) and sum(shapes_on) < 0.8 * sum(shapes_off)
    if not stop_fmax:  # frame t runs the rows that take it (padding rows take frame 0: it stops them)
        frames_run = int(np.max(np.asarray(res.num_frames)))
        running = [int(np.sum(np.asarray(res.num_frames) > t)) for t in range(frames_run)]
        expected = [min(size for size in (2, 4, 8) if size >= count) for count in running]
        passes = len(shapes_off) // frames_run  # rematerialisation computes frames again in the backward pass
        assert len(shapes_off) == passes * frames_run and shapes_on[:frames_run] == expected
        assert sorted(shapes_on) == sorted(expected * passes)


def test_forward_relaxation_and_grid_search_with_compaction():
    s, target = _clusters()
    config = relax.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-3)
    rule = relax.FixedStep(0.1)
    params = {"model": PARAMS["model"], "step_rule": rule.init()}
    shapes = []
    on = forward.relax_until_done(_shape_recording(wells, shapes), rule, params, s,
                                  rollout_config=dataclasses.replace(config, compact_levels=3))
    off = forward.relax_until_done(wells, rule, params, s, rollout_config=config)
    np.testing.assert_array_equal(np.asarray(on.num_frames), np.asarray(off.num_frames))
    np.testing.assert_allclose(np.asarray(on.positions), np.asarray(off.positions), atol=2e-6)
    assert min(shapes) == 1
    # the grid search vmaps the rollout over step sizes and turns compaction off: its results are unchanged
    batch = bm.RelaxationBatch(initial=s, target_positions=target, weight=jnp.ones(8))
    etas = jnp.asarray([0.05, 0.1])
    a = bm.grid_search(wells, PARAMS["model"], batch, etas, config)
    b = bm.grid_search(wells, PARAMS["model"], batch, etas,
                       dataclasses.replace(config, compact_levels=2))
    np.testing.assert_array_equal(np.asarray(a.num_frames), np.asarray(b.num_frames))
    np.testing.assert_array_equal(np.asarray(a.dq), np.asarray(b.dq))
