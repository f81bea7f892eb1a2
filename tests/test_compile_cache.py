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
