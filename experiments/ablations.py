"""The paper's ablations as runs of the main job from one shared pretrained model.

    python -m experiments.ablations --base_flagfile=experiments/si_cpu.flags \
        --pretrained=runs/si_cpu/checkpoints/pretrained --ablation_dir=runs/ablations --variants=table1,table4

Every variant is ``experiments.finetune`` with a few flags changed (the table below), run as a
subprocess with the shared flags of the flagfile; results are collected into
``<ablation_dir>/ablations.json`` and ``ablations.md``. A variant whose run directory already
holds results.json is not run again (delete it to re-run).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("base_flagfile", "", "Flagfile of experiments.finetune shared by every variant.")
flags.DEFINE_string("ablation_dir", "runs/ablations", "Folder holding one run directory per variant.")
flags.DEFINE_list("variants", ["table1"], "Groups or single variants to run (see VARIANTS / GROUPS).")
flags.DEFINE_string("pretrained", "", "Shared pretrained checkpoint (required: the ablations compare from one model).")
flags.DEFINE_string("extra", "", "Extra flags passed to every run, space-separated, e.g. --extra='--bptt_epochs=3'.")

# name -> flags changed from the flagfile (paper reference in the comment)
VARIANTS: dict[str, list[str]] = {
    "fixed": ["--step_kind=fixed"],  # table 1 / 3 BPTT row
    "learnable": ["--step_kind=learnable"],  # table 1
    "neural": ["--step_kind=neural"],  # table 1, appendix A
    "neural_bounded": ["--step_kind=neural", "--head_max_scale=1.5"],  # the head bounded to (0, 1.5 x grid step)
    "no_bptt": ["--bptt_epochs=0"],
    "momentum_no_bptt": ["--bptt_epochs=0", "--momentum=0.05"],  # table 4
    "anneal_no_bptt": ["--bptt_epochs=0", "--anneal=0.99"],
    "momentum_anneal_no_bptt": ["--bptt_epochs=0", "--momentum=0.05", "--anneal=0.99"],
    "momentum": ["--momentum=0.05"],
    "anneal": ["--anneal=0.99"],
    "momentum_anneal": ["--momentum=0.05", "--anneal=0.99"],
    "random_stopping": ["--random_stopping"],  # table 5
    "noise": ["--noise_std=0.002"],  # appendix B.1
    "proximal_no_clip": ["--clip_norm=0", "--proximal_weight=1e-2"],  # appendix B.2
    "clip_only": ["--clip_norm=1.0", "--proximal_weight=0"],
    "learnable_init_0.5x": ["--step_kind=learnable", "--init_step_scale=0.5"],  # figure 3a
    "learnable_init_0.25x": ["--step_kind=learnable", "--init_step_scale=0.25"],
    "learnable_init_1.5x": ["--step_kind=learnable", "--init_step_scale=1.5"],
    "step_only": ["--step_kind=learnable", "--freeze_model"],  # figure 5a
    "random_init": ["--random_init"],  # figure 5b
}
GROUPS = {
    "table1": ["fixed", "learnable", "neural"],
    "table4": ["no_bptt", "momentum_no_bptt", "anneal_no_bptt", "momentum_anneal_no_bptt", "fixed", "momentum",
               "anneal", "momentum_anneal"],
    "table5": ["fixed", "random_stopping"],
    "appendixB": ["noise", "proximal_no_clip", "clip_only"],
    "fig3a": ["learnable", "learnable_init_0.25x", "learnable_init_0.5x", "learnable_init_1.5x"],
    "fig5": ["step_only", "random_init"],
}


def expand(names):
    out = []
    for n in names:
        for v in GROUPS.get(n, [n]):
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; known: {sorted(VARIANTS)} and groups {sorted(GROUPS)}")
            if v not in out:
                out.append(v)
    return out


def main(argv):
    del argv
    if not FLAGS.pretrained:
        raise app.UsageError("--pretrained is required: every variant starts from the same pretrained model")
    root = Path(FLAGS.ablation_dir)
    root.mkdir(parents=True, exist_ok=True)
    flagfile = [f"--flagfile={FLAGS.base_flagfile}"] if FLAGS.base_flagfile else []
    rows = []
    for name in expand(FLAGS.variants):
        run = root / name
        args = [*flagfile, f"--pretrained={FLAGS.pretrained}", "--fire=false", *shlex.split(FLAGS.extra),
                *VARIANTS[name]]
        if not common.run_finetune(run, args, root / f"{name}.log"):
            rows.append({"variant": name, "status": "failed"})
            continue
        res = json.loads((run / "results.json").read_text())
        pre, bptt = res["relaxation"][-2], res["relaxation"][-1]
        rows.append({
            "variant": name, "flags": " ".join(VARIANTS[name]), "best_grid_step": res["best_grid_step"],
            "pretrained_mean_dq": pre["mean_dq"], "final_mean_dq": bptt["mean_dq"],
            "ratio": res["dq_ratio_bptt_over_best_grid"], "final_converged": bptt["num_converged"],
            "final_diverged": bptt["num_diverged"], "force_rmse_ratio": res["force_rmse_ratio"],
            "final_step": bptt["setting"], "wall_s": res["timings_s"]["total_s"],
        })
    common.write_json(root / "ablations.json", rows)
    cols = ["variant", "flags", "pretrained_mean_dq", "final_mean_dq", "ratio", "final_converged", "final_diverged",
            "force_rmse_ratio", "final_step", "wall_s"]
    table = common.markdown_table(rows, cols)
    (root / "ablations.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    common.run_main(main)
