"""--gradient=implicit|guided in the main job: the flags reach the trainer, the implicit metrics are logged,
and bad combinations are refused naming the flags."""

from __future__ import annotations

import json

from test_experiments import DATA_FLAGS, MODEL_FLAGS, PRETRAIN_FLAGS, RUN_FLAGS, run

IMPLICIT_COUNTS = ("implicit_rows", "implicit_unconverged_rollouts", "implicit_unconverged_solves")


def test_guided_gradient_runs_end_to_end_and_logs_the_implicit_metrics(tmp_path):
    workdir = tmp_path / "run"
    proc = run("finetune", f"--workdir={workdir}", "--gradient=guided", "--unroll_frames=2", "--fire=false",
               *DATA_FLAGS, *MODEL_FLAGS, *PRETRAIN_FLAGS, *RUN_FLAGS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((workdir / "results.json").read_text())["relaxation"]
    assert rows[-1]["setting"].startswith("guided: BPTT of 2 frames + implicit")  # the table names the gradient
    steps = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["phase"] == "bptt_step"]
    assert steps and all(name in steps[0] for name in IMPLICIT_COUNTS), sorted(steps[0])
    # every real training row went through the guided method: counted in rows, or handled by its BPTT window
    assert all(s["implicit_rows"] >= 0 for s in steps)


def test_implicit_gradient_with_an_unroll_window_is_refused_naming_the_flags(tmp_path):
    proc = run("finetune", f"--workdir={tmp_path / 'bad'}", "--gradient=implicit", "--unroll_frames=3",
               *DATA_FLAGS, *MODEL_FLAGS, *RUN_FLAGS)
    assert proc.returncode == 2
    assert "--gradient=implicit" in proc.stderr and "--unroll_frames=3" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "bad" / "results.json").exists()


def test_bptt_through_fire_is_tested_with_fire_against_the_pretrained_models_fire(tmp_path):
    workdir = tmp_path / "fire"
    proc = run("finetune", f"--workdir={workdir}", "--relaxer=fire", *DATA_FLAGS, *MODEL_FLAGS, *PRETRAIN_FLAGS,
               *RUN_FLAGS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((workdir / "results.json").read_text())
    settings = [row["setting"] for row in results["relaxation"]]
    assert settings[-2:] == ["pretrained + FIRE", "BPTT through FIRE, tested with FIRE"], settings
    rows = results["relaxation"]
    # the headline ratio compares the tuned model's FIRE with the pretrained model's FIRE
    assert abs(results["dq_ratio_bptt_over_best_grid"] - rows[-1]["mean_dq"] / rows[-2]["mean_dq"]) < 1e-9


def test_relaxer_fire_with_an_implicit_gradient_is_refused(tmp_path):
    proc = run("finetune", f"--workdir={tmp_path / 'bad'}", "--relaxer=fire", "--gradient=implicit",
               *DATA_FLAGS, *MODEL_FLAGS, *RUN_FLAGS)
    assert proc.returncode == 2 and "--relaxer=fire" in proc.stderr, proc.stderr[-2000:]
