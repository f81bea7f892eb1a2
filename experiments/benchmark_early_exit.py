"""What early exit inside the differentiable rollout and compaction of its force calls save: evaluation tables,
the step-size grid search and one BPTT epoch, each with ``RolloutConfig(early_exit=False)`` (every one of
``max_frames`` frames computed for every batch), ``early_exit=True`` (a ``lax.cond`` in the scan skips the force
call, forward and backward, once the whole batch has stopped; forward-only tables stop in a while loop) and, but
for the grid search, early exit with ``compact_levels`` (each frame calls the model only on the rows still running,
in the smallest of B, B/2, ... rows that holds them: :mod:`bptt_mlip.relax.compaction`).

    nice -n 10 python -m experiments.benchmark_early_exit --out=/tmp/benchmark_early_exit.json

Everything comes from a finished main job (``--run_dir``, default runs/si_cpu_derived: its config.json flags, the
stop rule, step grid and best grid step of its results.json, its checkpoints/pretrained and checkpoints/bptt_best):
the same split, ``max_frames``, batch size and remat. Sections (``--sections``):

* ``eval``: ``evaluate.relaxation_table`` of the test split, pretrained model at the best grid step and the tuned one;
* ``grid``: ``evaluate.grid_table`` of the pretrained model over the run's grid on its first
  ``grid_max_trajectories`` training trajectories;
* ``epoch``: one epoch of the main job's BPTT trainer (same initial parameters, step rule, optimiser, remat and
  batch order as ``training.loops.bptt_finetune``'s first epoch).

Every function is compiled and run once before it is timed (the epoch: one update per batch shape, then a full
epoch from the initial state); then ``--repeats`` rounds time the settings of a table in turn, and each row
reports the median (this host's speed drifts by tens of percent within an hour: docs/performance.md).
Structure-frames: ``needed`` is the sum of the frames each real structure took;
``computed`` is, per batch, the frames until the whole batch had stopped (early exit) or ``max_frames`` (without),
times the batch's real rows; with compaction, the sub-batch rows each frame ran (padding rows included). Under
``vmap`` a ``cond`` runs both branches, so the grid search saves frames only if its compiled program keeps a ``cond``
(``skips_frames`` in the rows). The end points (eval, grid) and the losses and final parameters (epoch) of each
setting are compared with the full scan (max abs difference; float32 rounding expected).
Prints a Markdown table; ``--out`` writes JSON. ``--quick``: a few structures, ``max_frames`` 20, 2 grid steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bptt_mlip.data import batching
from bptt_mlip.relax import compaction, grid, scan, step_rules
from bptt_mlip.training import evaluate, loops, optim, steps
from experiments import common, configs, timing

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", "runs/si_cpu_derived", "Finished main job: config.json, results.json, checkpoints/.")
flags.DEFINE_string("pretrained_checkpoint", "", "Pretrained model; default <run_dir>/checkpoints/pretrained.")
flags.DEFINE_string("checkpoint", "", "Tuned model; default <run_dir>/checkpoints/bptt_best.")
flags.DEFINE_list("sections", ["eval", "grid", "epoch"], "Sections to run: eval, grid, epoch.")
flags.DEFINE_bool("quick", False, "A few structures, max_frames 20, 2 grid steps: a check that runs in seconds.")
flags.DEFINE_string("out", "", "Optional JSON file for the results.")
flags.DEFINE_integer("repeats", 3, "Timed rounds per table: its settings take turns in each round (so that the host's "
                     "drift falls on all of them alike) and each row reports the median.", lower_bound=1)

SECTIONS = ("eval", "grid", "epoch")
QUICK = {"test": 8, "grid": 8, "train": 8, "grid_steps": 2, "max_frames": 20}
DERIVED_SETTINGS = ("stop_rms", "stop_fmax", "grid_steps", "fire_fmax")


@dataclasses.dataclass(frozen=True)
class Relaxer:
    """A model and the step rule it relaxes with: ``force_fn(params["model"], structures) -> [B, N, 3]`` eV/Å."""

    force_fn: Callable
    step_rule: Any
    params: Any
    modifiers: scan.FrameModifiers = scan.FrameModifiers()


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the benchmark relaxes and trains.

    Attributes:
      relaxers: name -> :class:`Relaxer` of the evaluation tables (the first also runs the grid search).
      test, grid_trajs, train: trajectories of the evaluation, the grid search and the epoch.
      grid_steps: fixed step sizes (Å²/eV) of the grid search.
      rollout: the evaluation's rollout (stop rule, ``max_frames``; remat off); ``early_exit`` is set per run.
      epoch_start: ``{"model": ..., "step_rule": ...}`` the BPTT epoch starts from, with ``epoch_rule``.
      bptt: the trainer's config (its rollout's remat is the main job's); optim: its optimiser.
      compact_levels: the halvings of the third setting, early exit with compaction of the force calls
        (``RolloutConfig.compact_levels``).
      repeats: timed rounds per table; the settings of a table take turns in each round and the median is
        reported (``timing.interleaved``).
    """

    relaxers: dict
    test: Sequence
    grid_trajs: Sequence
    grid_steps: Sequence[float]
    train: Sequence
    rollout: scan.RolloutConfig
    epoch_start: Any
    epoch_rule: Any
    bptt: steps.BPTTConfig
    optim: optim.OptimConfig
    batch_size: int
    seed: int = 0
    compact_levels: int = 2
    repeats: int = 1

    def settings(self, section: str) -> tuple[tuple[str, dict], ...]:
        """(name, ``RolloutConfig`` fields) of the settings compared: every frame computed, early exit, and
        (not for the grid search, which turns compaction off under ``vmap``) early exit with compaction."""
        out = (("full scan", {"early_exit": False, "compact_levels": 0}),
               ("early exit", {"early_exit": True, "compact_levels": 0}))
        if section != "grid" and self.compact_levels:
            out += (("early exit + compaction", {"early_exit": True, "compact_levels": self.compact_levels}),)
        return out


