"""Step rules as objects (init/apply), their stored form and older checkpoints, and the trainers
in the init/apply shape (jit on or off, with or without a one-device mesh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bptt_mlip as bm
from bptt_mlip.workflow import model_io
from bptt_mlip import relax
from bptt_mlip.models import adapt, potentials
from bptt_mlip.models.step_head import NeuralStep
from bptt_mlip.training import checkpoint, parallel
from bptt_mlip.training import steps as train

LEGACY_STEP_CONFIG = {"kind": "learnable", "init_step": 0.03, "momentum": 0.05, "anneal": 0.99, "noise_std": 0.0,
                      "max_displacement": 0.2, "head_d_model": 32, "head_num_heads": 2, "head_num_layers": 1,
                      "head_max_scale": 0.0}
"""The ``step_config`` meta that checkpoints written before the step-rule objects carry."""


def _batch(sizes=(4, 6)):
    rng = np.random.default_rng(0)
    pos = [np.arange(n)[:, None] * np.array([2.4, 0.0, 0.0]) + rng.normal(0, 0.2, (n, 3)) for n in sizes]
    return bm.from_arrays([["Si"] * n for n in sizes], pos, max_atoms=8)


def test_scalar_rules_apply_their_step_size_to_every_structure():
    s = _batch()
    forces = jnp.ones_like(s.positions)
    fixed, learnable = relax.FixedStep(0.04), relax.LearnableStep(0.03)
    np.testing.assert_array_equal(np.asarray(fixed.apply(fixed.init(), s, forces)), np.float32([0.04, 0.04]))
    np.testing.assert_array_equal(np.asarray(fixed.apply({}, s, forces)), np.float32([0.04, 0.04]))
    # the fixed step is a parameter (one compilation for every step size) that no gradient reaches
    assert float(jax.grad(lambda p: jnp.sum(fixed.apply(p, s, forces)))(fixed.init())["eta"]) == 0.0
    params = learnable.init()
    np.testing.assert_array_equal(np.asarray(learnable.apply(params, s, forces)), np.float32([0.03, 0.03]))
    # d(sum of step sizes)/d eta = batch size, by hand
    assert float(jax.grad(lambda p: jnp.sum(learnable.apply(p, s, forces)))(params)["eta"]) == 2.0
    assert fixed.describe({}) == fixed.describe(fixed.init()) == "fixed, eta = 0.04 Å²/eV"
    assert learnable.describe({"eta": jnp.float32(0.0412)}) == "learnable, eta = 0.0412 Å²/eV"
    assert isinstance(fixed, relax.StepRule) and isinstance(NeuralStep(), relax.StepRule)
    with pytest.raises(ValueError, match="step_size"):
        relax.FixedStep(0.0)


def test_a_capped_learnable_step_uses_min_eta_cap_and_no_gradient_reaches_eta_above_it():
    s = _batch()
    forces = jnp.ones_like(s.positions)
    capped = relax.LearnableStep(0.03, max_step=0.05)

    def step_sum(eta):
        return jnp.sum(capped.apply({"eta": eta}, s, forces))

    np.testing.assert_array_equal(np.asarray(capped.apply(capped.init(), s, forces)), np.float32([0.03, 0.03]))
    assert float(jax.grad(step_sum)(jnp.float32(0.04))) == 2.0  # below the cap: as unbounded
    assert float(step_sum(jnp.float32(0.08))) == pytest.approx(0.1)  # above it: the cap, twice
    assert float(jax.grad(step_sum)(jnp.float32(0.08))) == 0.0
    assert float(capped.scalar_step_size({"eta": jnp.float32(0.08)})) == pytest.approx(0.05)
    assert capped.describe({"eta": jnp.float32(0.08)}) == "learnable, eta = 0.05 Å²/eV (capped at 0.05)"
    with pytest.raises(ValueError, match="init_step = 0.06 Å²/eV is above its max_step = 0.05"):
        relax.LearnableStep(0.06, max_step=0.05)
    with pytest.raises(ValueError, match="max_step must be >= 0"):
        relax.LearnableStep(0.03, max_step=-1.0)


def test_training_a_capped_learnable_step_never_steps_past_its_cap():
    """On the Morse task a larger step ends closer within the frame limit, so BPTT grows eta; the
    frames never use more than the cap (the reported train_eta), however far eta itself moves."""
    batch = _morse_task()
    rule = relax.LearnableStep(0.01, max_step=0.012)
    params = {"model": potentials.init_morse_params(depth=0.6, r0=2.5, alpha=1.4), "step_rule": rule.init()}
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.0, step_rule_learning_rate=0.005))
    trainer = train.make_bptt_trainer(potentials.morse_force_fn, rule,
                                      bm.BPTTConfig(rollout=relax.RolloutConfig(max_frames=6)), tx)
    state = trainer.init(params, jax.random.PRNGKey(0))
    etas = []
    for _ in range(4):
        state, metrics = trainer.update(state, batch)
        etas.append(float(metrics["eta"]))
    assert float(state.params["step_rule"]["eta"]) > 0.012  # the learned parameter went past the cap ...
    assert max(etas) == pytest.approx(0.012) and all(e <= 0.012 + 1e-9 for e in etas)  # ... the frames did not


def test_rules_are_hashable_jit_static_arguments_and_the_head_hashes_its_normalizer_by_identity():
    assert hash(relax.FixedStep(0.05)) == hash(relax.FixedStep(0.05)) and relax.FixedStep(0.05) != relax.FixedStep(0.06)
    norm = adapt.Normalizer.identity()
    assert NeuralStep(0.05, normalizer=norm) == NeuralStep(0.05, normalizer=norm)
    assert hash(NeuralStep(0.05, normalizer=norm)) == hash(NeuralStep(0.05, normalizer=norm))
    # equal statistics in another object: not the same rule (a cached rollout must not mix them up)
    assert NeuralStep(0.05, normalizer=norm) != NeuralStep(0.05, normalizer=adapt.Normalizer.identity())
    s = _batch()
    run = jax.jit(lambda rule, p, st: rule.apply(p, st, jnp.zeros_like(st.positions)), static_argnums=0)
    np.testing.assert_allclose(np.asarray(run(relax.FixedStep(0.07), {}, s)), 0.07, rtol=1e-7)


@pytest.mark.parametrize("rule", [relax.FixedStep(0.02), relax.LearnableStep(0.03),
                                  relax.LearnableStep(0.03, max_step=0.05),
                                  NeuralStep(0.04, d_model=16, num_heads=4, num_layers=2, max_scale=1.5)])
def test_stored_form_round_trips(rule):
    modifiers = relax.FrameModifiers(momentum=0.05, anneal=0.99, noise_std=0.01, max_displacement=0.3)
    norm = adapt.Normalizer.identity()
    stored = relax.step_rule_to_dict(rule, modifiers)
    back, back_modifiers = relax.step_rule_from_dict(stored, norm)
    assert back_modifiers == modifiers and stored["kind"] == rule.kind
    if isinstance(rule, NeuralStep):
        assert back.normalizer is norm and back == NeuralStep(0.04, 16, 4, 2, 1.5, normalizer=norm)
    else:
        assert back == rule


def test_stored_form_of_older_checkpoints_still_reads():
    rule, modifiers = relax.step_rule_from_dict(LEGACY_STEP_CONFIG)
    assert rule == relax.LearnableStep(0.03)
    assert modifiers == relax.FrameModifiers(momentum=0.05, anneal=0.99, noise_std=0.0, max_displacement=0.2)
    assert relax.step_rule_from_dict({}) == (relax.FixedStep(0.077), relax.FrameModifiers())  # the old default
    neural, _ = relax.step_rule_from_dict({**LEGACY_STEP_CONFIG, "kind": "neural", "head_max_scale": 2.0})
    assert neural == NeuralStep(0.03, 32, 2, 1, 2.0)
    with pytest.raises(ValueError, match="unknown step rule kind 'newton'"):
        relax.step_rule_from_dict({"kind": "newton"})
    # a fixed step kept its eta among the parameters: that eta wins over the stored init_step
    fixed, _, params = relax.step_rule_from_checkpoint({"kind": "fixed", "init_step": 0.05}, {"eta": np.float32(0.03)})
    assert fixed == relax.FixedStep(float(np.float32(0.03))) and float(params["eta"]) == pytest.approx(0.03)


def test_checkpoint_written_with_the_old_parameter_key_loads(tmp_path):
    from bptt_mlip.workflow import api

    cfg = adapt.TINY
    old_params = {"model": adapt.init_params(cfg, jax.random.PRNGKey(0)), "step": {"eta": jnp.float32(0.021)}}
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=old_params,
                             opt_state=optax.identity().init(old_params), key=jax.random.PRNGKey(0))
    meta = {"model_config": checkpoint.config_to_dict(cfg), "step_config": LEGACY_STEP_CONFIG}
    checkpoint.save_checkpoint(tmp_path / "old", 0, state, adapt.Normalizer.identity(), meta)
    params, _, _ = model_io.restore_model(tmp_path / "old")
    assert set(params) == {"model", "step_rule"} and float(params["step_rule"]["eta"]) == pytest.approx(0.021)
    model = api.TrainedModel.load(tmp_path / "old")
    assert model.step_rule == relax.LearnableStep(0.03) and model.modifiers.momentum == 0.05
    assert model.step_description() == "learnable, eta = 0.021 Å²/eV"
    assert model.scalar_step_size() == pytest.approx(0.021)
    out = api.relax_structures([_ase_dimer()], model, max_frames=2)
    assert out.num_frames[0] >= 1


def test_a_trained_models_one_step_size_is_the_learned_capped_or_initial_one():
    from bptt_mlip.workflow import api

    model_params = adapt.init_params(adapt.TINY, jax.random.PRNGKey(0))
    capped = relax.LearnableStep(0.03, max_step=0.05)

    def trained(rule, step_params):
        params = {"model": model_params, "step_rule": step_params}
        return api.TrainedModel(adapt.TINY, adapt.Normalizer.identity(), params, rule)

    assert trained(capped, {"eta": jnp.float32(0.08)}).scalar_step_size() == pytest.approx(0.05)
    assert trained(capped, {"eta": jnp.float32(0.04)}).scalar_step_size() == pytest.approx(0.04)
    assert trained(capped, {}).scalar_step_size() == pytest.approx(0.03)  # saved without parameters: its start
    assert trained(relax.FixedStep(0.02), {}).scalar_step_size() == pytest.approx(0.02)
    neural = NeuralStep(0.04, d_model=16, num_heads=4, num_layers=2)
    assert trained(neural, neural.init(jax.random.PRNGKey(1))).scalar_step_size() is None  # varies per structure


def _ase_dimer():
    from ase import Atoms

    return Atoms("Si2", positions=[[0, 0, 0], [2.2, 0.1, 0]])


def _morse_task():
    s = _batch((5, 6))
    truth = {"model": potentials.init_morse_params(depth=0.6, r0=2.5, alpha=1.4), "step_rule": {}}
    ref = relax.rollout(potentials.morse_force_fn, relax.FixedStep(0.05), truth, s, relax.FrameModifiers(),
                        relax.RolloutConfig(max_frames=60, stop_rms=1e-5))
    return bm.RelaxationBatch(s, ref.positions, jnp.ones(2))


def _close(a, b, **kw):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def test_trainer_init_uses_the_one_optimizer_and_update_is_the_same_jitted_eager_and_on_a_mesh():
    batch = _morse_task()
    rule = relax.LearnableStep(0.04)
    params = {"model": potentials.init_morse_params(depth=0.5, r0=2.3), "step_rule": rule.init()}
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.01, step_rule_learning_rate=0.001))
    config = bm.BPTTConfig(modifiers=relax.FrameModifiers(momentum=0.05), rollout=relax.RolloutConfig(max_frames=12),
                           random_stopping=True, frame_limit_range=(8, 12))
    jitted = train.make_bptt_trainer(potentials.morse_force_fn, rule, config, tx)
    eager = train.make_bptt_trainer(potentials.morse_force_fn, rule, config, tx, jit=False)
    on_mesh = train.make_bptt_trainer(potentials.morse_force_fn, rule, config, tx,
                                      mesh=parallel.make_mesh(jax.devices()[:1]))
    key = jax.random.PRNGKey(7)
    state = jitted.init(params, key)
    _close(state.opt_state, tx.init(params), rtol=0, atol=0)
    assert int(state.step) == 0 and np.array_equal(np.asarray(state.key), np.asarray(key))
    results = [t.update(t.init(params, key), batch) for t in (jitted, eager, on_mesh)]
    (s1, m1), (s2, m2), (s3, m3) = results
    _close(s2.params, s1.params, rtol=1e-6, atol=1e-8)
    _close(s3.params, s1.params, rtol=1e-6, atol=1e-8)
    _close({k: m2[k] for k in m1}, m1, rtol=1e-5, atol=1e-7)
    assert float(m1["eta"]) != 0.04 and int(s1.step) == 1  # the learnable eta moved, and is reported
    with pytest.raises(ValueError, match="1-D mesh"):
        parallel.one_d(jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b")))


def test_pretrain_trainer_trains_only_the_model():
    batch = _morse_task()
    forces = potentials.morse_force_fn(potentials.init_morse_params(), batch.initial)
    fb = bm.ForceBatch(batch.initial, forces, jnp.ones(2))
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=0.01, freeze_step_rule=True))
    trainer = bm.make_pretrain_trainer(train.deterministic(potentials.morse_force_fn), tx)
    params = {"model": potentials.init_morse_params(depth=0.5, r0=2.3), "step_rule": {}}
    state, metrics = trainer.update(trainer.init(params, jax.random.PRNGKey(0)), fb)
    assert "eta" not in metrics and float(metrics["loss"]) > 0 and int(state.step) == 1
    assert float(state.params["model"]["r0"]) != 2.3
