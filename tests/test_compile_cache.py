"""JAX's persistent compilation cache (bptt_mlip.compile_cache): where it goes, that a second process
reuses the first one's compiles, and that it can be switched off. Run in subprocesses: the cache is a
process-wide JAX setting that must not leak into other tests."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = """
import sys, jax, jax.numpy as jnp
from bptt_mlip import compile_cache
folder = compile_cache.enable(min_compile_seconds=0.0) if sys.argv[1] == "default" else compile_cache.enable(
    sys.argv[1], min_compile_seconds=0.0)
assert compile_cache.enable_unless_configured() == compile_cache.active_dir()
f = jax.jit(lambda x: jnp.sin(x @ x.T).sum())
print(folder, float(f(jnp.ones((16, 16)))))
"""


def _run(arg: str, **env):
    return subprocess.run([sys.executable, "-c", PROGRAM, arg], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)


def test_a_second_process_reads_the_first_ones_compiles(tmp_path):
    folder = tmp_path / "cache"
    first = _run(str(folder))
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(p.name for p in folder.iterdir())
    assert any(name.startswith("jit_") for name in entries), entries
    second = _run(str(folder))
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == first.stdout
    assert sorted(p.name for p in folder.iterdir()) == entries  # nothing new compiled: every entry reused


def test_the_environment_chooses_the_folder_or_switches_it_off(tmp_path):
    chosen = _run("default", BPTT_MLIP_CACHE_DIR=str(tmp_path / "env"))
    assert chosen.returncode == 0 and chosen.stdout.startswith(str(tmp_path / "env")), chosen.stderr[-2000:]
    off = _run("default", BPTT_MLIP_CACHE_DIR="off")
    assert off.returncode == 0 and off.stdout.startswith("None"), off.stderr[-2000:]


def test_a_second_cli_call_on_the_same_inputs_compiles_nothing(tmp_path):
    import ase.io
    import jax
    from ase.build import bulk

    from bptt_mlip.models import adapt
    from bptt_mlip.relax.step_rules import FixedStep, step_rule_to_dict
    from bptt_mlip.workflow import model_io

    ckpt = tmp_path / "model"
    params = {"model": adapt.init_params(adapt.TINY, jax.random.PRNGKey(0)), "step_rule": FixedStep(0.01).init()}
    model_io.save_model(ckpt, params, adapt.Normalizer.identity(), adapt.TINY, step_rule_to_dict(FixedStep(0.01)),
                        {"role": "test"})
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.05, seed=1)
    ase.io.write(tmp_path / "si.cif", si)
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "bptt_mlip", "relax", str(tmp_path / "si.cif"), "--checkpoint", str(ckpt),
               "--out", str(tmp_path / "out.extxyz"), "--max-frames", "5"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "BPTT_MLIP_CACHE_DIR": str(cache)}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first call wrote nothing to the cache"
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    # every program of the second call was found in the cache: nothing new compiled (and written)
    assert sorted(p.name for p in cache.iterdir()) == entries