# --------------------------------------------------------------------------- frame accounting


def frames_until_stopped(num_frames, converged, last_rms, stop_rms: float, max_frames: int) -> np.ndarray:
    """Frames of the scan a structure keeps running (int, same shape as ``num_frames``): a structure stopped by
    the RMS-movement rule stops after the frame it took (``num_frames``); one stopped by the force rule or by
    divergence stops in the frame it did not take (``num_frames + 1``); one never stopped runs all ``max_frames``
    (also one converged by the force check of its end point)."""
    num_frames, converged = np.asarray(num_frames), np.asarray(converged, bool)
    by_movement = converged & (num_frames > 0) & (np.asarray(last_rms) < stop_rms)
    return np.where(by_movement, num_frames, np.minimum(num_frames + 1, max_frames))


def frame_counts(batches: Sequence[dict], max_frames: int, stop_rms: float, *, skips_frames: bool = True,
                 compact_levels: int = 0) -> dict:
    """Structure-frames needed and computed over ``batches``, each a dict of ``num_frames``, ``converged``,
    ``last_rms`` ([..., B], leading axes such as grid steps allowed) and ``weight`` [B] (0 on padding rows).

    A batch without early exit computes ``max_frames`` frames for each real row (and each leading index); with it,
    the frames until every row of the batch (all leading indices together) had stopped, or ``max_frames`` when
    ``skips_frames`` is False (a ``cond`` turned into a select under ``vmap``). With ``compact_levels`` (no leading
    axes), ``computed_compact`` is the sub-batch rows of every frame until the batch stopped: per frame the
    smallest of ``compaction.sub_batch_sizes`` holding the rows still running, padding rows (which stop in their
    first frame) included. Returns ``{"needed", "computed_without", "computed_with"}`` (and ``"computed_compact"``)."""
    needed = computed_without = computed_with = computed_compact = 0
    for b in batches:
        real = np.asarray(b["weight"]) > 0
        copies = int(np.prod(np.shape(b["num_frames"])[:-1]))  # leading axes: every copy is a relaxation
        rows = copies * int(real.sum())
        frames = frames_until_stopped(b["num_frames"], b["converged"], b["last_rms"], stop_rms, max_frames)
        needed += int(np.sum(np.asarray(b["num_frames"])[..., real]))
        computed_without += max_frames * rows
        computed_with += (int(frames.max()) if skips_frames else max_frames) * rows
        if compact_levels:
            sizes = compaction.sub_batch_sizes(frames.shape[-1], compact_levels)
            running = [int(np.sum(frames > t)) for t in range(int(frames.max()))]
            computed_compact += sum(min(size for size in sizes if size >= count) for count in running)
    out = {"needed": needed, "computed_without": computed_without, "computed_with": computed_with}
    return {**out, "computed_compact": computed_compact} if compact_levels else out


