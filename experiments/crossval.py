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

# name -> flags changed from the flagfile
VARIANTS: dict[str, list[str]] = {
    "plain": [],  # the paper's objective: Dq only, fixed best-grid step, clip 1.0
    "force": ["--force_weight=10"],  # multi-task: Dq + 10 x force MSE on training frames
    "force_1": ["--force_weight=1"],
    "proximal": ["--proximal_weight=1e-2"],
    "proximal_1e-1": ["--proximal_weight=1e-1"],
    "proximal_1": ["--proximal_weight=1"],
    "augment": ["--augment_rotation", "--augment_translation=2.0"],
    "starts": ["--start_stride=10"],  # start also from every 10th stored frame
    "weight_decay": ["--weight_decay=1e-2"],
    "force_augment": ["--force_weight=10", "--augment_rotation", "--augment_translation=2.0"],
    "force_augment_proximal": ["--force_weight=10", "--augment_rotation", "--augment_translation=2.0",
                               "--proximal_weight=1e-2"],
}


def fold_row(base: dict, res: dict) -> dict:
    """Test figures of one variant on one fold, relative to the fold's pretrained model
    (``base``: results.json of the fold's bptt_epochs=0 run, ``res``: the variant's)."""
    pre = next(r for r in base["relaxation"] if r["setting"].startswith("pretrained, best grid step"))
    tuned = res["relaxation"][-1]
    pre_f, tuned_f = base["forces"]["pretrained"]["force_rmse"], res["forces"]["bptt"]["force_rmse"]
    return {
        "pretrained_dq": pre["mean_dq"], "dq": tuned["mean_dq"], "dq_ratio": tuned["mean_dq"] / pre["mean_dq"],
        "pretrained_force_rmse": pre_f, "force_rmse": tuned_f, "force_ratio": tuned_f / pre_f,
        "converged": tuned["num_converged"], "pretrained_converged": pre["num_converged"],
        "num_test": tuned["num_structures"], "diverged": tuned["num_diverged"],
        "best_grid_step": base["best_grid_step"], "wall_s": res["timings_s"]["total_s"],
    }


def summarize_folds(rows: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for a single fold) of every number."""
    out = {"folds": len(rows)}
    for k in ("dq", "dq_ratio", "force_rmse", "force_ratio", "converged", "pretrained_dq", "wall_s"):
        v = np.asarray([r[k] for r in rows], np.float64)
        out[f"{k}_mean"] = float(v.mean())
        out[f"{k}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    out["num_test_total"] = int(sum(r["num_test"] for r in rows))
    out["converged_total"] = int(sum(r["converged"] for r in rows))
    return out


def _pm(mean, std, digits=3):
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


TABLE_HEAD = [("| variant | flags | folds | test Dq | Dq ratio | force RMSE (eV/Å) | force ratio | converged "
               "| wall s/run |"), "|---|---|---|---|---|---|---|---|---|"]


def summary_markdown(summary: list[dict], failed: list[str]) -> str:
    """crossval.md: one row per variant (mean ± std over folds), then the failed runs."""
    table = list(TABLE_HEAD)
    for r in summary:
        table.append(
            f"| {r['variant']} | `{r['flags'] or '(none)'}` | {r['folds']} | {_pm(r['dq_mean'], r['dq_std'])} | "
            f"{_pm(r['dq_ratio_mean'], r['dq_ratio_std'])} | {_pm(r['force_rmse_mean'], r['force_rmse_std'])} | "
            f"{_pm(r['force_ratio_mean'], r['force_ratio_std'])} | {r['converged_total']}/{r['num_test_total']} | "
            f"{r['wall_s_mean']:.0f} |"
        )
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
    failed = []
    for k in folds:
        fold = root / f"fold{k}"
        base_dir = fold / "base"
        if not common.run_finetune(base_dir, [*shared, f"--cv_fold={k}", "--bptt_epochs=0",
                                              *shlex.split(FLAGS.base_extra)], fold / "base.log"):
            failed.append(f"fold{k}/base")
            continue
        base = json.loads((base_dir / "results.json").read_text())
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
                                               "folds_run": folds, "per_fold": per_variant, "summary": summary,
                                               "failed": failed})
    text = summary_markdown(summary, failed)
    (root / "crossval.md").write_text(text + "\n")
    print(text)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    common.run_main(main)
