"""Backpropagation through FIRE (bptt_mlip.relax.fire_bptt): forward equals the library's FIRE, the
gradient equals central finite differences, remat and padding change nothing, training with it works."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_mlip as bm
from bptt_mlip import losses, relax
from bptt_mlip.models import potentials
from bptt_mlip.relax import fire, fire_bptt, scan
from bptt_mlip.training import steps

# 3- and 4-atom Morse clusters padded to 6 atoms, plus an empty row: with these settings structure 0
# stops on fmax after 31 steps (with uphill resets on the way), structure 1 runs out of steps with dt
# grown and two maxstep clips, the empty row is converged at the start (checked in the tests).
SIZES = (3, 4)
FIRE_CONFIG = fire.FireConfig(fmax=0.02, max_steps=40)


def cluster(n: int, seed: int, spacing: float = 2.4, noise: float = 0.25) -> np.ndarray:
    """n atoms of a simple-cubic grid near the Morse distance, rattled (Å)."""
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(3)], float)[:n] * spacing
    return grid + rng.normal(0.0, noise, grid.shape)


def batch64(sizes=SIZES, max_atoms=6, batch_size=3, seed=10, garbage_padding=False) -> bm.Structures:
    """float64 Structures of the clusters (call under ``jax.enable_x64``); ``garbage_padding`` puts
    large values on the padded atoms' positions."""
    pos = [cluster(n, seed + i) for i, n in enumerate(sizes)]
    s = bm.from_arrays([["Si"] * n for n in sizes], pos, max_atoms=max_atoms, batch_size=batch_size)
    x = np.full((batch_size, max_atoms, 3), 37.0 if garbage_padding else 0.0)
    for b, p in enumerate(pos):
        x[b, : len(p)] = p
    return s.replace(positions=jnp.asarray(x, jnp.float64))


def morse64(**kw):
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), potentials.init_morse_params(**kw))


def end_loss(model_params, s, target, rollout_config=scan.RolloutConfig(), config=FIRE_CONFIG):
    """Sum over structures of the end-point Dq of a FIRE rollout."""
    r = fire_bptt.fire_rollout(potentials.morse_force_fn, model_params, s, config, rollout_config)
    return jnp.sum(losses.delta_q(r.positions, target, s.masses, s.mask))


def target_of(s: bm.Structures) -> jnp.ndarray:
    shift = jnp.asarray([0.05, -0.03, 0.02], s.positions.dtype)
    return jnp.where(s.mask[..., None], s.positions + shift, 0.0)


def test_forward_equals_library_fire_on_a_padded_batch():
    with jax.enable_x64(True):
        s, params = batch64(), morse64()
        run = fire.make_fire_runner(potentials.morse_force_fn, FIRE_CONFIG, True)(params, s)
        for early_exit in (True, False):
            rc = scan.RolloutConfig(return_trajectory=True, early_exit=early_exit)
            got = jax.jit(lambda p, rc=rc: fire_bptt.fire_rollout(potentials.morse_force_fn, p, s, FIRE_CONFIG, rc))(
                params)
            np.testing.assert_array_equal(np.asarray(got.num_frames), np.asarray(run.state.num_frames))
            np.testing.assert_array_equal(np.asarray(got.converged), np.asarray(run.state.converged))
            np.testing.assert_allclose(np.asarray(got.positions), np.asarray(run.state.positions), rtol=0, atol=1e-12)
            np.testing.assert_allclose(np.asarray(got.trajectory), np.asarray(run.trajectory), rtol=0, atol=1e-12)
            assert not np.any(np.asarray(got.diverged))
        # the case covers the branches the gradient test relies on
        assert list(np.asarray(run.state.num_frames)) == [31, 40, 0]
        assert list(np.asarray(run.state.converged)) == [True, False, True]
        assert int(run.state.n_pos[0]) < 30 and float(run.state.dt[0]) < FIRE_CONFIG.dt  # uphill resets
        assert float(run.state.dt[1]) > FIRE_CONFIG.dt  # dt grew
        traj = np.asarray(run.trajectory)[:, 1]
        step_norms = np.linalg.norm((traj[1:] - traj[:-1]).reshape(FIRE_CONFIG.max_steps, -1), axis=-1)
        assert np.sum(np.isclose(step_norms, FIRE_CONFIG.maxstep, rtol=0, atol=1e-12)) >= 1  # maxstep clip


