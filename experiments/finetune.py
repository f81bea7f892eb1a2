"""The main job: pretrain (or load) a force model (--model), grid-search the fixed step, fine-tune with BPTT, evaluate.

    python -m experiments.finetune --flagfile=experiments/si_cpu.flags

Writes into --workdir: config.json, metrics.jsonl, checkpoints/{pretrained,bptt}/ (orbax),
results.json, results.md and plots/*.png, and prints the result table. The flags and their
checks are in ``experiments.finetune_flags``, the configs built from them in ``experiments.configs``,
the stages before BPTT in ``experiments.finetune_stages`` and the reports in ``experiments.report``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags

from bptt_mlip.models import registry
from bptt_mlip.relax import scan, step_rules
from bptt_mlip.training import checkpoint, diagnostics, evaluate, loop, loops, optim
from bptt_mlip.training import steps as train
from experiments import common, configs, report
from experiments import finetune_stages as stages
from experiments.finetune_flags import RESUME_FREE_FLAGS, flag_problems, given_flags  # noqa: F401  (defines the flags)

FLAGS = flags.FLAGS


def check_flags() -> None:
    """Raise ``app.UsageError`` listing every problem of the parsed flags (before any work)."""
    problems = flag_problems(common.flag_values())
    if problems:
        raise app.UsageError("invalid flags:\n  " + "\n  ".join(problems))


def relaxation_settings(train_set) -> configs.RelaxationSettings:
    """The stopping rule, step grid and FIRE fmax of this run: the flags given, the rest derived
    from ``train_set`` (with --derive_settings) or left at their defaults; logged."""
    derived, given = None, given_flags(configs.DERIVABLE_FLAGS)
    if FLAGS.derive_settings:
        from bptt_mlip.data import relax_settings

        try:
            derived = relax_settings.derive_relax_settings(train_set)
        except ValueError as err:
            missing = [f"--{n}" for n in configs.DERIVABLE_FLAGS if n not in given]
            if missing:
                raise app.UsageError(f"{err}\n(--derive_settings needs it for {', '.join(missing)}: give them, or "
                                     "--derive_settings=false for the flag defaults)") from None
            common.info(f"settings not derived from the data (all given as flags): {err}")
    settings = configs.relaxation_settings(common.flag_values(), given, derived)
    common.info("relaxation settings: " + "; ".join(settings.lines()))
    if settings.description:
        common.info(settings.description)
    return settings


class BPTTResult(NamedTuple):
    """What :func:`finetune_bptt` returns (test-split evaluation of the best-validation model)."""

    params: Any
    history: list
    skipped_steps: int
    summary: dict
    per_structure: dict
    setting: str
    step_rule: Any
    modifiers: scan.FrameModifiers


def finetune_bptt(workdir: Path, cfg, normalizer, force_fn, model_params, best_step, data, eval_rollout, log, mesh,
                  timings: dict, v: dict) -> BPTTResult:
    """BPTT from the pretrained model (``data`` = (train, val, test); ``v`` the flag values with the
    run's relaxation settings); the best-validation model is saved as checkpoints/bptt_best and
    relaxes the test split."""
    train_set, val, test = data
    batch, t0 = FLAGS.batch_size, time.time()
    step_rule, modifiers = configs.step_rule(v, best_step, normalizer)
    relax_meta = stages.save_relax_settings(workdir, v, best_step)  # carried by the saved models
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
            mesh=mesh, gradient_config=configs.gradient_config(v, bptt_cfg),
        )
    except loop.TrainingStopped as err:
        common.save_model(workdir / "checkpoints" / "bptt_best", err.best_params, normalizer, cfg, step_rule,
                          {"role": "bptt_best_validation", "stopped": err.message, **relax_meta}, modifiers,
                          train_set=train_set)
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
                      {"role": "bptt_best_validation", **relax_meta}, modifiers, train_set=train_set)
    if bptt_cfg.relaxer == "fire":  # tested as it was trained: with FIRE, against the pretrained model's FIRE
        bptt_summary, bptt_per = evaluate.fire_table(force_fn, best_params["model"], test, configs.fire_config(v),
                                                     batch_size=batch)
        setting = "BPTT through FIRE, tested with FIRE"
    else:
        bptt_summary, bptt_per = evaluate.relaxation_table(force_fn, step_rule, best_params, test, modifiers,
                                                           eval_rollout, batch_size=batch)
        eta = step_rule.scalar_step_size(best_params["step_rule"])
        learned = None if eta is None else float(eta)
        tuned_by = {"bptt": "BPTT", "implicit": "implicit gradients",
                    "guided": f"guided: BPTT of {FLAGS.unroll_frames} frames + implicit"}[FLAGS.gradient]
        setting = f"{tuned_by} ({FLAGS.step_kind} step" + (f", eta={learned:.4g})" if learned else ")")
    return BPTTResult(best_params, bptt_history, skipped_steps, bptt_summary, bptt_per, setting, step_rule, modifiers)


def long_rollout_result(force_fn, model_params, best_step: float, bptt: BPTTResult, test, eval_rollout) -> dict:
    """Both test relaxations (pretrained at the best grid step, BPTT) again with --long_rollout_factor
    times --max_frames, so that a baseline cut short at --max_frames is compared run to convergence."""
    long = dataclasses.replace(eval_rollout, max_frames=eval_rollout.max_frames * FLAGS.long_rollout_factor)
    common.info(f"most pretrained best-grid rollouts hit max_frames: relaxing the test split again with "
                f"max_frames={long.max_frames}")
    fixed = step_rules.FixedStep(best_step)
    pre, pre_per = evaluate.relaxation_table(force_fn, fixed, {"model": model_params, "step_rule": fixed.init()}, test,
                                             scan.FrameModifiers(), long, batch_size=FLAGS.batch_size)
    tuned, tuned_per = evaluate.relaxation_table(force_fn, bptt.step_rule, bptt.params, test, bptt.modifiers, long,
                                                 batch_size=FLAGS.batch_size)
    out = {"max_frames": long.max_frames, "pretrained_best_grid": pre, "bptt": tuned,
           "dq_ratio": tuned["mean_dq"] / pre["mean_dq"],
           "counts": {"pretrained_best_grid": diagnostics.relaxation_counts(pre_per, long.max_frames),
                      "bptt": diagnostics.relaxation_counts(tuned_per, long.max_frames)}}
    common.info(f"BPTT / best-grid Dq ratio with max_frames={long.max_frames}: {out['dq_ratio']:.4g} "
                f"(converged: pretrained {pre['num_converged']}, BPTT {tuned['num_converged']} of "
                f"{tuned['num_structures']})")
    return out


def run_diagnostics(pre_per, bptt_per, fire_per, grid_train, forces, train_set, test, v: dict, labels: dict,
                    bptt_history=None) -> dict:
    """``diagnostics.diagnose`` of this run's evaluations (``forces``: test force errors ``{"pretrained": ...,
    "bptt": ...}``; ``labels``: the table's names of the pretrained best-grid and BPTT rows; ``bptt_history``:
    the fine-tuning's per-epoch rows); each warning printed."""
    diag = diagnostics.diagnose(
        {"pretrained_best_grid": pre_per, "bptt": bptt_per}, max_frames=v["max_frames"],
        baseline="pretrained_best_grid", fire=fire_per, fire_max_steps=v["fire_max_steps"], fire_fmax=v["fire_fmax"],
        grid=grid_train, pretrained_forces=forces["pretrained"], tuned_forces=forces["bptt"],
        train_species=[t.species for t in train_set],
        test_species=[t.species for t in test], labels=labels, bptt_history=bptt_history)
    for name, c in diag["relaxation"].items():
        common.info(f"{name}: " + ", ".join(f"{k[4:]} {n}" for k, n in c.items()))
    for warning in diag["warnings"]:
        common.info(f"WARNING: {warning}")
    return diag