def make_accounting_run(relaxer: Relaxer, rollout: scan.RolloutConfig, *, over_steps: bool = False):
    """A jitted ``run(params, batch) -> dict`` of the rollout's per-row ``num_frames``, ``converged``,
    ``diverged``, ``last_rms`` and end ``positions`` [B, N, 3] Å, with every row (padding included), and the
    batch ``weight``; with ``over_steps`` it takes ``run(model_params, batch, step_sizes [S])`` and vmaps a fixed
    step over them as the grid search does (fields [S, B, ...])."""

    def one(params, batch):
        res = scan.rollout(relaxer.force_fn, relaxer.step_rule, params, batch.initial, relaxer.modifiers, rollout)
        return {"num_frames": res.num_frames, "converged": res.converged, "diverged": res.diverged,
                "last_rms": res.last_rms, "positions": res.positions, "weight": batch.weight}

    if not over_steps:
        return jax.jit(one)

    def over(model_params, batch, step_sizes):
        out = jax.vmap(lambda eta: one({"model": model_params, "step_rule": {"eta": eta}}, batch))(step_sizes)
        return {**out, "weight": batch.weight}

    return jax.jit(over)


def grid_skips_frames(force_fn, model_params, batch, steps_: Sequence[float], rollout: scan.RolloutConfig) -> bool:
    """Whether the traced grid search can skip frames: it relaxes with a ``while`` loop that ends once every
    (step size, row) has stopped (:func:`bptt_mlip.relax.forward.relax_until_done`, with early exit). A scan
    computes every frame: under ``vmap`` over step sizes its early-exit ``cond`` becomes a select that runs both
    branches, and without early exit its ``cond`` never skips a frame."""
    etas = jnp.asarray(steps_, jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda p, b: grid.grid_search(force_fn, p, b, etas, rollout))(model_params, batch))
    return "while[" in jaxpr


# --------------------------------------------------------------------------- timing


COMPILES = timing.CompileCounter()  # XLA backend compiles of this process (one listener)


def timed_settings(calls: dict, repeats: int) -> dict:
    """``timing.interleaved`` with this process's compile counter: label -> (result, ``{"wall_s"`` (median),
    ``"times_s", "load_1min", "loads_1min", "compiles"}``); ``compiles`` counts XLA compiles inside the timed calls
    (a function that builds a new jitted function per call, as ``evaluate.grid_table`` does, compiles again there:
    from JAX's persistent cache if on)."""
    return timing.interleaved(calls, repeats, COMPILES)


def max_abs_difference(a, b) -> float:
    """Largest |a - b| over the leaves of two pytrees of arrays where both are finite (NaN / inf must sit at the
    same places, else inf)."""
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        fx, fy = np.isfinite(x), np.isfinite(y)
        if not np.array_equal(fx, fy):
            return float("inf")
        if fx.any():
            worst = max(worst, float(np.max(np.abs(x[fx] - y[fx]))))
    return worst


