"""What the main job writes: the grid-search table, results.json, results.md and its plots."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from bptt_mlip.models import registry
from bptt_mlip.training import checkpoint
from bptt_mlip.workflow import plots
from bptt_mlip.workflow.report import markdown_table, write_json
from experiments import configs

RELAXATION_COLUMNS = ["setting", "mean_dq", "median_dq", "basin_0.05", "basin_0.1", "basin_0.2", "mean_frames",
                      "num_converged", "num_diverged", "num_structures"]
"""basin_d: fraction of test relaxations ending with every atom within d Å of the reference."""
FORCE_COLUMNS = ["model", "force_rmse", "force_mae", "force_l2_per_frame", "zero_force_rmse"]


def grid_to_json(grid: dict | None) -> dict | None:
    return None if grid is None else {k: np.asarray(v).tolist() for k, v in grid.items()}


def grid_from_json(grid: dict | None) -> dict | None:
    """Inverse of :func:`grid_to_json` for a grid stored by :func:`write_json` (non-finite values
    were stored as strings such as ``"inf"``)."""
    if grid is None:
        return None
    as_float = ("mean_dq", "dq", "step_sizes")
    return {k: np.asarray(v, dtype=object).astype(np.float64) if k in as_float else np.asarray(v)
            for k, v in grid.items()}


def grid_rows(steps: list[float], grid_train: dict, grid_test: dict | None) -> list[dict]:
    """One row per grid step: mean Dq and converged count on training (and test) data."""
    return [
        {"step": s, "train_mean_dq": float(grid_train["mean_dq"][i]),
         "train_converged": int(grid_train["converged"][i].sum()),
         **({"test_mean_dq": float(grid_test["mean_dq"][i]), "test_converged": int(grid_test["converged"][i].sum())}
            if grid_test is not None else {})}
        for i, s in enumerate(steps)
    ]


def divergence_line(row: dict) -> str:
    return (f"{row['setting']}: {row['num_diverged']} of {row['num_structures']} test relaxations diverged, "
            f"{row['num_nonfinite']} non-finite (left out of mean_dq); mean Dq without diverged "
            f"{row['mean_dq_not_diverged']:.4g}")


@dataclasses.dataclass
class FinetuneOutcome:
    """Everything the main job reports (test-split figures unless named otherwise)."""

    dataset: str
    curation: Any
    split: dict
    model_config: Any
    num_params: int
    steps: list[float]
    best_step: float
    grid_train: dict
    grid_test: dict | None
    relaxation: list[dict]  # rows: [FIRE], pretrained at the best grid step, BPTT
    forces: dict  # {"pretrained": ..., "bptt": ...}
    pretrain_history: list
    bptt_history: list
    per_structure_dq: dict  # {"pretrained_best_grid": [...], "bptt": [...]}
    timings: dict
    skipped_records: dict
    nonfinite_skipped_steps: int
    resumed: bool
    settings: dict | None = None  # configs.RelaxationSettings.to_dict()
    diagnostics: dict | None = None  # training.diagnostics.diagnose(...), keys "pretrained_best_grid", "bptt"
    long_rollout: dict | None = None  # both rollouts run again with more frames (see long_rollout_result)
    max_frames: int = 0

    @property
    def dq_ratio(self) -> float:
        return self.relaxation[-1]["mean_dq"] / self.relaxation[-2]["mean_dq"]


def movement_line(label: str, c: dict, limit: str) -> str:
    """One bullet of what a relaxation setting did (``c``: ``diagnostics.relaxation_counts`` or ``fire_counts``)."""
    n, fire_counts = c["num_structures"], "num_converged_at_step_0" in c
    early = c["num_converged_at_step_0"] if fire_counts else c["num_first_frame_stops"]
    hit = c["num_hit_max_steps"] if fire_counts else c["num_hit_max_frames"]
    moved = n - (c["num_not_moved"] if c["num_not_moved"] >= 0 else early)
    return (f"- {label}: {moved} of {n} test relaxations moved ({c['num_not_moved']} never moved, {early} "
            f"{'converged at step 0' if fire_counts else 'stopped at their first frame'}); {c['num_converged']} "
            f"converged, {hit} reached {limit} without converging, {c['num_diverged']} ran away.")


def learned_line(o: FinetuneOutcome) -> str:
    """What BPTT did to the end points, in words, with the ratio (and the ratio run to convergence)."""
    r, rel = o.dq_ratio, (o.diagnostics or {}).get("relaxation", {})
    if rel and all(c["num_not_moved"] == c["num_structures"] for c in rel.values()):
        return (f"- Neither the pretrained nor the BPTT-tuned model moved any test structure: the Dq ratio {r:.3f} "
                "says nothing about what was learned.")
    if not np.isfinite(r):
        verdict = "The BPTT / best-grid Dq ratio is not finite: some relaxations ran away"
    elif r < 0.99:
        verdict = "BPTT fine-tuning learned to end test relaxations closer to the DFT end points"
    elif r <= 1.01:
        verdict = "BPTT fine-tuning did not change how close test relaxations end to the DFT end points"
    else:
        verdict = "BPTT fine-tuning made test relaxations end farther from the DFT end points"
    line = f"- {verdict} (Dq ratio {r:.3f}; 1 = no change)."
    if o.long_rollout is not None:
        lr = o.long_rollout
        line += (f" With both rollouts allowed max_frames={lr['max_frames']} to run to convergence, the ratio is "
                 f"{lr['dq_ratio']:.3f} (converged then: pretrained {lr['pretrained_best_grid']['num_converged']}, "
                 f"BPTT {lr['bptt']['num_converged']} of {lr['bptt']['num_structures']}).")
    return line


def forces_line(o: FinetuneOutcome) -> str:
    pre, bptt = o.forces["pretrained"], o.forces["bptt"]
    ratio, zero = bptt["force_rmse"] / pre["force_rmse"], pre["zero_force_rmse"]
    change = "better" if ratio < 0.99 else "worse" if ratio > 1.01 else "about the same"
    return (f"- Forces on test frames: pretrained RMSE {pre['force_rmse']:.4g} eV/Å ({pre['force_rmse'] / zero:.2f} "
            f"of the zero-force RMSE {zero:.4g}), BPTT-tuned {bptt['force_rmse']:.4g} (ratio {ratio:.3f}: {change}).")


def what_happened(o: FinetuneOutcome) -> list[str]:
    """The plain account at the top of results.md: what moved, what did not, what the model did
    and did not learn, and every warning of the diagnostics."""
    d = o.diagnostics or {}
    rel, labels = d.get("relaxation", {}), [r["setting"] for r in o.relaxation]
    lines = []
    if "fire" in d:
        lines.append(movement_line(labels[0], d["fire"], "the FIRE step limit"))
    for key, label in zip(("pretrained_best_grid", "bptt"), labels[-2:]):
        if key in rel:
            lines.append(movement_line(label, rel[key], f"max_frames={o.max_frames}"))
    pre, bptt = o.relaxation[-2], o.relaxation[-1]
    fire = f"{o.relaxation[0]['mean_dq']:.4g} FIRE, " if len(o.relaxation) > 2 else ""
    closed = 1 - pre["mean_dq"] / pre["mean_dq_initial"] if pre["mean_dq_initial"] > 0 else float("nan")
    lines.append(f"- Mean test Dq (amu^0.5 Å): {pre['mean_dq_initial']:.4g} not moving at all, {fire}"
                 f"{pre['mean_dq']:.4g} pretrained at the best grid step, {bptt['mean_dq']:.4g} BPTT-tuned. "
                 + (f"The pretrained relaxations close {closed:.0%} of the distance to the DFT end points."
                    if closed > 0 else "The pretrained relaxations end no closer to the DFT end points than not "
                    "moving at all."))
    lines += [learned_line(o), forces_line(o), ""]
    warnings = d.get("warnings", [])
    if not warnings:
        return lines + ["No warnings: no rollout stopped at its first frame or never moved, no FIRE run converged "
                        "at step 0, nothing ran away, the baseline was not cut at max_frames, the grid is neither "
                        "flat nor best at its edge, the forces beat zero force, no test element is unseen."]
    return lines + [f"**Warnings** ({len(warnings)}):", ""] + [f"- {w}" for w in warnings]


def settings_lines(settings: dict | None) -> list[str]:
    """The "Settings" section of results.md (``configs.RelaxationSettings.to_dict()``), ending in a blank line."""
    if settings is None:
        return []
    out = ["## Settings: stopping rule, step grid, FIRE", ""]
    for name in configs.DERIVABLE_FLAGS:
        value = settings[name]
        shown = ", ".join(f"{x:.4g}" for x in value) if isinstance(value, list) else f"{value:.4g}"
        out.append(f"- {name} = {shown} {configs.UNITS[name]} ({settings['sources'][name]})")
    return out + (["", settings["description"]] if settings.get("description") else []) + [""]


def results_json(o: FinetuneOutcome) -> dict:
    """The content of results.json."""
    return {
        "dataset": o.dataset, "curation": str(o.curation), "split": o.split,
        "model": configs.model_name(o.model_config), "model_kind": registry.kind_of(o.model_config),
        "model_config": checkpoint.config_to_dict(o.model_config), "num_params": o.num_params,
        "best_grid_step": o.best_step, "grid": grid_rows(o.steps, o.grid_train, o.grid_test),
        "relaxation": o.relaxation, "dq_ratio_bptt_over_best_grid": o.dq_ratio,
        "dq_ratio_of": [o.relaxation[-1]["setting"], o.relaxation[-2]["setting"]],  # (numerator, denominator)
        "forces": o.forces, "force_rmse_ratio": o.forces["bptt"]["force_rmse"] / o.forces["pretrained"]["force_rmse"],
        "pretrain_history": o.pretrain_history, "bptt_history": o.bptt_history,
        "per_structure_test_dq": o.per_structure_dq, "timings_s": o.timings,
        "skipped_records": o.skipped_records, "nonfinite_skipped_steps": o.nonfinite_skipped_steps,
        "diverged": {r["setting"]: {"num_diverged": r["num_diverged"], "num_nonfinite": r["num_nonfinite"],
                                    "mean_dq_not_diverged": r["mean_dq_not_diverged"]} for r in o.relaxation},
        "resumed": o.resumed, "settings": o.settings, "diagnostics": o.diagnostics,
        "long_rollout": o.long_rollout,
        "dq_ratio_bptt_over_best_grid_long_rollout": None if o.long_rollout is None else o.long_rollout["dq_ratio"],
    }


def results_markdown(o: FinetuneOutcome, command: str) -> list[str]:
    """The lines of results.md (the lines from the fifth on are also printed)."""
    rows = grid_rows(o.steps, o.grid_train, o.grid_test)
    forces = [{"model": "pretrained", **o.forces["pretrained"]}, {"model": "BPTT-tuned", **o.forces["bptt"]}]
    long = ([] if o.long_rollout is None else
            [f"With both rollouts allowed max_frames={o.long_rollout['max_frames']} to run to convergence: "
             f"**{o.long_rollout['dq_ratio']:.3f}**", ""])
    return [f"# Results: {o.dataset}", "", f"Command: `{command}`", "",
            (f"Split: {o.split['test']} test / {o.split['val']} val / {o.split['train']} train; model "
             f"{configs.model_name(o.model_config)} {o.model_config}, {o.num_params} parameters."), "",
            "## What happened", "", *what_happened(o), "", *settings_lines(o.settings),
            "## Test relaxations (Dq in amu^0.5 Å)", "", markdown_table(o.relaxation, RELAXATION_COLUMNS), "",
            "basin_d: fraction of test relaxations that ended with every atom within d Å of its reference "
            "relaxed position (diverged ones never count).", "",
            f"BPTT / best-grid Dq ratio: **{o.dq_ratio:.3f}**", "", *long,
            "## Test force errors (eV/Å)", "", markdown_table(forces, FORCE_COLUMNS), "",
            "## Grid search (pretrained model)", "", markdown_table(rows, list(rows[0].keys())), "",
            "## Wall time (s)", "", markdown_table([{k: round(v, 1) for k, v in o.timings.items()}], list(o.timings))]


def write_outputs(workdir: Path, o: FinetuneOutcome, command: str) -> list[str]:
    """Write results.json, results.md and the plots into ``workdir``; returns results.md's lines."""
    write_json(workdir / "results.json", results_json(o))
    md = results_markdown(o, command)
    (workdir / "results.md").write_text("\n".join(md) + "\n")
    plots.loss_curves(o.bptt_history, workdir / "plots" / "bptt_loss.png")
    splits = {"train": o.grid_train["mean_dq"], **({"test": o.grid_test["mean_dq"]} if o.grid_test is not None else {})}
    plots.grid_curve(o.steps, splits, workdir / "plots" / "grid_search.png", best=o.best_step)
    plots.dq_before_after(o.per_structure_dq["pretrained_best_grid"], o.per_structure_dq["bptt"],
                          workdir / "plots" / "dq_before_after.png")
    return md