def test_gradient_matches_central_finite_differences_with_decisions_unchanged():
    with jax.enable_x64(True):
        s, params = batch64(), morse64()
        target = target_of(s)
        loss = jax.jit(lambda p: end_loss(p, s, target))
        grad = jax.jit(jax.grad(lambda p: end_loss(p, s, target)))(params)
        runner = fire.make_fire_runner(potentials.morse_force_fn, FIRE_CONFIG)
        h = 1e-5
        for name in params:
            plus = {**params, name: params[name] + h}
            minus = {**params, name: params[name] - h}
            # the branch decisions must not change under the perturbation for FD to be meaningful
            a, b = runner(plus, s).state, runner(minus, s).state
            for field in ("num_frames", "converged", "n_pos", "dt", "a"):
                np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
            fd = (float(loss(plus)) - float(loss(minus))) / (2 * h)
            assert float(grad[name]) == pytest.approx(fd, rel=1e-6, abs=1e-9), name
        assert all(abs(float(g)) > 1e-3 for g in jax.tree_util.tree_leaves(grad))


def test_remat_modes_and_early_exit_give_the_same_gradient():
    with jax.enable_x64(True):
        s, params = batch64(), morse64()
        target = target_of(s)
        grads = {}
        # segment_length 7 does not divide 40 steps: the last segment's overhang must change nothing
        for remat, early_exit in (("none", True), ("frame", True), ("segment", True), ("segment", False)):
            rc = scan.RolloutConfig(remat=remat, early_exit=early_exit, segment_length=7)
            grads[remat, early_exit] = jax.jit(jax.grad(lambda p, rc=rc: end_loss(p, s, target, rc)))(params)
    ref = grads["none", True]
    assert all(np.isfinite(float(g)) and float(g) != 0 for g in jax.tree_util.tree_leaves(ref))
    for key, g in grads.items():
        for name in ref:
            np.testing.assert_allclose(float(g[name]), float(ref[name]), rtol=1e-10, err_msg=str(key))


def relaxation_batch(s: bm.Structures, weight) -> bm.RelaxationBatch:
    return bm.RelaxationBatch(s, target_of(s), jnp.asarray(weight, s.positions.dtype))


def test_padded_atoms_and_rows_change_nothing():
    fire_bptt_config = steps.BPTTConfig(relaxer="fire", fire=FIRE_CONFIG)
    with jax.enable_x64(True):
        params = {"model": morse64(), "step_rule": {"eta": jnp.asarray(0.05, jnp.float64)}}
        tight = relaxation_batch(batch64(max_atoms=4, batch_size=2), [1.0, 1.0])
        # two more padded atoms per row (with far-away garbage positions) and a weight-0 row
        padded_s = batch64(max_atoms=6, batch_size=3, garbage_padding=True)
        padded = relaxation_batch(padded_s, [1.0, 1.0, 0.0])
        padded = padded.replace(initial=padded.initial.replace(
            positions=padded.initial.positions.at[2].set(jnp.nan), mask=padded.initial.mask.at[2, :2].set(True)))

        def value_and_grad(batch):
            fn = lambda p: steps.bptt_loss(p, batch, potentials.morse_force_fn, relax.FixedStep(0.05),  # noqa: E731
                                           fire_bptt_config, jax.random.PRNGKey(0))
            return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

        (l1, aux1), g1 = value_and_grad(tight)
        (l2, aux2), g2 = value_and_grad(padded)
        assert float(l2) == pytest.approx(float(l1), rel=1e-12)
        assert float(aux2["frames"]) == float(aux1["frames"]) and int(aux2["converged"]) == int(aux1["converged"])
        for name in g1["model"]:
            assert np.isfinite(float(g2["model"][name]))
            assert float(g2["model"][name]) == pytest.approx(float(g1["model"][name]), rel=1e-10, abs=1e-14)
        # FIRE has no step rule: its parameters get an exact zero gradient
        assert float(g1["step_rule"]["eta"]) == 0.0 and float(g2["step_rule"]["eta"]) == 0.0
        run = jax.jit(lambda p, st: fire_bptt.fire_rollout(potentials.morse_force_fn, p, st, FIRE_CONFIG))
        r_tight, r_pad = run(params["model"], tight.initial), run(params["model"], padded_s)
        real = np.asarray(tight.initial.mask)
        np.testing.assert_allclose(np.asarray(r_pad.positions)[:2, :4][real], np.asarray(r_tight.positions)[real],
                                   rtol=0, atol=1e-12)
        pad = ~np.asarray(padded_s.mask)
        np.testing.assert_array_equal(np.asarray(r_pad.positions)[pad], np.asarray(padded_s.positions)[pad])