def _row(section: str, what: str, setting: tuple[str, dict], timing: dict, counts: dict, **extra) -> dict:
    name, fields = setting
    computed = counts["computed_compact" if fields["compact_levels"] else
                      "computed_with" if fields["early_exit"] else "computed_without"]
    return {"section": section, "what": what, "setting": name, **fields, **timing, "frames_needed": counts["needed"],
            "frames_computed": computed, "computed_over_needed": computed / max(counts["needed"], 1), **extra}


def _batches(trajs, batch_size: int) -> list:
    return list(batching.relaxation_batches(trajs, batch_size))


# --------------------------------------------------------------------------- sections


def eval_section(setup: Setup) -> list[dict]:
    """``evaluate.relaxation_table`` of the test split with every relaxer in every setting; differences are to
    the full scan."""
    rows, batches = [], _batches(setup.test, setup.batch_size)
    settings = setup.settings("eval")
    for name, r in setup.relaxers.items():
        rollouts = {label: dataclasses.replace(setup.rollout, **fields) for label, fields in settings}
        timed = timed_settings({label: functools.partial(
            evaluate.relaxation_table, r.force_fn, r.step_rule, r.params, setup.test, r.modifiers, rollout,
            batch_size=setup.batch_size) for label, rollout in rollouts.items()}, setup.repeats)
        ends, tables = {}, {}
        for label, rollout in rollouts.items():
            run = make_accounting_run(r, rollout)
            accounted = [jax.device_get(run(r.params, b)) for b in batches]
            (summary, per), timing_ = timed[label]
            ends[label], tables[label] = [a["positions"] for a in accounted], (summary, per, timing_)
        counts = frame_counts(accounted, setup.rollout.max_frames, setup.rollout.stop_rms,
                              compact_levels=setup.compact_levels)
        full = settings[0][0]
        for setting in settings:
            summary, per, timing_ = tables[setting[0]]
            agree = {"max_abs_diff_positions": max_abs_difference(ends[full], ends[setting[0]]),
                     "max_abs_diff_dq": max_abs_difference(tables[full][1]["dq"], per["dq"]),
                     "num_frames_equal": bool(np.array_equal(tables[full][1]["num_frames"], per["num_frames"]))}
            rows.append(_row("eval", f"test split, {name}", setting, timing_, counts, structures=len(setup.test),
                             mean_dq=summary["mean_dq"], mean_frames=summary["mean_frames"], **agree))
    return rows


def grid_section(setup: Setup) -> list[dict]:
    """``evaluate.grid_table`` of the first relaxer's model over ``setup.grid_steps``, without and with early exit."""
    r = next(iter(setup.relaxers.values()))
    model_params, rows = r.params["model"], []
    batches = _batches(setup.grid_trajs, setup.batch_size)
    settings = setup.settings("grid")
    tables = timed_settings({label: functools.partial(
        evaluate.grid_table, r.force_fn, model_params, setup.grid_trajs, setup.grid_steps,
        dataclasses.replace(setup.rollout, **fields), batch_size=setup.batch_size) for label, fields in settings},
        setup.repeats)
    skips = grid_skips_frames(r.force_fn, model_params, batches[0], setup.grid_steps, setup.rollout)
    run = make_accounting_run(Relaxer(r.force_fn, step_rules.FixedStep(), None),
                              dataclasses.replace(setup.rollout, compact_levels=0), over_steps=True)
    etas = jnp.asarray(setup.grid_steps, jnp.float32)
    accounted = [jax.device_get(run(model_params, b, etas)) for b in batches]
    counts = frame_counts(accounted, setup.rollout.max_frames, setup.rollout.stop_rms, skips_frames=skips)
    full = tables[settings[0][0]][0]
    for setting in settings:
        table, timing_ = tables[setting[0]]
        agree = {"max_abs_diff_dq": max_abs_difference(full["dq"], table["dq"]),
                 "num_frames_equal": bool(np.array_equal(full["num_frames"], table["num_frames"]))}
        rows.append(_row("grid", f"{len(setup.grid_steps)} steps x {len(setup.grid_trajs)} training trajectories",
                         setting, timing_, counts, skips_frames=skips, structures=len(setup.grid_trajs),
                         best_step=float(table["step_sizes"][int(np.argmin(table["mean_dq"]))]), **agree))
    return rows


