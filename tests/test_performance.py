"""Performance properties that do not depend on timing: compile counts, memory bounds from XLA's
compiled memory analysis, data-parallel equality on 4 forced host devices, the bfloat16 option."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_mlip as bm
from bptt_mlip.models import adapt as model
from bptt_mlip.training import optim
from bptt_mlip import relax
from bptt_mlip.training import steps as train
from bptt_mlip.data import batching
from bptt_mlip.data.store import load_default_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations by jitted function name while active."""
    from jax._src import monitoring

    counts: collections.Counter = collections.Counter()

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            counts[kw.get("fun_name", "?")] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def two_bucket_trajs():
    """4 Si-defect trajectories of <= 64 atoms and 4 of 65-66 atoms: buckets 64 and 72."""
    trajs = load_default_dataset("si_defects")
    small = [t for t in trajs if t.num_atoms <= 64][:4]
    large = [t for t in trajs if t.num_atoms > 64][:4]
    return small + large


def _tiny_setup(trajs, max_frames=2):
    cfg = model.TINY
    norm = bm.models.adapt.normalizer_from_trajectories(trajs)
    calls = {"n": 0}
    inner = model.make_force_fn(cfg, norm)

    def force_fn(p, s):
        calls["n"] += 1  # Python side effect: runs only while tracing
        return inner(p, s)

    step_rule = relax.LearnableStep(0.03)
    params = {"model": model.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": step_rule.init()}
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-4, clip_norm=1.0))
    bcfg = train.BPTTConfig(rollout=relax.RolloutConfig(max_frames=max_frames, stop_rms=1e-3, remat="frame"))
    return force_fn, calls, step_rule, params, tx, bcfg, norm


def test_bptt_step_and_evaluation_compile_once_per_bucket(two_bucket_trajs):
    trajs = two_bucket_trajs
    buckets = (64, 72)
    force_fn, calls, step_rule, params, tx, bcfg, norm = _tiny_setup(trajs)
    trainer = train.make_bptt_trainer(force_fn, step_rule, bcfg, tx)
    update = trainer.update
    eval_run = bm.evaluate.make_relax_eval(force_fn, step_rule, bcfg.modifiers,
                                           dataclasses.replace(bcfg.rollout, remat="none"))
    state = trainer.init(params, jax.random.PRNGKey(1))
    traces_after_epoch = []
    with count_compiles() as compiles:
        for epoch in range(2):
            shapes = set()
            for batch in batching.relaxation_batches(trajs, 2, buckets=buckets, shuffle_key_or_seed=epoch):
                shapes.add(batch.initial.positions.shape)
                state, m = update(state, batch)
                float(m["loss"])
            for batch in batching.relaxation_batches(trajs, 2, buckets=buckets):
                eval_run(state.params, batch, jax.random.PRNGKey(0))
            assert shapes == {(2, 64, 3), (2, 72, 3)}
            traces_after_epoch.append(calls["n"])
    # one executable per bucket shape for each jitted function
    assert update._cache_size() == 2
    assert eval_run._cache_size() == 2
    assert compiles["jit(bptt_update)"] == 2, compiles
    assert compiles["jit(run)"] == 2, compiles
    # no retracing after the first epoch (every trace calls the force function)
    assert traces_after_epoch[0] > 0 and traces_after_epoch[0] == traces_after_epoch[-1], traces_after_epoch
    assert np.isfinite(float(m["loss"]))


# --------------------------------------------------------------------------- memory


def _step_memory(remat: str, k: int) -> int:
    cfg = model.TINY
    s = bm.from_arrays([["Si"] * 8] * 2, [np.random.default_rng(i).normal(0, 2.0, (8, 3)) for i in range(2)])
    batch = bm.RelaxationBatch(initial=s, target_positions=s.positions + 0.05, weight=jnp.ones(2))
    step_rule = relax.LearnableStep(0.01)
    params = {"model": model.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": step_rule.init()}
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-4))
    bcfg = train.BPTTConfig(rollout=relax.RolloutConfig(max_frames=k, stop_rms=0.0, remat=remat))
    trainer = train.make_bptt_trainer(model.make_force_fn(cfg, model.Normalizer.identity()), step_rule, bcfg, tx)
    state = trainer.init(params, jax.random.PRNGKey(1))
    m = trainer.update.lower(state, batch).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def test_rematerialised_bptt_memory_is_bounded_in_trajectory_length():
    none_short, none_long = _step_memory("none", 16), _step_memory("none", 128)
    seg_short, seg_long = _step_memory("segment", 16), _step_memory("segment", 128)
    assert none_long > 4 * none_short  # stores every frame's activations: linear in K
    assert seg_long <= 2 * seg_short  # K/S + S carries and one frame's activations
    assert seg_long < none_long / 4


# --------------------------------------------------------------------------- bfloat16


