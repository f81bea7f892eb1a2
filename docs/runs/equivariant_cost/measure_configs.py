"""Cost of one force call and of one parameter gradient of the force loss (second derivatives) of the
equivariant energy model at four sizes, random weights (the cost does not depend on them), on a batch
of 8 shipped Si-defect structures (72-atom bucket, 522 real atoms), five calls each after a compile.

    python docs/runs/equivariant_cost/measure_configs.py

Output in idle_timings.txt.
"""
import time, sys, jax, jax.numpy as jnp, numpy as np
from bptt_mlip.data import batching, load_default_dataset
from bptt_mlip.models import equivariant as eq
trajs = load_default_dataset("si_defects")[:16]
s = next(iter(batching.relaxation_batches(trajs, 8))).initial
print(s.positions.shape, int(np.asarray(s.mask).sum()))
for cfg in [eq.EquivariantConfig(), eq.EquivariantConfig(cutoff=4.0, capacity=32, avg_neighbours=16.0),
            eq.EquivariantConfig(cutoff=4.0, capacity=32, avg_neighbours=16.0, channels=8),
            eq.EquivariantConfig(cutoff=4.0, capacity=24, avg_neighbours=16.0, channels=8, num_layers=1)]:
    p = eq.init_params(cfg, jax.random.PRNGKey(0))
    f = jax.jit(eq.make_force_fn(cfg, 1.0))
    jax.block_until_ready(f(p, s))
    t = time.time(); [jax.block_until_ready(f(p, s)) for _ in range(5)]; tf = (time.time() - t) / 5
    loss = jax.jit(jax.grad(lambda p: jnp.sum(f(p, s) ** 2)))
    jax.block_until_ready(loss(p))
    t = time.time(); [jax.block_until_ready(loss(p)) for _ in range(5)]; tg = (time.time() - t) / 5
    print(cfg.cutoff, cfg.capacity, cfg.channels, cfg.num_layers, "force %.4f s  grad %.4f s" % (tf, tg), flush=True)
