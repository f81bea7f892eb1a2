"""Reliability (issue 7): bad input at the edges, non-finite steps, interruption and exact resume,
determinism. Subprocess tests use tiny settings and share one JAX compilation cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bptt_mlip.workflow import model_io
from bptt_mlip.training import checkpoint
from bptt_mlip.training import loop
from bptt_mlip.training import loops
from bptt_mlip.training import optim
from bptt_mlip.models import potentials
from bptt_mlip import relax
from bptt_mlip.training import steps as train
from bptt_mlip.data import readers, store
from bptt_mlip.data import checks
from bptt_mlip.data import trajectory as T
from bptt_mlip.data.trajectory import TrajectoryError, make_trajectory

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- input validation


def _traj(n=3, frames=2, seed=0, **kw):
    rng = np.random.default_rng(seed)
    x0 = np.arange(n)[:, None] * np.array([2.3, 0.0, 0.0]) + rng.normal(size=(n, 3)) * 0.05
    pos = np.stack([x0 + 0.01 * k for k in range(frames)])
    return dict(species=["Si"] * n, positions=pos, forces=np.zeros_like(pos), source="data.xyz", traj_id="t7", **kw)


def _raises(match, fn, reason=None):
    with pytest.raises(TrajectoryError, match=match) as info:
        fn()
    if reason is not None:
        assert T.error_reason(info.value) == reason, (info.value, T.error_reason(info.value))
    return str(info.value)


def test_bad_records_have_clear_messages():
    chk = lambda **kw: checks.check_relaxation(make_trajectory(check=False, **{**_traj(), **kw}))
    # NaN / inf positions and forces: file, trajectory, frame and atom named
    pos = _traj()["positions"].copy()
    pos[1, 2, 0] = np.nan
    msg = _raises(r"data.xyz trajectory 't7' frame 1: positions of atom 2", lambda: chk(positions=pos),
                  T.REASON_NONFINITE)
    assert "finite" in msg
    frc = np.zeros_like(pos)
    frc[0, 1, 2] = np.inf
    _raises(r"'t7' frame 0: forces of atom 1 is .*inf", lambda: chk(positions=_traj()["positions"], forces=frc),
            T.REASON_NONFINITE)
    # unknown elements, by symbol and by Z
    _raises(r"unknown element 'Xx' at atom 1", lambda: make_trajectory(["Si", "Xx", "Si"], _traj()["positions"]))
    odd = make_trajectory(**_traj()).replace(species=np.array([150, 14, 14], np.int32))
    _raises(r"'t7': unknown element Z=150 at atom 0", lambda: checks.check_relaxation(odd), T.REASON_UNKNOWN_ELEMENT)
    # empty and one-frame trajectories
    _raises(r"'t7': positions must have shape \[T>=1, n, 3\]", lambda: chk(positions=np.zeros((0, 3, 3)),
                                                                             forces=None))
    _raises(r"'t7': 1 frame, expected at least 2 \(a relaxation needs an initial frame and a relaxed reference",
            lambda: chk(positions=_traj()["positions"][:1], forces=None), T.REASON_TOO_FEW_FRAMES)
    # mismatched atom counts between the frames' arrays
    _raises(r"'t7' frame 0: positions have shape \(4, 3\) per frame, expected \(3, 3\)",
            lambda: chk(positions=np.zeros((2, 4, 3)), forces=None), T.REASON_SHAPE)
    _raises(r"frame 0: forces have shape \(2, 3\) per frame, expected \(3, 3\)",
            lambda: chk(forces=np.zeros((2, 2, 3))), T.REASON_SHAPE)
    # atoms too close, plain and through the periodic boundary (minimum image)
    close = _traj()["positions"].copy()
    close[-1, 1] = close[-1, 0] + [0.3, 0.0, 0.0]
    _raises(r"'t7' frame 1: atoms 0 and 1 are 0.3 Å apart, closer than the minimum distance 0.5 Å",
            lambda: chk(positions=close), T.REASON_ATOMS_TOO_CLOSE)
    close_traj = make_trajectory(check=False, **{**_traj(), "positions": close})
    checks.check_relaxation(close_traj, min_distance=0.2)  # threshold
    wrap = np.array([[[0.1, 5.0, 5.0], [9.9, 5.0, 5.0]]] * 2)
    _raises(r"frame 0: atoms 0 and 1 are 0.2 Å apart \(minimum image\)",
            lambda: checks.check_relaxation(make_trajectory(["Si", "Si"], wrap, cell=np.eye(3) * 10, traj_id="p")))
    checks.check_relaxation(make_trajectory(["Si", "Si"], wrap, cell=np.eye(3) * 10, pbc=False))  # no pbc: 9.8 Å apart
    # a reference structure whose species differ from the initial one
    _raises(r"'t7': the reference structure has Z=32 at atom 2 where the initial structure has Z=14",
            lambda: checks.check_relaxation(make_trajectory(**_traj()), reference_species=[14, 14, 32]),
            T.REASON_SPECIES_CHANGE)
    _raises(r"reference structure has 2 atoms, the initial structure 3",
            lambda: checks.check_same_species([14, 14, 14], [14, 14], "x"))


def test_reference_frame_with_other_species_in_a_file(tmp_path):
    from ase import Atoms

    import ase.io

    a = Atoms("Si2", positions=[[0, 0, 0], [2.3, 0, 0]])
    b = Atoms("SiGe", positions=[[0, 0, 0], [2.4, 0, 0]])
    ase.io.write(tmp_path / "r.extxyz", [a, b], format="extxyz")
    with pytest.raises(TrajectoryError,
                       match=r"r.extxyz trajectory 'r' frame 1: 2 atoms SiGe, expected the 2 atoms SiSi of frame 0"):
        readers.read_extxyz(tmp_path / "r.extxyz")


def _write_mixed_file(path):
    good = [make_trajectory(**{**_traj(seed=k), "traj_id": f"good{k}"}) for k in range(3)]
    nan = _traj(seed=5)
    nan["forces"] = nan["forces"].copy()
    nan["forces"][1, 0, 1] = np.nan
    close = _traj(seed=6)
    close["positions"] = close["positions"].copy()
    close["positions"][0, 2] = close["positions"][0, 1] + 0.1
    bad = [make_trajectory(check=False, **{**nan, "traj_id": "nanforce"}),
           make_trajectory(check=False, **{**close, "traj_id": "tooclose"}),
           make_trajectory(check=False, **{**_traj(frames=1), "traj_id": "single"})]
    store.write_extxyz([good[0], bad[0], good[1], bad[1], bad[2], good[2]], path)


def test_loader_stops_on_bad_records_or_skips_and_counts_them(tmp_path):
    from experiments import common

    path = tmp_path / "mixed.extxyz"
    _write_mixed_file(path)
    kw = dict(min_distance=0.5, min_frames=2, max_trajectories=0)
    with pytest.raises(TrajectoryError, match=r"mixed.extxyz trajectory 'nanforce' frame 1: forces of atom 0"):
        common.load_trajectories(str(path), skip_bad=False, **kw)
    kept, report, skipped = common.load_trajectories(str(path), skip_bad=True, return_skipped=True, **kw)
    assert [t.traj_id for t in kept] == ["good0", "good1", "good2"]
    assert skipped["num_skipped"] == 3
    assert skipped["by_reason"] == {"nonfinite": 1, "atoms_too_close": 1, "too_few_frames": 1}
    import re

    assert any(re.search(r"mixed.extxyz trajectory 'tooclose' frame 0: atoms 1 and 2 are 0\.\d+ Å apart", r["message"])
               for r in skipped["records"])


def test_flag_problems_name_the_contradictions():
    from experiments import common, finetune

    base = common.flag_values()
    assert finetune.flag_problems(base) == []
    cases = {
        "--num_test=3 + --num_val=9 >= --max_trajectories=12": dict(max_trajectories=12, num_test=3, num_val=9),
        "--random_stopping draws the frame limit from [50, --max_frames], but --max_frames=4 < 50":
            dict(random_stopping=True, max_frames=4),
        "--freeze_model with --step_kind=fixed leaves nothing to train": dict(freeze_model=True, step_kind="fixed"),
        "--init_step_scale=0.0 must be > 0": dict(init_step_scale=0.0),
        "--bptt_epochs=-1 must be >= 0": dict(bptt_epochs=-1),
        "--bptt_lr=-0.001 is a negative learning rate": dict(bptt_lr=-1e-3),
        "--step_lr=-1.0 is a negative learning rate": dict(step_lr=-1.0),
        "--resume and --overwrite contradict each other": dict(resume=True, overwrite=True),
        "--grid_steps=0.01,x: not a list of numbers": dict(grid_steps=["0.01", "x"]),
    }
    for message, change in cases.items():
        problems = finetune.flag_problems({**base, **change})
        assert any(message in p for p in problems), (message, problems)
    # fixed step with a frozen model is fine when nothing is trained anyway
    assert finetune.flag_problems({**base, "freeze_model": True, "bptt_epochs": 0}) == []


def _run(*flags, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.finetune", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_flag_errors_stop_the_script_before_any_work(tmp_path):
    ff = tmp_path / "bad.flags"
    ff.write_text("--num_test=3\n--no_such_flag=1\n")
    proc = _run(f"--flagfile={ff}", f"--workdir={tmp_path / 'w1'}")
    assert proc.returncode != 0 and "Unknown command line flag 'no_such_flag'" in proc.stderr
    proc = _run(f"--workdir={tmp_path / 'w2'}", "--max_trajectories=12", "--num_test=10", "--num_val=2",
                "--random_stopping", "--max_frames=4", "--bptt_lr=-1", "--freeze_model", "--init_step_scale=0")
    assert proc.returncode != 0
    for message in ("--num_test=10 + --num_val=2 >= --max_trajectories=12", "--max_frames=4 < 50",
                    "--bptt_lr=-1.0 is a negative learning rate", "--freeze_model with --step_kind=fixed",
                    "--init_step_scale=0.0 must be > 0"):
        assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "w2").exists()  # nothing was written
    proc = _run(f"--workdir={tmp_path / 'w3'}", "--resume")
    assert proc.returncode != 0 and "--resume: no checkpoint to resume from" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- extxyz round trip (property)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 7), st.integers(1, 4), st.booleans()), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_extxyz_write_read_round_trip(shapes, seed):
    import tempfile

    rng = np.random.default_rng(seed)
    trajs = []
    for k, (n, frames, periodic) in enumerate(shapes):
        x0 = rng.uniform(1.0, 9.0, size=(n, 3))
        pos = x0 + np.cumsum(rng.normal(scale=0.05, size=(frames, n, 3)), axis=0)
        trajs.append(make_trajectory(
            rng.choice([1, 6, 8, 14, 32], size=n), pos, cell=np.eye(3) * 10.0 if periodic else None,
            forces=rng.normal(size=(frames, n, 3)), energies=rng.normal(size=frames), traj_id=f"t{k}",
        ))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rt.extxyz"
        store.write_extxyz(trajs, path)
        back = readers.read_extxyz(path)
    assert [b.traj_id for b in back] == [t.traj_id for t in trajs]
    for a, b in zip(trajs, back):
        assert np.array_equal(a.species, b.species) and a.num_frames == b.num_frames
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)
        np.testing.assert_allclose(b.forces, a.forces, atol=1e-6)
        np.testing.assert_allclose(b.energies, a.energies, atol=1e-6)
        assert (b.cell is None) == (a.cell is None) or not np.any(b.cell)


# ----------------------------------------------------------------------------- non-finite steps, in-process resume

STEP_RULE = relax.LearnableStep(0.02)
BPTT = train.BPTTConfig(rollout=relax.RolloutConfig(max_frames=4, stop_rms=1e-4, remat="none"))
OPT = optim.OptimConfig(learning_rate=1e-3, step_rule_learning_rate=1e-3)


def _morse_trajs(num, seed, bad=()):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(num):
        m = int(rng.integers(3, 6))
        x0 = np.arange(m)[:, None] * np.array([2.35, 0.0, 0.0]) + rng.normal(size=(m, 3)) * 0.15
        x1 = np.arange(m)[:, None] * np.array([2.35, 0.0, 0.0])
        if k in bad:
            x1 = x1.copy()
            x1[0, 0] = np.nan  # an injected NaN in the reference: loss and gradient of its batch are NaN
        out.append(make_trajectory(["Si"] * m, np.stack([x0, x1]), traj_id=str(k), check=k not in bad))
    return out


def _params():
    return {"model": potentials.init_morse_params(), "step_rule": STEP_RULE.init()}


def _finetune(train_trajs, val_trajs, **kw):
    kw = {"bptt_config": BPTT, "optim_config": OPT, "epochs": 3, "batch_size": 2, "seed": 3, "buckets": (8,), **kw}
    return loops.bptt_finetune(potentials.morse_force_fn, STEP_RULE, _params(), train_trajs, val_trajs, **kw)


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_nan_batch_is_skipped_counted_and_training_goes_on_then_stops_after_too_many(tmp_path):
    val = _morse_trajs(2, seed=1)
    with_nan = _morse_trajs(6, seed=0, bad=(4,))
    ck = tmp_path / "ck"
    best, hist, state = _finetune(with_nan, val, epochs=2, checkpoint_dir=ck, checkpoint_every=1)
    rows = hist[1:]
    assert [r["skipped_steps"] for r in rows] == [1, 1]  # the NaN batch, once per epoch
    assert [r["nonfinite_total"] for r in rows] == [1.0, 2.0]
    assert all(np.isfinite(r["train_loss"]) for r in rows)  # skipped steps are left out of the averages
    assert int(state.step) == 6 and int(optim.nonfinite_counts(state.opt_state)["nonfinite_total"]) == 2
    assert not _leaves_equal(state.params, _params())  # the other batches trained
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
    last_good = checkpoint.checkpoint_steps(ck)[-1]
    # continue for a third epoch on data that is all NaN: stops after max_consecutive_bad_steps, keeps the checkpoint
    all_bad = _morse_trajs(6, seed=0, bad=range(6))
    with pytest.raises(loop.TrainingStopped, match=r"BPTT stopped: 2 consecutive non-finite gradients at step \d+ "
                       r"\(more than max_consecutive_bad_steps=1\).*last good checkpoint") as info:
        _finetune(all_bad, val, epochs=3, checkpoint_dir=ck, checkpoint_every=1, resume=True,
                  max_consecutive_bad_steps=1, report=lambda m: None)
    assert _leaves_equal(info.value.args[1], best)
    assert isinstance(info.value, RuntimeError) and _leaves_equal(info.value.best_params, best)
    assert info.value.reason == "nonfinite" and info.value.step == last_good + 2  # resumed there, then 2 bad updates
    assert checkpoint.checkpoint_steps(ck)[-1] == last_good
    assert checkpoint.restore_training_checkpoint(ck, state, {"best": best})[0] == last_good


def test_in_process_interrupt_and_resume_is_exact_and_skips_a_truncated_checkpoint(tmp_path):
    tr, val = _morse_trajs(7, seed=0), _morse_trajs(2, seed=1)
    ref_best, ref_hist, ref_state = _finetune(tr, val, epochs=2)

    class Crash(Exception):
        pass

    def crash_at_7(phase, step, metrics):
        if phase == "bptt_step" and step == 7:
            raise Crash

    ck = tmp_path / "ck"
    with pytest.raises(Crash):
        _finetune(tr, val, epochs=2, checkpoint_dir=ck, checkpoint_every=2, log=crash_at_7)
    steps = checkpoint.checkpoint_steps(ck)
    assert steps == [2, 4, 6]  # 4 steps per epoch (4 = epoch end), 7 crashed before its save
    newest = ck / str(steps[-1])
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    messages = []
    best, hist, state = _finetune(tr, val, epochs=2, checkpoint_dir=ck, checkpoint_every=2, resume=True,
                                  report=messages.append)
    assert any("checkpoint step 6" in m and "corrupt or partial" in m and "truncated" in m for m in messages), messages
    assert any("resuming BPTT from checkpoint step 4: epoch 2 of 2, 0 batches" in m for m in messages), messages
    assert _leaves_equal(best, ref_best) and _leaves_equal(state, ref_state)
    assert [r.get("val_mean_dq") for r in hist] == [r.get("val_mean_dq") for r in ref_hist]


# ----------------------------------------------------------------------------- SIGKILL and --resume of the script

TINY = ["--max_trajectories=12", "--num_test=3", "--num_val=2", "--max_frames=4", "--grid_steps=0.01,0.04",
        "--batch_size=4", "--fire=false", "--bptt_epochs=2", "--step_kind=learnable", "--checkpoint_every=1",
        "--remat=none", "--pretrain_batch_size=16"]


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A random-weight 'pretrained' checkpoint of the tiny model (pretraining itself is not under test)."""
    from experiments import common
    from bptt_mlip.models import adapt as model

    path = tmp_path_factory.mktemp("pre") / "pretrained"
    trajs = store.load_default_dataset("si_defects")[:12]
    cfg = model.AdaptConfig(d_model=16, d_ff=16, num_heads=2, num_layers=1, embed_hidden=16)
    common.save_model(path, {"model": model.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": {}},
                      model.normalizer_from_trajectories(trajs[5:]), cfg, relax.FixedStep(), {"role": "pretrained"})
    return path


def _final(workdir):
    import orbax.checkpoint as ocp

    best, _, _ = model_io.restore_model(workdir / "checkpoints" / "bptt_best")
    d = (workdir / "checkpoints" / "bptt" / "train_state").absolute()
    mngr = ocp.CheckpointManager(d)
    state = mngr.restore(max(mngr.all_steps()), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    return best, state, json.loads((workdir / "results.json").read_text())


def test_sigkill_mid_bptt_then_resume_is_bit_identical(tmp_path, tiny_pretrained):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    flags = [*TINY, f"--pretrained={tiny_pretrained}"]
    ref = _run(f"--workdir={tmp_path / 'ref'}", *flags, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.finetune", f"--workdir={run}", *flags], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, t0 = run / "metrics.jsonl", time.time()
    try:
        while proc.poll() is None and time.time() - t0 < 300:
            if metrics.exists() and metrics.read_text().count('"phase": "bptt_step"') >= 3:  # epoch 2 of 2 started
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == -signal.SIGKILL and not (run / "results.json").exists()
    ck = run / "checkpoints" / "bptt" / "train_state"
    steps = checkpoint.checkpoint_steps(ck)
    assert len(steps) >= 2, steps
    # damage the newest checkpoint: resume must notice and use the one before
    newest = ck / str(steps[-1])
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-7])

    res = _run(f"--workdir={run}", *flags, "--resume", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"checkpoint step {steps[-1]} in {ck.absolute()} is corrupt or partial" in res.stdout, res.stdout[-3000:]
    assert f"resuming BPTT from checkpoint step {steps[-2]}" in res.stdout
    assert "reusing the grid search" in res.stdout and "pretraining skipped" in res.stdout

    best_a, state_a, res_a = _final(tmp_path / "ref")
    best_b, state_b, res_b = _final(run)
    assert _leaves_equal(best_a, best_b) and _leaves_equal(state_a, state_b)
    # determinism of the whole job: equal relaxation numbers in results.json
    assert res_a["relaxation"] == res_b["relaxation"]
    assert res_a["per_structure_test_dq"] == res_b["per_structure_test_dq"]
    assert res_b["resumed"] and res_b["nonfinite_skipped_steps"] == 0 and res_b["skipped_records"]["num_skipped"] == 0