def test_diverging_structure_is_frozen_at_its_last_finite_state_with_a_finite_gradient():
    s = bm.from_arrays([["Si"] * 3, ["Si"] * 3], [cluster(3, 1), cluster(3, 2)])

    def force_fn(p, st):
        # a uniform push along x (row 0 only); forces turn NaN once an atom passes x = 6 Å
        push = p["push"] * jnp.where(jnp.arange(2)[:, None, None] == 0, jnp.array([1.0, 0.0, 0.0]), 0.0)
        far = jnp.any(st.positions[..., 0] > 6.0, axis=-1)[:, None, None]
        return jnp.where(far, jnp.nan, push + potentials.morse_force_fn(p["morse"], st))

    params = {"push": jnp.asarray(1.0), "morse": potentials.init_morse_params()}
    config = fire.FireConfig(fmax=1e-3, max_steps=60)

    def loss(p):
        r = fire_bptt.fire_rollout(force_fn, p, s, config)
        return jnp.sum(r.positions[..., 0]), r

    (value, r), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert list(np.asarray(r.diverged)) == [True, False]
    assert np.all(np.isfinite(np.asarray(r.positions))) and float(np.max(np.asarray(r.positions)[0, :, 0])) <= 6.0
    assert 0 < int(r.num_frames[0]) < config.max_steps and not bool(r.converged[0])
    assert all(np.isfinite(float(x)) for x in jax.tree_util.tree_leaves(g)) and float(g["push"]) > 0


def test_bptt_config_checks_the_relaxer():
    with pytest.raises(ValueError, match="relaxer"):
        steps.BPTTConfig(relaxer="lbfgs")
    with pytest.raises(ValueError, match="modifiers"):
        steps.BPTTConfig(relaxer="fire", modifiers=scan.FrameModifiers(momentum=0.05))
    with pytest.raises(ValueError, match="random_stopping"):
        steps.BPTTConfig(relaxer="fire", random_stopping=True, frame_limit_range=(10, 20))
    with pytest.raises(ValueError, match="max_steps"):
        s = bm.from_arrays([["Si"] * 2], [cluster(2, 0)])
        fire_bptt.fire_rollout(potentials.morse_force_fn, potentials.init_morse_params(), s,
                               fire.FireConfig(max_steps=0))
    assert steps.BPTTConfig().relaxer == "frame" and steps.BPTTConfig().fire == fire.FireConfig()


def test_bptt_through_fire_finetunes_a_morse_potential():
    sizes = (5, 6, 7)
    s = bm.from_arrays([["Si"] * n for n in sizes], [cluster(n, 20 + i) for i, n in enumerate(sizes)])
    config = fire.FireConfig(fmax=0.01, max_steps=150)  # the reference relaxations take 78 to 105 steps
    truth = potentials.init_morse_params(depth=0.6, r0=2.5, alpha=1.4)
    reference = fire.make_fire_runner(potentials.morse_force_fn, dataclasses.replace(config, max_steps=300))(truth, s)
    assert np.all(np.asarray(reference.state.converged))
    batch = bm.RelaxationBatch(s, reference.state.positions, jnp.ones(len(sizes)))
    bptt_config = steps.BPTTConfig(relaxer="fire", fire=config, rollout=scan.RolloutConfig(remat="frame"))
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.02, clip_norm=10.0, freeze_step_rule=True))
    trainer = steps.make_bptt_trainer(potentials.morse_force_fn, relax.FixedStep(0.05), bptt_config, tx)
    params = {"model": potentials.init_morse_params(depth=0.5, r0=2.3, alpha=1.6),
              "step_rule": {"eta": jnp.asarray(0.05)}}
    state = trainer.init(params, jax.random.PRNGKey(0))
    history = []
    for _ in range(22):
        state, metrics = trainer.update(state, batch)
        history.append(float(metrics["dq"]))
        assert int(metrics["converged"]) == len(sizes)
    # FIRE's end point jumps when a branch decision flips, so the loss is not monotone: compare the last three
    assert np.mean(history[-3:]) < 0.3 * history[0], history
    assert abs(float(state.params["model"]["r0"]) - 2.5) < abs(2.3 - 2.5)
    assert int(metrics["nonfinite_total"]) == 0