def test_bfloat16_matmul_option_keeps_float32_params_and_default():
    assert model.AdaptConfig().matmul_dtype == "float32"
    with pytest.raises(ValueError, match="matmul_dtype"):
        model.AdaptConfig(matmul_dtype="float16")
    cfg32 = model.TINY
    cfg16 = dataclasses.replace(cfg32, matmul_dtype="bfloat16")
    p32, p16 = model.init_params(cfg32, jax.random.PRNGKey(0)), model.init_params(cfg16, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(p32) == jax.tree_util.tree_structure(p16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p16))
    s = bm.from_arrays([["Si"] * 6], [np.random.default_rng(0).normal(0, 2.0, (6, 3))])
    norm = model.Normalizer.identity()
    f32 = model.make_force_fn(cfg32, norm)(p32, s)
    f16 = model.make_force_fn(cfg16, norm)(p32, s)
    assert f32.dtype == f16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(f16 - f32) / jnp.linalg.norm(f32))
    assert 0 < rel < 0.05, rel
    # the default computes no bfloat16 at all
    jaxpr = str(jax.make_jaxpr(model.make_force_fn(cfg32, norm))(p32, s))
    assert "bf16" not in jaxpr and "bf16" in str(jax.make_jaxpr(model.make_force_fn(cfg16, norm))(p32, s))


# --------------------------------------------------------------------------- data parallel

