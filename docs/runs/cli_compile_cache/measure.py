"""Wall time of the first and second `python -m bptt_mlip relax` call with an empty persistent compilation
cache, and of `info`; writes timings.json beside this file.

    python docs/runs/cli_compile_cache/measure.py runs/si_cpu_derived/checkpoints/bptt_best
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase.io

from bptt_mlip.data import store

HERE = Path(__file__).resolve().parent


def timed(command, env):
    t0 = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode in (0, 1, 3), done.stderr[-2000:]
    return round(time.time() - t0, 2)


def main(checkpoint: str) -> None:
    work = Path(tempfile.mkdtemp())
    trajs = store.load_default_dataset("si_defects")[:3]
    files = []
    for i, t in enumerate(trajs):
        atoms = ase.Atoms(numbers=t.species, positions=t.positions[0], cell=t.cell, pbc=True)
        files.append(str(work / f"s{i}.extxyz"))
        ase.io.write(files[-1], atoms)
    env = {**os.environ, "BPTT_MLIP_CACHE_DIR": str(work / "cache")}
    relax = [sys.executable, "-m", "bptt_mlip", "relax", *files, "--checkpoint", checkpoint, "--out",
             str(work / "out.extxyz")]
    info = [sys.executable, "-m", "bptt_mlip", "info", checkpoint]
    result = {"checkpoint": checkpoint, "files": 3, "load_1min": os.getloadavg()[0],
              "relax_first_s": timed(relax, env), "relax_second_s": timed(relax, env),
              "relax_cache_off_s": timed(relax, {**env, "BPTT_MLIP_CACHE_DIR": "off"}),
              "info_s": timed(info, env), "date": time.strftime("%Y-%m-%d %H:%M")}
    (HERE / "timings.json").write_text(json.dumps(result, indent=1) + "\n")
    print(result)


if __name__ == "__main__":
    main(sys.argv[1])
