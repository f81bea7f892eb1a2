"""k-fold cross-validated comparison of BPTT settings: mean and spread over folds.

    python -m experiments.crossval --base_flagfile=experiments/si_cpu.flags --cv_folds=3 \
        --cv_dir=runs/cv --variants=plain,force,augment --extra="--bptt_epochs=3"

For every fold k of a seeded partition of the curated trajectories into ``--cv_folds`` parts:
``base`` runs ``experiments.finetune --cv_fold=k --bptt_epochs=0`` (pretrains on the fold's
training trajectories, grid-searches the fixed step on training data, evaluates that model at its
best step on the held-out fold: the reference of every ratio); every variant then runs
``experiments.finetune`` from that pretrained model and step with its flags. The test fold is
never used for a choice. Data and model flags given to this script (``--dataset``, ``--num_val``,
``--model``, ...) are handed on to every run; ``--extra`` adds any other finetune flag.

Per variant and fold: test mean Dq and its ratio to the fold's reference, test force RMSE and its
ratio, converged relaxations; then mean and sample standard deviation over folds, into
``<cv_dir>/crossval.json`` and ``crossval.md``. A run directory that already holds results.json
is reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
from absl import app, flags

from bptt_mlip.training import diagnostics
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("base_flagfile", "", "Flagfile of experiments.finetune shared by every run.")
flags.DEFINE_string("cv_dir", "runs/crossval", "Folder holding fold<k>/<variant>/ run directories.")
flags.DEFINE_list("variants", ["plain", "force"], "Variants to compare (see VARIANTS).")
flags.DEFINE_string("extra", "", "Extra flags for every run, space-separated, e.g. --extra='--bptt_epochs=3'.")
flags.DEFINE_list("only_folds", [], "Run only these fold indices (default: all); the summary covers the folds run, "
                  "e.g. to split a study over machines or to explore one setting on one fold first.")
flags.DEFINE_string("base_extra", "", "Extra flags for the per-fold pretraining/grid run only (e.g. a narrower "
                    "--grid_steps).")
flags.DEFINE_bool("base_fire", True, "Relax each fold's test structures with the pretrained model under FIRE too "
                  "(the reference table's FIRE column).")

# name -> flags changed from the flagfile
VARIANTS: dict[str, list[str]] = {
    "plain": [],  # the paper's objective: Dq only, fixed best-grid step, clip 1.0
    "force": ["--force_weight=10"],  # multi-task: Dq + 10 x force MSE on training frames
    "force_1": ["--force_weight=1"],
    "force_100": ["--force_weight=100"],  # a model whose force MSE is ~0.005 (eV/Å)^2 needs this for the term to count
    "proximal": ["--proximal_weight=1e-2"],
    "proximal_1e-1": ["--proximal_weight=1e-1"],
    "proximal_1": ["--proximal_weight=1"],
    "augment": ["--augment_rotation", "--augment_translation=2.0"],
    "starts": ["--start_stride=10"],  # start also from every 10th stored frame
    "weight_decay": ["--weight_decay=1e-2"],
    "force_augment": ["--force_weight=10", "--augment_rotation", "--augment_translation=2.0"],
    "force_augment_proximal": ["--force_weight=10", "--augment_rotation", "--augment_translation=2.0",
                               "--proximal_weight=1e-2"],
    # how the end-point loss is differentiated (the frame map relaxes in every one)
    "implicit": ["--gradient=implicit"],  # implicit function theorem at converged end points only
    "guided": ["--gradient=guided", "--unroll_frames=15"],  # BPTT through 15 frames + the implicit tail
    "guided_force_1": ["--gradient=guided", "--unroll_frames=15", "--force_weight=1"],
    # BPTT through FIRE; the ratio is then to the pretrained model's FIRE
    "fire": ["--relaxer=fire", "--fire=true"],
    # the same through up to 150 FIRE steps: trains on more of the relaxation FIRE actually runs
    "fire_150": ["--relaxer=fire", "--fire=true", "--max_frames=150"],
}


def _relaxation_row(results: dict, prefix: str) -> dict | None:
    return next((r for r in results["relaxation"] if r["setting"].startswith(prefix)), None)


def reference_row(base: dict) -> dict:
    """The fold's pretrained model on its test fold (``base``: results.json of the bptt_epochs=0 run):
    Dq (amu^0.5 Å) of not moving, at the best grid step and under FIRE (NaN where FIRE was not run),
    converged counts, the 0.1 Å basin fraction, and the force RMSE (eV/Å) against predicting zero."""
    pre = _relaxation_row(base, "pretrained, best grid step")
    fire = _relaxation_row(base, "pretrained + FIRE")
    forces = base["forces"]["pretrained"]
    nan = float("nan")
    return {
        "start_dq": pre["mean_dq_initial"], "pretrained_dq": pre["mean_dq"],
        "pretrained_converged": pre["num_converged"], "pretrained_basin_0.1": pre.get("basin_0.1", nan),
        "fire_dq": fire["mean_dq"] if fire else nan, "fire_converged": fire["num_converged"] if fire else 0,
        "fire_diverged": fire["num_diverged"] if fire else 0,
        "pretrained_force_rmse": forces["force_rmse"], "zero_force_rmse": forces["zero_force_rmse"],
        "pretrained_force_over_zero": forces["force_rmse"] / forces["zero_force_rmse"],
        "best_grid_step": base["best_grid_step"], "num_test": pre["num_structures"],
        "base_wall_s": base["timings_s"]["total_s"],
    }


def epoch_seconds(history: list[dict]) -> float:
    """Median wall time (s) of one fine-tuning epoch: over the epochs after the first (the first also
    compiles), or the first alone when it is the only one; NaN when the history records none."""
    times = [row["epoch_s"] for row in history if row.get("epoch", 0) >= 1 and "epoch_s" in row]
    return float(np.median(times[1:] if len(times) > 1 else times)) if times else float("nan")


def fold_row(base: dict, res: dict) -> dict:
    """Test figures of one variant on one fold, relative to the fold's pretrained model
    (``base``: results.json of the fold's bptt_epochs=0 run, ``res``: the variant's)."""
    ref = reference_row(base)
    tuned = res["relaxation"][-1]
    tuned_f = res["forces"]["bptt"]["force_rmse"]
    # the tuned model is compared with the pretrained model under the same relaxer (the run's second-to-last
    # row: its best grid step for the frame map, FIRE for --relaxer=fire)
    same_relaxer = res["relaxation"][-2]
    return {
        **ref, "dq": tuned["mean_dq"], "dq_ratio": tuned["mean_dq"] / same_relaxer["mean_dq"],
        "ratio_of": same_relaxer["setting"],
        "dq_over_start": tuned["mean_dq"] / ref["start_dq"],
        "force_rmse": tuned_f, "force_ratio": tuned_f / ref["pretrained_force_rmse"],
        "converged": tuned["num_converged"], "num_test": tuned["num_structures"], "diverged": tuned["num_diverged"],
        "basin_0.1": tuned.get("basin_0.1", float("nan")), "wall_s": res["timings_s"]["total_s"],
        "epoch_s": epoch_seconds(res.get("bptt_history", [])),
        "kept_start": bool(diagnostics.kept_start_warnings(res.get("bptt_history", []))),
        "exploded": bool(diagnostics.exploding_gradient_warnings(res.get("bptt_history", []))),
    }


FOLD_FLAGS = {
    "kept_start": "Kept the starting model (no fine-tuning epoch lowered the validation Dq; its row counts the "
                  "pretrained model)",
    "exploded": "BPTT gradients exploded in some epoch (mean gradient norm above "
                f"{diagnostics.EXPLODING_GRADIENT_NORM:.0e}; clipped)",
}
"""Per-run flags a fold row carries (True when the run's diagnostics warned), each named under crossval.md's
table with the folds where it was raised."""

SUMMARIZED = ("dq", "dq_ratio", "dq_over_start", "force_rmse", "force_ratio", "converged", "basin_0.1", "wall_s",
              "epoch_s",
              "start_dq", "pretrained_dq", "fire_dq", "pretrained_force_rmse", "pretrained_force_over_zero",
              "pretrained_basin_0.1", "base_wall_s")


def summarize_folds(rows: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; None for a single fold, which has no spread) of every number."""
    out = {"folds": len(rows)}
    for k in SUMMARIZED:
        if not all(k in r for r in rows):  # a row computed by older code
            continue
        v = np.asarray([r[k] for r in rows], np.float64)
        out[f"{k}_mean"] = float(v.mean())
        out[f"{k}_std"] = float(v.std(ddof=1)) if v.size > 1 else None
    out["num_test_total"] = int(sum(r["num_test"] for r in rows))
    for count in ("converged", "pretrained_converged", "fire_converged"):
        if all(count in r for r in rows):
            out[f"{count}_total"] = int(sum(r[count] for r in rows))
    for flag in FOLD_FLAGS:
        out[f"{flag}_folds"] = [r.get("fold", i) for i, r in enumerate(rows) if r.get(flag)]
    return out


def _pm(mean, std, digits=3):
    """``mean ± std``; just the mean when ``std`` is None (one fold: no spread to show)."""
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


TABLE_HEAD = [("| variant | flags | folds | test Dq | Dq ratio | Dq / not moving | basin 0.1 Å | force RMSE (eV/Å) "
               "| force ratio | converged | wall s/run | s/epoch |"), "|---" * 12 + "|"]
REFERENCE_HEAD = [("| folds | not moving Dq | pretrained + FIRE Dq | FIRE converged | best grid Dq | grid converged "
                   "| basin 0.1 Å | force RMSE (eV/Å) | force RMSE / zero force | wall s/fold |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]


def _pm_or_blank(r: dict, key: str, digits: int = 3) -> str:
    if f"{key}_mean" not in r or not np.isfinite(r[f"{key}_mean"]):
        return ""
    return _pm(r[f"{key}_mean"], r[f"{key}_std"], digits)


def reference_markdown(reference: list[dict]) -> list[str]:
    """The pretrained reference of every fold, mean ± std over folds (one row)."""
    r = summarize_folds(reference)
    return [*REFERENCE_HEAD,
            f"| {r['folds']} | {_pm_or_blank(r, 'start_dq')} | {_pm_or_blank(r, 'fire_dq')} "
            f"| {r['fire_converged_total']}/{r['num_test_total']} "
            f"| {_pm_or_blank(r, 'pretrained_dq')} | {r['pretrained_converged_total']}/{r['num_test_total']} "
            f"| {_pm_or_blank(r, 'pretrained_basin_0.1')} | {_pm_or_blank(r, 'pretrained_force_rmse')} "
            f"| {_pm_or_blank(r, 'pretrained_force_over_zero')} | {r['base_wall_s_mean']:.0f} |"]


def summary_markdown(summary: list[dict], failed: list[str], reference: list[dict] | None = None) -> str:
    """crossval.md: the pretrained reference (when given), one row per variant (mean ± std over folds),
    then the failed runs."""
    table = ["Pretrained reference (test folds):", "", *reference_markdown(reference), ""] if reference else []
    table += list(TABLE_HEAD)
    for r in summary:
        table.append(
            f"| {r['variant']} | `{r['flags'] or '(none)'}` | {r['folds']} | {_pm(r['dq_mean'], r['dq_std'])} | "
            f"{_pm(r['dq_ratio_mean'], r['dq_ratio_std'])} | {_pm_or_blank(r, 'dq_over_start')} | "
            f"{_pm_or_blank(r, 'basin_0.1')} | {_pm(r['force_rmse_mean'], r['force_rmse_std'])} | "
            f"{_pm(r['force_ratio_mean'], r['force_ratio_std'])} | {r['converged_total']}/{r['num_test_total']} | "
            f"{r['wall_s_mean']:.0f} | {_pm_or_blank(r, 'epoch_s', 0)} |"
        )
    for flag, words in FOLD_FLAGS.items():
        named = [f"{r['variant']} (fold {', '.join(str(k) for k in r[f'{flag}_folds'])})" for r in summary
                 if r.get(f"{flag}_folds")]
        if named:
            table += ["", f"{words}: " + "; ".join(named) + "."]
    table += ["", "Dq ratio: to the fold's pretrained model under the same relaxer (its best grid step; its FIRE for "
              "--relaxer=fire). Dq / not moving: to the Dq of the start structures. s/epoch: median wall time of "
              "a fine-tuning epoch after the first (which also compiles)."]
    text = "\n".join(table)
    return text + ("\n\nFailed runs (see their logs): " + ", ".join(failed) if failed else "")


def main(argv):
    del argv
    if FLAGS.cv_folds < 2:
        raise app.UsageError(f"--cv_folds={FLAGS.cv_folds}: cross-validation needs at least 2 folds")
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    root = Path(FLAGS.cv_dir)
    root.mkdir(parents=True, exist_ok=True)
    flagfile = [f"--flagfile={FLAGS.base_flagfile}"] if FLAGS.base_flagfile else []
    passed_on = common.explicit_run_flags(exclude=("cv_folds", "cv_seed", "cv_fold", "workdir", "overwrite"))
    shared = [*flagfile, *passed_on, f"--cv_folds={FLAGS.cv_folds}", f"--cv_seed={FLAGS.cv_seed}", "--fire=false",
              "--grid_on_test=false", *shlex.split(FLAGS.extra)]
    folds = [int(k) for k in FLAGS.only_folds] if FLAGS.only_folds else list(range(FLAGS.cv_folds))
    if any(not 0 <= k < FLAGS.cv_folds for k in folds):
        raise app.UsageError(f"--only_folds={FLAGS.only_folds}: fold indices must be in 0..{FLAGS.cv_folds - 1}")
    per_variant: dict[str, list[dict]] = {v: [] for v in FLAGS.variants}
    failed, reference = [], []
    for k in folds:
        fold = root / f"fold{k}"
        base_dir = fold / "base"
        if not common.run_finetune(base_dir, [*shared, f"--cv_fold={k}", "--bptt_epochs=0",
                                              f"--fire={str(FLAGS.base_fire).lower()}",
                                              *shlex.split(FLAGS.base_extra)], fold / "base.log"):
            failed.append(f"fold{k}/base")
            continue
        base = json.loads((base_dir / "results.json").read_text())
        reference.append({"fold": k, **reference_row(base)})
        fixed = [f"--cv_fold={k}", f"--pretrained={base_dir / 'checkpoints' / 'pretrained'}",
                 f"--grid_steps={base['best_grid_step']!r}", "--grid_max_trajectories=8"]
        for name in FLAGS.variants:
            run = fold / name
            if not common.run_finetune(run, [*shared, *fixed, *VARIANTS[name]], fold / f"{name}.log"):
                failed.append(f"fold{k}/{name}")
                continue
            row = fold_row(base, json.loads((run / "results.json").read_text()))
            per_variant[name].append({"fold": k, **row})
            common.info(f"fold {k} {name}: test Dq {row['dq']:.4g} (ratio {row['dq_ratio']:.3f}), force RMSE ratio "
                        f"{row['force_ratio']:.3f}, converged {row['converged']}/{row['num_test']}")
    summary = [{"variant": v, "flags": " ".join(VARIANTS[v]), **summarize_folds(rows)}
               for v, rows in per_variant.items() if rows]
    common.write_json(root / "crossval.json", {"command": common.command_line(), "folds": FLAGS.cv_folds,
                                               "folds_run": folds, "reference": reference,
                                               "reference_summary": summarize_folds(reference) if reference else None,
                                               "per_fold": per_variant, "summary": summary, "failed": failed})
    text = summary_markdown(summary, failed, reference)
    (root / "crossval.md").write_text(text + "\n")
    print(text)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    common.run_main(main)
