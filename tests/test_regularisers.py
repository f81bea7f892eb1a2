"""Regularised BPTT (issue 9): force term, rigid-motion augmentation, intermediate starts,
early stopping, cross-validation splits. Each test checks behaviour against something computed
independently (a plain force loss, an equivariant toy force field, a count by hand)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_mlip as bm
from bptt_mlip.training import augment
from bptt_mlip.training import loops
from bptt_mlip.models import potentials
from bptt_mlip import relax
from bptt_mlip.training import steps as train
from bptt_mlip.data import batching
from bptt_mlip.data.trajectory import make_trajectory

FIXED = relax.FixedStep(0.05)
ROLL = relax.RolloutConfig(max_frames=8, stop_rms=1e-9)


def cluster(n, seed, spacing=2.4, noise=0.25):
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(3)], float)[:n] * spacing
    return grid + rng.normal(0.0, noise, grid.shape)


def morse_task(sizes=(5, 7), max_atoms=8, seed=0):
    """Start structures, Morse reference relaxations and reference forces of the start frames."""
    s = bm.from_arrays([["Si"] * n for n in sizes], [cluster(n, seed + i) for i, n in enumerate(sizes)],
                       max_atoms=max_atoms)
    truth = potentials.init_morse_params(depth=0.6, r0=2.5, alpha=1.4)
    ref = relax.rollout(potentials.morse_force_fn, FIXED, {"model": truth, "step_rule": {}}, s, relax.FrameModifiers(),
                        relax.RolloutConfig(max_frames=100, stop_rms=1e-5))
    relax_batch = bm.RelaxationBatch(s, ref.positions, jnp.ones(len(sizes)))
    force_batch = bm.ForceBatch(s, potentials.morse_force_fn(truth, s), jnp.ones(len(sizes)))
    return relax_batch, force_batch


def params(**kw):
    model = potentials.init_morse_params(**{"depth": 0.5, "r0": 2.3, "alpha": 1.6, **kw})
    return {"model": model, "step_rule": FIXED.init()}


def grad_of(config, relax_batch, force_batch, p=None, key=0):
    fn = lambda q: train.bptt_loss(q, relax_batch, potentials.morse_force_fn, FIXED, config,
                                   jax.random.PRNGKey(key), force_batch)
    return jax.value_and_grad(fn, has_aux=True)(params() if p is None else p)


# ----------------------------------------------------------------------------- force term


def test_force_term_alone_has_the_plain_force_loss_gradient():
    rb, fb = morse_task()
    cfg = train.BPTTConfig(rollout=ROLL, dq_weight=0.0, force_weight=1.0)
    (loss, aux), g = grad_of(cfg, rb, fb)
    plain = lambda m: train.force_loss(m, fb, train.deterministic(potentials.morse_force_fn), jax.random.PRNGKey(0))[0]
    ref_loss, ref_g = jax.value_and_grad(plain)(params()["model"])
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for k in ref_g:
        np.testing.assert_allclose(float(g["model"][k]), float(ref_g[k]), rtol=1e-5, atol=1e-8)
    assert float(aux["force_mse"]) == pytest.approx(float(ref_loss), rel=1e-6) and float(ref_loss) > 0


def test_force_term_adds_linearly_to_the_dq_gradient():
    rb, fb = morse_task()
    w = 3.0
    (_, _), g_dq = grad_of(train.BPTTConfig(rollout=ROLL), rb, None)
    (_, _), g_f = grad_of(train.BPTTConfig(rollout=ROLL, dq_weight=0.0, force_weight=1.0), rb, fb)
    (_, _), g_both = grad_of(train.BPTTConfig(rollout=ROLL, force_weight=w), rb, fb)
    for k in g_dq["model"]:
        expect = float(g_dq["model"][k]) + w * float(g_f["model"][k])
        np.testing.assert_allclose(float(g_both["model"][k]), expect, rtol=1e-5, atol=1e-7)


def test_force_term_needs_a_force_batch_and_a_nonempty_objective():
    rb, _ = morse_task()
    with pytest.raises(ValueError, match="force_batch"):
        grad_of(train.BPTTConfig(rollout=ROLL, force_weight=1.0), rb, None)
    with pytest.raises(ValueError, match="both 0"):
        train.BPTTConfig(dq_weight=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        train.BPTTConfig(force_weight=-1.0)


# ----------------------------------------------------------------------------- augmentation


def test_random_rotations_are_proper_rotations():
    r = np.asarray(augment.random_rotations(jax.random.PRNGKey(3), 64), np.float64)
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
    # Haar-uniform: the mean of a uniformly random rotation matrix is 0
    assert np.abs(np.asarray(augment.random_rotations(jax.random.PRNGKey(4), 4000)).mean(0)).max() < 0.05


def test_augmentation_leaves_an_equivariant_force_field_unchanged():
    rb, fb = morse_task()
    plain = train.BPTTConfig(rollout=ROLL, force_weight=0.5)
    aug = train.BPTTConfig(rollout=ROLL, force_weight=0.5, augment_rotation=True, augment_translation=3.0)
    (l0, a0), g0 = grad_of(plain, rb, fb)
    (l1, a1), g1 = grad_of(aug, rb, fb)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-4)
    np.testing.assert_allclose(float(a1["force_mse"]), float(a0["force_mse"]), rtol=1e-4)
    for k in g0["model"]:
        np.testing.assert_allclose(float(g1["model"][k]), float(g0["model"][k]), rtol=2e-3, atol=1e-6)
    # ... and it really moved the structures
    moved = augment.augment_relaxation_batch(rb, jax.random.PRNGKey(1), rotate=True, max_translation=3.0)
    assert float(jnp.max(jnp.abs(moved.initial.positions - rb.initial.positions))) > 0.5


def test_augmented_forces_rotate_with_the_structure_and_padding_stays_zero():
    rb, fb = morse_task()
    truth = potentials.init_morse_params(depth=0.6, r0=2.5, alpha=1.4)
    moved = augment.augment_force_batch(fb, jax.random.PRNGKey(7), rotate=True, max_translation=2.0)
    np.testing.assert_allclose(moved.forces, potentials.morse_force_fn(truth, moved.structures), atol=2e-5)
    mask = np.asarray(fb.structures.mask)
    assert not mask.all()
    assert np.all(np.asarray(moved.structures.positions)[~mask] == 0) and np.all(np.asarray(moved.forces)[~mask] == 0)


def test_augmentation_rotates_the_cell_so_fractional_coordinates_are_kept():
    s = bm.from_arrays([["Si"] * 4], [np.random.default_rng(0).uniform(0, 5, (4, 3))], [np.diag([5.0, 6.0, 7.0])])
    rb = bm.RelaxationBatch(s, s.positions, jnp.ones(1))
    moved = augment.augment_relaxation_batch(rb, jax.random.PRNGKey(0), rotate=True)
    frac = lambda x, c: np.asarray(x)[0] @ np.linalg.inv(np.asarray(c)[0])
    np.testing.assert_allclose(frac(moved.initial.positions, moved.initial.cell), frac(s.positions, s.cell), atol=1e-5)


def test_augmentation_changes_adapt_loss():
    cfg = bm.TINY
    rb, fb = morse_task()
    norm = bm.fit_normalizer(np.asarray(rb.initial.positions), np.asarray(rb.initial.features), np.asarray(fb.forces),
                             rb.initial.mask)
    force_fn = bm.make_force_fn(cfg, norm)
    p = {"model": bm.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": FIXED.init()}
    loss = lambda c: float(train.bptt_loss(p, rb, force_fn, FIXED, c, jax.random.PRNGKey(0))[0])
    base = loss(train.BPTTConfig(rollout=ROLL))
    assert loss(train.BPTTConfig(rollout=ROLL, augment_rotation=True)) != pytest.approx(base, rel=1e-6)


# ----------------------------------------------------------------------------- loops: starts, sampler, patience


def _morse_traj(n, seed, frames=7):
    truth = potentials.init_morse_params(depth=0.6, r0=2.5, alpha=1.4)
    s = bm.from_arrays([["Si"] * n], [cluster(n, seed)])
    res = relax.rollout(potentials.morse_force_fn, FIXED, {"model": truth, "step_rule": {}}, s, relax.FrameModifiers(),
                        relax.RolloutConfig(max_frames=frames - 1, stop_rms=0.0, return_trajectory=True))
    pos = np.asarray(res.trajectory)[:, 0, :n]  # [frames, n, 3], the start included
    forces = np.stack([np.asarray(potentials.morse_force_fn(truth, s.replace(positions=jnp.asarray(x[None]))))[0]
                       for x in pos])
    return make_trajectory(["Si"] * n, pos.astype(np.float64), forces=forces.astype(np.float64), source="morse",
                           traj_id=f"m{seed}")


@pytest.fixture(scope="module")
def morse_trajs():
    return [_morse_traj(n, k) for k, n in enumerate((5, 6, 7))]


def _finetune(trajs, val, **kw):
    steps = []
    cfg = kw.pop("config", train.BPTTConfig(rollout=ROLL))
    best, history, state = loops.bptt_finetune(
        potentials.morse_force_fn, FIXED, params(), trajs, val, bptt_config=cfg,
        optim_config=bm.OptimConfig(learning_rate=kw.pop("lr", 1e-3), freeze_step_rule=True), batch_size=2,
        log=lambda phase, i, m: steps.append(m) if phase == "bptt_step" else None, report=lambda m: None, **kw)
    return best, history, state, steps


def test_intermediate_starts_give_the_expected_number_of_rollouts(morse_trajs):
    t = morse_trajs
    assert all(x.num_frames == 7 for x in t)
    # starts at frames 0, 3 (stride 3, before the last frame 6): 2 per trajectory, 6 rollouts, batch 2
    assert [len(batching.intermediate_start_pairs(x, 3)) for x in t] == [2, 2, 2]
    _, _, _, steps = _finetune(t, [], epochs=1, start_stride=3)
    # buckets: all trajectories have <= 16 atoms -> one bucket; 6 rollouts in batches of 2
    assert len(steps) == 3
    _, _, _, steps = _finetune(t, [], epochs=1, start_stride=0)
    assert len(steps) == 2  # 3 first-frame rollouts: a full batch and a half one


def test_frame_sampler_is_a_pure_function_of_seed_and_step(morse_trajs):
    a = batching.FrameSampler(morse_trajs, 4, seed=1)
    b = batching.FrameSampler(morse_trajs, 4, seed=1)
    np.testing.assert_array_equal(a(5).forces, b(5).forces)
    assert not np.array_equal(np.asarray(a(5).forces), np.asarray(a(6).forces))
    assert a(0).forces.shape == (4, 16, 3)  # 5-7 atoms: the smallest bucket


def test_force_term_in_the_loop_is_logged_and_resume_identity_includes_it(morse_trajs, tmp_path):
    cfg = train.BPTTConfig(rollout=ROLL, force_weight=1.0)
    _, _, _, steps = _finetune(morse_trajs, [], epochs=1, config=cfg, force_batch_size=3, checkpoint_dir=tmp_path)
    assert len(steps) == 2 and all("force_mse" in m and np.isfinite(m["force_mse"]) for m in steps)
    # a resumed run must draw the same force batches: another force batch size is refused
    with pytest.raises(ValueError, match="force_batch_size=3"):
        _finetune(morse_trajs, [], epochs=2, config=cfg, force_batch_size=4, checkpoint_dir=tmp_path, resume=True)


def test_patience_stops_early_and_keeps_the_best(morse_trajs):
    # a huge learning rate ruins the model after the first step, so validation never improves
    best, history, _, _ = _finetune(morse_trajs[:2], morse_trajs[2:], epochs=6, patience=2, lr=5.0)
    epochs = [h["epoch"] for h in history]
    assert epochs == [0, 1, 2]
    assert loops._best_val_epoch(history) == 0
    for k in best["model"]:
        assert float(best["model"][k]) == float(params()["model"][k])


# ----------------------------------------------------------------------------- weight decay, proximal pull


def test_weight_decay_shrinks_and_proximal_pulls_back_with_zero_loss_gradient():
    start = {"model": {"w": jnp.array([2.0, -1.0])}, "step_rule": {}}
    zero = {"model": {"w": jnp.zeros(2)}, "step_rule": {}}
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.1, weight_decay=0.5, clip_norm=0.0))
    upd, _ = tx.update(zero, tx.init(start), start)
    # decoupled (AdamW): w <- w - lr * wd * w when the loss gradient is zero
    np.testing.assert_allclose(upd["model"]["w"], -0.1 * 0.5 * np.array([2.0, -1.0]), rtol=1e-6)
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.1, proximal_weight=1.0, clip_norm=0.0))
    state = tx.init(start)  # the anchor: the weights at init (the pretrained model)
    moved = {"model": {"w": jnp.array([3.0, -1.0])}, "step_rule": {}}
    upd, _ = tx.update(zero, state, moved)
    assert float(upd["model"]["w"][0]) < 0 and float(upd["model"]["w"][1]) == 0.0  # back toward 2.0, -1.0 untouched


def test_learning_rate_warmup_is_linear_from_zero_and_only_for_the_model_group():
    params_ = {"model": {"w": jnp.array([1.0])}, "step_rule": {"eta": jnp.asarray(0.05)}}
    grad = {"model": {"w": jnp.array([0.5])}, "step_rule": {"eta": jnp.asarray(0.5)}}
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.1, step_rule_learning_rate=0.01, clip_norm=0.0,
                                          warmup_steps=4))
    state = tx.init(params_)
    model_moves, eta_moves = [], []
    for _ in range(6):
        upd, state = tx.update(grad, state, params_)
        model_moves.append(float(upd["model"]["w"][0]))
        eta_moves.append(float(upd["step_rule"]["eta"]))
    # Adam on a constant gradient moves by -lr (up to eps); the model's lr is 0, 0.025, ..., 0.1, 0.1
    np.testing.assert_allclose(model_moves, [-0.0, -0.025, -0.05, -0.075, -0.1, -0.1], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(eta_moves, [-0.01] * 6, rtol=1e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        bm.make_optimizer(bm.OptimConfig(warmup_steps=-1))


def test_pretrain_augmentation_leaves_an_equivariant_model_loss_unchanged():
    _, fb = morse_task()
    p = params()
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=1e-3, freeze_step_rule=True))
    losses_ = []
    for aug in (False, True):
        trainer = train.make_pretrain_trainer(train.deterministic(potentials.morse_force_fn), tx, augment_rotation=aug,
                                              augment_translation=2.0 if aug else 0.0)
        _, m = trainer.update(trainer.init(p, jax.random.PRNGKey(0)), fb)
        losses_.append(float(m["loss"]))
    assert losses_[0] > 0
    np.testing.assert_allclose(losses_[1], losses_[0], rtol=1e-4)
