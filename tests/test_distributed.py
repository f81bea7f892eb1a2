"""Data-parallel BPTT as two real processes over the loopback address (jax.distributed, CPU gloo
collectives) equals the single-process run: experiments/distributed_bptt.py run three ways."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.distributed_bptt", f"--out={out}", "--steps=3", *extra]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def test_two_processes_over_loopback_equal_one_process(tmp_path):
    coordinator = f"--coordinator=127.0.0.1:{_free_port()}"
    workers = [subprocess.Popen(_command(tmp_path / f"p{i}.npz", "--num_processes=2", f"--process_id={i}",
                                         coordinator),
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-3000:]
    for name, extra in (("two_devices", ["--num_cpu_devices=2"]), ("one_device", [])):
        done = subprocess.run(_command(tmp_path / f"{name}.npz", *extra), cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    p0, p1, two, one = (np.load(tmp_path / f"{n}.npz") for n in ("p0", "p1", "two_devices", "one_device"))
    assert int(p0["process_count"]) == 2 and int(p0["device_count"]) == 2
    assert int(two["process_count"]) == 1 and int(two["device_count"]) == 2
    # both processes end with the same replicated parameters
    np.testing.assert_array_equal(p0["params"], p1["params"])
    np.testing.assert_array_equal(p0["losses"], p1["losses"])
    # two processes with one device each compute exactly what one process with two devices does
    np.testing.assert_array_equal(p0["losses"], two["losses"])
    np.testing.assert_array_equal(p0["params"], two["params"])
    # and what one device does, up to float32 summation order of the batch mean (Adam's first steps
    # move a parameter by ~lr = 1e-3 per step whatever the gradient's size, so tiny gradient components
    # may differ in sign: 3 steps bound the difference by ~3e-3; measured 3.4e-5)
    np.testing.assert_allclose(p0["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(p0["params"], one["params"], rtol=0, atol=3e-4)
    assert not np.array_equal(p0["params"], np.zeros_like(p0["params"]))


def test_importing_the_library_does_not_start_the_jax_backend():
    # jax.distributed.initialize must come before the backend starts; users import bptt_mlip first
    code = ("import jax\nfrom jax._src import xla_bridge\n"
            "import bptt_mlip, bptt_mlip.training.parallel, bptt_mlip.workflow.cli, bptt_mlip.data.oracles\n"
            "assert not xla_bridge.backends_are_initialized(), 'importing bptt_mlip started the XLA backend'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
