"""Cost of the equivariant energy model on CPU: one force call, a 75-frame forward relaxation and FIRE
on a batch of 8 shipped Si-defect structures (compile + first call, then a second call).

    python docs/runs/equivariant_cost/measure.py CHECKPOINT
"""

import sys
import time

import jax
import numpy as np

from bptt_mlip.data import batching, load_default_dataset
from bptt_mlip.relax import fire, forward, scan, step_rules
from bptt_mlip.workflow import api

m = api.TrainedModel.load(sys.argv[1])  # a checkpoint of the equivariant model
print(m.kind, m.config)
trajs = load_default_dataset("si_defects")[:8]
s = next(iter(batching.relaxation_batches(trajs, 8))).initial
f = jax.jit(m.force_fn)
t = time.time(); jax.block_until_ready(f(m.model_params, s)); print("force compile+run", time.time() - t)
t = time.time(); [jax.block_until_ready(f(m.model_params, s)) for _ in range(5)]
print("force call x8 rows", (time.time() - t) / 5)
rule = step_rules.FixedStep(0.04)
params = {"model": m.model_params, "step_rule": rule.init()}
rc = scan.RolloutConfig(max_frames=75, stop_rms=1e-3)
run = jax.jit(lambda p, s: forward.relax_until_done(m.force_fn, rule, p, s, rollout_config=rc))
t = time.time(); r = jax.block_until_ready(run(params, s)); print("rollout compile+run", time.time() - t, np.asarray(r.num_frames))
t = time.time(); r = jax.block_until_ready(run(params, s)); print("rollout run", time.time() - t)
runner = jax.jit(fire.make_fire_runner(m.force_fn, fire.FireConfig(fmax=0.0187, max_steps=500)))
t = time.time(); e = jax.block_until_ready(runner(m.model_params, s))
print("fire compile+run", time.time() - t, np.asarray(e.state.num_frames))
t = time.time(); e = jax.block_until_ready(runner(m.model_params, s)); print("fire run", time.time() - t)