_SHARDED_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    import bptt_mlip as bm
    from bptt_mlip.models import adapt as model
    from bptt_mlip.training import optim
    from bptt_mlip.training import parallel
    from bptt_mlip import relax
    from bptt_mlip.training import steps as train

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    sizes = [6, 8, 5, 7, 8, 6, 7, 8]
    pos = [rng.normal(0, 1.8, (n, 3)) for n in sizes]
    s = bm.from_arrays([["Si"] * n for n in sizes], pos, max_atoms=8)
    shifted = s.positions + 0.03 * rng.normal(size=s.positions.shape).astype(np.float32)
    batch = bm.RelaxationBatch(initial=s, target_positions=shifted,
                               weight=jnp.asarray([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32))
    cfg = model.TINY
    step_rule = relax.LearnableStep(0.01)
    params = {"model": model.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": step_rule.init()}
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, clip_norm=1.0))
    bcfg = train.BPTTConfig(rollout=relax.RolloutConfig(max_frames=6, stop_rms=1e-3, remat="frame"))
    ff = model.make_force_fn(cfg, model.Normalizer.identity())
    mesh = parallel.make_mesh()
    one_device = train.make_bptt_trainer(ff, step_rule, bcfg, tx)
    data_parallel = train.make_bptt_trainer(ff, step_rule, bcfg, tx, mesh=mesh)
    single, sharded = one_device.update, data_parallel.update
    s1, s4 = one_device.init(params, jax.random.PRNGKey(1)), data_parallel.init(params, jax.random.PRNGKey(1))
    assert all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(s4))  # init places the state
    # Adam's first update is lr * g / (|g| + 1e-8): a gradient component at float32 noise level (below
    # ~1e-4 of the largest, the tolerance of the gradient comparison further down) has a sign that the
    # summation order decides, so its parameter may move by up to lr = 1e-3 either way (measured: up to
    # 1.4e-5, from components with |g| ~ 1e-11). Components with a real gradient must agree to 1e-5.
    for _ in range(1):
        s1, m1 = single(s1, batch)
        s4, m4 = sharded(s4, parallel.shard_batch(batch, mesh))
        for k in m1:
            np.testing.assert_allclose(np.asarray(m4[k]), np.asarray(m1[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    g0 = jax.grad(lambda p: train.bptt_loss(p, batch, ff, step_rule, bcfg, jax.random.PRNGKey(3))[0])(params)
    g_scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g0))

    strict = []

    def same_update(a, b, g):
        a, b, g = np.asarray(a), np.asarray(b), np.asarray(g)
        clear = np.abs(g) > 1e-4 * g_scale
        np.testing.assert_allclose(a[clear], b[clear], rtol=2e-5, atol=1e-5)
        assert np.all(np.abs(a - b) <= 1e-3 + 1e-6), np.max(np.abs(a - b))
        strict.append((int(clear.sum()), int(clear.size)))

    jax.tree_util.tree_map(same_update, s4.params, s1.params, g0)
    compared, total = map(sum, zip(*strict))
    # the strict comparison is not vacuous: 1288 of the 3092 components have a gradient above the noise
    assert compared >= total / 3, (compared, total)
    # the batch really is split over the 4 devices, the parameters are replicated
    sb = parallel.shard_batch(batch, mesh)
    assert len(sb.initial.positions.addressable_shards) == 4
    assert sb.initial.positions.addressable_shards[0].data.shape == (2, 8, 3)
    assert s4.params["step_rule"]["eta"].sharding.is_fully_replicated
    # gradients through the sharded loss equal the single-device ones
    g1 = jax.grad(lambda p: train.bptt_loss(p, batch, ff, step_rule, bcfg, jax.random.PRNGKey(3))[0])(params)
    g4 = jax.jit(jax.grad(lambda p, b: train.bptt_loss(p, b, ff, step_rule, bcfg, jax.random.PRNGKey(3))[0]))(
        parallel.replicate(params, mesh), sb)
    # float32 summation order differs; compare against the largest gradient component
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g1))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * scale), g4, g1)
    odd = jax.tree_util.tree_map(lambda x: x[:6], batch)
    try:
        sharded(s4, odd)
    except ValueError as e:
        assert "not divisible by the 4 devices" in str(e), e
    else:
        raise AssertionError("batch of 6 on 4 devices did not raise")
    print("SHARDED_OK", float(m1["loss"]), float(m4["loss"]))
    """
)


def test_sharded_bptt_step_equals_single_device_on_four_host_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0 and "SHARDED_OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


_SHARDED_TRAINING_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    import bptt_mlip as bm
    from bptt_mlip.training import loops
    from bptt_mlip.training import parallel
    from bptt_mlip.models import potentials
    from bptt_mlip.training import steps as train
    from test_regularisers import FIXED, ROLL, _morse_traj, morse_task, params

    assert jax.device_count() == 4, jax.devices()
    mesh = parallel.make_mesh()
    ff = potentials.morse_force_fn

    def close(a, b, rtol=2e-5, atol=1e-6):
        jax.tree_util.tree_map(
            lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)

    # 1. the multi-task BPTT step (Dq + force term) and the pretraining step, sharded == single device
    rb, fb = morse_task(sizes=(5, 7, 6, 8), max_atoms=8)
    cfg = train.BPTTConfig(rollout=ROLL, force_weight=0.5)
    tx = bm.make_optimizer(bm.OptimConfig(learning_rate=1e-3, freeze_step_rule=True))
    one_device = train.make_bptt_trainer(ff, FIXED, cfg, tx)
    data_parallel = train.make_bptt_trainer(ff, FIXED, cfg, tx, mesh=mesh)
    s0 = one_device.init(params(), jax.random.PRNGKey(1))
    s1, m1 = one_device.update(s0, rb, fb)
    s4, m4 = data_parallel.update(data_parallel.init(params(), jax.random.PRNGKey(1)), rb, fb)
    assert float(m1["force_mse"]) > 0
    close({k: m4[k] for k in m1}, m1)
    close(s4.params, s1.params)
    assert s4.params["model"]["depth"].sharding.is_fully_replicated
    p1, q1 = train.make_pretrain_trainer(train.deterministic(ff), tx).update(s0, fb)
    pretrain_parallel = train.make_pretrain_trainer(train.deterministic(ff), tx, mesh=mesh)
    p4, q4 = pretrain_parallel.update(pretrain_parallel.init(params(), jax.random.PRNGKey(1)), fb)
    close({k: q4[k] for k in q1}, q1)
    close(p4.params, p1.params)
    odd = jax.tree_util.tree_map(lambda x: x[:3], fb)
    try:
        data_parallel.update(data_parallel.init(params(), jax.random.PRNGKey(1)), rb, odd)
    except ValueError as e:
        assert "not divisible by the 4 devices" in str(e), e
    else:
        raise AssertionError("force batch of 3 on 4 devices did not raise")

    # 2. the training loops with a mesh == without: force pretraining, then BPTT with the force
    #    term, validation, best-epoch choice and checkpoints
    trajs = [_morse_traj(n, k) for k, n in enumerate((5, 6, 7, 8, 6))]
    train_t, val_t = trajs[:4], trajs[4:]
    out = {}
    for name, m in (("single", None), ("mesh", mesh)):
        pre, hist = loops.pretrain(train.deterministic(ff), ff, params()["model"], train_t, val_t, epochs=2,
                                   batch_size=4, optim_config=bm.OptimConfig(learning_rate=1e-3, freeze_step_rule=True),
                                   mesh=m)
        best, history, state = loops.bptt_finetune(
            ff, FIXED, {"model": pre, "step_rule": params()["step_rule"]}, train_t, val_t, bptt_config=cfg,
            optim_config=bm.OptimConfig(learning_rate=1e-3, freeze_step_rule=True), epochs=2, batch_size=4,
            force_batch_size=4, checkpoint_dir=os.path.join(sys.argv[1], name), report=lambda msg: None, mesh=m)
        out[name] = (pre, hist, best, history, state)
    (pre1, h1, b1, bh1, st1), (pre4, h4, b4, bh4, st4) = out["single"], out["mesh"]
    close(pre4, pre1, rtol=1e-5, atol=1e-6)
    close(b4, b1, rtol=1e-5, atol=1e-6)
    close(st4.params, st1.params, rtol=1e-5, atol=1e-6)
    assert isinstance(b4["model"]["depth"], np.ndarray)  # host copies come back
    np.testing.assert_allclose([r["val_mean_dq"] for r in bh4], [r["val_mean_dq"] for r in bh1], rtol=1e-5)
    np.testing.assert_allclose([r["val_force_rmse"] for r in h4], [r["val_force_rmse"] for r in h1], rtol=1e-5)
    print("SHARDED_TRAINING_OK", [round(r["val_mean_dq"], 6) for r in bh4])
    """
)


def test_sharded_force_term_pretraining_and_training_loops_equal_single_device(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SHARDED_TRAINING_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0 and "SHARDED_TRAINING_OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
