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

RELAXATION_COLUMNS = ["setting", "mean_dq", "median_dq", "mean_frames", "num_converged", "num_diverged",
                      "num_structures"]
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

    @property
    def dq_ratio(self) -> float:
        return self.relaxation[-1]["mean_dq"] / self.relaxation[-2]["mean_dq"]


def results_json(o: FinetuneOutcome) -> dict:
    """The content of results.json."""
    return {
        "dataset": o.dataset, "curation": str(o.curation), "split": o.split,
        "model": configs.model_name(o.model_config), "model_kind": registry.kind_of(o.model_config),
        "model_config": checkpoint.config_to_dict(o.model_config), "num_params": o.num_params,
        "best_grid_step": o.best_step, "grid": grid_rows(o.steps, o.grid_train, o.grid_test),
        "relaxation": o.relaxation, "dq_ratio_bptt_over_best_grid": o.dq_ratio,
        "forces": o.forces, "force_rmse_ratio": o.forces["bptt"]["force_rmse"] / o.forces["pretrained"]["force_rmse"],
        "pretrain_history": o.pretrain_history, "bptt_history": o.bptt_history,
        "per_structure_test_dq": o.per_structure_dq, "timings_s": o.timings,
        "skipped_records": o.skipped_records, "nonfinite_skipped_steps": o.nonfinite_skipped_steps,
        "diverged": {r["setting"]: {"num_diverged": r["num_diverged"], "num_nonfinite": r["num_nonfinite"],
                                    "mean_dq_not_diverged": r["mean_dq_not_diverged"]} for r in o.relaxation},
        "resumed": o.resumed,
    }


def results_markdown(o: FinetuneOutcome, command: str) -> list[str]:
    """The lines of results.md (the lines from the fifth on are also printed)."""
    rows = grid_rows(o.steps, o.grid_train, o.grid_test)
    forces = [{"model": "pretrained", **o.forces["pretrained"]}, {"model": "BPTT-tuned", **o.forces["bptt"]}]
    return [f"# Results: {o.dataset}", "", f"Command: `{command}`", "",
            (f"Split: {o.split['test']} test / {o.split['val']} val / {o.split['train']} train; model "
             f"{configs.model_name(o.model_config)} {o.model_config}, {o.num_params} parameters."), "",
            "## Test relaxations (Dq in amu^0.5 Å)", "", markdown_table(o.relaxation, RELAXATION_COLUMNS), "",
            f"BPTT / best-grid Dq ratio: **{o.dq_ratio:.3f}**", "",
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
