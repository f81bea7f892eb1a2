"""Generate a relaxation dataset with a reference potential.

Example (the shipped default silicon point-defect set):

  python -m experiments.make_dataset --kind=si_defects --num=240 --seed=0 \
      --oracle=sw --host_size=64 --fmax=0.02 --max_steps=1000 --frame_stride=4 --noxyz \
      --out=bptt_mlip/data/default/si_defects
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from bptt_mlip.data import generator

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", "si_defects", ["si_defects", "crystals"], "Which dataset to generate.")
flags.DEFINE_integer("num", 16, "Number of trajectories.")
flags.DEFINE_integer("seed", 0, "Seed; structure i uses the seed sequence (seed, i, attempt).")
flags.DEFINE_string("out", None, "Output folder.", required=True)
flags.DEFINE_string("oracle", "sw", "Reference potential: sw | tersoff | emt | chgnet; crystals: auto or e.g. emt+sw.")
flags.DEFINE_integer("host_size", 64, "Si host atoms (8 r^3: 64, 216).")
flags.DEFINE_integer("max_steps", 1000, "FIRE step limit; unconverged structures are re-seeded.")
flags.DEFINE_float("fmax", 0.02, "Convergence threshold on the largest per-atom force norm (eV/Å).")
flags.DEFINE_integer("frame_stride", 1, "Store every k-th frame (plus the last).")
flags.DEFINE_bool("xyz", True, "Also write trajectories.extxyz.gz.")


def main(argv):
    del argv
    t0 = time.time()

    def progress(i, n):
        if i % 10 == 0 or i == n:
            print(f"{i}/{n} trajectories, {time.time() - t0:.0f} s", flush=True)

    oracle = FLAGS.oracle
    if FLAGS.kind == "crystals" and oracle == "sw":
        oracle = "auto"
    manifest = generator.generate_and_save(
        FLAGS.kind, FLAGS.num, FLAGS.seed, FLAGS.out, oracle=oracle, host_size=FLAGS.host_size,
        fmax=FLAGS.fmax, max_steps=FLAGS.max_steps, write_xyz=FLAGS.xyz, frame_stride=FLAGS.frame_stride,
        progress=progress,
    )
    print(json.dumps({k: manifest[k] for k in ("statistics", "stored", "exploded", "not_converged", "timing",
                                               "sizes_bytes")}, indent=2))


if __name__ == "__main__":
    app.run(main)
