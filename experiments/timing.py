"""Timing helpers shared by the benchmark scripts (no flags: importable from any of them)."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np


def load_1min() -> float:
    """The machine's 1-minute load average (recorded beside every timing)."""
    return round(os.getloadavg()[0], 2)


def block(x):
    """``jax.block_until_ready``: a timed call must include the device's work."""
    import jax

    return jax.block_until_ready(x)


def timed(fn, repeats: int) -> dict:
    """Median wall time of ``fn()`` (which must block) over ``repeats`` runs after one warm-up."""
    fn()
    times, loads = [], []
    for _ in range(repeats):
        loads.append(load_1min())
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "loadavg": loads}


def dense_matmul(n: int, repeats: int) -> dict:
    """The device's dense float32 rate: an n x n matmul, ``{"n", "median_s", ..., "gflops"}``."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot).lower(a, b).compile()
    t = timed(lambda: block(f(a, b)), max(repeats, 5))
    return {"n": n, **t, "gflops": 2 * n**3 / t["median_s"] / 1e9}


class CompileCounter:
    """Counts XLA backend compiles (JAX's monitoring events) from its creation on; ``reset()`` returns the
    count since the last reset and starts again."""

    def __init__(self):
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def reset(self) -> int:
        count, self.count = self.count, 0
        return count


def interleaved(calls: dict, repeats: int, compiles: CompileCounter) -> dict:
    """Time several calls against each other on a machine whose speed drifts: every call once first (compiles,
    warm-up), then ``repeats`` rounds that time each call in turn, so that a slow spell of the host falls on all
    of them alike.

    Args:
      calls: label -> ``fn()``; its result is blocked on (``jax.block_until_ready``) inside the timing.
      repeats: timed rounds (>= 1).
      compiles: the process's compile counter; XLA compiles inside the timed calls are counted per call.

    Returns:
      label -> (the result of its last call, ``{"wall_s": median seconds, "times_s": every round's seconds,
      "load_1min": the median 1-minute load average before its rounds, "loads_1min": each round's, "compiles":
      compiles inside its timed calls, summed over the rounds}``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    outputs = {label: block(fn()) for label, fn in calls.items()}
    times = {label: [] for label in calls}
    loads = {label: [] for label in calls}
    compiled = dict.fromkeys(calls, 0)
    for _ in range(repeats):
        for label, fn in calls.items():
            loads[label].append(load_1min())
            compiles.reset()
            t0 = time.perf_counter()
            outputs[label] = block(fn())
            times[label].append(time.perf_counter() - t0)
            compiled[label] += compiles.reset()
    return {label: (outputs[label], {"wall_s": statistics.median(times[label]), "times_s": times[label],
                                     "load_1min": statistics.median(loads[label]), "loads_1min": loads[label],
                                     "compiles": compiled[label]})
            for label in calls}


def published_size(model):
    """A :class:`TrainedModel` of the published ADAPT size (d_model 256, d_ff 512, 8 heads, 8 layers) with the
    checkpoint's inputs, statistics and step rule and random weights: its force calls cost what a trained
    published model's do, but it does not relax (time its force calls, not its relaxations)."""
    import dataclasses

    import jax

    from bptt_mlip.models import registry
    from bptt_mlip.workflow import api

    config = dataclasses.replace(model.config, d_model=256, d_ff=512, num_heads=8, num_layers=8)
    params = {"model": registry.init_params(config, jax.random.PRNGKey(0)), "step_rule": model.params["step_rule"]}
    return api.TrainedModel(config, model.normalizer, params, model.step_rule, model.modifiers, model.meta)


def copies_batch(atoms, batch_size: int, buckets: dict, rattle: float = 0.0, seed: int = 0):
    """``(Structures of batch_size copies of atoms (an ASE structure), each rattled by rattle Å with seed,
    padded to its bucket; the bucket's atom count)``; ``buckets``: ``{"buckets": ...}`` or ``{}`` (the
    library's)."""
    from bptt_mlip import structures
    from bptt_mlip.data import batching

    n_bucket = batching.bucket_atoms(len(atoms), **buckets)
    rng = np.random.default_rng(seed)
    positions = [atoms.positions + rng.normal(scale=rattle, size=atoms.positions.shape) for _ in range(batch_size)]
    batch = structures.from_arrays([atoms.get_chemical_symbols()] * batch_size, positions,
                                   [np.asarray(atoms.cell)] * batch_size, max_atoms=n_bucket)
    return batch, n_bucket


def force_call_row(name: str, model, atoms, batch_size: int, repeats: int, buckets: dict) -> dict:
    """One force evaluation of ``atoms`` (an ASE structure) two ways, median of ``repeats`` after a warm-up:
    batched as the relax API calls the model (``batch_size`` rattled copies, one jitted call on the padded bucket)
    and through the library's ASE calculator one structure at a time (the positions move by 1e-4 Å before each
    call, as an optimiser's step would, so that no result is cached). Returns atoms per second of each and their
    ratio: the most the API's batching can gain over ASE's optimisers per force call, whatever the frame counts.
    ``buckets``: ``{"buckets": ...}`` or ``{}`` (the library's), for both paths."""
    import jax

    from bptt_mlip.workflow import calculator

    batch, n_bucket = copies_batch(atoms, batch_size, buckets, rattle=0.01)
    rng = np.random.default_rng(1)
    force_fn = jax.jit(model.force_fn)
    batched = timed(lambda: block(force_fn(model.model_params, batch)), repeats)
    work = atoms.copy()
    work.calc = calculator.BPTTCalculator(model, on_out_of_domain="ignore", **buckets)

    def one_call():
        work.positions = work.positions + rng.normal(scale=1e-4, size=work.positions.shape)
        return work.get_forces()

    single = timed(one_call, repeats)
    rate_batched = batch_size * len(atoms) / batched["median_s"]
    rate_single = len(atoms) / single["median_s"]
    return dict(model=name, params=model.num_params(), atoms=len(atoms), bucket_atoms=n_bucket, batch_size=batch_size,
                batched_call_s=batched["median_s"], calculator_call_s=single["median_s"],
                batched_atoms_per_s=rate_batched, calculator_atoms_per_s=rate_single,
                batched_over_calculator=rate_batched / rate_single)
