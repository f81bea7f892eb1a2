"""Force pretraining alone: fit the chosen force model (--model) to every frame's forces and save an orbax checkpoint.

    python -m experiments.pretrain --flagfile=experiments/si_cpu.flags --workdir=runs/pretrain

The saved ``checkpoints/pretrained`` can be passed to the other scripts with --pretrained.
"""

from __future__ import annotations

import time

from absl import flags

from bptt_mlip.data import batching
from bptt_mlip.models import registry
from bptt_mlip.training import evaluate
from experiments import common

FLAGS = flags.FLAGS
common.define_pretrain_flags()


def main(argv):
    del argv
    common.quiet_libraries()
    mesh = common.setup_devices({"pretrain_batch_size": FLAGS.pretrain_batch_size})
    workdir = common.prepare_workdir(FLAGS.workdir, FLAGS.overwrite)
    log = common.metrics_writer(workdir / "metrics.jsonl")
    common.write_json(workdir / "config.json", {"command": common.command_line(), "flags": common.flag_values()})
    trajs, _ = common.load_trajectories(FLAGS.dataset)
    test, val, train_set = common.split(trajs)
    t0 = time.time()
    cfg, normalizer, params, history = common.pretrain_model(train_set, val, log, mesh)
    ff = registry.make_force_fn(cfg, normalizer)
    test_forces = evaluate.evaluate_forces(ff, params, batching.force_batches(test, FLAGS.pretrain_batch_size))
    common.save_pretrained(workdir, cfg, normalizer, params, history, train_set=train_set)
    results = {"test_forces": test_forces, "history": history, "num_params": registry.count_params(params),
               "wall_s": time.time() - t0}
    common.write_json(workdir / "results.json", results)
    common.info(f"test force errors: {test_forces}")
    log.close()


if __name__ == "__main__":
    common.run_main(main)
