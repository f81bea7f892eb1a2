"""Smoke test: the main job runs end to end on tiny settings and writes its run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_FLAGS = [
    "--max_trajectories=12", "--num_test=3", "--num_val=2", "--d_model=16", "--d_ff=16", "--num_heads=2",
    "--num_layers=1", "--embed_hidden=16", "--pretrain_epochs=1", "--pretrain_frame_stride=20", "--bptt_epochs=1",
    "--max_frames=4", "--grid_steps=0.01,0.04", "--fire_max_steps=5", "--batch_size=4", "--pretrain_batch_size=16",
]


def run_finetune(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.finetune", f"--workdir={workdir}", *TINY_FLAGS, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_finetune_script_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    proc = run_finetune(workdir, "--step_kind=learnable")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "BPTT / best-grid Dq ratio" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["split"] == {"test": 3, "val": 2, "train": 7}
    assert [r["step"] for r in results["grid"]] == [0.01, 0.04]
    assert len(results["per_structure_test_dq"]["bptt"]) == 3
    for name in ("bptt_loss.png", "grid_search.png", "dq_before_after.png"):
        assert (workdir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ck in ("pretrained", "bptt_best"):
        assert (workdir / "checkpoints" / ck / "0").is_dir()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(l)["phase"] == "bptt_step" for l in lines)
    # an existing run directory is not overwritten without --overwrite
    again = run_finetune(workdir)
    assert again.returncode != 0 and "--overwrite" in again.stderr
