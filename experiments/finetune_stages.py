"""Stages of the main job (``experiments.finetune``): the run directory, the pretrained model,
the grid search of the fixed step and the pretrained model's test relaxations. Each reads the
parsed flags and reports progress through ``common.info``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from bptt_mlip.data import batching
from bptt_mlip.relax import scan, step_rules
from bptt_mlip.training import checkpoint, evaluate
from bptt_mlip.workflow import model_io
from experiments import common, configs, report
from experiments.finetune_flags import RESUME_FREE_FLAGS

FLAGS = flags.FLAGS


def start_run(config: dict) -> Path:
    """The run directory, new (config.json written) or, with --resume, the earlier run's with the same flags."""
    try:
        workdir = common.prepare_workdir(FLAGS.workdir, FLAGS.overwrite, resume=FLAGS.resume)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise app.UsageError(str(err)) from None
    if not FLAGS.resume:
        common.write_json(workdir / "config.json", {"command": common.command_line(), "flags": config,
                                                    "devices": [str(d) for d in jax.devices()]})
        return workdir
    old = json.loads((workdir / "config.json").read_text()).get("flags", {})
    diff = resume_differences(old, config)
    if diff:
        raise app.UsageError(f"--resume: the flags differ from the run in {workdir} (a resumed run must use the "
                             "same settings):\n  " + "\n  ".join(diff))
    if run_finished(workdir):
        common.info(f"the run in {workdir} is finished (results.json and results.md written); nothing to resume")
        raise SystemExit(0)
    moved = f" (moved from {old['workdir']})" if old.get("workdir") not in (None, config.get("workdir")) else ""
    common.info(f"resuming the run in {workdir}{moved}")
    return workdir


def run_finished(workdir: Path) -> bool:
    """Whether the run in ``workdir`` wrote its results (results.json is written first, results.md after it)."""
    return (workdir / "results.json").is_file() and (workdir / "results.md").is_file()


def resume_differences(old: dict, new: dict) -> list[str]:
    """The settings of the flag values ``new`` that differ from those of the run they resume (``old``,
    from its config.json), one line each. --workdir is not a setting (a run directory may be moved or
    copied), nor is the folder part of a path inside it (e.g. --pretrained=<workdir>/pretrained)."""
    old_dir, new_dir = old.get("workdir"), new.get("workdir")

    def setting(value, run_dir):
        if not isinstance(value, str) or not run_dir:
            return value
        return ",".join(_within(part, run_dir) for part in value.split(","))

    return [f"--{k}: run has {old.get(k)!r}, now {new[k]!r}" for k in new
            if k not in (*RESUME_FREE_FLAGS, "workdir") and k in old
            and setting(common.jsonable(new[k]), new_dir) != setting(old[k], old_dir)]


def _within(path: str, run_dir: str) -> str:
    """``path`` as ``<run>/relative`` when it is a path (has a ``/``) inside ``run_dir``, else unchanged."""
    if "/" not in path:
        return path
    try:
        return "<run>/" + Path(path).absolute().relative_to(Path(run_dir).absolute()).as_posix()
    except ValueError:
        return path


def load_or_pretrain(workdir: Path, train_set, val, log, mesh):
    """(config, normalizer, model params, pretraining history): this run's saved model on --resume,
    else --pretrained or a model pretrained here, saved as checkpoints/pretrained."""
    pre_dir = workdir / "checkpoints" / "pretrained"
    if FLAGS.resume and checkpoint.checkpoint_steps(pre_dir):
        cfg, normalizer, params, meta = model_io.load_model(pre_dir)
        common.info(f"resume: loaded the pretrained model of this run from {pre_dir} (pretraining skipped)")
        return cfg, normalizer, params["model"], meta.get("history", [])
    if FLAGS.resume:
        common.info(f"resume: no pretrained checkpoint in {pre_dir}; pretraining again (deterministic)")
    cfg, normalizer, model_params, history = common.pretrain_model(train_set, val, log, mesh)
    common.save_pretrained(workdir, cfg, normalizer, model_params, history, train_set=train_set)
    return cfg, normalizer, model_params, history


