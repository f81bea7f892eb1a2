"""Data-parallel BPTT over several processes: a short run whose losses and final parameters are saved.

Every process runs this same script. Each joins the job (``jax.distributed.initialize``), builds
the same model, data and trainer, and passes the same *global* batch; the trainer's mesh spans
every device of every process, each process copies only its devices' rows, and XLA all-reduces
the batch-mean loss and gradients. With ``--num_processes=1`` it is the ordinary single-process
run, which the multi-process run must reproduce (tests/test_distributed.py runs both).

Two processes on one machine over the loopback address (CPU collectives: gloo)::

    python -m experiments.distributed_bptt --num_processes=2 --process_id=0 \\
        --coordinator=127.0.0.1:23456 --out=/tmp/dp/p0.npz &
    python -m experiments.distributed_bptt --num_processes=2 --process_id=1 \\
        --coordinator=127.0.0.1:23456 --out=/tmp/dp/p1.npz

A cluster, one process per host or per accelerator (SLURM; process 0's host is the coordinator)::

    srun --ntasks=$N python -m experiments.distributed_bptt --num_processes=$SLURM_NTASKS \\
        --process_id=$SLURM_PROCID --coordinator=$(scontrol show hostnames | head -1):23456 --out=run/p.npz

The global batch size (--batch_size) must be divisible by the total device count. The same three
calls (``parallel.initialize_distributed``, ``make_bptt_trainer(..., mesh=parallel.make_mesh())``,
the same global batches on every process) make any training script of the library multi-process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags

flags.DEFINE_integer("num_processes", 1, "processes in the job (1 = an ordinary single-process run)")
flags.DEFINE_integer("process_id", 0, "this process's index in [0, num_processes)")
flags.DEFINE_string("coordinator", "127.0.0.1:23456", "host:port of process 0 (when num_processes > 1)")
flags.DEFINE_integer("num_cpu_devices", 1, "CPU devices per process (XLA host platform device count)")
flags.DEFINE_string("dataset", "default:si_defects", "dataset spec (experiments.common.load_trajectories)")
flags.DEFINE_integer("num_trajectories", 8, "training trajectories used (the first ones of the dataset)")
flags.DEFINE_integer("batch_size", 4, "global batch size (divisible by the total device count)")
flags.DEFINE_integer("steps", 3, "BPTT updates")
flags.DEFINE_integer("max_frames", 6, "frames per rollout")
flags.DEFINE_string("out", None, "where to save losses and final parameters (.npz); process 0 also prints them")
FLAGS = flags.FLAGS


def _setup_jax():
    """Import JAX configured for this process (device count before the backend starts, then the job)."""
    import os

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.num_cpu_devices}")
    import jax

    if FLAGS.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from bptt_mlip.training import parallel

        parallel.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    return jax


def run() -> dict[str, np.ndarray]:
    """Losses [steps] and flattened final parameters of a short data-parallel BPTT run."""
    jax = _setup_jax()
    from bptt_mlip.data import batching, datasets
    from bptt_mlip.models import adapt
    from bptt_mlip.relax import scan, step_rules
    from bptt_mlip.training import optim, parallel
    from bptt_mlip.training import steps as train

    trajs = datasets.load_dataset_spec(FLAGS.dataset, max_trajectories=FLAGS.num_trajectories,
                                       report=lambda message: None).trajectories
    normalizer = adapt.normalizer_from_trajectories(trajs)
    cfg = adapt.TINY
    rule = step_rules.LearnableStep(0.01)
    params = {"model": adapt.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": rule.init()}
    config = train.BPTTConfig(rollout=scan.RolloutConfig(max_frames=FLAGS.max_frames, remat="frame"))
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, clip_norm=1.0))
    trainer = train.make_bptt_trainer(adapt.make_force_fn(cfg, normalizer), rule, config, tx,
                                      mesh=parallel.make_mesh())
    state = trainer.init(params, jax.random.PRNGKey(1))
    batches = list(batching.relaxation_batches(trajs, FLAGS.batch_size))
    losses = []
    for i in range(FLAGS.steps):
        state, metrics = trainer.update(state, batches[i % len(batches)])
        losses.append(float(parallel.fetch(metrics)["loss"]))
    leaves = jax.tree_util.tree_leaves(parallel.fetch(state.params))
    return {"losses": np.asarray(losses), "params": np.concatenate([np.ravel(x) for x in leaves]),
            "process_count": np.asarray(jax.process_count()), "device_count": np.asarray(jax.device_count())}


def main(argv):
    del argv
    result = run()
    if FLAGS.out:
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        np.savez(FLAGS.out, **result)
    if FLAGS.process_id == 0:
        print(f"processes {int(result['process_count'])}, devices {int(result['device_count'])}, "
              f"losses {np.array2string(result['losses'], precision=6)}")


if __name__ == "__main__":
    app.run(main)
