"""Core library: model, rollout, losses, optimiser pieces, BPTT step, grid search, checkpoints."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_mlip as bm
from bptt_mlip.workflow import model_io
from bptt_mlip import losses
from bptt_mlip.training import checkpoint
from bptt_mlip.training import optim
from bptt_mlip.models import potentials
from bptt_mlip import relax
from bptt_mlip.models.step_head import NeuralStep


def cluster(n: int, seed: int, spacing: float = 2.4, noise: float = 0.25) -> np.ndarray:
    """A small, slightly disordered simple-cubic silicon cluster of n atoms (Å)."""
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(3)], float)[:n] * spacing
    return grid + rng.normal(0.0, noise, grid.shape)


def si_batch(sizes=(5, 7), max_atoms=None, seed=0) -> bm.Structures:
    pos = [cluster(n, seed + i) for i, n in enumerate(sizes)]
    return bm.from_arrays([["Si"] * n for n in sizes], pos, max_atoms=max_atoms)


def morse_params(**kw):
    return {"model": potentials.init_morse_params(**kw), "step_rule": {"eta": jnp.asarray(0.05)}}


FIXED = relax.FixedStep(0.05)
LEARN = relax.LearnableStep(0.05)
NO_MODIFIERS = relax.FrameModifiers()


# ----------------------------------------------------------------------------- losses


def test_delta_q_matches_hand_computed_value():
    pred = jnp.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    target = jnp.array([[[0.1, 0.0, 0.0], [1.0, 0.2, 0.2], [0.0, 0.0, 0.0]]])
    masses = jnp.array([[28.0855, 12.011, 0.0]])
    mask = jnp.array([[True, True, False]])
    # sqrt(28.0855 * 0.01 + 12.011 * 0.08) = sqrt(0.280855 + 0.96088) = sqrt(1.241735)
    np.testing.assert_allclose(losses.delta_q(pred, target, masses, mask), [np.sqrt(1.241735)], rtol=1e-6)
    # gradient is finite at zero error and on padded atoms
    g = jax.grad(lambda p: losses.delta_q(p, p, masses, mask).sum())(pred)
    assert np.all(np.isfinite(g)) and np.all(g == 0)


def test_structures_use_pymatgen_masses_and_mask():
    s = si_batch((2, 3))
    assert s.positions.shape == (2, 3, 3)
    np.testing.assert_array_equal(np.asarray(s.mask), [[True, True, False], [True, True, True]])
    np.testing.assert_allclose(np.asarray(s.masses)[1], [28.0855] * 3, rtol=1e-6)
    assert float(s.masses[0, 2]) == 0.0


def test_from_arrays_rejects_unknown_element_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown element 'Xx' at atom 1 in structure 0"):
        bm.from_arrays([["Si", "Xx"]], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match=r"structure 0: positions have shape \(3, 3\), expected \(2, 3\)"):
        bm.from_arrays([["Si", "Si"]], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="NaN or infinity"):
        bm.from_arrays([["Si"]], [np.full((1, 3), np.nan)])


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_adapt():
    cfg = bm.TINY
    params = bm.init_params(cfg, jax.random.PRNGKey(0))
    s = si_batch((5, 7))
    forces = potentials.morse_force_fn(potentials.init_morse_params(), s)
    norm = bm.fit_normalizer(np.asarray(s.positions), np.asarray(s.features), np.asarray(forces), s.mask)
    return cfg, params, norm


def test_adapt_is_permutation_equivariant_and_zero_on_padding(tiny_adapt):
    cfg, params, norm = tiny_adapt
    s = si_batch((7,), max_atoms=9)
    f = bm.make_force_fn(cfg, norm)(params, s)
    assert f.shape == (1, 9, 3)
    np.testing.assert_array_equal(np.asarray(f[0, 7:]), 0.0)
    perm = np.array([3, 0, 6, 1, 5, 2, 4, 7, 8])
    sp = s.replace(
        positions=s.positions[:, perm], species=s.species[:, perm], features=s.features[:, perm],
        masses=s.masses[:, perm], mask=s.mask[:, perm],
    )
    fp = bm.make_force_fn(cfg, norm)(params, sp)
    np.testing.assert_allclose(np.asarray(fp), np.asarray(f[:, perm]), atol=2e-5)


def test_adapt_padding_does_not_change_real_forces(tiny_adapt):
    cfg, params, norm = tiny_adapt
    ff = bm.make_force_fn(cfg, norm)
    a = ff(params, si_batch((5,)))
    b = ff(params, si_batch((5,), max_atoms=11))
    np.testing.assert_allclose(np.asarray(b[:, :5]), np.asarray(a), atol=2e-5)


def test_published_config_has_about_four_million_parameters():
    params = jax.eval_shape(lambda: bm.init_params(bm.PUBLISHED, jax.random.PRNGKey(0)))
    n = bm.count_params(params)
    assert 3.5e6 < n < 4.6e6, n


def test_fourier_encoding_changes_inputs_and_needs_cell():
    cfg = bm.AdaptConfig(d_model=16, d_ff=16, num_heads=2, num_layers=1, input_encoding="xyz+fourier")
    assert cfg.num_inputs == 12 + 24
    params = bm.init_params(cfg, jax.random.PRNGKey(0))
    s = si_batch((5,))
    s = s.replace(cell=jnp.eye(3)[None] * 7.2)
    f = bm.make_force_fn(cfg, bm.Normalizer.identity())(params, s)
    assert f.shape == (1, 5, 3) and np.all(np.isfinite(f))
    with pytest.raises(ValueError, match="input_encoding"):
        bm.AdaptConfig(input_encoding="spherical")


# ----------------------------------------------------------------------------- rollout


@functools.partial(jax.jit, static_argnums=(3, 4))
def _loss_of(params, s, target, step_rule=FIXED, rollout_cfg=relax.RolloutConfig(max_frames=6, stop_rms=1e-9)):
    res = relax.rollout(potentials.morse_force_fn, step_rule, params, s, NO_MODIFIERS, rollout_cfg)
    return jnp.mean(losses.delta_q(res.positions, target, s.masses, s.mask))


loss_of = _loss_of


def test_bptt_gradient_matches_central_finite_differences():
    with jax.enable_x64(True):
        s = si_batch((5, 6))
        s = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, s)
        target = s.positions + 0.1 * jnp.asarray(np.random.default_rng(3).normal(size=s.positions.shape))
        target = jnp.where(s.mask[..., None], target, 0.0)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), morse_params())
        grads = jax.jit(jax.grad(_loss_of), static_argnums=(3, 4))(params, s, target, LEARN)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        eps = 1e-6
        for i, (leaf, g) in enumerate(zip(leaves, jax.tree_util.tree_leaves(grads))):
            bumped = lambda d: jax.tree_util.tree_unflatten(
                treedef, [leaf + d if j == i else leaf for j, leaf in enumerate(leaves)])
            fd = (loss_of(bumped(eps), s, target, LEARN) - loss_of(bumped(-eps), s, target, LEARN)) / (2 * eps)
            np.testing.assert_allclose(float(g), float(fd), rtol=1e-5, atol=1e-8)
        assert abs(float(grads["step_rule"]["eta"])) > 0


def test_fixed_step_gets_no_gradient_learnable_does():
    s = si_batch()
    target = s.positions + 0.05
    g_fixed = jax.jit(jax.grad(_loss_of), static_argnums=(3, 4))(morse_params(), s, target, FIXED)
    g_learn = jax.jit(jax.grad(_loss_of), static_argnums=(3, 4))(morse_params(), s, target, LEARN)
    assert float(g_fixed["step_rule"]["eta"]) == 0.0 and float(g_learn["step_rule"]["eta"]) != 0.0
    assert not FIXED.trainable and LEARN.trainable


@pytest.mark.parametrize("remat,seg", [("frame", 0), ("segment", 0), ("segment", 4)])
def test_rematerialisation_gives_identical_gradients(remat, seg):
    s = si_batch()
    target = s.positions + 0.05
    rollout_config = relax.RolloutConfig(max_frames=11, stop_rms=1e-3)
    ref = jax.jit(jax.grad(_loss_of), static_argnums=(3, 4))(morse_params(), s, target, LEARN, rollout_config)
    cfg = relax.RolloutConfig(max_frames=11, stop_rms=1e-3, remat=remat, segment_length=seg)
    got = jax.jit(jax.grad(_loss_of), static_argnums=(3, 4))(morse_params(), s, target, LEARN, cfg)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, ref)


def test_padded_structure_gives_same_rollout_loss_and_gradient():
    s = si_batch((5,))
    sp = si_batch((5,), max_atoms=9)
    target = s.positions + 0.07
    target_p = jnp.pad(target, ((0, 0), (0, 4), (0, 0)))
    cfg = relax.RolloutConfig(max_frames=40, stop_rms=1e-3)
    r = relax.rollout(potentials.morse_force_fn, LEARN, morse_params(), s, NO_MODIFIERS, cfg)
    rp = relax.rollout(potentials.morse_force_fn, LEARN, morse_params(), sp, NO_MODIFIERS, cfg)
    np.testing.assert_allclose(np.asarray(rp.positions[:, :5]), np.asarray(r.positions), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(rp.positions[:, 5:]), 0.0)
    assert int(r.num_frames[0]) == int(rp.num_frames[0])
    l, g = jax.jit(jax.value_and_grad(_loss_of), static_argnums=(3, 4))(morse_params(), s, target, LEARN, cfg)
    lp, gp = jax.jit(jax.value_and_grad(_loss_of), static_argnums=(3, 4))(morse_params(), sp, target_p, LEARN, cfg)
    np.testing.assert_allclose(float(lp), float(l), rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), gp, g)


def test_frames_after_the_stop_change_nothing():
    s = si_batch((5, 6))
    target = s.positions + 0.05
    p = morse_params()
    p["step_rule"]["eta"] = jnp.asarray(0.02)
    long_cfg = relax.RolloutConfig(max_frames=300, stop_rms=1e-3, return_trajectory=True)
    r = relax.rollout(potentials.morse_force_fn, LEARN, p, s, NO_MODIFIERS, long_cfg)
    assert bool(jnp.all(r.converged)), r.num_frames
    n = int(jnp.max(r.num_frames))
    assert n < 300 and int(jnp.min(r.num_frames)) < n
    # positions are frozen after each structure's stop
    for b in range(2):
        k = int(r.num_frames[b])
        frozen = np.asarray(r.trajectory[k, b])[None].repeat(301 - k, 0)
        np.testing.assert_array_equal(np.asarray(r.trajectory[k:, b]), frozen)
    # a rollout cut exactly at the last stop has the same value and gradient
    vg = jax.jit(jax.value_and_grad(_loss_of), static_argnums=(3, 4))
    l1, g1 = vg(p, s, target, LEARN, relax.RolloutConfig(max_frames=n, stop_rms=1e-3))
    l2, g2 = vg(p, s, target, LEARN, relax.RolloutConfig(max_frames=300, stop_rms=1e-3))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_frame_is_x_plus_eta_f():
    s = si_batch()
    p = morse_params()
    new = relax.frame(potentials.morse_force_fn, FIXED, p, s)
    f = potentials.morse_force_fn(p["model"], s)
    np.testing.assert_allclose(np.asarray(new), np.asarray(s.positions + 0.05 * f), rtol=1e-6)


def test_descent_variants_momentum_anneal_noise_cap():
    f = jnp.ones((1, 2, 3))
    mask = jnp.array([[True, False]])
    eta = jnp.array([0.5])
    prev = jnp.full((1, 2, 3), 2.0)
    mom = relax.displacement(f, eta, mask, relax.FrameModifiers(momentum=0.05), prev)
    np.testing.assert_allclose(np.asarray(mom[0, 0]), 0.5 + 0.1)
    np.testing.assert_array_equal(np.asarray(mom[0, 1]), 0.0)
    capped = relax.displacement(f * 10, eta, mask, relax.FrameModifiers(max_displacement=0.2))
    np.testing.assert_allclose(float(jnp.linalg.norm(capped[0, 0])), 0.2, rtol=1e-6)
    # annealing: the k-th frame's step is eta * 0.99^k; with F constant, displacement sums a geometric series
    s = si_batch((5,))
    const_force = lambda params, st: jnp.where(st.mask[..., None], 1.0, 0.0)
    step_rule, no_params = relax.FixedStep(0.1), {"model": {}, "step_rule": {}}
    r = relax.rollout(const_force, step_rule, no_params, s, relax.FrameModifiers(anneal=0.99),
                      relax.RolloutConfig(max_frames=10, stop_rms=0.0))
    np.testing.assert_allclose(np.asarray(r.positions - s.positions)[0, 0, 0], 0.1 * (1 - 0.99**10) / 0.01, rtol=1e-5)
    # noise needs a key and changes with the key
    noisy = relax.FrameModifiers(noise_std=0.01)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        relax.rollout(const_force, step_rule, no_params, s, noisy)
    run = lambda k: relax.rollout(const_force, step_rule, no_params, s, noisy, relax.RolloutConfig(max_frames=3),
                                  key=jax.random.PRNGKey(k)).positions
    assert not np.allclose(run(0), run(1)) and np.allclose(run(0), run(0))


def test_diverging_rollout_is_flagged_and_frozen_finite():
    s = si_batch((5,))
    explode = lambda params, st: jnp.where(st.mask[..., None], 1e4, 0.0)
    r = relax.rollout(explode, FIXED, {"model": {}, "step_rule": {}}, s, NO_MODIFIERS,
                      relax.RolloutConfig(max_frames=5))
    assert bool(r.diverged[0]) and not bool(r.converged[0]) and int(r.num_frames[0]) == 0
    np.testing.assert_array_equal(np.asarray(r.positions), np.asarray(s.positions))


def test_neural_step_head_starts_at_init_step_and_is_trainable(tiny_adapt):
    cfg, params, norm = tiny_adapt
    rule = NeuralStep(init_step=0.077, normalizer=norm)
    sp = rule.init(jax.random.PRNGKey(3))
    s = si_batch((5, 7))
    f = potentials.morse_force_fn(potentials.init_morse_params(), s)
    np.testing.assert_allclose(np.asarray(jax.jit(rule.apply)(sp, s, f)), 0.077, rtol=1e-6)
    g = jax.jit(jax.grad(lambda p: jnp.sum(rule.apply(p, s, f))))(sp)
    assert float(optax.global_norm(g)) > 0


def test_bounded_neural_step_head_starts_at_init_step_and_stays_below_its_cap(tiny_adapt):
    cfg, params, norm = tiny_adapt
    rule = NeuralStep(init_step=0.05, max_scale=1.5, normalizer=norm)
    sp = rule.init(jax.random.PRNGKey(3))
    ssf = rule.apply
    s = si_batch((5, 7))
    f = potentials.morse_force_fn(potentials.init_morse_params(), s)
    np.testing.assert_allclose(np.asarray(ssf(sp, s, f)), 0.05, rtol=1e-5)
    # push the last layer's bias far up: the step saturates just below 1.5 x 0.05, never above
    big = jax.tree_util.tree_map(lambda x: x, sp)
    big["head"]["out"]["bias"] = big["head"]["out"]["bias"] + 50.0
    eta = np.asarray(ssf(big, s, f))
    assert np.all(eta <= 0.075 + 1e-7) and np.all(eta > 0.074)
    with pytest.raises(ValueError, match="max_scale"):
        NeuralStep(max_scale=0.5)


# ----------------------------------------------------------------------------- optimiser and training


def test_proximal_transform_pulls_toward_stored_weights():
    anchor = {"w": jnp.array([1.0, -2.0])}
    tx = optim.proximal(0.5)
    state = tx.init(anchor)
    moved = {"w": jnp.array([3.0, -2.0])}
    upd, _ = tx.update({"w": jnp.zeros(2)}, state, moved)
    np.testing.assert_allclose(np.asarray(upd["w"]), [1.0, 0.0])  # 0.5 * (3 - 1), 0
    # with SGD, repeated steps with zero task gradient move the weights back to the anchor
    sgd = optax.chain(optim.proximal(1.0), optax.sgd(0.5))
    p, st = moved, sgd.init(anchor)
    for _ in range(30):
        u, st = sgd.update({"w": jnp.zeros(2)}, st, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(np.asarray(p["w"]), [1.0, -2.0], atol=1e-6)


def test_nonfinite_gradient_skips_update_and_is_counted():
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.1))
    params = morse_params()
    st = tx.init(params)
    bad = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params)
    upd, st = tx.update(bad, st, params)
    new = optax.apply_updates(params, upd)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), new, params)
    assert int(optim.nonfinite_counts(st)["nonfinite_total"]) == 1


def test_freeze_model_trains_only_the_step():
    tx = bm.make_optimizer(bm.OptimConfig(freeze_model=True, step_rule_learning_rate=0.01))
    params = morse_params()
    st = tx.init(params)
    g = jax.tree_util.tree_map(jnp.ones_like, params)
    upd, st = tx.update(g, st, params)
    new = optax.apply_updates(params, upd)
    assert float(new["model"]["depth"]) == float(params["model"]["depth"])
    assert float(new["step_rule"]["eta"]) != float(params["step_rule"]["eta"])


def make_morse_task(n_struct=4, seed=0):
    """Reference relaxations from a 'true' Morse potential; the model starts from a wrong one."""
    sizes = (5, 6, 7, 8)[:n_struct]
    s = si_batch(sizes, seed=seed)
    truth = {"model": potentials.init_morse_params(depth=0.6, r0=2.5, alpha=1.4), "step_rule": {}}
    ref = jax.jit(lambda p: relax.rollout(potentials.morse_force_fn, FIXED, p, s, NO_MODIFIERS,
                                          relax.RolloutConfig(max_frames=150, stop_rms=1e-5)))(truth)
    return bm.RelaxationBatch(s, ref.positions, jnp.ones(len(sizes)))


def test_bptt_finetunes_a_pair_potential_and_lowers_dq():
    batch = make_morse_task()
    params = morse_params(depth=0.5, r0=2.3, alpha=1.6)
    cfg = bm.BPTTConfig(rollout=relax.RolloutConfig(max_frames=40, stop_rms=1e-3))
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.02, step_rule_learning_rate=0.002, clip_norm=10.0))
    trainer = bm.make_bptt_trainer(potentials.morse_force_fn, LEARN, cfg, tx)
    state = trainer.init(params, jax.random.PRNGKey(0))
    first = None
    for _ in range(40):
        state, m = trainer.update(state, batch)
        first = float(m["dq"]) if first is None else first
    _, m = trainer.update(state, batch)
    assert float(m["dq"]) < 0.5 * first, (first, float(m["dq"]))
    assert abs(float(state.params["model"]["r0"]) - 2.5) < abs(2.3 - 2.5)


def test_bptt_step_runs_for_adapt_with_every_step_kind(tiny_adapt):
    cfg, mp, norm = tiny_adapt
    batch = make_morse_task(2)
    ff = bm.make_force_fn(cfg, norm)
    for rule in (relax.LearnableStep(0.02), NeuralStep(0.02, normalizer=norm)):
        params = {"model": mp, "step_rule": rule.init(jax.random.PRNGKey(1))}
        tx = bm.make_optimizer(bm.OptimConfig(learning_rate=1e-3))
        bcfg = bm.BPTTConfig(rollout=relax.RolloutConfig(max_frames=4), random_stopping=True, frame_limit_range=(2, 4))
        trainer = bm.make_bptt_trainer(ff, rule, bcfg, tx)
        new, m = trainer.update(trainer.init(params, jax.random.PRNGKey(0)), batch)
        assert np.isfinite(float(m["loss"])) and int(new.step) == 1
        changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), new.params["model"], mp)
        assert any(jax.tree_util.tree_leaves(changed))


def test_pretrain_step_reduces_force_error(tiny_adapt):
    cfg, mp, norm = tiny_adapt
    s = si_batch((5, 7))
    forces = potentials.morse_force_fn(potentials.init_morse_params(), s)
    batch = bm.ForceBatch(s, forces, jnp.ones(2))
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=3e-3, freeze_step_rule=True))
    trainer = bm.make_pretrain_trainer(bm.make_train_force_fn(cfg, norm), tx)
    state = trainer.init({"model": mp, "step_rule": {}}, jax.random.PRNGKey(0))
    losses_seen = []
    for _ in range(30):
        state, m = trainer.update(state, batch)
        losses_seen.append(float(m["loss"]))
    assert losses_seen[-1] < 0.5 * losses_seen[0]


# ----------------------------------------------------------------------------- grid search, checkpoint


def test_grid_search_equals_loop_of_single_rollouts():
    batch = make_morse_task(3)
    etas = jnp.array([0.01, 0.03, 0.06, 0.1])
    cfg = relax.RolloutConfig(max_frames=25, stop_rms=1e-3)
    mp = potentials.init_morse_params(depth=0.5, r0=2.3)
    grid = bm.make_grid_search(potentials.morse_force_fn, cfg)(mp, batch, etas)
    chunked = bm.make_grid_search(potentials.morse_force_fn, cfg, chunk_size=3)(mp, batch, etas)
    for i, eta in enumerate(etas):
        r = relax.rollout(potentials.morse_force_fn, relax.FixedStep(float(eta)), {"model": mp, "step_rule": {}},
                          batch.initial, NO_MODIFIERS, cfg)
        dq = losses.delta_q(r.positions, batch.target_positions, batch.initial.masses, batch.initial.mask)
        np.testing.assert_allclose(np.asarray(grid.dq[i]), np.asarray(dq), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(grid.num_frames[i]), np.asarray(r.num_frames))
        np.testing.assert_allclose(float(grid.mean_dq[i]), float(jnp.mean(dq)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked.dq), np.asarray(grid.dq), rtol=1e-6)


def test_checkpoint_round_trips_exactly(tmp_path, tiny_adapt):
    cfg, mp, norm = tiny_adapt
    rule = relax.LearnableStep()
    params = {"model": mp, "step_rule": rule.init()}
    tx = bm.make_optimizer(bm.OptimConfig(proximal_weight=0.1))
    trainer = bm.make_bptt_trainer(bm.make_force_fn(cfg, norm), rule, bm.BPTTConfig(), tx)
    state = trainer.init(params, jax.random.PRNGKey(5))
    g = jax.tree_util.tree_map(jnp.ones_like, params)
    upd, opt_state = tx.update(g, state.opt_state, params)
    state = state.replace(params=optax.apply_updates(params, upd), opt_state=opt_state, step=state.step + 1)
    meta = {"model_config": checkpoint.config_to_dict(cfg), "note": "test"}
    checkpoint.save_checkpoint(tmp_path / "ckpt", 1, state, norm, meta)
    fresh = trainer.init(params, jax.random.PRNGKey(0))
    restored, meta2 = checkpoint.restore_state(tmp_path / "ckpt", fresh)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
    assert meta2["note"] == "test"
    p2, n2, m3 = model_io.restore_model(tmp_path / "ckpt")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p2, state.params)
    np.testing.assert_array_equal(np.asarray(n2.force_std), np.asarray(norm.force_std))
    assert model_io.adapt_config_from_dict(m3["model_config"]) == cfg
