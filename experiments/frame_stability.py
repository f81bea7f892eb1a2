"""How stiff is a trained model's force field against its fixed step? eta * k per structure.

For every trajectory of a dataset: the largest curvature k (eV/Å^2) of the model's forces at the
start structure and at the reference (DFT-relaxed) end point (``bptt_mlip.relax.stability``), and
``eta * k`` for the run's fixed step. Above 2 the fixed-step frame map, and the Jacobian product of
backpropagation through its frames, grows displacements along that mode.

  python -m experiments.frame_stability --run=runs/cv_si_equivariant/fold0/base \\
      --dataset=default:si_defects --out=docs/runs/frame_stability/equivariant_fold0.json

``--run`` is a finetune run directory: the model is its pretrained checkpoint (``--checkpoint`` picks
another one) and eta its ``best_grid_step`` from results.json, or the learned step of a checkpoint
with a learnable step (``--step_size`` overrides). Each place also reports 2/max k, the largest step
at which every probed structure's stiffest mode shrinks (a ``--max_step`` for a learnable step).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from bptt_mlip import structures as st
from bptt_mlip.data import datasets
from bptt_mlip.relax import stability
from bptt_mlip.workflow.api import TrainedModel

FLAGS = flags.FLAGS
flags.DEFINE_string("run", None, "A finetune run directory (its checkpoints/ and results.json).", required=True)
flags.DEFINE_string("checkpoint", "pretrained", "Checkpoint under <run>/checkpoints.")
flags.DEFINE_float("step_size", 0.0,
                   "Step eta (Å^2/eV); 0 = the checkpoint's learned step, else the run's best_grid_step.")
flags.DEFINE_string("dataset", "default:si_defects", "Dataset spec whose trajectories are probed.")
flags.DEFINE_integer("max_trajectories", 64, "Probe at most this many trajectories (0 = all).")
flags.DEFINE_integer("iterations", 100, "Power-iteration steps.")
flags.DEFINE_integer("batch_size", 8, "Structures per Jacobian-vector product.")
flags.DEFINE_string("out", "", "Optional JSON file for the per-structure numbers and the summary.")


def curvatures(model: TrainedModel, probe, species, positions, cells) -> np.ndarray:
    """[len(species)] largest curvature (eV/Å^2) of ``model``'s forces at each structure (``probe``: the
    jitted :func:`stability.stiffest_curvature` of ``model``, built once for every call)."""
    max_atoms = max(len(z) for z in species)
    out = []
    for i in range(0, len(species), FLAGS.batch_size):
        sl = slice(i, i + FLAGS.batch_size)
        batch = st.from_arrays(species[sl], positions[sl], cells[sl], max_atoms=max_atoms, batch_size=FLAGS.batch_size)
        out.append(np.asarray(probe(model.model_params, batch))[: len(species[sl])])
    return np.concatenate(out)


def summary(eta_k: np.ndarray) -> dict:
    """Distribution of eta * k over structures, and the share above the unstable limit 2."""
    return {"median": float(np.median(eta_k)), "p90": float(np.percentile(eta_k, 90)), "max": float(eta_k.max()),
            "fraction_unstable": float(np.mean(eta_k > stability.UNSTABLE_STEP_TIMES_CURVATURE)),
            "count": int(eta_k.size)}


def main(argv):
    del argv
    run = Path(FLAGS.run)
    model = TrainedModel.load(run / "checkpoints" / FLAGS.checkpoint)
    learned = model.scalar_step_size() if model.step_rule.trainable else None
    eta = FLAGS.step_size or learned or json.loads((run / "results.json").read_text())["best_grid_step"]
    trajs = datasets.load_dataset_spec(FLAGS.dataset).trajectories
    trajs = trajs[: FLAGS.max_trajectories] if FLAGS.max_trajectories else trajs
    species = [t.species for t in trajs]
    cells = [t.cell for t in trajs]
    result = {"run": str(run), "checkpoint": FLAGS.checkpoint, "model_kind": model.kind, "step_size": float(eta),
              "dataset": FLAGS.dataset, "iterations": FLAGS.iterations}
    model = model.covering(cells)
    probe = jax.jit(lambda p, s: stability.stiffest_curvature(model.force_fn, p, s, iterations=FLAGS.iterations))
    for where, index in [("start", 0), ("reference_end", -1)]:
        k = curvatures(model, probe, species, [t.positions[index] for t in trajs], cells)
        result[where] = {"curvature": k.tolist(), "eta_k": summary(np.asarray(stability.step_times_curvature(eta, k)))}
        result[where]["stable_step_below"] = float(stability.UNSTABLE_STEP_TIMES_CURVATURE / k.max())
        s = result[where]["eta_k"]
        print(f"{where}: eta*k median {s['median']:.3f}, 90th percentile {s['p90']:.3f}, max {s['max']:.3f}, "
              f"above 2: {s['fraction_unstable']:.1%} of {s['count']} (eta = {eta:.4g} Å^2/eV); every probed "
              f"structure's stiffest mode shrinks for eta below 2/max k = {result[where]['stable_step_below']:.4g}")
    if FLAGS.out:
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
