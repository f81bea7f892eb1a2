"""The main job's honest reports: settings derived from the data unless given as flags, the
diagnostics in the console, results.json and the "What happened" section of results.md."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bptt_mlip.training import diagnostics
from experiments import common, configs, finetune, report  # noqa: F401  (finetune defines its flags)

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class FakeDerived:
    """Stands in for ``relax_settings.RelaxSettings`` (the fields and methods the job reads)."""

    stop_rms: float = 2e-4
    stop_fmax: float = 0.01
    grid_steps: tuple = (0.1, 0.2, 0.4)
    fire_fmax: float = 0.02

    def to_dict(self):
        return dataclasses.asdict(self)

    def describe(self):
        return "derived from 5 trajectories"


def test_relaxation_settings_keep_given_flags_and_derive_the_rest():
    v = {**common.flag_values(), "stop_rms": 1e-3, "stop_fmax": 0.0, "grid_steps": ["0.01", "0.04"], "fire_fmax": 0.05}
    s = configs.relaxation_settings(v, {"stop_rms"}, FakeDerived())
    assert (s.stop_rms, s.stop_fmax, s.grid_steps, s.fire_fmax) == (1e-3, 0.01, (0.1, 0.2, 0.4), 0.02)
    assert s.sources == {"stop_rms": "flag", "stop_fmax": "derived from data", "grid_steps": "derived from data",
                         "fire_fmax": "derived from data"}
    assert s.description == "derived from 5 trajectories" and s.derived["stop_fmax"] == 0.01
    eff = s.flag_values(v)
    rollout, fire = configs.rollout_config(eff), configs.fire_config(eff)
    assert (rollout.stop_rms, rollout.stop_fmax, fire.fmax) == (1e-3, 0.01, 0.02)
    assert [float(x) for x in eff["grid_steps"]] == [0.1, 0.2, 0.4]
    assert v["grid_steps"] == ["0.01", "0.04"]  # the flag values themselves are untouched
    assert any("stop_fmax = 0.01 eV/Å (derived from data)" == line for line in s.lines())
    # nothing derived: every value is its flag's
    plain = configs.relaxation_settings(v, {"fire_fmax"}, None)
    assert plain.grid_steps == (0.01, 0.04) and plain.sources["grid_steps"] == "flag default"
    assert plain.sources["fire_fmax"] == "flag" and plain.derived is None
    lines = report.settings_lines(plain.to_dict())
    assert "- grid_steps = 0.01, 0.04 Å²/eV (flag default)" in lines


def test_given_flags_count_flagfiles_and_command_line_not_defaults():
    script = (
        "from absl import flags\n"
        "from experiments import configs, finetune\n"
        "flags.FLAGS(['finetune', '--flagfile=experiments/si_cpu.flags', '--fire_fmax=0.1'])\n"
        "print(sorted(finetune.given_flags(configs.DERIVABLE_FLAGS)))\n"
        "print(finetune.flag_problems({**finetune.common.flag_values(), 'stop_fmax': -1.0, 'fire_fmax': 0.0}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    given, problems = proc.stdout.strip().splitlines()[-2:]
    assert given == "['fire_fmax', 'stop_rms']"
    assert "--stop_fmax=-1.0 must be >= 0" in problems and "--fire_fmax=0.0 must be > 0" in problems


def _per(dq, dq_initial, frames, converged):
    n = len(dq)
    return {"dq": np.asarray(dq, float), "dq_initial": np.asarray(dq_initial, float),
            "num_frames": np.asarray(frames), "converged": np.asarray(converged, bool), "diverged": np.zeros(n, bool)}


def _outcome(pre_per, bptt_per, forces):
    rows = [{"setting": "pretrained, best grid step 0.01", **_summary(pre_per)},
            {"setting": "BPTT (fixed step)", **_summary(bptt_per)}]
    diag = diagnostics.diagnose({"pretrained_best_grid": pre_per, "bptt": bptt_per}, max_frames=75,
                                baseline="pretrained_best_grid", pretrained_forces=forces["pretrained"])
    return report.FinetuneOutcome(
        dataset="d", curation=None, split={}, model_config=None, num_params=0, steps=[], best_step=0.01,
        grid_train={}, grid_test=None, relaxation=rows, forces=forces, pretrain_history=[], bptt_history=[],
        per_structure_dq={}, timings={}, skipped_records={}, nonfinite_skipped_steps=0, resumed=False,
        diagnostics=diag, max_frames=75)


def _summary(per):
    from bptt_mlip.training import evaluate

    return evaluate.summarize(per)


def test_what_happened_says_nothing_moved():
    stuck = _per([5.0, 6.0, 7.0], [5.0, 6.0, 7.0], [1, 1, 1], [1, 1, 1])
    forces = {"pretrained": {"force_rmse": 0.7, "zero_force_rmse": 0.7},
              "bptt": {"force_rmse": 0.7, "zero_force_rmse": 0.7}}
    text = "\n".join(report.what_happened(_outcome(stuck, stuck, forces)))
    assert "0 of 3 test relaxations moved (3 never moved, 3 stopped at their first frame)" in text
    assert "Neither the pretrained nor the BPTT-tuned model moved any test structure" in text
    assert "**Warnings** (5):" in text and "no better than predicting zero force" in text
    assert "end no closer to the DFT end points than not moving at all" in text


def test_what_happened_says_what_bptt_learned():
    pre = _per([4.0, 5.0], [8.0, 9.0], [30, 75], [1, 0])
    tuned = _per([2.0, 3.0], [8.0, 9.0], [20, 25], [1, 1])
    forces = {"pretrained": {"force_rmse": 0.3, "zero_force_rmse": 0.7},
              "bptt": {"force_rmse": 0.36, "zero_force_rmse": 0.7}}
    text = "\n".join(report.what_happened(_outcome(pre, tuned, forces)))
    assert "2 of 2 test relaxations moved" in text and "1 reached max_frames=75 without converging" in text
    assert "learned to end test relaxations closer to the DFT end points (Dq ratio 0.556" in text
    assert "BPTT-tuned 0.36 (ratio 1.200: worse)" in text
    assert "The pretrained relaxations close 47% of the distance" in text  # 1 - 4.5 / 8.5
    assert "No warnings" in text


def near_equilibrium_dataset(path: Path, num: int = 14, frames: int = 5) -> Path:
    """The last ``frames`` frames of ``num`` shipped Si relaxations (largest force <~0.1 eV/Å), as DFT
    defect runs start: with the generated set's settings every rollout stops at its first frame."""
    from bptt_mlip.data import store

    trajs = [dataclasses.replace(t, positions=t.positions[-frames:], forces=t.forces[-frames:],
                                 energies=None if t.energies is None else t.energies[-frames:])
             for t in store.load_default_dataset("si_defects")[:num]]
    store.write_extxyz(trajs, path)
    return path


