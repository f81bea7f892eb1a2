"""The NbCO example's energy per frame from its vasprun.xml (``e_fr_energy``, the free energy TOTEN)
and from its OUTCAR (ASE's potential energy, sigma -> 0): the difference is the smearing term.
Reads the reference DFT files in the 'shared' folder beside the repository; writes
``energy_terms.json`` next to this script (eV, one value per ionic step). Run from the repository root:

    python docs/runs/nbco_energy_terms/compare_energies.py
"""

import json
from pathlib import Path

import numpy as np

from bptt_mlip.data import readers

DFT_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "dft"
(vasprun,) = readers.read_trajectories(DFT_DIR / "NbCO_relax.vasprun.xml.gz")
(outcar,) = readers.read_trajectories(DFT_DIR / "NbCO_relax.OUTCAR.gz")
difference = np.asarray(vasprun.energies) - np.asarray(outcar.energies)  # [T] eV
out = {
    "num_frames": int(vasprun.num_frames),
    "vasprun_minus_outcar_energy_eV": {
        "mean": float(difference.mean()), "min": float(difference.min()), "max": float(difference.max()),
        "first": float(difference[0]), "last": float(difference[-1]),
    },
    "vasprun_e_fr_energy_eV": {"first": float(vasprun.energies[0]), "last": float(vasprun.energies[-1])},
    "outcar_energy_eV": {"first": float(outcar.energies[0]), "last": float(outcar.energies[-1])},
}
(Path(__file__).parent / "energy_terms.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