def _run_epoch(update, state, batches) -> tuple[Any, list, list]:
    """One pass of ``update`` over ``batches`` (metrics fetched every update, as the epoch loop does): (final
    state, per-update metrics, the parameters each update started from)."""
    metrics, starts = [], []
    for batch in batches:
        starts.append(state.params)
        state, m = update(state, batch)
        metrics.append(jax.device_get(m))
    return state, metrics, starts


def _epoch_call(setup: Setup, config: steps.BPTTConfig, batches: list) -> Callable[[], tuple]:
    """A call that runs one epoch of the BPTT trainer of ``config`` over ``batches`` from the same initial state
    and returns (final state, per-update metrics, the parameters each update started from); every batch shape is
    compiled here first."""
    trainer = steps.make_bptt_trainer(_force_fn_of(setup), setup.epoch_rule, config, optim.make_optimizer(setup.optim))
    state0 = trainer.init(setup.epoch_start, jax.random.PRNGKey(setup.seed))
    shapes = {}
    for b in batches:  # compile every batch shape first
        shapes.setdefault(b.initial.positions.shape, b)
    for b in shapes.values():  # twice: the state after an update may trace anew (weak types of the initial one)
        jax.block_until_ready(trainer.update(trainer.update(state0, b)[0], b))
    return functools.partial(_run_epoch, trainer.update, state0, batches)


def epoch_section(setup: Setup) -> list[dict]:
    """One BPTT epoch over ``setup.train`` in the main job's first-epoch order, in every setting; differences
    are to the full scan."""
    order, _ = loops._relaxation_epochs(setup.train, setup.batch_size, batching.DEFAULT_BUCKETS, setup.seed, 0)
    batches = list(order(0))
    settings = setup.settings("epoch")
    runs = timed_settings({label: _epoch_call(setup, dataclasses.replace(
        setup.bptt, rollout=dataclasses.replace(setup.bptt.rollout, **fields)), batches)
        for label, fields in settings}, setup.repeats)
    replay = make_accounting_run(Relaxer(_force_fn_of(setup), setup.epoch_rule, None, setup.bptt.modifiers),
                                 dataclasses.replace(setup.bptt.rollout, remat="none", early_exit=True,
                                                     compact_levels=0))
    (_, metrics, starts), _ = runs[settings[1][0]]
    accounted = [jax.device_get(replay(p, b)) for p, b in zip(starts, batches)]
    counts = frame_counts(accounted, setup.bptt.rollout.max_frames, setup.bptt.rollout.stop_rms,
                          compact_levels=setup.compact_levels)
    needed_trainer = sum(float(m["frames"]) * float(np.sum(np.asarray(b.weight) > 0)) for m, b in zip(metrics, batches))
    full = runs[settings[0][0]]
    rows = []
    for setting in settings:
        (state, metrics_, _), timing_ = runs[setting[0]]
        losses_ = [m["loss"] for m in metrics_]
        rows.append(_row("epoch", f"BPTT epoch, {len(batches)} batches, remat {setup.bptt.rollout.remat}", setting,
                         timing_, counts, structures=len(setup.train), frames_needed_trainer=round(needed_trainer),
                         mean_loss=float(np.mean(losses_)),
                         max_abs_diff_loss=max_abs_difference([m["loss"] for m in full[0][1]], losses_),
                         max_abs_diff_params=max_abs_difference(full[0][0].params, state.params)))
    return rows


