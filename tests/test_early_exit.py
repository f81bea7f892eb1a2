"""Early exit of the differentiable rollout: once every structure of a batch has stopped, later
frames call no force model (forward or backward), and results and gradients equal those of computing
every frame bit for bit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_mlip as bm
from bptt_mlip import losses, relax

MAX_FRAMES = 60
CENTRES_SEED = 3


def _batch():
    """Three structures of 8, 6 and 7 atoms displaced 0.05-0.4 Å from their well centres (so they stop
    at different frames), and one padding row; the centres are the targets."""
    rng = np.random.default_rng(CENTRES_SEED)
    centres = [rng.uniform(0.0, 6.0, (n, 3)) for n in (8, 6, 7)]
    starts = [c + rng.normal(0.0, scale, c.shape) for c, scale in zip(centres, (0.05, 0.4, 0.15))]
    s = bm.from_arrays([["Si"] * len(x) for x in starts], starts, max_atoms=8, batch_size=4)
    target = np.zeros(s.positions.shape, np.float32)
    for i, c in enumerate(centres):
        target[i, : len(c)] = c
    return s, jnp.asarray(target)


def _counting_force_fn(calls: list, centres: jnp.ndarray, row_stiffness=None):
    """Harmonic wells F = -k s_b (x - centre) (k learnable, eV/Å²; s_b a fixed factor per row, default 1),
    counting each executed call (a host callback runs only where its branch runs)."""

    def count(_):
        calls.append(1)

    def force_fn(params, structures):
        jax.debug.callback(count, structures.positions[0, 0, 0])
        forces = -params["k"] * (structures.positions - centres)
        if row_stiffness is not None:
            forces = forces * row_stiffness[:, None, None]
        return jnp.where(structures.mask[..., None], forces, 0.0)

    return force_fn


def assert_identical(tree, other):
    """Every leaf of two pytrees equal bit for bit (NaN at the same places)."""
    leaves, other_leaves = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(other)
    assert len(leaves) == len(other_leaves)
    for a, b in zip(leaves, other_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


PARAMS = {"model": {"k": jnp.asarray(2.0)}, "step_rule": relax.LearnableStep(0.1).init()}


def _loss_and_grad(config: relax.RolloutConfig, calls: list):
    structures, target = _batch()
    force_fn = _counting_force_fn(calls, target)

    def loss(params):
        res = relax.rollout(force_fn, relax.LearnableStep(0.1), params, structures, relax.FrameModifiers(), config)
        # the target is off the wells' centres so that the gradient is not zero
        dq = losses.delta_q(res.positions, target + 0.1, structures.masses, structures.mask)
        return jnp.sum(dq), res

    (value, res), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS)
    jax.block_until_ready(grads)
    return value, res, grads


@pytest.mark.parametrize("remat", ["none", "frame", "segment"])
@pytest.mark.parametrize("stop_fmax", [0.0, 0.05])
def test_early_exit_is_bit_identical_and_skips_the_force_calls(remat, stop_fmax):
    config = relax.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-3, stop_fmax=stop_fmax, remat=remat,
                                 return_trajectory=True)
    calls_on, calls_off = [], []
    value, res, grads = _loss_and_grad(config, calls_on)
    value_off, res_off, grads_off = _loss_and_grad(dataclasses.replace(config, early_exit=False), calls_off)
    assert bool(jnp.all(res.converged[:3])), "the test needs every real structure to stop before max_frames"
    slowest = int(jnp.max(res.num_frames))
    assert slowest < MAX_FRAMES // 2
    # the full scan runs the same frame inside the same cond (whose predicate never holds there), so XLA
    # compiles one frame for both settings: values, gradients and discrete outcomes agree bit for bit
    assert_identical((value, res, grads), (value_off, res_off, grads_off))
    assert float(jnp.abs(grads["step_rule"]["eta"])) > 0
    # without early exit every frame calls the model (in the backward pass again when rematerialised);
    # with it, only the frames up to the slowest structure's stop (+1 for the frame that stops it) do
    assert len(calls_on) < len(calls_off) / 2, (len(calls_on), len(calls_off))


def test_frame_limit_counts_as_finished():
    structures, _ = _batch()
    calls = []
    config = relax.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-9)
    res = jax.jit(lambda p: relax.rollout(_counting_force_fn(calls, structures.positions + 1.0), relax.FixedStep(0.02),
                                          p, structures, relax.FrameModifiers(), config, frame_limit=5))(
        {"model": PARAMS["model"], "step_rule": relax.FixedStep(0.02).init()})
    jax.block_until_ready(res)
    np.testing.assert_array_equal(np.asarray(res.num_frames[:3]), [5, 5, 5])
    assert len(calls) <= 6


def test_early_exit_with_a_diverging_and_a_never_converging_structure():
    """Row 1 runs away at its first frame (a 6 Å step). Then either every other row converges (the batch
    finishes early and frames are skipped) or row 0 oscillates for ever (eta k s = 2: each frame
    mirrors it through its well's centre), so the batch never finishes and early exit skips nothing;
    both agree with computing every frame."""
    structures, target = _batch()
    far = target.at[1].add(30.0)  # row 1's well is 30 Å away: eta k 30 = 6 Å > divergence_displacement
    for stiffness, never in ((jnp.ones(4), False), (jnp.asarray([10.0, 1.0, 1.0, 1.0]), True)):
        calls_on, calls_off = [], []
        outs = []
        for early, calls in ((True, calls_on), (False, calls_off)):
            config = relax.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-3, early_exit=early)
            force_fn = _counting_force_fn(calls, far, stiffness)

            def loss(params):
                res = relax.rollout(force_fn, relax.LearnableStep(0.1), params, structures, relax.FrameModifiers(),
                                    config)
                return jnp.sum(losses.delta_q(res.positions, target + 0.1, structures.masses, structures.mask)), res

            outs.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS))
        (v_on, r_on), g_on = outs[0]
        (v_off, r_off), g_off = outs[1]
        assert bool(r_on.diverged[1]) and int(r_on.num_frames[1]) == 0
        assert_identical((v_on, r_on, g_on), (v_off, r_off, g_off))
        if never:
            assert int(r_on.num_frames[0]) == MAX_FRAMES and not bool(r_on.converged[0])
            assert len(calls_on) == len(calls_off)  # the batch never finished: nothing to skip
        else:
            assert len(calls_on) < len(calls_off)


def test_forward_relaxation_stops_when_done_and_equals_the_rollout():
    """relax_until_done (a while loop over the done mask) gives the rollout's end points (to float32
    rounding; frames taken and flags exactly) and calls the force model only until the batch has
    stopped: once per frame taken by the slowest structure, where the full scan calls it MAX_FRAMES
    times. Also for a batch with a runaway row and one that never converges (runs to the limit)."""
    structures, target = _batch()
    for centres, stiffness in ((target, None), (target.at[1].add(30.0), jnp.asarray([10.0, 1.0, 1.0, 1.0]))):
        calls_loop, calls_scan = [], []
        config = relax.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-3, early_exit=False)
        args = (relax.LearnableStep(0.1), PARAMS, structures, relax.FrameModifiers(), config)
        looped = jax.jit(lambda: relax.relax_until_done(_counting_force_fn(calls_loop, centres, stiffness), *args))()
        scanned = jax.jit(lambda: relax.rollout(_counting_force_fn(calls_scan, centres, stiffness), *args))()
        jax.block_until_ready((looped, scanned))
        for name in ("num_frames", "converged", "diverged"):
            np.testing.assert_array_equal(np.asarray(getattr(looped, name)), np.asarray(getattr(scanned, name)))
        np.testing.assert_allclose(np.asarray(looped.positions), np.asarray(scanned.positions), rtol=0, atol=1e-5)
        assert len(calls_scan) == MAX_FRAMES
        assert len(calls_loop) == int(np.max(np.asarray(looped.num_frames)))  # frames of the slowest row
    assert int(looped.num_frames[0]) == MAX_FRAMES and bool(looped.diverged[1])  # the second case


def test_forward_relaxation_refuses_to_return_a_trajectory():
    structures, target = _batch()
    with pytest.raises(ValueError, match="trajectory"):
        relax.relax_until_done(_counting_force_fn([], target), relax.LearnableStep(0.1), PARAMS, structures,
                               rollout_config=relax.RolloutConfig(return_trajectory=True))