def per_structure_dq(pre_per: dict, fire_per: dict | None, bptt_per: dict) -> dict:
    """Test Dq (amu^0.5 Å) per structure, in test order: not moving (``start``), the pretrained model
    at its best grid step, with FIRE (when run), and BPTT-tuned; the per-structure figures' input."""
    out = {"start": pre_per["dq_initial"], "pretrained_best_grid": pre_per["dq"]}
    if fire_per is not None:
        out["pretrained_fire"] = fire_per["dq"]
    out["bptt"] = bptt_per["dq"]
    return out


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
    settings = relaxation_settings(train_set)
    v = settings.flag_values(common.flag_values())

    t0 = time.time()
    cfg, normalizer, model_params, pretrain_history = stages.load_or_pretrain(workdir, train_set, val, log, mesh)
    timings = {"pretrain_s": time.time() - t0}
    # the neighbour search reaches every periodic image that any cell of the dataset needs (test cells may be
    # narrower than the training ones); this changes no parameter and no force, only what the search covers
    cfg = registry.covering_cells(cfg, [c for t in trajs
                                        for c in np.reshape(t.cell if t.cells is None else t.cells, (-1, 3, 3))])
    force_fn = registry.make_force_fn(cfg, normalizer)
    common.info(f"model: {configs.model_name(cfg)} {cfg}, {registry.count_params(model_params)} parameters")
    pre_forces = stages.force_errors(force_fn, model_params, test)
    t0 = time.time()
    eval_rollout = configs.rollout_config(v, remat="none")
    steps, grid_train, grid_test, best_step = stages.grid_search(workdir, force_fn, model_params, train_set, test,
                                                                 eval_rollout, log, steps=settings.grid_steps)
    timings["grid_s"] = time.time() - t0
    pre_summary, pre_per, fire_summary, fire_per = stages.pretrained_baselines(
        force_fn, model_params, test, best_step, eval_rollout, timings, fire_config=configs.fire_config(v))
    bptt = finetune_bptt(workdir, cfg, normalizer, force_fn, model_params, best_step, (train_set, val, test),
                         eval_rollout, log, mesh, timings, v)
    bptt_forces = stages.force_errors(force_fn, bptt.params["model"], test)

    grid_row = {"setting": f"pretrained, best grid step {best_step:g}", **pre_summary}
    fire_rows = [{"setting": "pretrained + FIRE", **fire_summary}] if fire_summary is not None else []
    # the last two rows are what the Dq ratio compares: BPTT against the pretrained model's same relaxer
    rows = [grid_row, *fire_rows] if FLAGS.relaxer == "fire" else [*fire_rows, grid_row]
    rows.append({"setting": bptt.setting, **bptt.summary})
    for row in rows:
        common.info(report.divergence_line(row))
    diag = run_diagnostics(pre_per, bptt.per_structure, fire_per, grid_train,
                           {"pretrained": pre_forces, "bptt": bptt_forces}, train_set, test, v,
                           {"pretrained_best_grid": rows[-2]["setting"], "bptt": rows[-1]["setting"]}, bptt.history)
    long = None
    if FLAGS.long_rollout_factor > 1 and diagnostics.baseline_max_frames_warning(
            "", diag["relaxation"]["pretrained_best_grid"], v["max_frames"]):
        long = long_rollout_result(force_fn, model_params, best_step, bptt, test, eval_rollout)
    timings["total_s"] = time.time() - t_start
    outcome = report.FinetuneOutcome(
        dataset=FLAGS.dataset, curation=curation, split={"test": len(test), "val": len(val), "train": len(train_set)},
        model_config=cfg, num_params=registry.count_params(model_params), steps=steps, best_step=best_step,
        grid_train=grid_train, grid_test=grid_test, relaxation=rows,
        forces={"pretrained": pre_forces, "bptt": bptt_forces},
        pretrain_history=pretrain_history, bptt_history=bptt.history,
        per_structure_dq=per_structure_dq(pre_per, fire_per, bptt.per_structure), timings=timings,
        skipped_records=skipped, nonfinite_skipped_steps=bptt.skipped_steps, resumed=bool(FLAGS.resume),
        settings=settings.to_dict(), diagnostics=diag, long_rollout=long, max_frames=v["max_frames"])
    md = report.write_outputs(workdir, outcome, common.command_line())
    log.close()
    print("\n".join(md[4:]))
    print(f"\nrun directory: {workdir}")


if __name__ == "__main__":
    common.run_main(main)