def _force_fn_of(setup: Setup):
    """The force function of the epoch: the first relaxer's (the pretrained model's)."""
    return next(iter(setup.relaxers.values())).force_fn


SECTION_RUNS = {"eval": eval_section, "grid": grid_section, "epoch": epoch_section}


def benchmark(setup: Setup, sections: Sequence[str] = SECTIONS) -> list[dict]:
    """The rows of every section in ``sections`` (per table one row per :meth:`Setup.settings`, full scan first)."""
    unknown = [s for s in sections if s not in SECTION_RUNS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTION_RUNS)}")
    rows = []
    for name in sections:
        new = SECTION_RUNS[name](setup)
        for row in new:
            common.info(f"{row['section']} {row['what']}, {row['setting']}: {row['wall_s']:.2f} s, "
                        f"frames computed {row['frames_computed']} / needed {row['frames_needed']}")
        rows += new
    return rows


def markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of the rows, with each setting's speed-up over the full scan of the same table."""
    head = ["section", "what", "setting", "wall s", "compiles in it", "speed-up", "frames computed", "needed",
            "computed / needed", "load (1 min)", "max abs difference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full = {}
    for r in rows:
        key = (r["section"], r["what"])
        if not r["early_exit"]:
            full[key] = r["wall_s"]
        speed = f"{full[key] / r['wall_s']:.2f}x" if r["early_exit"] and key in full else ""
        diff = ", ".join(f"{k[13:]} {v:.2g}" for k, v in r.items() if k.startswith("max_abs_diff"))
        lines.append(f"| {r['section']} | {r['what']} | {r['setting']} | {r['wall_s']:.2f} | "
                     f"{r['compiles']} | "
                     f"{speed} | {r['frames_computed']} | {r['frames_needed']} | {r['computed_over_needed']:.2f} | "
                     f"{r['load_1min']:.2f} | {diff} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the main job's setup


def required_path(path: Path, what: str) -> Path:
    """``path`` if it exists, else a usage error naming it and how the main job makes it."""
    if not path.exists():
        raise app.UsageError(f"missing {what}: {path} (written by the main job: python -m experiments.finetune "
                             f"--flagfile=experiments/si_cpu.flags --workdir={FLAGS.run_dir}; or pass --run_dir / "
                             "--pretrained_checkpoint / --checkpoint)")
    return path


def run_values(run_dir: Path) -> tuple[dict, float]:
    """(flag values of the main job in ``run_dir``: its config.json flags, the flags given here on the command line,
    and the stop rule, grid and FIRE fmax of its results.json unless given here; its best grid step Å²/eV). The
    command-line-free flags of this script's modules take the run's values, so that ``common.load_trajectories`` and
    ``common.split`` see the run's data set and split."""
    config = json.loads(required_path(run_dir / "config.json", "run config").read_text())["flags"]
    results = json.loads(required_path(run_dir / "results.json", "run results").read_text())
    for name, value in config.items():
        if name in FLAGS and not FLAGS[name].present and name not in ("workdir", "overwrite"):
            FLAGS[name].value = value
    v = {**config, **common.flag_values()}
    for name in DERIVED_SETTINGS:
        if not (name in FLAGS and FLAGS[name].present):
            v[name] = results["settings"][name]
    if FLAGS.quick:
        v["max_frames"] = QUICK["max_frames"]
    return v, float(results["best_grid_step"])


def setup_from_run(run_dir: Path) -> tuple[Setup, dict]:
    """The :class:`Setup` of the main job in ``run_dir`` (``--quick``: a few structures, 2 grid steps from the
    best one), and what it used (JSON-able)."""
    from bptt_mlip.workflow import api

    v, best_step = run_values(run_dir)
    pre_dir = Path(FLAGS.pretrained_checkpoint or required_path(run_dir / "checkpoints" / "pretrained", "checkpoint"))
    tuned_dir = Path(FLAGS.checkpoint or required_path(run_dir / "checkpoints" / "bptt_best", "checkpoint"))
    pre, tuned = (api.TrainedModel.load(required_path(d, "checkpoint")) for d in (pre_dir, tuned_dir))
    fixed = step_rules.FixedStep(best_step)  # the main job's pretrained baseline: the best grid step
    relaxers = {"pretrained, best grid step": Relaxer(pre.force_fn, fixed, {"model": pre.model_params,
                                                                           "step_rule": fixed.init()}),
                "BPTT-tuned": Relaxer(tuned.force_fn, tuned.step_rule, tuned.params, tuned.modifiers)}
    test, _, train = common.split(common.load_trajectories(v["dataset"])[0])
    grid_steps = [float(s) for s in v["grid_steps"]]
    grid_trajs = train[: v["grid_max_trajectories"]] if v["grid_max_trajectories"] else train
    if FLAGS.quick:
        i = int(np.argmin(np.abs(np.asarray(grid_steps) - best_step)))
        lo = max(0, min(i - 1, len(grid_steps) - QUICK["grid_steps"]))
        grid_steps = grid_steps[lo: lo + QUICK["grid_steps"]]
        test, grid_trajs, train = test[: QUICK["test"]], grid_trajs[: QUICK["grid"]], train[: QUICK["train"]]
    rule, modifiers = configs.step_rule(v, best_step, pre.normalizer)
    bptt = steps.BPTTConfig(modifiers=modifiers, rollout=configs.rollout_config(v), **configs.bptt_settings(v))
    if configs.gradient_config(v, bptt) is not None or bptt.relaxer != "frame" or v.get("start_stride"):
        raise app.UsageError(f"the run in {run_dir} trains with --gradient={v.get('gradient')} "
                             f"--relaxer={bptt.relaxer} --start_stride={v.get('start_stride')}; this benchmark times "
                             "BPTT through the frame map from first frames only")
    start = {"model": pre.model_params, "step_rule": rule.init(jax.random.PRNGKey(v["seed"] + 2))}
    setup = Setup(relaxers, test, grid_trajs, grid_steps, train, configs.rollout_config(v, remat="none"), start, rule,
                  bptt, configs.bptt_optim_config(v), int(v["batch_size"]), int(v["seed"]),
                  int(v.get("compact_levels", 2)), FLAGS.repeats)
    used = {"run_dir": str(run_dir), "pretrained_checkpoint": str(pre_dir), "checkpoint": str(tuned_dir),
            "best_grid_step": best_step, "grid_steps": grid_steps, "max_frames": int(v["max_frames"]),
            "stop_rms": float(v["stop_rms"]), "stop_fmax": float(v["stop_fmax"]), "remat": v["remat"],
            "batch_size": int(v["batch_size"]), "seed": int(v["seed"]), "quick": bool(FLAGS.quick),
            "compact_levels": setup.compact_levels, "repeats": setup.repeats,
            "structures": {"test": len(test), "grid": len(grid_trajs), "train": len(train)},
            "model": type(pre.config).__name__, "params": pre.num_params()}
    return setup, used


def results_json(rows: Sequence[dict], settings: dict) -> dict:
    """The JSON ``--out`` holds: ``meta`` (command, date, machine, devices), ``settings`` and ``rows``."""
    meta = {"command": common.command_line(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    return {"meta": meta, "settings": settings, "rows": common.jsonable(list(rows))}


def main(argv):
    del argv
    common.quiet_libraries()
    sections = [s.strip() for s in FLAGS.sections]
    if unknown := [s for s in sections if s not in SECTIONS]:
        raise app.UsageError(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    setup, settings = setup_from_run(Path(FLAGS.run_dir))
    common.info("settings: " + json.dumps(settings))
    rows = benchmark(setup, sections)
    print(markdown(rows), flush=True)
    if FLAGS.out:
        common.write_json(Path(FLAGS.out), results_json(rows, settings))


if __name__ == "__main__":
    common.run_main(main)
