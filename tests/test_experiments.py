"""Smoke tests: each experiment script runs end to end on tiny settings and writes its outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DATA_FLAGS = ["--max_trajectories=12", "--num_test=3", "--num_val=2"]
MODEL_FLAGS = ["--d_model=16", "--d_ff=16", "--num_heads=2", "--num_layers=1", "--embed_hidden=16"]
PRETRAIN_FLAGS = ["--pretrain_epochs=1", "--pretrain_frame_stride=20", "--pretrain_batch_size=16"]
RUN_FLAGS = ["--bptt_epochs=1", "--max_frames=4", "--grid_steps=0.01,0.04", "--fire_max_steps=5", "--batch_size=4"]


def run(module: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"experiments.{module}", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=None if env is None else {**os.environ, **env})


def test_make_dataset_script(tmp_path):
    proc = run("make_dataset", "--kind=si_defects", "--num=2", f"--out={tmp_path / 'ds'}",
               "--xyz=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["statistics"]["num_trajectories"] == 2


def test_pretrain_finetune_and_ablation_scripts_end_to_end(tmp_path):
    pre = run("pretrain", f"--workdir={tmp_path / 'pre'}", *DATA_FLAGS, *MODEL_FLAGS, *PRETRAIN_FLAGS)
    assert pre.returncode == 0, pre.stderr[-4000:]
    ckpt = tmp_path / "pre" / "checkpoints" / "pretrained"
    assert (ckpt / "0").is_dir()

    workdir = tmp_path / "run"
    proc = run("finetune", f"--workdir={workdir}", f"--pretrained={ckpt}", "--step_kind=learnable", *DATA_FLAGS,
               *RUN_FLAGS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "BPTT / best-grid Dq ratio" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["split"] == {"test": 3, "val": 2, "train": 7}
    assert [r["step"] for r in results["grid"]] == [0.01, 0.04]
    per_structure = results["per_structure_test_dq"]
    assert len(per_structure["bptt"]) == 3
    assert len(per_structure["start"]) == 3 and min(per_structure["start"]) > 0  # test starts are not minima
    assert results["model_config"]["d_model"] == 16  # taken from the checkpoint, not the flags
    for name in ("bptt_loss.png", "grid_search.png", "dq_before_after.png"):
        assert (workdir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "checkpoints" / "bptt_best" / "0").is_dir()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(l)["phase"] == "bptt_step" for l in lines)
    stab = run("frame_stability", f"--run={workdir}", "--checkpoint=bptt_best", "--max_trajectories=4",
               "--iterations=5", "--batch_size=4", f"--out={tmp_path / 'stability.json'}")
    assert stab.returncode == 0, stab.stderr[-4000:]
    stability = json.loads((tmp_path / "stability.json").read_text())
    learned = re.search(r"learnable step, eta=([0-9.e+-]+)", results["relaxation"][-1]["setting"]).group(1)
    assert stability["step_size"] == pytest.approx(float(learned), rel=1e-3)  # the checkpoint's learned step
    for where in ("start", "reference_end"):
        assert len(stability[where]["curvature"]) == 4 and min(stability[where]["curvature"]) > 0
        assert stability[where]["eta_k"]["count"] == 4
        assert stability[where]["stable_step_below"] == pytest.approx(2 / max(stability[where]["curvature"]))
    # an existing run directory is not overwritten without --overwrite
    again = run("finetune", f"--workdir={workdir}", f"--pretrained={ckpt}", *DATA_FLAGS, *RUN_FLAGS)
    assert again.returncode != 0 and "--overwrite" in again.stderr

    abl = run("ablations", f"--pretrained={ckpt}", f"--ablation_dir={tmp_path / 'abl'}", "--variants=no_bptt",
              f"--extra={' '.join(DATA_FLAGS + RUN_FLAGS)}")
    assert abl.returncode == 0, abl.stderr[-4000:]
    rows = json.loads((tmp_path / "abl" / "ablations.json").read_text())
    assert rows[0]["variant"] == "no_bptt" and abs(rows[0]["ratio"] - 1.0) < 1e-6


def test_crossval_script_folds_and_variants(tmp_path):
    # compaction off: 9 runs would each compile 3 copies of the model (tests/test_compaction.py covers it, and the
    # end-to-end test above runs the scripts' default)
    flags = ["--max_trajectories=9", "--num_val=2", *MODEL_FLAGS, *PRETRAIN_FLAGS, *RUN_FLAGS, "--compact_levels=0"]
    proc = run("crossval", f"--cv_dir={tmp_path / 'cv'}", "--cv_folds=3", "--variants=plain,force_augment",
               f"--extra={' '.join(flags)}")
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    out = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert [r["variant"] for r in out["summary"]] == ["plain", "force_augment"]
    assert all(r["folds"] == 3 and r["num_test_total"] == 9 for r in out["summary"])  # every trajectory tested once
    for k in range(3):
        res = json.loads((tmp_path / "cv" / f"fold{k}" / "plain" / "results.json").read_text())
        assert res["split"] == {"test": 3, "val": 2, "train": 4}
        assert res["best_grid_step"] == json.loads((tmp_path / "cv" / f"fold{k}" / "base" / "results.json")
                                                   .read_text())["best_grid_step"]
    md = (tmp_path / "cv" / "crossval.md").read_text()
    assert "± " in md and "pretrained + FIRE Dq" in md  # the base runs relax with FIRE too (--base_fire)
    assert [r["fold"] for r in out["reference"]] == [0, 1, 2]
    assert all(r["fire_dq"] > 0 and r["start_dq"] > 0 for r in out["reference"])


def test_finetune_data_parallel_over_four_host_devices(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    flags = [*DATA_FLAGS, *MODEL_FLAGS, *PRETRAIN_FLAGS, *RUN_FLAGS, "--data_parallel", "--force_weight=1",
             "--force_batch_size=4"]
    bad = run("finetune", f"--workdir={tmp_path / 'bad'}", *flags, "--batch_size=6", env=env)
    assert bad.returncode != 0 and "--batch_size=6 not divisible by 4" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()  # refused before any work
    proc = run("finetune", f"--workdir={tmp_path / 'run'}", *flags, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "data parallel over 4 devices" in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["per_structure_test_dq"]["bptt"]) == 3
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m["phase"] == "bptt_step" and m["force_mse"] > 0 for m in steps)


def test_every_shipped_flagfile_parses_and_passes_the_flag_checks():
    script = (
        "import glob, sys\n"
        "from absl import flags\n"
        "from experiments import finetune\n"
        "files = sorted(glob.glob('experiments/*.flags'))\n"
        "assert len(files) >= 5, files\n"
        "for f in files:\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    flags.FLAGS(['finetune', f'--flagfile={f}'])\n"
        "    problems = finetune.flag_problems(finetune.common.flag_values())\n"
        "    assert not problems, (f, problems)\n"
        "print('FLAGFILES_OK', len(files))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FLAGFILES_OK" in proc.stdout, proc.stderr[-3000:]


def test_config_problems_name_the_flags_of_what_a_config_refuses():
    from experiments import common, configs, finetune

    base = common.flag_values()
    assert configs.config_problems(base) == []
    cases = {  # flag values -> flags named, text of the config's own check
        "--dq_weight=0.0, --force_weight=0.0: BPTTConfig: dq_weight and force_weight are both 0":
            dict(dq_weight=0.0, force_weight=0.0),
        "--augment_translation=-1.0": dict(augment_translation=-1.0),
        "--max_frames=0: max_frames must be >= 1": dict(max_frames=0),
        "--head_max_scale=0.5: NeuralStep.max_scale must be 0 (unbounded) or > 1":
            dict(step_kind="neural", head_max_scale=0.5),
        "--momentum=-1.0": dict(momentum=-1.0),
        "--max_step=0.05 caps a learnable step; --step_kind=fixed has none to cap": dict(max_step=0.05),
        "--max_step=-1.0 must be >= 0": dict(step_kind="learnable", max_step=-1.0),
        "--d_model=10, --num_heads=4: d_model=10 is not divisible by num_heads=4": dict(d_model=10),
    }
    for message, change in cases.items():
        problems = finetune.flag_problems({**base, **change})
        assert any(message in p for p in problems), (message, problems)
    # a loaded model brings its architecture: the model flags are not checked then
    assert configs.config_problems({**base, "d_model": 10, "pretrained": "somewhere"}) == []


def test_config_builders_follow_the_flags():
    from bptt_mlip import relax
    from experiments import common, configs

    v = {**common.flag_values(), "d_model": 32, "max_frames": 9, "remat": "none", "step_kind": "learnable",
         "init_step": 0.0, "init_step_scale": 0.5, "bptt_lr": 3e-4}
    assert configs.model_config(v).d_model == 32
    rollout = configs.rollout_config(v, stop_rms=1e-4)
    assert (rollout.max_frames, rollout.remat, rollout.stop_rms) == (9, "none", 1e-4)
    assert configs.step_rule_settings(v, base_step=0.04)["init_step"] == 0.02  # best grid step x scale
    assert configs.step_rule_settings({**v, "init_step": 0.1}, base_step=0.04)["init_step"] == 0.05
    capped = configs.step_rule_settings({**v, "max_step": 0.015}, base_step=0.04)  # the cap also caps the start
    assert (capped["init_step"], capped["max_step"]) == (0.015, 0.015)
    recorded_before = {k: x for k, x in v.items() if k != "max_step"}  # runs recorded before --max_step existed
    assert configs.step_rule(recorded_before, base_step=0.04)[0] == relax.LearnableStep(0.02)
    assert configs.bptt_settings(v)["frame_limit_range"] == (9, 9)
    opt = configs.bptt_optim_config(v)
    assert opt.learning_rate == 3e-4 and not opt.freeze_step_rule


def test_split_errors_are_translated_to_flag_names():
    from experiments import common

    msg = "num_test=6 + num_val=4 >= 10 usable trajectories: no training data left; lower num_test / num_val"
    assert common.as_flag_names(msg, common.SPLIT_FLAGS) == (
        "--num_test=6 + --num_val=4 >= 10 usable trajectories: no training data left; lower num_test / num_val")
    assert common.as_flag_names("fold=3 must be in 0..2 (folds=3)", common.SPLIT_FLAGS) == (
        "--cv_fold=3 must be in 0..2 (--cv_folds=3)")


def test_crossval_hands_its_data_and_model_flags_on_to_every_run():
    """``crossval --dataset=FILE`` once ran every fold on the default dataset; the flags given to the
    driver (not their defaults) must reach each finetune run."""
    script = (
        "from absl import flags\n"
        "from experiments import common, crossval\n"
        "flags.FLAGS(['crossval', '--dataset=/data/mine.extxyz', '--num_val=7', '--cv_folds=3', '--workdir=x'])\n"
        "print(common.explicit_run_flags(exclude=('cv_folds', 'workdir')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['--dataset=/data/mine.extxyz', '--num_val=7']"
