"""Peak memory of one fine-tuning step: BPTT vs implicit vs guided gradients, against max frames.

    nice python -m experiments.benchmark_implicit --size=small --frames=25,75,300 --unroll_frames=10

ADAPT (``--size``: tiny or small) on ``--batch_size`` shipped Si-defect relaxations padded to 64
atoms. Memory is XLA's compiled memory analysis of the jitted update (temp + arguments + outputs -
aliased bytes; see experiments/benchmark.py), so nothing is run, only compiled. Prints a Markdown
table and, with ``--out``, writes it as JSON.
"""

from __future__ import annotations

import dataclasses
import json

import jax
from absl import app, flags

from bptt_mlip import relax
from bptt_mlip.data import load_default_dataset
from bptt_mlip.data.batching import make_relaxation_batch
from bptt_mlip.models import adapt
from bptt_mlip.training import implicit_steps, optim, steps

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "small", ["tiny", "small"], "ADAPT size (models/adapt.py TINY or SMALL).")
flags.DEFINE_list("frames", ["25", "75", "300"], "Max frames K of the rollout.")
flags.DEFINE_list("gradients", ["bptt", "bptt_segment", "implicit", "guided"],
                  "Methods: bptt (no remat), bptt_segment (sqrt(K) segments), implicit, guided.")
flags.DEFINE_integer("unroll_frames", 10, "W of the guided gradient (its BPTT window, no remat).")
flags.DEFINE_integer("batch_size", 8, "Structures per batch (62-64 atoms, padded to 64).")
flags.DEFINE_string("out", "", "Optional JSON file for the rows.")


def si_batch(batch_size: int):
    """(the first ``batch_size`` shipped Si-defect relaxations of <= 64 atoms padded to 64, their normaliser)."""
    trajs = [t for t in load_default_dataset("si_defects") if t.num_atoms <= 64][:batch_size]
    batch = make_relaxation_batch([t.species for t in trajs], [t.initial_positions for t in trajs],
                                  [t.final_positions for t in trajs], [t.cell for t in trajs],
                                  batch_size=batch_size, max_atoms=64)
    return batch, adapt.normalizer_from_trajectories(trajs)


def peak_mb(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes) / 1e6


def step_memory(gradient: str, max_frames: int) -> dict:
    """Compiled memory (MB) of one update of ``gradient`` with ``max_frames`` frames."""
    batch, normalizer = si_batch(FLAGS.batch_size)
    config = dataclasses.replace({"tiny": adapt.TINY, "small": adapt.SMALL}[FLAGS.size], dropout=0.0)
    rule = relax.LearnableStep(0.05)
    params = {"model": adapt.init_params(config, jax.random.PRNGKey(0)), "step_rule": rule.init()}
    remat = "segment" if gradient == "bptt_segment" else "none"
    bptt = steps.BPTTConfig(rollout=relax.RolloutConfig(max_frames=max_frames, stop_rms=0.0, remat=remat))
    method = "bptt" if gradient.startswith("bptt") else gradient
    window = min(FLAGS.unroll_frames, max_frames) if method == "guided" else 0
    gradient_config = implicit_steps.GradientConfig(bptt=bptt, gradient=method, unroll_frames=window)
    trainer = implicit_steps.make_implicit_trainer(adapt.make_force_fn(config, normalizer), rule, gradient_config,
                                                   optim.make_optimizer(optim.OptimConfig(learning_rate=1e-5)))
    state = trainer.init(params, jax.random.PRNGKey(1))
    compiled = trainer.update.lower(state, batch).compile()
    return {"gradient": gradient, "max_frames": max_frames, "unroll_frames": window, "peak_mb": peak_mb(compiled)}


def main(argv):
    del argv
    rows = [step_memory(g, int(k)) for g in FLAGS.gradients for k in FLAGS.frames]
    print(f"ADAPT {FLAGS.size}, {FLAGS.batch_size} x 64 atoms, peak MB (XLA memory analysis)\n")
    print("| gradient | " + " | ".join(f"K={k}" for k in FLAGS.frames) + " |")
    print("|---|" + "---|" * len(FLAGS.frames))
    for g in FLAGS.gradients:
        print(f"| {g} | " + " | ".join(f"{r['peak_mb']:.1f}" for r in rows if r["gradient"] == g) + " |")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
