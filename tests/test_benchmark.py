"""The benchmark script runs its sections on tiny settings and its numbers are self-consistent
(the vmapped, chunked and looped grid searches agree; remat executes more FLOPs than the model
needs; float32 and bfloat16 relaxations of a saved checkpoint both cover every structure)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from bptt_mlip.training import checkpoint
from bptt_mlip.models import adapt as model
from bptt_mlip.relax import step_rules
from bptt_mlip.training import steps as train

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.benchmark", "--repeats=1", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_benchmark_bptt_and_grid_sections(tmp_path):
    out = tmp_path / "bench"
    proc = run_benchmark("--sections=matmul,bptt,grid", "--sizes=small", "--frames=2,4", "--remats=none,frame",
                         "--matmul_size=128", "--grid_sizes=small", "--grid_batch_sizes=1", "--grid_steps=4",
                         "--grid_frames=2", "--grid_chunk_sizes=2", f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["matmul"]["gflops"] > 0
    rows = {(r["frames"], r["remat"]): r for r in res["bptt"]}
    assert set(rows) == {(2, "none"), (2, "frame"), (4, "none"), (4, "frame")}
    for (k, remat), r in rows.items():
        assert r["step_s"] > 0 and r["peak_mb"] > 0
        if remat == "none":
            assert abs(r["executed_gflop"] - r["model_gflop"]) < 1e-9
        else:  # one more forward per frame is executed
            assert r["executed_gflop"] > r["model_gflop"]
    # FLOPs scale with K (the scan body is counted once and multiplied by the trip count)
    assert rows[(4, "none")]["model_gflop"] > 1.8 * rows[(2, "none")]["model_gflop"]
    (grid,) = res["grid"]
    assert grid["step_sizes"] == 4 and grid["max_abs_dq_diff"] < 1e-4
    assert grid["chunked"][0]["chunk_size"] == 2 and grid["chunked"][0]["max_abs_dq_diff"] < 1e-4
    md = (out / "results.md").read_text()
    assert "model % of matmul" in md and "Chunked" in md


def test_benchmark_bf16_checkpoint_section(tmp_path):
    cfg = model.TINY
    step_rule = step_rules.FixedStep(0.01)
    params = {"model": model.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": step_rule.init()}
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optax.identity().init(params),
                             key=jax.random.PRNGKey(0))
    ckpt = tmp_path / "ckpt"
    checkpoint.save_checkpoint(ckpt, 0, state, model.Normalizer.identity(),
                               {"model_config": checkpoint.config_to_dict(cfg),
                                "step_config": step_rules.step_rule_to_dict(step_rule)})
    out = tmp_path / "bench"
    proc = run_benchmark("--sections=bf16_checkpoint", f"--bf16_checkpoint={ckpt}", "--bf16_checkpoint_frames=2",
                         "--batch_size=64", f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    c = json.loads((out / "results.json").read_text())["bf16_checkpoint"]
    assert c["structures"] == 280  # every shipped Si-defect relaxation
    assert c["model_config"]["matmul_dtype"] == "float32"
    # bfloat16 rounding moves the end points a little, not by the size of a relaxation
    assert 0 < c["dq_between_mean"] < 0.1 * c["dq_initial_mean"]
    assert abs(c["dq_change_mean"]) <= c["dq_change_abs_mean"] <= c["dq_change_abs_max"]
    assert "bfloat16 matmuls with a trained checkpoint" in (out / "results.md").read_text()