def test_finetune_on_near_equilibrium_data_derives_settings_and_reports_what_moved(tmp_path):
    """DFT-like data that start near their minimum: the settings not given come from the training
    split, and whether the rollouts moved or not, results.md, results.json and the console say so."""
    data = near_equilibrium_dataset(tmp_path / "near_eq.extxyz")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.finetune", f"--workdir={workdir}", f"--dataset={data}",
           "--num_test=3", "--num_val=2", "--d_model=16", "--d_ff=16", "--num_heads=2", "--num_layers=1",
           "--embed_hidden=16", "--pretrain_epochs=1", "--pretrain_batch_size=16", "--bptt_epochs=1",
           "--max_frames=6", "--fire_max_steps=5", "--batch_size=4", "--remat=none", "--grid_on_test=false",
           "--stop_rms=2e-4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "relaxation settings: stop_rms = 0.0002 Å (flag); stop_fmax = " in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    settings = results["settings"]
    assert settings["sources"] == {"stop_rms": "flag", "stop_fmax": "derived from data",
                                   "grid_steps": "derived from data", "fire_fmax": "derived from data"}
    assert settings["stop_rms"] == 2e-4 and settings["derived"]["num_trajectories"] == 9
    # the largest force of these frames is <~0.1 eV/Å: ASE's fmax 0.05 and the generated set's grid would not fit
    assert settings["fire_fmax"] < 0.05 and settings["grid_steps"] == settings["derived"]["grid_steps"]
    assert [r["step"] for r in results["grid"]] == pytest.approx(settings["grid_steps"])
    diag = results["diagnostics"]
    assert set(diag) >= {"relaxation", "fire", "grid", "forces", "elements", "warnings"}
    assert diag["elements"]["unseen_in_training"] == []
    pre = diag["relaxation"]["pretrained_best_grid"]
    rows = {r["setting"]: r for r in results["relaxation"]}
    assert pre["num_structures"] == 3 and pre["num_converged"] == rows[results["relaxation"][1]["setting"]][
        "num_converged"]
    md = (workdir / "results.md").read_text()
    assert "## What happened" in md and md.index("## What happened") < md.index("## Test relaxations")
    assert f"{3 - pre['num_not_moved']} of 3 test relaxations moved ({pre['num_not_moved']} never moved" in md
    assert "## Settings" in md and "(derived from data)" in md and "Settings derived from 9 training" in md
    if pre["num_not_moved"]:  # nothing may stand still without a word
        assert any("never moved" in w for w in diag["warnings"])
    for w in diag["warnings"]:
        assert w in md and f"WARNING: {w}" in proc.stdout