def grid_search(workdir: Path, force_fn, model_params, train_set, test, eval_rollout, log, steps=None):
    """(steps, train grid, test grid or None, best step): every step of ``steps`` (Å²/eV; default
    --grid_steps) on training data (and test data, reported only); the best is chosen on training
    data. Kept in grid.json for --resume."""
    steps = [float(s) for s in (FLAGS.grid_steps if steps is None else steps)]
    batch, grid_path = FLAGS.batch_size, workdir / "grid.json"
    grid_trajs = train_set[: FLAGS.grid_max_trajectories] if FLAGS.grid_max_trajectories else train_set
    if FLAGS.resume and grid_path.exists():
        stored = json.loads(grid_path.read_text())
        grid_train, grid_test = report.grid_from_json(stored["train"]), report.grid_from_json(stored["test"])
        common.info(f"resume: reusing the grid search stored in {grid_path}")
    else:
        grid_train = evaluate.grid_table(force_fn, model_params, grid_trajs, steps, eval_rollout, batch_size=batch)
        grid_test = (evaluate.grid_table(force_fn, model_params, test, steps, eval_rollout, batch_size=batch)
                     if FLAGS.grid_on_test else None)
        common.write_json(grid_path, {"steps": steps, "train": report.grid_to_json(grid_train),
                                      "test": report.grid_to_json(grid_test)})
    best_i = int(np.argmin(grid_train["mean_dq"]))
    for i, row in enumerate(report.grid_rows(steps, grid_train, grid_test)):
        log("grid", i, row)
    common.info(f"best grid step on training data: {steps[best_i]:g} "
                f"(train mean Dq {grid_train['mean_dq'][best_i]:.4g})")
    return steps, grid_train, grid_test, steps[best_i]


def save_relax_settings(workdir: Path, v: dict, best_step: float) -> dict:
    """The relaxation settings of the run (flag values ``v`` with its stop rule, frame limit, FIRE fmax and
    step grid) and the grid's best step (Å²/eV) as the meta entry its saved models carry
    (``{"relax_settings": ...}``, read with ``model_io.saved_relax_settings``). They are also written into
    checkpoints/pretrained, whose step rule becomes the fixed best grid step: the CLI and ``TrainedModel``
    then relax with the pretrained model as this run's baseline did."""
    settings = {"stop_rms": float(v["stop_rms"]), "stop_fmax": float(v.get("stop_fmax") or 0.0),
                "max_frames": int(v["max_frames"]), "grid_steps": [float(s) for s in v["grid_steps"]],
                "best_grid_step": float(best_step)}
    if "fire_fmax" in v:
        settings["fire_fmax"] = float(v["fire_fmax"])
    extra = {model_io.RELAX_SETTINGS_KEY: settings}
    pre_dir = workdir / "checkpoints" / "pretrained"
    cfg, normalizer, params, meta = model_io.load_model(pre_dir)
    named = (model_io.MODEL_KIND_KEY, model_io.MODEL_CONFIG_KEY, model_io.STEP_RULE_KEY)
    fixed = step_rules.FixedStep(float(best_step))
    common.save_model(pre_dir, {"model": params["model"], "step_rule": fixed.init()}, normalizer, cfg, fixed,
                      {**{k: x for k, x in meta.items() if k not in named}, **extra})
    return extra


def pretrained_baselines(force_fn, model_params, test, best_step: float, eval_rollout, timings: dict,
                         fire_config=None):
    """Test relaxations of the pretrained model: at the best grid step, and with FIRE (--fire; of
    ``fire_config``, default from the flags). Returns (summary, per-structure results) of the
    first and (summary, per-structure results) of FIRE, or None twice without --fire."""
    batch = FLAGS.batch_size
    fixed = step_rules.FixedStep(best_step)
    pre_params = {"model": model_params, "step_rule": fixed.init()}
    pre_summary, pre_per = evaluate.relaxation_table(force_fn, fixed, pre_params, test, scan.FrameModifiers(),
                                                     eval_rollout, batch_size=batch)
    fire_summary = fire_per = None
    if FLAGS.fire:
        t0 = time.time()
        fire_summary, fire_per = evaluate.fire_table(
            force_fn, model_params, test, fire_config or configs.fire_config(common.flag_values()), batch_size=batch)
        timings["fire_s"] = time.time() - t0
    return pre_summary, pre_per, fire_summary, fire_per


def force_errors(force_fn, model_params, trajs) -> dict:
    return evaluate.evaluate_forces(force_fn, model_params, batching.force_batches(trajs, FLAGS.pretrain_batch_size))
