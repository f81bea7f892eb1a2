"""The main job: pretrain (or load) ADAPT, grid-search the fixed step, fine-tune with BPTT, evaluate.

    python -m experiments.finetune --flagfile=experiments/si_cpu.flags

Writes into --workdir: config.json, metrics.jsonl, checkpoints/{pretrained,bptt}/ (orbax),
results.json, results.md and plots/*.png, and prints the result table.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import common
from bptt_mlip.training import checkpoint
from bptt_mlip.relax import fire
from bptt_mlip.training import loops
from bptt_mlip.models import adapt as model
from bptt_mlip.training import optim
from bptt_mlip.workflow import plots
from bptt_mlip.relax import scan as relax
from bptt_mlip.training import steps as train
from bptt_mlip.data import batching

FLAGS = flags.FLAGS

common.define_pretrain_flags()

flags.DEFINE_list(
    "grid_steps",
    ["0.005", "0.01", "0.015", "0.02", "0.025", "0.03", "0.035", "0.04", "0.045", "0.05", "0.055", "0.06", "0.065",
     "0.07", "0.075", "0.08"],
    "Fixed step sizes (Å²/eV) of the grid search.",
)
flags.DEFINE_integer("grid_max_trajectories", 0, "Grid-search on at most this many training trajectories (0 = all).")
flags.DEFINE_bool("grid_on_test", True, "Also report test Dq at every grid step (paper table 6; never used for choices).")

flags.DEFINE_enum("step_kind", "fixed", ["fixed", "learnable", "neural"], "BPTT step-size rule.")
flags.DEFINE_float("init_step", 0.0, "Initial step size for BPTT; 0 = the best grid step (chosen on training data).")
flags.DEFINE_float("init_step_scale", 1.0, "Multiply the initial BPTT step by this (figure 3a: learnable step from far-off starts).")
flags.DEFINE_float("head_max_scale", 0.0, "Neural step head: 0 = unbounded linear output (appendix A); c > 1 = step "
                   "bounded to (0, c x the initial step) through a sigmoid.")
flags.DEFINE_float("momentum", 0.0, "Heavy-ball momentum weight of the frame rule (paper ablation: 0.05).")
flags.DEFINE_float("anneal", 1.0, "Multiplicative step annealing per frame (paper ablation: 0.99).")
flags.DEFINE_float("noise_std", 0.0, "Exploration noise on each frame's update (Å).")
flags.DEFINE_float("max_displacement", 0.0, "Cap on an atom's displacement per frame (Å); 0 = none.")
flags.DEFINE_bool("random_stopping", False, "Randomly vary the stopping rule per batch (paper table 5).")

flags.DEFINE_integer("bptt_epochs", 5, "BPTT fine-tuning epochs.")
flags.DEFINE_float("bptt_lr", 1e-4, "Adam learning rate of the model during BPTT.")
flags.DEFINE_float("step_lr", 1e-3, "Adam learning rate of the step-size parameters.")
flags.DEFINE_float("clip_norm", 1.0, "Global-norm gradient clip (0 = off).")
flags.DEFINE_float("proximal_weight", 0.0, "Proximal pull toward the pretrained weights (0 = off).")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay during BPTT.")
flags.DEFINE_float("dq_weight", 1.0, "Weight of the end-point Dq in the BPTT objective (0 = force term only).")
flags.DEFINE_float("force_weight", 0.0, "Weight of a force-matching term (mean squared force error, (eV/Å)^2, on "
                   "--force_batch_size reference frames of the training trajectories per step); 0 = the paper's "
                   "Dq-only objective.")
flags.DEFINE_integer("force_batch_size", 32, "Reference frames per BPTT step for the force term.")
flags.DEFINE_bool("augment_rotation", False, "Rotate every training relaxation and force frame by a random rotation "
                  "(positions, target, cell and forces together).")
flags.DEFINE_float("augment_translation", 0.0, "Translate every training example by a random vector with components "
                   "in [-x, x] Å (0 = off).")
flags.DEFINE_integer("start_stride", 0, "Start BPTT rollouts also from every k-th stored frame of a training "
                     "trajectory (target: its last frame); 0 = from the first frame only (the paper).")
flags.DEFINE_integer("patience", 0, "Stop BPTT once the validation Dq has not improved for this many epochs "
                     "(0 = run every epoch); the best-validation model is kept either way.")
flags.DEFINE_bool("freeze_model", False, "Train only the step size (figure 5a).")
flags.DEFINE_bool("random_init", False, "BPTT from random weights instead of the pretrained model (figure 5b).")

flags.DEFINE_bool("fire", True, "Evaluate the pretrained model with FIRE (ASE semantics) on the test split.")
flags.DEFINE_float("fire_fmax", 0.05, "FIRE convergence: largest per-atom force below this (eV/Å).")
flags.DEFINE_integer("fire_max_steps", 500, "FIRE step limit.")

flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its newest good checkpoint (same flags); the "
                  "result is bit-identical to an uninterrupted run on the same machine.")
flags.DEFINE_integer("checkpoint_every", 50, "Save the full BPTT training state every N steps (and after every "
                     "epoch); 0 = only after every epoch.")
flags.DEFINE_integer("max_consecutive_bad_steps", 10, "Stop BPTT after more than this many consecutive steps with a "
                     "non-finite loss or gradient (each is skipped); the last good checkpoint stays on disk.")

# flags a resumed run may change without changing its numbers
RESUME_FREE_FLAGS = ("resume", "overwrite", "checkpoint_every")


def flag_problems(v: dict) -> list[str]:
    """Contradictory or impossible settings in the flag values ``v`` (name -> value), each a
    sentence naming the flags; empty when the settings are usable. Checked before any work."""
    out = []

    def need(cond, msg):
        if not cond:
            out.append(msg)

    need(v["num_test"] >= 0, f"--num_test={v['num_test']} must be >= 0")
    need(v["num_val"] >= 0, f"--num_val={v['num_val']} must be >= 0")
    if v["max_trajectories"] > 0 and not v["cv_folds"]:
        need(v["num_test"] + v["num_val"] < v["max_trajectories"],
             f"--num_test={v['num_test']} + --num_val={v['num_val']} >= --max_trajectories={v['max_trajectories']}: "
             "no training trajectories would be left")
    if v["cv_folds"]:
        need(v["cv_folds"] >= 2, f"--cv_folds={v['cv_folds']} must be >= 2 (or 0 = off)")
        need(0 <= v["cv_fold"] < max(v["cv_folds"], 1),
             f"--cv_fold={v['cv_fold']} must be in 0..{v['cv_folds'] - 1} (--cv_folds={v['cv_folds']})")
    need(v["max_trajectories"] >= 0, f"--max_trajectories={v['max_trajectories']} must be >= 0 (0 = all)")
    need(v["bptt_epochs"] >= 0, f"--bptt_epochs={v['bptt_epochs']} must be >= 0")
    need(v["pretrain_epochs"] >= 0, f"--pretrain_epochs={v['pretrain_epochs']} must be >= 0")
    for name in ("bptt_lr", "step_lr", "pretrain_lr"):
        need(v[name] >= 0, f"--{name}={v[name]} is a negative learning rate")
    need(v["init_step_scale"] > 0, f"--init_step_scale={v['init_step_scale']} must be > 0")
    need(v["head_max_scale"] == 0 or v["head_max_scale"] > 1,
         f"--head_max_scale={v['head_max_scale']} must be 0 (unbounded) or > 1")
    need(v["init_step"] >= 0, f"--init_step={v['init_step']} must be >= 0 (0 = best grid step)")
    if v["random_stopping"]:
        need(v["max_frames"] >= 50,
             f"--random_stopping draws the frame limit from [50, --max_frames], but --max_frames={v['max_frames']} < 50")
    if v["freeze_model"] and v["bptt_epochs"] > 0:
        need(v["step_kind"] != "fixed",
             "--freeze_model with --step_kind=fixed leaves nothing to train (the model is frozen and the fixed step "
             "has no gradient); use --step_kind=learnable or neural, or --bptt_epochs=0")
    need(v["max_frames"] >= 1, f"--max_frames={v['max_frames']} must be >= 1")
    need(v["stop_rms"] > 0, f"--stop_rms={v['stop_rms']} must be > 0")
    for name in ("batch_size", "pretrain_batch_size", "pretrain_frame_stride", "max_consecutive_bad_steps"):
        need(v[name] >= 1, f"--{name}={v[name]} must be >= 1")
    need(v["checkpoint_every"] >= 0, f"--checkpoint_every={v['checkpoint_every']} must be >= 0 (0 = every epoch)")
    need(v["min_atom_distance"] >= 0, f"--min_atom_distance={v['min_atom_distance']} must be >= 0 (0 = no check)")
    need(v["dq_weight"] > 0 or v["force_weight"] > 0,
         "--dq_weight=0 and --force_weight=0 leave the BPTT objective empty")
    if v["force_weight"] > 0:
        need(v["force_batch_size"] >= 1, f"--force_batch_size={v['force_batch_size']} must be >= 1")
    if v["patience"] > 0:
        need(v["num_val"] > 0, f"--patience={v['patience']} needs validation data, but --num_val=0")
    for name in ("start_stride", "patience"):
        need(v[name] >= 0, f"--{name}={v[name]} must be >= 0")
    for name in ("clip_norm", "proximal_weight", "weight_decay", "noise_std", "max_displacement", "dropout",
                 "dq_weight", "force_weight", "augment_translation"):
        need(v[name] >= 0, f"--{name}={v[name]} must be >= 0")
    need(0 < v["anneal"] <= 1, f"--anneal={v['anneal']} must be in (0, 1]")
    try:
        steps = [float(x) for x in v["grid_steps"]]
        need(len(steps) > 0, "--grid_steps is empty")
        need(all(x > 0 for x in steps), f"--grid_steps={','.join(v['grid_steps'])}: every step size must be > 0")
    except ValueError:
        out.append(f"--grid_steps={','.join(v['grid_steps'])}: not a list of numbers")
    need(not (v["resume"] and v["overwrite"]),
         "--resume and --overwrite contradict each other: --overwrite deletes the run to resume")
    if v["pretrained"]:
        from pathlib import Path

        need(Path(v["pretrained"]).is_dir(), f"--pretrained={v['pretrained']}: no such checkpoint directory")
    return out


def check_flags() -> None:
    """Raise ``app.UsageError`` listing every problem of the parsed flags (before any work)."""
    problems = flag_problems(common.flag_values())
    if problems:
        raise app.UsageError("invalid flags:\n  " + "\n  ".join(problems))


def _check_resume_config(workdir, config: dict) -> None:
    import json

    old = json.loads((workdir / "config.json").read_text()).get("flags", {})
    diff = [f"--{k}: run has {old.get(k)!r}, now {config[k]!r}" for k in config
            if k not in RESUME_FREE_FLAGS and k in old and common._jsonable(config[k]) != old[k]]
    if diff:
        raise app.UsageError(
            f"--resume: the flags differ from the run in {workdir} (a resumed run must use the same settings):\n  "
            + "\n  ".join(diff)
        )


def _grid_to_json(g):
    return None if g is None else {k: np.asarray(v).tolist() for k, v in g.items()}


def _grid_from_json(g):
    if g is None:
        return None
    as_float = ("mean_dq", "dq", "step_sizes")  # non-finite values were stored as strings ("inf")
    return {k: np.asarray(v, dtype=object).astype(np.float64) if k in as_float else np.asarray(v) for k, v in g.items()}


def main(argv):
    del argv
    t_start = time.time()
    common.quiet_libraries()
    check_flags()
    mesh = common.setup_devices({"batch_size": FLAGS.batch_size, "pretrain_batch_size": FLAGS.pretrain_batch_size,
                                 **({"force_batch_size": FLAGS.force_batch_size} if FLAGS.force_weight else {})})
    config = common.flag_values()
    try:
        workdir = common.prepare_workdir(FLAGS.workdir, FLAGS.overwrite, resume=FLAGS.resume)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise app.UsageError(str(err)) from None
    if FLAGS.resume:
        _check_resume_config(workdir, config)
        common.info(f"resuming the run in {workdir}")
    log = common.MetricsWriter(workdir / "metrics.jsonl")
    if not FLAGS.resume:
        common.write_json(workdir / "config.json", {"command": common.command_line(), "flags": config,
                                                    "devices": [str(d) for d in jax.devices()]})
    timings = {}

    # ---------------------------------------------------------------- data
    trajs, report, skipped = common.load_trajectories(FLAGS.dataset, return_skipped=True)
    test, val, train_set = common.split(trajs)
    common.info(f"split: {len(test)} test, {len(val)} val, {len(train_set)} train trajectories")
    batch = FLAGS.batch_size

    # ---------------------------------------------------------------- model: load or pretrain
    t0 = time.time()
    pre_dir = workdir / "checkpoints" / "pretrained"
    if FLAGS.resume and checkpoint.checkpoint_steps(pre_dir):
        saved, normalizer, meta = checkpoint.restore_model(pre_dir)
        cfg, model_params = checkpoint.adapt_config_from_dict(meta["model_config"]), saved["model"]
        pretrain_history = meta.get("history", [])
        common.info(f"resume: loaded the pretrained model of this run from {pre_dir} (pretraining skipped)")
    else:
        if FLAGS.resume:
            common.info(f"resume: no pretrained checkpoint in {pre_dir}; pretraining again (deterministic)")
        cfg, normalizer, model_params, pretrain_history = common.pretrain_model(train_set, val, log, mesh)
        common.save_model(pre_dir, {"model": model_params, "step": {}}, normalizer, cfg,
                          relax.StepConfig(), {"role": "pretrained", "history": pretrain_history})
    timings["pretrain_s"] = time.time() - t0
    force_fn = model.make_force_fn(cfg, normalizer)
    common.info(f"model: {cfg}, {model.count_params(model_params)} parameters")

    def force_errors(p, trajs_):
        from bptt_mlip.training import evaluate

        return evaluate.evaluate_forces(force_fn, p, batching.force_batches(trajs_, FLAGS.pretrain_batch_size))

    pre_forces = force_errors(model_params, test)

    # ---------------------------------------------------------------- grid search (chosen on training data)
    t0 = time.time()
    steps = [float(s) for s in FLAGS.grid_steps]
    eval_rollout = common.rollout_config(remat="none")
    grid_trajs = train_set[: FLAGS.grid_max_trajectories] if FLAGS.grid_max_trajectories else train_set
    grid_path = workdir / "grid.json"
    if FLAGS.resume and grid_path.exists():
        import json

        stored = json.loads(grid_path.read_text())
        grid_train, grid_test = _grid_from_json(stored["train"]), _grid_from_json(stored["test"])
        common.info(f"resume: reusing the grid search stored in {grid_path}")
    else:
        grid_train = loops.grid_search(force_fn, model_params, grid_trajs, steps, eval_rollout, batch_size=batch)
        grid_test = loops.grid_search(force_fn, model_params, test, steps, eval_rollout, batch_size=batch) if FLAGS.grid_on_test else None
        common.write_json(grid_path, {"steps": steps, "train": _grid_to_json(grid_train), "test": _grid_to_json(grid_test)})
    best_i = int(np.argmin(grid_train["mean_dq"]))
    best_step = steps[best_i]
    timings["grid_s"] = time.time() - t0
    grid_rows = [
        {"step": s, "train_mean_dq": float(grid_train["mean_dq"][i]),
         "train_converged": int(grid_train["converged"][i].sum()),
         **({"test_mean_dq": float(grid_test["mean_dq"][i]), "test_converged": int(grid_test["converged"][i].sum())}
            if grid_test is not None else {})}
        for i, s in enumerate(steps)
    ]
    for i, r in enumerate(grid_rows):
        log("grid", i, r)
    common.info(f"best grid step on training data: {best_step:g} (train mean Dq {grid_train['mean_dq'][best_i]:.4g})")

    # ---------------------------------------------------------------- baselines on the test split
    fixed = relax.StepConfig(kind="fixed", init_step=best_step)
    fixed_fn = relax.make_step_size_fn(fixed)
    pre_params = {"model": model_params, "step": {"eta": jnp.asarray(best_step, jnp.float32)}}
    pre_summary, pre_per = loops.relaxation_table(force_fn, fixed_fn, pre_params, test, fixed, eval_rollout, batch_size=batch)
    fire_summary = None
    if FLAGS.fire:
        t0 = time.time()
        fire_cfg = fire.FireConfig(fmax=FLAGS.fire_fmax, max_steps=FLAGS.fire_max_steps)
        fire_summary, _ = loops.fire_table(force_fn, model_params, test, fire_cfg, batch_size=batch)
        timings["fire_s"] = time.time() - t0

    # ---------------------------------------------------------------- BPTT
    t0 = time.time()
    step_cfg = relax.StepConfig(
        kind=FLAGS.step_kind, init_step=(FLAGS.init_step or best_step) * FLAGS.init_step_scale, momentum=FLAGS.momentum, anneal=FLAGS.anneal,
        noise_std=FLAGS.noise_std, max_displacement=FLAGS.max_displacement, head_max_scale=FLAGS.head_max_scale,
    )
    start_model = model.init_params(cfg, jax.random.PRNGKey(FLAGS.seed + 1)) if FLAGS.random_init else model_params
    params = {"model": start_model, "step": relax.init_step_params(step_cfg, jax.random.PRNGKey(FLAGS.seed + 2))}
    step_fn = relax.make_step_size_fn(step_cfg, normalizer)
    bptt_cfg = train.BPTTConfig(step=step_cfg, rollout=common.rollout_config(), random_stopping=FLAGS.random_stopping,
                                frame_limit_range=(min(50, FLAGS.max_frames), FLAGS.max_frames),
                                dq_weight=FLAGS.dq_weight, force_weight=FLAGS.force_weight,
                                augment_rotation=FLAGS.augment_rotation, augment_translation=FLAGS.augment_translation)
    optim_cfg = optim.OptimConfig(
        learning_rate=FLAGS.bptt_lr, step_learning_rate=FLAGS.step_lr, clip_norm=FLAGS.clip_norm,
        proximal_weight=FLAGS.proximal_weight, weight_decay=FLAGS.weight_decay, freeze_model=FLAGS.freeze_model,
        freeze_step=FLAGS.step_kind == "fixed",
    )
    ckpt_dir = workdir / "checkpoints" / "bptt"
    try:
        best_params, bptt_history, final_state = loops.bptt_finetune(
            force_fn, step_fn, params, train_set, val, bptt_config=bptt_cfg, optim_config=optim_cfg,
            epochs=FLAGS.bptt_epochs, batch_size=batch, seed=FLAGS.seed, log=log,
            max_consecutive_bad_steps=FLAGS.max_consecutive_bad_steps, checkpoint_dir=ckpt_dir / "train_state",
            checkpoint_every=FLAGS.checkpoint_every, resume=FLAGS.resume, report=common.info,
            start_stride=FLAGS.start_stride, force_batch_size=FLAGS.force_batch_size, patience=FLAGS.patience,
            mesh=mesh,
        )
    except RuntimeError as err:
        if len(err.args) < 2 or not str(err.args[0]).startswith("BPTT stopped"):
            raise
        common.save_model(workdir / "checkpoints" / "bptt_best", err.args[1], normalizer, cfg, step_cfg,
                          {"role": "bptt_best_validation", "stopped": err.args[0]})
        log.close()
        raise SystemExit(f"{err.args[0]}. Best parameters so far saved in {workdir / 'checkpoints' / 'bptt_best'}.")
    timings["bptt_s"] = time.time() - t0
    nonfinite = optim.nonfinite_counts(final_state.opt_state)
    skipped_steps = int(nonfinite["nonfinite_total"])
    if skipped_steps:
        common.info(f"BPTT skipped {skipped_steps} updates with a non-finite loss or gradient (counted in results.json)")
    common.save_model(workdir / "checkpoints" / "bptt_best", best_params, normalizer, cfg, step_cfg,
                      {"role": "bptt_best_validation"})
    bptt_summary, bptt_per = loops.relaxation_table(force_fn, step_fn, best_params, test, step_cfg, eval_rollout, batch_size=batch)
    bptt_forces = force_errors(best_params["model"], test)

    # ---------------------------------------------------------------- results
    rows = []
    if fire_summary is not None:
        rows.append({"setting": "pretrained + FIRE", **fire_summary})
    rows.append({"setting": f"pretrained, best grid step {best_step:g}", **pre_summary})
    learned = float(best_params["step"]["eta"]) if "eta" in best_params["step"] else None
    rows.append({"setting": f"BPTT ({FLAGS.step_kind} step" + (f", eta={learned:.4g})" if learned else ")"), **bptt_summary})
    for r in rows:
        common.info(
            f"{r['setting']}: {r['num_diverged']} of {r['num_structures']} test relaxations diverged, "
            f"{r['num_nonfinite']} non-finite (left out of mean_dq); mean Dq without diverged "
            f"{r['mean_dq_not_diverged']:.4g}"
        )
    ratio = bptt_summary["mean_dq"] / pre_summary["mean_dq"]
    timings["total_s"] = time.time() - t_start
    results = {
        "dataset": FLAGS.dataset, "curation": str(report), "split": {"test": len(test), "val": len(val), "train": len(train_set)},
        "model_config": checkpoint.config_to_dict(cfg), "num_params": model.count_params(model_params),
        "best_grid_step": best_step, "grid": grid_rows, "relaxation": rows,
        "dq_ratio_bptt_over_best_grid": ratio,
        "forces": {"pretrained": pre_forces, "bptt": bptt_forces},
        "force_rmse_ratio": bptt_forces["force_rmse"] / pre_forces["force_rmse"],
        "pretrain_history": pretrain_history, "bptt_history": bptt_history,
        "per_structure_test_dq": {"pretrained_best_grid": pre_per["dq"], "bptt": bptt_per["dq"]},
        "timings_s": timings,
        "skipped_records": skipped,
        "nonfinite_skipped_steps": skipped_steps,
        "diverged": {r["setting"]: {"num_diverged": r["num_diverged"], "num_nonfinite": r["num_nonfinite"],
                                    "mean_dq_not_diverged": r["mean_dq_not_diverged"]} for r in rows},
        "resumed": bool(FLAGS.resume),
    }
    common.write_json(workdir / "results.json", results)
    cols = ["setting", "mean_dq", "median_dq", "mean_frames", "num_converged", "num_diverged", "num_structures"]
    md = [f"# Results: {FLAGS.dataset}", "", f"Command: `{common.command_line()}`", "",
          f"Split: {len(test)} test / {len(val)} val / {len(train_set)} train; model {cfg}, "
          f"{model.count_params(model_params)} parameters.", "",
          "## Test relaxations (Dq in amu^0.5 Å)", "", common.markdown_table(rows, cols), "",
          f"BPTT / best-grid Dq ratio: **{ratio:.3f}**", "",
          "## Test force errors (eV/Å)", "",
          common.markdown_table([{"model": "pretrained", **pre_forces}, {"model": "BPTT-tuned", **bptt_forces}],
                                ["model", "force_rmse", "force_mae", "force_l2_per_frame", "zero_force_rmse"]), "",
          "## Grid search (pretrained model)", "",
          common.markdown_table(grid_rows, list(grid_rows[0].keys())), "",
          "## Wall time (s)", "", common.markdown_table([{k: round(v, 1) for k, v in timings.items()}], list(timings))]
    (workdir / "results.md").write_text("\n".join(md) + "\n")
    plots.loss_curves(bptt_history, workdir / "plots" / "bptt_loss.png")
    splits = {"train": grid_train["mean_dq"], **({"test": grid_test["mean_dq"]} if grid_test is not None else {})}
    plots.grid_curve(steps, splits, workdir / "plots" / "grid_search.png", best=best_step)
    plots.dq_before_after(pre_per["dq"], bptt_per["dq"], workdir / "plots" / "dq_before_after.png")
    log.close()
    print("\n".join(md[4:]))
    print(f"\nrun directory: {workdir}")


if __name__ == "__main__":
    app.run(main)
