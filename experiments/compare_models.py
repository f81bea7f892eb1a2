"""Force models side by side: test Dq per structure from cross-validation studies of one dataset.

    python -m experiments.compare_models --variant=plain --out=docs/runs/compare_si \
        --studies="ADAPT=runs/cv_si_adapt,periodic ADAPT=runs/cv_si_periodic"

Every study is a ``experiments.crossval`` folder (``--cv_dir``) run on the same dataset with the same
``--cv_folds`` and ``--cv_seed`` and a different ``--model``, so that every trajectory is a test
structure exactly once and the studies hold the same structures in the same order. For each study
and each fold run: Dq (amu^0.5 Å) per test structure of not moving, of the fold's pretrained model at
its best grid step and under FIRE (its base run), and after BPTT (``--variant``'s run). Writes
``compare.json``, ``compare.md`` (means and medians over all test structures) and
``dq_per_structure.png`` (one panel per model, structures sorted by the Dq of not moving).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import app, flags

from bptt_mlip.workflow import plots
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_list("studies", [], "NAME=CV_DIR pairs: a display name and an experiments.crossval folder.")
flags.DEFINE_string("variant", "plain", "The crossval variant whose BPTT-tuned relaxations are shown.")
flags.DEFINE_string("out", "runs/compare", "Output folder.")
flags.DEFINE_list("folds", [], "Compare only these fold indices (default: the folds every study ran).")

RELAXATIONS = ("start", "pretrained_best_grid", "pretrained_fire", "bptt")


def folds_run(cv_dir: Path) -> list[int]:
    """The folds a study ran: crossval.json's list, or (a study still running) every fold<k>/base with results."""
    if (cv_dir / "crossval.json").exists():
        return [int(k) for k in json.loads((cv_dir / "crossval.json").read_text())["folds_run"]]
    return sorted(int(d.name[4:]) for d in cv_dir.glob("fold*") if (d / "base" / "results.json").exists())


def study_per_structure(cv_dir: Path, variant: str, folds: list[int]) -> dict[str, np.ndarray]:
    """Per-structure test Dq of one crossval study, ``folds`` concatenated in that order: relaxation name
    -> [N]. A relaxation missing from any fold (FIRE not run, older results) is left out."""
    per_fold = []
    for k in folds:
        base_path = cv_dir / f"fold{k}" / "base" / "results.json"
        if not base_path.exists():
            raise app.UsageError(f"{base_path}: fold {k} was not run in this study (see --folds)")
        base = json.loads(base_path.read_text())["per_structure_test_dq"]
        tuned_path = cv_dir / f"fold{k}" / variant / "results.json"
        if not tuned_path.exists():
            raise app.UsageError(f"{tuned_path}: no results for variant {variant!r} in fold {k}")
        tuned = json.loads(tuned_path.read_text())["per_structure_test_dq"]
        per_fold.append({**{key: base[key] for key in RELAXATIONS[:-1] if key in base}, "bptt": tuned["bptt"]})
    keys = [key for key in RELAXATIONS if all(key in f for f in per_fold)]
    return {key: np.concatenate([np.asarray(f[key], np.float64) for f in per_fold]) for key in keys}


def summary(per_structure: dict[str, np.ndarray]) -> dict:
    """Mean and median Dq of each relaxation over all test structures, and how many structures BPTT
    left closer to the DFT minimum than the pretrained model's best grid step."""
    out = {"num_structures": int(per_structure["bptt"].size)}
    for key, v in per_structure.items():
        finite = v[np.isfinite(v)]
        out[key] = {"mean": float(finite.mean()) if finite.size else float("nan"),
                    "median": float(np.median(finite)) if finite.size else float("nan"),
                    "non_finite": int(v.size - finite.size)}
    out["bptt_closer_than_best_grid"] = int(np.sum(per_structure["bptt"] < per_structure["pretrained_best_grid"]))
    return out


def parse_studies(pairs: list[str]) -> dict[str, Path]:
    studies = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise app.UsageError(f"--studies entry {pair!r}: expected NAME=CV_DIR")
        if not Path(path).is_dir():
            raise app.UsageError(f"--studies entry {pair!r}: no folder {path} (run experiments.crossval)")
        studies[name] = Path(path)
    if not studies:
        raise app.UsageError("--studies: give at least one NAME=CV_DIR")
    return studies


def check_same_structures(panels: dict[str, dict[str, np.ndarray]]) -> None:
    """Studies must hold the same test structures in the same order: their Dq of not moving agree."""
    names = list(panels)
    ref = panels[names[0]]["start"]
    for name in names[1:]:
        start = panels[name]["start"]
        if start.shape != ref.shape or not np.allclose(start, ref, rtol=1e-4, atol=1e-4):
            raise app.UsageError(f"study {name!r} holds other test structures than {names[0]!r} (its Dq of not "
                                 "moving differ): run both with the same --dataset, --cv_folds, --cv_seed and "
                                 "--only_folds")


def markdown(summaries: dict[str, dict]) -> str:
    head = ["| model | structures | not moving | pretrained, best grid | pretrained + FIRE | BPTT-tuned "
            "| BPTT closer than grid |", "|---|---|---|---|---|---|---|"]
    rows = []
    for name, s in summaries.items():
        cells = [f"{s[k]['mean']:.3f} / {s[k]['median']:.3f}" if k in s else "" for k in RELAXATIONS]
        rows.append(f"| {name} | {s['num_structures']} | " + " | ".join(cells)
                    + f" | {s['bptt_closer_than_best_grid']}/{s['num_structures']} |")
    return "Test Dq (amu^0.5 Å), mean / median over every test structure of every fold:\n\n" + "\n".join(head + rows)


def main(argv):
    del argv
    studies = parse_studies(FLAGS.studies)
    folds = ([int(k) for k in FLAGS.folds] if FLAGS.folds
             else sorted(set.intersection(*(set(folds_run(path)) for path in studies.values()))))
    if not folds:
        raise app.UsageError("the studies share no fold: pass --folds")
    panels = {name: study_per_structure(path, FLAGS.variant, folds) for name, path in studies.items()}
    check_same_structures(panels)
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {name: summary(p) for name, p in panels.items()}
    common.write_json(out / "compare.json", {
        "command": common.command_line(), "variant": FLAGS.variant, "folds": folds,
        "studies": {k: str(v) for k, v in studies.items()},
        "summary": summaries,
        "per_structure": {name: {k: v.tolist() for k, v in p.items()} for name, p in panels.items()}})
    text = markdown(summaries)
    (out / "compare.md").write_text(text + "\n")
    plots.dq_per_structure_panels(panels, out / "dq_per_structure.png")
    print(text)


if __name__ == "__main__":
    common.run_main(main)
