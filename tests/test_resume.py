"""Resume that always resumes: model saves that replace safely, a loop restored after its last epoch or
after an early stop, a run killed after its best model and moved to another directory, a finished run,
the relaxation settings a run's checkpoints carry (and the CLI uses), and flag errors without the help text.

The script tests reuse the tiny run of ``tests/test_reliability.py`` (its flags and random-weight
pretrained checkpoint); the loop tests the one-parameter model of ``tests/test_training_loop.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import ase.build
import ase.io
import jax
import numpy as np
import optax
import pytest
from test_reliability import ROOT, TINY, _final, _leaves_equal, _run, tiny_pretrained  # noqa: F401  (fixture)
from test_training_loop import NAMES, init, make_update, quiet, sqrt_loss

from bptt_mlip.models import adapt
from bptt_mlip.relax import scan, step_rules
from bptt_mlip.training import checkpoint, loop
from bptt_mlip.workflow import api, cli, model_io

# ----------------------------------------------------------------------------- model saves


def _tiny_model(seed=0):
    return {"model": adapt.init_params(adapt.TINY, jax.random.PRNGKey(seed)), "step_rule": {}}


def test_saving_a_model_again_keeps_an_identical_save_and_replaces_a_different_one(tmp_path):
    d, norm = tmp_path / "bptt_best", adapt.Normalizer.identity()
    first = model_io.save_model(d, _tiny_model(0), norm, adapt.TINY, {}, {"role": "best"})
    # a resumed run saves its (bit-identical) best model again: once orbax's StepAlreadyExistsError
    again = model_io.save_model(d, _tiny_model(0), norm, adapt.TINY, {}, {"role": "best"})
    assert first == again == d / "0" and checkpoint.checkpoint_steps(d) == [0]
    # another model replaces it: written as the next step, the old one deleted only afterwards
    other = model_io.save_model(d, _tiny_model(1), norm, adapt.TINY, {}, {"role": "best"})
    assert other == d / "1" and checkpoint.checkpoint_steps(d) == [1]
    _, _, params, meta = model_io.load_model(d)
    assert _leaves_equal(params["model"], _tiny_model(1)["model"]) and meta["role"] == "best"
    # other meta with the same parameters is a different save too
    model_io.save_model(d, _tiny_model(1), norm, adapt.TINY, {}, {"role": "best", "note": "x"})
    assert checkpoint.checkpoint_steps(d) == [2] and model_io.load_model(d)[3]["note"] == "x"


def test_a_save_killed_before_the_old_model_is_deleted_leaves_the_new_model_readable(tmp_path, monkeypatch):
    d, norm = tmp_path / "m", adapt.Normalizer.identity()
    model_io.save_model(d, _tiny_model(0), norm, adapt.TINY, {}, {"role": "old"})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between writing the new step and deleting the old one

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        model_io.save_model(d, _tiny_model(1), norm, adapt.TINY, {}, {"role": "new"})
    monkeypatch.undo()
    assert checkpoint.checkpoint_steps(d) == [0, 1]
    _, _, params, meta = model_io.load_model(d)
    assert meta["role"] == "new" and _leaves_equal(params["model"], _tiny_model(1)["model"])


# ----------------------------------------------------------------------------- the loop restored late


def _run_loop(directory, *, epochs, patience=0, updates=None, report=quiet):
    """The test loop of ``test_training_loop`` with epoch-end checkpoints, restored from ``directory`` when it
    holds one; ``updates`` counts the updates made. Training pulls w down from 1, validation prefers w = 4."""
    tx = optax.apply_if_finite(optax.adam(0.05), max_consecutive_errors=100)
    xs = np.random.default_rng(7).uniform(0.3, 0.6, size=(epochs, 3)).astype(np.float32)
    checkpointer = loop.Checkpointer(directory, identity={"seed": 0})
    start = init(tx)
    state, progress = loop.start_or_resume(start, start.params, checkpointer, epochs=epochs, report=report)
    update = make_update(tx)

    def counted(s, batch):
        if updates is not None:
            updates.append(1)
        return update(s, batch)

    val = loop.Validation(lambda p: {"loss": float(sqrt_loss(p, 2.0))}, "loss", at_start=True)
    stop = loop.EarlyStopping(patience, key="val_loss") if patience else None
    return loop.run_epochs(counted, state, lambda epoch: list(xs[epoch]), epochs=epochs, batches_per_epoch=3,
                           names=NAMES, best=start.params, progress=progress, validation=val, early_stopping=stop,
                           checkpointer=checkpointer, report=quiet)


def _rows(history):
    return [{k: v for k, v in row.items() if k != "epoch_s"} for row in history]


def test_a_loop_restored_after_its_last_epoch_says_so_and_trains_no_more(tmp_path):
    ref_state, ref = _run_loop(tmp_path, epochs=2)
    messages, updates = [], []
    state, run = _run_loop(tmp_path, epochs=2, updates=updates, report=messages.append)
    assert messages == ["resuming BPTT from checkpoint step 6: all 2 epochs done"]  # not "epoch 3 of 2"
    assert updates == [] and _rows(run.history) == _rows(ref.history)
    assert _leaves_equal(state, ref_state) and float(run.best.params["w"]) == float(ref.best.params["w"])


def test_a_run_restored_where_it_stopped_early_stops_there_again(tmp_path):
    ref_state, ref = _run_loop(tmp_path / "ref", epochs=5, patience=1)
    assert [r["epoch"] for r in ref.history] == [0, 1]  # validation got worse in epoch 1: stopped
    updates = []
    state, run = _run_loop(tmp_path / "ref", epochs=5, patience=1, updates=updates)
    assert updates == [] and _rows(run.history) == _rows(ref.history) and _leaves_equal(state, ref_state)


# ----------------------------------------------------------------------------- run directories


def test_resume_compares_settings_not_where_the_run_directory_lives():
    from experiments import finetune_stages as stages

    old = {"workdir": "/data/runs/a", "seed": 0, "pretrained": "/data/runs/a/pre", "dataset": "/data/x.extxyz",
           "resume": False}
    moved = {**old, "workdir": "/scratch/b", "pretrained": "/scratch/b/pre", "resume": True}
    assert stages.resume_differences(old, moved) == []
    assert stages.resume_differences({**old, "workdir": "runs/a", "pretrained": "runs/a/pre"},
                                      {**moved, "workdir": "b", "pretrained": "b/pre"}) == []
    changed = {**moved, "seed": 1, "pretrained": "/elsewhere/pre", "dataset": "/data/y.extxyz"}
    assert stages.resume_differences(old, changed) == [
        "--seed: run has 0, now 1", "--pretrained: run has '/data/runs/a/pre', now '/elsewhere/pre'",
        "--dataset: run has '/data/x.extxyz', now '/data/y.extxyz'"]


def _compile_cache_env(tmp_path):
    import os

    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _numbers(results):
    """What a resumed run must reproduce bit for bit (not its timings or its ``resumed`` mark)."""
    return {**{k: results[k] for k in ("relaxation", "per_structure_test_dq", "grid", "best_grid_step", "forces")},
            "bptt_history": _rows(results["bptt_history"])}


def test_a_run_killed_after_its_best_model_resumes_from_a_moved_directory_bit_identical(tmp_path, tiny_pretrained):  # noqa: F811
    env, flags = _compile_cache_env(tmp_path), [*TINY, f"--pretrained={tiny_pretrained}"]
    ref_dir = tmp_path / "ref"
    ref = _run(f"--workdir={ref_dir}", *flags, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    results = json.loads((ref_dir / "results.json").read_text())

    # the checkpoints carry the run's relaxation settings and grid result
    settings = model_io.saved_relax_settings(model_io.load_model(ref_dir / "checkpoints" / "bptt_best")[3])
    assert settings["max_frames"] == 4 and settings["grid_steps"] == [0.01, 0.04]
    assert settings["best_grid_step"] == results["best_grid_step"] and settings["stop_rms"] > 0
    pretrained = api.TrainedModel.load(ref_dir / "checkpoints" / "pretrained")
    assert model_io.saved_relax_settings(pretrained.meta) == settings
    assert pretrained.step_description() == f"fixed, eta = {results['best_grid_step']:g} Å²/eV"
    assert model_io.frame_stop_rule(pretrained.meta) == (4, settings["stop_rms"], settings["stop_fmax"])

    # killed after checkpoints/bptt_best was written, before results.json; then moved elsewhere
    run_dir = tmp_path / "moved" / "run"
    shutil.copytree(ref_dir, run_dir)
    for name in ("results.json", "results.md", "plots"):
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    res = _run(f"--workdir={run_dir}", *flags, "--resume", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for line in (f"resuming the run in {run_dir} (moved from {ref_dir})", "pretraining skipped",
                 "reusing the grid search", "resuming BPTT from checkpoint step 4: all 2 epochs done"):
        assert line in res.stdout, (line, res.stdout[-3000:])
    best_a, state_a, res_a = _final(ref_dir)
    best_b, state_b, res_b = _final(run_dir)
    assert _leaves_equal(best_a, best_b) and _leaves_equal(state_a, state_b)
    assert _numbers(res_a) == _numbers(res_b) and res_b["resumed"]
    assert checkpoint.checkpoint_steps(run_dir / "checkpoints" / "bptt_best") == [0]  # the identical save kept

    # resuming the finished run says so and does nothing
    written = (run_dir / "results.json").stat().st_mtime_ns
    done = _run(f"--workdir={run_dir}", *flags, "--resume", env=env)
    assert done.returncode == 0 and f"the run in {run_dir} is finished" in done.stdout, done.stdout + done.stderr
    assert (run_dir / "results.json").stat().st_mtime_ns == written


# ----------------------------------------------------------------------------- the CLI uses the saved settings


def _saved_model(path, relax_settings=None):
    fixed = step_rules.FixedStep(1e-4)
    extra = {"role": "test"} if relax_settings is None else {"role": "test", "relax_settings": relax_settings}
    params = {**_tiny_model(0), "step_rule": fixed.init()}
    model_io.save_model(path, params, adapt.Normalizer.identity(), adapt.TINY,
                        step_rules.step_rule_to_dict(fixed, scan.FrameModifiers()), extra)
    return path


def test_the_saved_stop_rule_and_frame_limit_are_what_the_api_and_the_cli_use(tmp_path):
    atoms = ase.build.bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    ase.io.write(tmp_path / "in.extxyz", atoms)
    # a stop rule that never fires (RMS movement below 0 Å) and 3 frames: every relaxation takes exactly 3
    saved = _saved_model(tmp_path / "saved", {"stop_rms": 0.0, "stop_fmax": 0.0, "max_frames": 3, "fire_fmax": 1e-6})
    plain = _saved_model(tmp_path / "plain")
    assert model_io.frame_stop_rule(api.TrainedModel.load(plain).meta) == (75, 1e-3, 0.0)
    assert model_io.frame_stop_rule(api.TrainedModel.load(saved).meta, max_frames=5) == (5, 0.0, 0.0)

    model = api.TrainedModel.load(saved)
    out = api.relax_structures(atoms, model, on_out_of_domain="ignore")
    explicit = api.relax_structures(atoms, model, max_frames=3, stop_rms=0.0, on_out_of_domain="ignore")
    assert int(out.num_frames[0]) == 3 and not out.converged[0]
    np.testing.assert_array_equal(out.structure.positions, explicit.structure.positions)
    assert int(api.relax_structures(atoms, model, max_frames=2, on_out_of_domain="ignore").num_frames[0]) == 2

    assert cli.main(["relax", str(tmp_path / "in.extxyz"), "-c", str(saved), "-o", str(tmp_path / "out.extxyz")]) == 0
    assert ase.io.read(tmp_path / "out.extxyz").info["num_frames"] == 3
    # FIRE's fmax: the run's (1e-6 eV/Å, never reached here) unless --fmax is given
    args = ["relax", str(tmp_path / "in.extxyz"), "-c", str(saved), "--method=fire", "--max-frames=4"]
    assert cli.main([*args, "-o", str(tmp_path / "fire.extxyz")]) == 0
    assert ase.io.read(tmp_path / "fire.extxyz").info["num_frames"] == 4
    assert cli.main([*args, "--fmax=1e6", "-o", str(tmp_path / "fire2.extxyz")]) == 0
    assert ase.io.read(tmp_path / "fire2.extxyz").info["num_frames"] == 0


# ----------------------------------------------------------------------------- flag errors


@pytest.mark.parametrize("script, flag_args, message", [
    ("finetune", ["--bptt_lr=-1"], "--bptt_lr=-1.0 is a negative learning rate"),
    ("crossval", ["--cv_folds=1"], "--cv_folds=1: cross-validation needs at least 2 folds"),
])
def test_a_flag_error_is_printed_alone_without_the_flag_help(tmp_path, script, flag_args, message):
    proc = subprocess.run([sys.executable, "-m", f"experiments.{script}", f"--workdir={tmp_path / 'w'}",
                           *flag_args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "--helpfull" in proc.stderr and len(proc.stderr.splitlines()) <= 5, proc.stderr
    assert "--batch_size" not in proc.stderr and "USAGE" not in proc.stderr.upper()  # no flag help
    assert not (tmp_path / "w").exists()
