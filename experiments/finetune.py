"""The main job: pretrain (or load) a force model (--model), grid-search the fixed step, fine-tune with BPTT, evaluate.

    python -m experiments.finetune --flagfile=experiments/si_cpu.flags

Writes into --workdir: config.json, metrics.jsonl, checkpoints/{pretrained,bptt}/ (orbax),
results.json, results.md and plots/*.png, and prints the result table. The flags and their
checks are in ``experiments.finetune_flags``, the configs built from them in ``experiments.configs``,
the stages before BPTT in ``experiments.finetune_stages`` and the reports in ``experiments.report``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
from absl import app, flags

from bptt_mlip.models import registry
from bptt_mlip.training import checkpoint, evaluate, loop, loops, optim
from bptt_mlip.training import steps as train
from experiments import common, configs, report
from experiments import finetune_stages as stages
from experiments.finetune_flags import RESUME_FREE_FLAGS, flag_problems  # noqa: F401  (defines the flags)

FLAGS = flags.FLAGS


def check_flags() -> None:
    """Raise ``app.UsageError`` listing every problem of the parsed flags (before any work)."""
    problems = flag_problems(common.flag_values())
    if problems:
        raise app.UsageError("invalid flags:\n  " + "\n  ".join(problems))


def finetune_bptt(workdir: Path, cfg, normalizer, force_fn, model_params, best_step, data, eval_rollout, log, mesh,
                  timings: dict):
    """BPTT from the pretrained model (``data`` = (train, val, test)); the best-validation model is
    saved as checkpoints/bptt_best and relaxes the test split. Returns (best params, history,
    skipped non-finite updates, test summary, per-structure results, setting name)."""
    train_set, val, test = data
    batch, v, t0 = FLAGS.batch_size, common.flag_values(), time.time()
    step_rule, modifiers = configs.step_rule(v, best_step, normalizer)
    start_model = registry.init_params(cfg, jax.random.PRNGKey(FLAGS.seed + 1)) if FLAGS.random_init else model_params
    params = {"model": start_model, "step_rule": step_rule.init(jax.random.PRNGKey(FLAGS.seed + 2))}
    bptt_cfg = train.BPTTConfig(modifiers=modifiers, rollout=configs.rollout_config(v), **configs.bptt_settings(v))
    optim_cfg = configs.bptt_optim_config(v)
    ckpt_dir = workdir / "checkpoints" / "bptt"
    try:
        best_params, bptt_history, final_state = loops.bptt_finetune(
            force_fn, step_rule, params, train_set, val, bptt_config=bptt_cfg, optim_config=optim_cfg,
            epochs=FLAGS.bptt_epochs, batch_size=batch, seed=FLAGS.seed, log=log,
            max_consecutive_bad_steps=FLAGS.max_consecutive_bad_steps, checkpoint_dir=ckpt_dir / "train_state",
            checkpoint_every=FLAGS.checkpoint_every, resume=FLAGS.resume, report=common.info,
            start_stride=FLAGS.start_stride, force_batch_size=FLAGS.force_batch_size, patience=FLAGS.patience,
            mesh=mesh,
        )
    except loop.TrainingStopped as err:
        common.save_model(workdir / "checkpoints" / "bptt_best", err.best_params, normalizer, cfg, step_rule,
                          {"role": "bptt_best_validation", "stopped": err.message}, modifiers)
        log.close()
        raise SystemExit(f"{err.message}. Best parameters so far saved in {workdir / 'checkpoints' / 'bptt_best'}.")
    except checkpoint.CheckpointIncompatible as err:
        log.close()
        raise SystemExit(f"--resume: {err}") from None
    timings["bptt_s"] = time.time() - t0
    nonfinite = optim.nonfinite_counts(final_state.opt_state)
    skipped_steps = int(nonfinite["nonfinite_total"])
    if skipped_steps:
        common.info(f"BPTT skipped {skipped_steps} updates with a non-finite loss or gradient "
                    "(counted in results.json)")
    common.save_model(workdir / "checkpoints" / "bptt_best", best_params, normalizer, cfg, step_rule,
                      {"role": "bptt_best_validation"}, modifiers)
    bptt_summary, bptt_per = evaluate.relaxation_table(force_fn, step_rule, best_params, test, modifiers, eval_rollout,
                                                       batch_size=batch)
    eta = step_rule.scalar_step_size(best_params["step_rule"])
    learned = None if eta is None else float(eta)
    setting = f"BPTT ({FLAGS.step_kind} step" + (f", eta={learned:.4g})" if learned else ")")
    return best_params, bptt_history, skipped_steps, bptt_summary, bptt_per, setting


def main(argv):
    del argv
    t_start = time.time()
    common.quiet_libraries()
    check_flags()
    mesh = common.setup_devices({"batch_size": FLAGS.batch_size, "pretrain_batch_size": FLAGS.pretrain_batch_size,
                                 **({"force_batch_size": FLAGS.force_batch_size} if FLAGS.force_weight else {})})
    workdir = stages.start_run(common.flag_values())
    log = common.metrics_writer(workdir / "metrics.jsonl")
    trajs, curation, skipped = common.load_trajectories(FLAGS.dataset, return_skipped=True)
    test, val, train_set = common.split(trajs)
    common.info(f"split: {len(test)} test, {len(val)} val, {len(train_set)} train trajectories")

    t0 = time.time()
    cfg, normalizer, model_params, pretrain_history = stages.load_or_pretrain(workdir, train_set, val, log, mesh)
    timings = {"pretrain_s": time.time() - t0}
    force_fn = registry.make_force_fn(cfg, normalizer)
    common.info(f"model: {configs.model_name(cfg)} {cfg}, {registry.count_params(model_params)} parameters")
    pre_forces = stages.force_errors(force_fn, model_params, test)
    t0 = time.time()
    eval_rollout = common.rollout_config(remat="none")
    steps, grid_train, grid_test, best_step = stages.grid_search(workdir, force_fn, model_params, train_set, test,
                                                                 eval_rollout, log)
    timings["grid_s"] = time.time() - t0
    pre_summary, pre_per, fire_summary = stages.pretrained_baselines(force_fn, model_params, test, best_step,
                                                                     eval_rollout, timings)
    best_params, bptt_history, skipped_steps, bptt_summary, bptt_per, bptt_setting = finetune_bptt(
        workdir, cfg, normalizer, force_fn, model_params, best_step, (train_set, val, test), eval_rollout, log, mesh,
        timings)
    bptt_forces = stages.force_errors(force_fn, best_params["model"], test)

    rows = [{"setting": "pretrained + FIRE", **fire_summary}] if fire_summary is not None else []
    rows += [{"setting": f"pretrained, best grid step {best_step:g}", **pre_summary},
             {"setting": bptt_setting, **bptt_summary}]
    for row in rows:
        common.info(report.divergence_line(row))
    timings["total_s"] = time.time() - t_start
    outcome = report.FinetuneOutcome(
        dataset=FLAGS.dataset, curation=curation, split={"test": len(test), "val": len(val), "train": len(train_set)},
        model_config=cfg, num_params=registry.count_params(model_params), steps=steps, best_step=best_step,
        grid_train=grid_train, grid_test=grid_test, relaxation=rows,
        forces={"pretrained": pre_forces, "bptt": bptt_forces},
        pretrain_history=pretrain_history, bptt_history=bptt_history,
        per_structure_dq={"pretrained_best_grid": pre_per["dq"], "bptt": bptt_per["dq"]}, timings=timings,
        skipped_records=skipped, nonfinite_skipped_steps=skipped_steps, resumed=bool(FLAGS.resume))
    md = report.write_outputs(workdir, outcome, common.command_line())
    log.close()
    print("\n".join(md[4:]))
    print(f"\nrun directory: {workdir}")


if __name__ == "__main__":
    app.run(main)
