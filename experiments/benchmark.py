"""Performance benchmark: BPTT step time and memory vs trajectory length and remat, the vmapped
step-size grid search vs a Python loop, relaxation throughput, achieved FLOP/s vs a dense matmul,
and the bfloat16 matmul option.

    python -m experiments.benchmark --quick --out_dir=runs/benchmark_quick     # a few minutes
    python -m experiments.benchmark --out_dir=runs/benchmark                   # full tables

Writes ``results.json`` and ``results.md`` to ``--out_dir`` and prints the Markdown.

How things are measured (see docs/performance.md):

* times exclude compilation (every function is compiled once with ``.lower().compile()`` and the
  compiled executable is run); each time is the median of ``--repeats`` runs after one warm-up,
  and the 1-minute load average is recorded next to it;
* memory is XLA's compiled memory analysis (temp + argument + output - aliased bytes), which
  needs only compiling; with ``--rss`` a fresh subprocess per configuration also reports the
  process's peak RSS (ru_maxrss: includes the JAX runtime and the compiler's own memory);
* FLOPs come from ``compiled.cost_analysis()``. XLA counts a ``while`` (``lax.scan``) body once,
  not times its trip count, so the step's FLOPs are ``opt + K * (cost - opt)`` with ``opt`` the
  optimiser update's own count. "model FLOPs" use the no-remat cost (no recomputation counted),
  "executed FLOPs" the cost of the remat mode actually run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments import timing

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Reduced sizes (a few minutes on 2 CPU cores); overrides the size flags below.")
flags.DEFINE_list("sizes", ["small", "published"], "Model sizes: small (bptt_mlip.model.SMALL), published (PUBLISHED).")
flags.DEFINE_list("frames", ["25", "75", "150", "300"], "Trajectory lengths K for the small model.")
flags.DEFINE_list("published_frames", ["25", "75", "150", "300"], "Trajectory lengths K for the published model.")
flags.DEFINE_list("remats", ["none", "frame", "segment"], "Remat modes (small model).")
flags.DEFINE_list("published_remats", ["none", "frame", "segment"], "Remat modes (published model).")
flags.DEFINE_integer("time_max_frames_small", 300, "Time BPTT steps of the small model up to this K (memory for all).")
flags.DEFINE_integer("time_max_frames_published", 75, "Time BPTT steps of the published model up to this K (memory for all).")
flags.DEFINE_list("time_remats_published", ["frame"], "Remat modes whose published-size steps are timed.")
flags.DEFINE_integer("batch_size", 4, "Structures per BPTT batch (Si defects, 62-64 atoms, padded to 64).")
flags.DEFINE_integer("repeats", 3, "Timed repeats per measurement (median reported).")
flags.DEFINE_integer("grid_steps", 32, "Step sizes in the grid-search comparison.")
flags.DEFINE_integer("grid_frames", 25, "Frames per rollout in the grid-search comparison.")
flags.DEFINE_list("grid_sizes", ["small", "published"], "Model sizes for the grid-search comparison.")
flags.DEFINE_list("grid_batch_sizes", ["1", "4"], "Structures per rollout in the grid-search comparison.")
flags.DEFINE_list("grid_chunk_sizes", ["4", "8"], "Also time search.make_grid_search(chunk_size=c): c step sizes vmapped "
                  "at a time inside the one compiled call (lax.map); bounds memory and cache footprint.")
flags.DEFINE_list("throughput_batches", ["1", "4", "16"], "Batch sizes of the forward-rollout throughput.")
flags.DEFINE_integer("throughput_frames", 25, "Frames per rollout in the throughput measurement.")
flags.DEFINE_list("throughput_sizes", ["small", "published"], "Model sizes for the throughput measurement.")
flags.DEFINE_integer("matmul_size", 2048, "n of the n x n float32 matmul that measures the device's dense rate.")
flags.DEFINE_bool("rss", False, "Also measure peak RSS in a fresh subprocess per BPTT configuration (slow).")
flags.DEFINE_list("rss_sizes", ["small"], "Sizes measured with --rss.")
flags.DEFINE_bool("bf16", True, "Compare matmul_dtype='bfloat16' with float32 (Dq of rollouts, step time).")
flags.DEFINE_integer("bf16_pretrain_epochs", 4, "Force-pretraining epochs of the small model used for the bf16 Dq check.")
flags.DEFINE_integer("bf16_structures", 8, "Si-defect structures relaxed for the bf16 Dq check.")
flags.DEFINE_integer("bf16_frames", 75, "Frames of the bf16 Dq check rollouts.")
flags.DEFINE_string("bf16_checkpoint", "", "A trained model checkpoint (e.g. a finetune run's checkpoints/bptt_best): "
                    "its relaxations of every shipped Si-defect structure in float32 vs bfloat16 matmuls (section "
                    "bf16_checkpoint, run when this is set).")
flags.DEFINE_integer("bf16_checkpoint_frames", 75, "Frames of the checkpoint's float32 / bfloat16 relaxations.")
flags.DEFINE_list("sections", ["matmul", "bptt", "grid", "throughput", "bf16", "bf16_checkpoint"], "Which parts to run.")
flags.DEFINE_string("out_dir", "runs/benchmark", "Where results.json and results.md go.")
flags.DEFINE_string("rss_child", "", "Internal: 'size:K:remat' measures one configuration and prints JSON.")


_load = timing.load_1min


def machine_info() -> dict:
    import jax

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
        "command": " ".join(["python -m experiments.benchmark"] + sys.argv[1:]),
    }


timed = timing.timed
_block = timing.block


# --------------------------------------------------------------------------- setup


def model_config(size: str, matmul_dtype: str = "float32"):
    import dataclasses

    from bptt_mlip.models import adapt as model

    base = {"small": model.SMALL, "published": model.PUBLISHED}[size]
    return dataclasses.replace(base, matmul_dtype=matmul_dtype, dropout=0.0)


_CACHE: dict = {}


def si_data():
    if "trajs" not in _CACHE:
        from bptt_mlip.data import load_default_dataset
        from bptt_mlip.models.adapt import normalizer_from_trajectories

        trajs = [t for t in load_default_dataset("si_defects") if t.num_atoms <= 64]
        _CACHE["trajs"] = trajs
        _CACHE["normalizer"] = normalizer_from_trajectories(trajs)
    return _CACHE["trajs"], _CACHE["normalizer"]


def si_batch(batch_size: int, offset: int = 0):
    from bptt_mlip.data.batching import make_relaxation_batch

    trajs, _ = si_data()
    sel = [trajs[(offset + i) % len(trajs)] for i in range(batch_size)]
    return make_relaxation_batch(
        [t.species for t in sel], [t.initial_positions for t in sel], [t.final_positions for t in sel],
        [t.cell for t in sel], batch_size=batch_size, max_atoms=64,
    )


def bptt_setup(size: str, k: int, remat: str, batch_size: int, matmul_dtype: str = "float32", params=None):
    """(jitted BPTT update, state, batch, optimizer) for one configuration."""
    import jax

    from bptt_mlip.models import adapt as model
    from bptt_mlip.training import optim
    from bptt_mlip.relax import scan as relax
    from bptt_mlip.relax import step_rules
    from bptt_mlip.training import steps as train

    _, norm = si_data()
    cfg = model_config(size, matmul_dtype)
    force_fn = model.make_force_fn(cfg, norm)
    step_rule = step_rules.LearnableStep(0.05)
    if params is None:
        params = {"model": model.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": step_rule.init()}
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-5, clip_norm=1.0))
    bcfg = train.BPTTConfig(rollout=relax.RolloutConfig(max_frames=k, stop_rms=0.0, remat=remat))
    trainer = train.make_bptt_trainer(force_fn, step_rule, bcfg, tx)
    state = trainer.init(params, jax.random.PRNGKey(1))
    batch = si_batch(batch_size)
    return trainer.update, state, batch, tx


def optimizer_flops(tx, params) -> float:
    import jax

    opt_state = tx.init(params)
    c = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(params, opt_state, params).compile()
    return float(_cost(c).get("flops", 0.0))


def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "temp_mb": m.temp_size_in_bytes / 1e6,
        "argument_mb": m.argument_size_in_bytes / 1e6,
        "output_mb": m.output_size_in_bytes / 1e6,
        "alias_mb": m.alias_size_in_bytes / 1e6,
    }
    out["peak_mb"] = out["temp_mb"] + out["argument_mb"] + out["output_mb"] - out["alias_mb"]
    return out


# --------------------------------------------------------------------------- sections


bench_matmul = timing.dense_matmul


def bench_bptt(size: str, frames: list[int], remats: list[str], time_max: int, time_remats, batch_size: int, repeats: int,
               rss: bool) -> list[dict]:
    import jax

    rows = []
    opt_flops = None
    none_cost = None
    if "none" not in remats:
        # XLA counts the scan body once, so the no-remat (model) FLOPs per frame come from a
        # compile at any K; compiled for its cost analysis only, never run
        step, state, batch, tx = bptt_setup(size, min(frames), "none", batch_size)
        opt_flops = optimizer_flops(tx, state.params)
        none_cost = float(_cost(step.lower(state, batch).compile()).get("flops", 0.0))
        jax.clear_caches()
    for k in frames:
        for remat in remats:
            step, state, batch, tx = bptt_setup(size, k, remat, batch_size)
            if opt_flops is None:
                opt_flops = optimizer_flops(tx, state.params)
            t0 = time.perf_counter()
            compiled = step.lower(state, batch).compile()
            row = {"size": size, "frames": k, "remat": remat, "batch_size": batch_size,
                   "compile_s": time.perf_counter() - t0, "compile_loadavg": _load(), **memory(compiled)}
            cost = float(_cost(compiled).get("flops", 0.0))
            if remat == "none":
                none_cost = cost
            row["executed_gflop"] = (opt_flops + k * (cost - opt_flops)) / 1e9
            if none_cost is not None:
                row["model_gflop"] = (opt_flops + k * (none_cost - opt_flops)) / 1e9
            if k <= time_max and (time_remats is None or remat in time_remats):
                t = timed(lambda: _block(compiled(state, batch)), repeats)
                row.update({"step_s": t["median_s"], "step_times_s": t["times_s"], "step_loadavg": t["loadavg"]})
                row["executed_gflops_per_s"] = row["executed_gflop"] / t["median_s"]
                if "model_gflop" in row:
                    row["model_gflops_per_s"] = row["model_gflop"] / t["median_s"]
            if rss:
                row.update(rss_subprocess(size, k, remat, batch_size))
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()
                              if not isinstance(v, list)}), flush=True)
            rows.append(row)
            compiled = None  # free the executable before the next shape
            jax.clear_caches()
    # model FLOPs of rows compiled before the none row of the same K
    for r in rows:
        if "model_gflop" not in r and none_cost is not None:
            r["model_gflop"] = (opt_flops + r["frames"] * (none_cost - opt_flops)) / 1e9
            if "step_s" in r:
                r["model_gflops_per_s"] = r["model_gflop"] / r["step_s"]
    return rows


def rss_subprocess(size: str, k: int, remat: str, batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "experiments.benchmark", f"--rss_child={size}:{k}:{remat}", f"--batch_size={batch_size}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
        return {"rss_error": str(e)[:200]}


def peak_rss_mb() -> float:
    """This process's peak resident set size (MB).

    Read from ``VmHWM`` in /proc/self/status, which starts afresh at ``exec``. (``getrusage``'s
    ``ru_maxrss`` does not on Linux: a child started by ``subprocess`` reports at least the
    parent's RSS at fork time, which is what an earlier version of this script measured.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(spec: str, batch_size: int) -> None:
    size, k, remat = spec.split(":")
    step, state, batch, _ = bptt_setup(size, int(k), remat, batch_size)
    base = peak_rss_mb()
    compiled = step.lower(state, batch).compile()
    after_compile = peak_rss_mb()
    _block(compiled(state, batch))
    peak = peak_rss_mb()
    print(json.dumps({"rss_setup_mb": base, "rss_after_compile_mb": after_compile, "rss_peak_mb": peak}))


def bench_grid(size: str, steps: int, k: int, batch_size: int, repeats: int, chunk_sizes=()) -> dict:
    import jax
    import jax.numpy as jnp

    from bptt_mlip import losses
    from bptt_mlip.models import adapt as model
    from bptt_mlip.relax import scan as relax
    from bptt_mlip.relax import step_rules
    from bptt_mlip.relax import grid as search

    _, norm = si_data()
    cfg = model_config(size)
    force_fn = model.make_force_fn(cfg, norm)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    batch = si_batch(batch_size)
    rc = relax.RolloutConfig(max_frames=k, stop_rms=0.0)
    etas = jnp.linspace(0.005, 0.1, steps, dtype=jnp.float32)
    t0 = time.perf_counter()
    grid = search.make_grid_search(force_fn, rc).lower(params, batch, etas).compile()
    grid_compile = time.perf_counter() - t0
    fixed = step_rules.FixedStep()  # its step size is the traced parameter eta, as in the grid search

    def single(p, b, eta):
        s = b.initial
        res = relax.rollout(force_fn, fixed, {"model": p, "step_rule": {"eta": eta}}, s, relax.FrameModifiers(), rc)
        return losses.delta_q(res.positions, b.target_positions, s.masses, s.mask)

    t0 = time.perf_counter()
    one = jax.jit(single).lower(params, batch, etas[0]).compile()
    loop_compile = time.perf_counter() - t0
    # same numbers both ways
    ref = grid(params, batch, etas).dq
    loop_dq = jnp.stack([one(params, batch, e) for e in etas])
    max_diff = float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(ref), ref - loop_dq, 0.0))))
    tv = timed(lambda: _block(grid(params, batch, etas).dq), repeats)
    tl = timed(lambda: _block([one(params, batch, e) for e in etas]), repeats)
    out = {"size": size, "step_sizes": steps, "frames": k, "batch_size": batch_size,
           "vmapped_s": tv["median_s"], "vmapped_times_s": tv["times_s"], "vmapped_loadavg": tv["loadavg"],
           "loop_s": tl["median_s"], "loop_times_s": tl["times_s"], "loop_loadavg": tl["loadavg"],
           "speedup": tl["median_s"] / tv["median_s"], "vmapped_compile_s": grid_compile,
           "loop_compile_s": loop_compile, "max_abs_dq_diff": max_diff}
    for c in chunk_sizes:
        chunked = search.make_grid_search(force_fn, rc, chunk_size=c).lower(params, batch, etas).compile()
        diff = float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(ref), ref - chunked(params, batch, etas).dq, 0.0))))
        tc = timed(lambda: _block(chunked(params, batch, etas).dq), repeats)
        out.setdefault("chunked", []).append({"chunk_size": c, "s": tc["median_s"], "times_s": tc["times_s"],
                                              "loadavg": tc["loadavg"], "speedup": tl["median_s"] / tc["median_s"],
                                              "max_abs_dq_diff": diff})
    print(json.dumps({a: b for a, b in out.items() if not isinstance(b, list)}), flush=True)
    return out


def bench_throughput(size: str, batches: list[int], k: int, repeats: int) -> list[dict]:
    import jax

    from bptt_mlip.models import adapt as model
    from bptt_mlip.relax import scan as relax
    from bptt_mlip.relax import step_rules

    _, norm = si_data()
    cfg = model_config(size)
    force_fn = model.make_force_fn(cfg, norm)
    fixed = step_rules.FixedStep(0.05)
    params = {"model": model.init_params(cfg, jax.random.PRNGKey(0)), "step_rule": fixed.init()}
    rc = relax.RolloutConfig(max_frames=k, stop_rms=0.0)
    rows = []
    for b in batches:
        batch = si_batch(b)
        fn = jax.jit(lambda p, s: relax.rollout(force_fn, fixed, p, s, relax.FrameModifiers(), rc).positions)
        compiled = fn.lower(params, batch.initial).compile()
        t = timed(lambda: _block(compiled(params, batch.initial)), repeats)
        atoms = int(batch.initial.mask.sum())
        row = {"size": size, "batch_size": b, "frames": k, "real_atoms": atoms, "rollout_s": t["median_s"],
               "times_s": t["times_s"], "loadavg": t["loadavg"],
               "atom_frames_per_s": atoms * k / t["median_s"],
               "gflops_per_s": float(_cost(compiled).get("flops", 0.0)) * k / t["median_s"] / 1e9}
        print(json.dumps({a: c for a, c in row.items() if not isinstance(c, list)}), flush=True)
        rows.append(row)
    return rows


def bench_bf16(pretrain_epochs: int, n_structures: int, k: int, repeats: int, sizes: list[str], time_frames: int,
               batch_size: int) -> dict:
    """Same (briefly force-pretrained) small-model parameters relaxed in float32 and bf16 matmuls."""
    import dataclasses

    import jax
    import numpy as np

    from bptt_mlip import losses
    from bptt_mlip.training import loops
    from bptt_mlip.models import adapt as model
    from bptt_mlip.training import optim
    from bptt_mlip.relax import scan as relax
    from bptt_mlip.relax import step_rules
    from bptt_mlip.training import steps as train

    trajs, norm = si_data()
    cfg32 = dataclasses.replace(model.SMALL, input_encoding="xyz+fourier")
    cfg16 = dataclasses.replace(cfg32, matmul_dtype="bfloat16")
    params = model.init_params(cfg32, jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    pre_trajs = trajs[n_structures:]
    from bptt_mlip.data.curation import subsample_frames

    pre_trajs = [subsample_frames(t, 4) for t in pre_trajs]
    params, hist = loops.pretrain(
        train.deterministic(model.make_force_fn(cfg32, norm)), model.make_force_fn(cfg32, norm), params, pre_trajs, [],
        epochs=pretrain_epochs, batch_size=32, optim_config=optim.OptimConfig(learning_rate=5e-4, clip_norm=1.0),
    )
    pretrain_s = time.perf_counter() - t0
    fixed = step_rules.FixedStep(0.05)
    p = {"model": params, "step_rule": fixed.init()}
    rc = relax.RolloutConfig(max_frames=k, stop_rms=1e-3)
    batch = si_batch(n_structures)
    s = batch.initial
    ends = {}
    for name, cfg in (("float32", cfg32), ("bfloat16", cfg16)):
        ff = model.make_force_fn(cfg, norm)
        res = jax.jit(lambda p_, s_: relax.rollout(ff, fixed, p_, s_, relax.FrameModifiers(), rc))(p, s)
        ends[name] = res
    f32, b16 = ends["float32"], ends["bfloat16"]
    dq32 = np.asarray(losses.delta_q(f32.positions, batch.target_positions, s.masses, s.mask))
    dq16 = np.asarray(losses.delta_q(b16.positions, batch.target_positions, s.masses, s.mask))
    dq_between = np.asarray(losses.delta_q(b16.positions, f32.positions, s.masses, s.mask))
    dq0 = np.asarray(losses.delta_q(s.positions, batch.target_positions, s.masses, s.mask))
    f_32 = model.make_force_fn(cfg32, norm)(params, s)
    f_16 = model.make_force_fn(cfg16, norm)(params, s)
    mask = np.asarray(s.mask)
    force_rel = float(np.linalg.norm(np.asarray(f_16 - f_32)[mask]) / np.linalg.norm(np.asarray(f_32)[mask]))
    out = {
        "pretrain_epochs": pretrain_epochs, "pretrain_s": pretrain_s,
        "pretrain_final_rmse": hist[-1].get("train_force_rmse") if hist else None,
        "structures": n_structures, "frames": k, "stop_rms": 1e-3, "step": 0.05,
        "dq_initial_mean": float(dq0.mean()),
        "dq_float32_mean": float(dq32.mean()), "dq_bfloat16_mean": float(dq16.mean()),
        "dq_float32_vs_bfloat16_mean": float(dq_between.mean()), "dq_float32_vs_bfloat16_max": float(dq_between.max()),
        "frames_float32": np.asarray(f32.num_frames).tolist(), "frames_bfloat16": np.asarray(b16.num_frames).tolist(),
        "force_relative_l2_diff": force_rel,
        "timing": [],
    }
    for size in sizes:
        for name in ("float32", "bfloat16"):
            step, state, b, _ = bptt_setup(size, time_frames, "frame", batch_size, matmul_dtype=name)
            compiled = step.lower(state, b).compile()
            t = timed(lambda: _block(compiled(state, b)), repeats)
            out["timing"].append({"size": size, "matmul_dtype": name, "frames": time_frames, "remat": "frame",
                                  "batch_size": batch_size, "step_s": t["median_s"], "times_s": t["times_s"],
                                  "loadavg": t["loadavg"]})
            print(json.dumps(out["timing"][-1]), flush=True)
    print(json.dumps({a: c for a, c in out.items() if a != "timing"}), flush=True)
    return out


def bench_bf16_checkpoint(path: str, max_frames: int, batch_size: int) -> dict:
    """Relax every shipped Si-defect structure with a trained checkpoint, float32 vs bfloat16
    matmuls, same parameters and step rule; per-structure Dq to the reference end points and
    Dq between the two end points (amu^0.5 Å)."""
    import dataclasses

    import jax
    import numpy as np

    from bptt_mlip import losses
    from bptt_mlip.models import adapt as model
    from bptt_mlip.relax import scan as relax
    from bptt_mlip.relax import step_rules
    from bptt_mlip.data import batching, load_default_dataset
    from bptt_mlip.workflow import model_io

    cfg, norm, params, meta = model_io.load_model(path)
    cfg32 = dataclasses.replace(cfg, matmul_dtype="float32")
    step_rule, modifiers, step_params = step_rules.step_rule_from_checkpoint(
        model_io.saved_step_rule(meta), params.get("step_rule"), norm)
    params = {**params, "step_rule": step_params}
    rc = relax.RolloutConfig(max_frames=max_frames, stop_rms=1e-3)
    trajs = load_default_dataset("si_defects")
    runs = {}
    for name in ("float32", "bfloat16"):
        ff = model.make_force_fn(dataclasses.replace(cfg32, matmul_dtype=name), norm)
        runs[name] = jax.jit(lambda p, s, ff=ff: relax.rollout(ff, step_rule, p, s, modifiers, rc))
    rows: dict[str, list] = {}
    t = {"float32": 0.0, "bfloat16": 0.0}
    warm: set = set()
    for batch in batching.relaxation_batches(trajs, batch_size):
        s = batch.initial
        real = np.asarray(batch.weight) > 0
        ends = {}
        for name, fn in runs.items():
            if (name, s.positions.shape) not in warm:  # compile each bucket once, outside the timing
                jax.block_until_ready(fn(params, s))
                warm.add((name, s.positions.shape))
            t0 = time.perf_counter()
            ends[name] = jax.block_until_ready(fn(params, s))
            t[name] += time.perf_counter() - t0
            rows.setdefault(f"dq_{name}", []).append(
                np.asarray(losses.delta_q(ends[name].positions, batch.target_positions, s.masses, s.mask))[real])
            rows.setdefault(f"frames_{name}", []).append(np.asarray(ends[name].num_frames)[real])
            rows.setdefault(f"converged_{name}", []).append(np.asarray(ends[name].converged)[real])
        rows.setdefault("dq_between", []).append(np.asarray(losses.delta_q(
            ends["bfloat16"].positions, ends["float32"].positions, s.masses, s.mask))[real])
        rows.setdefault("dq_initial", []).append(
            np.asarray(losses.delta_q(s.positions, batch.target_positions, s.masses, s.mask))[real])
    r = {k: np.concatenate(v) for k, v in rows.items()}
    diff = r["dq_bfloat16"] - r["dq_float32"]
    out = {"checkpoint": str(path), "structures": int(r["dq_float32"].size), "frames": max_frames, "stop_rms": 1e-3,
           "step_config": meta["step_config"], "model_config": meta["model_config"],
           "dq_initial_mean": float(r["dq_initial"].mean()),
           "dq_float32_mean": float(r["dq_float32"].mean()), "dq_bfloat16_mean": float(r["dq_bfloat16"].mean()),
           "dq_change_mean": float(diff.mean()), "dq_change_abs_mean": float(np.abs(diff).mean()),
           "dq_change_abs_max": float(np.abs(diff).max()),
           "dq_between_mean": float(r["dq_between"].mean()), "dq_between_max": float(r["dq_between"].max()),
           "converged_float32": int(r["converged_float32"].sum()), "converged_bfloat16": int(r["converged_bfloat16"].sum()),
           "mean_frames_float32": float(r["frames_float32"].mean()),
           "mean_frames_bfloat16": float(r["frames_bfloat16"].mean()),
           "relax_s_float32": t["float32"], "relax_s_bfloat16": t["bfloat16"]}
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
    return out


# --------------------------------------------------------------------------- report


def _f(x, nd=3):
    if x is None or x == "":
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Benchmark ({m['cpu']}, {m['cores']} cores, {m['device']}, jax {m['jax']})", "",
             f"Command: `{m['command']}`  ", f"Load average at start: {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}", ""]
    if "matmul" in res:
        mm = res["matmul"]
        lines += [f"Dense float32 matmul {mm['n']}x{mm['n']}: **{mm['gflops']:.1f} GFLOP/s** "
                  f"(median {mm['median_s'] * 1e3:.1f} ms; load {mm['loadavg']})", ""]
    if res.get("bptt"):
        lines += ["## BPTT step vs trajectory length and remat", "",
                  "| size | K | remat | step s | load | XLA peak MB | temp MB | RSS peak MB | executed GFLOP | "
                  "model GFLOP/s | model % of matmul | executed GFLOP/s | executed % of matmul |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        mm = res.get("matmul", {}).get("gflops")

        def pct(r, key):
            return f"{100 * r[key] / mm:.0f}%" if mm and key in r else "-"

        for r in res["bptt"]:
            load = _f(statistics.median(r["step_loadavg"])) if "step_loadavg" in r else "-"
            lines.append(f"| {r['size']} | {r['frames']} | {r['remat']} | {_f(r.get('step_s'))} | {load} | "
                         f"{_f(r.get('peak_mb'), 4)} | {_f(r.get('temp_mb'), 4)} | {_f(r.get('rss_peak_mb'), 4)} | "
                         f"{_f(r.get('executed_gflop'))} | {_f(r.get('model_gflops_per_s'))} | "
                         f"{pct(r, 'model_gflops_per_s')} | {_f(r.get('executed_gflops_per_s'))} | "
                         f"{pct(r, 'executed_gflops_per_s')} |")
        lines += ["", "model FLOPs: one forward + backward per frame (no recomputation); executed FLOPs: what "
                  "the remat mode runs (frame: +1 forward, segment: +2)", ""]
    if res.get("grid"):
        lines += ["## Step-size grid search: one vmapped call vs a Python loop of jitted rollouts", "",
                  "| size | step sizes | K | B | vmapped s | loop s | speedup | load (vmap / loop) | max |dDq| |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for g in res["grid"]:
            lines.append(f"| {g['size']} | {g['step_sizes']} | {g['frames']} | {g['batch_size']} | {_f(g['vmapped_s'])} | "
                         f"{_f(g['loop_s'])} | **{g['speedup']:.2f}x** | {_f(statistics.median(g['vmapped_loadavg']))} / "
                         f"{_f(statistics.median(g['loop_loadavg']))} | {_f(g['max_abs_dq_diff'])} |")
        lines.append("")
        chunked = [(g, c) for g in res["grid"] for c in g.get("chunked", [])]
        if chunked:
            lines += ["Chunked (`make_grid_search(chunk_size=c)`: c step sizes vmapped at a time, still one call):", "",
                      "| size | B | chunk | s | speedup vs loop | max |dDq| |", "|---|---|---|---|---|---|"]
            for g, c in chunked:
                lines.append(f"| {g['size']} | {g['batch_size']} | {c['chunk_size']} | {_f(c['s'])} | "
                             f"{c['speedup']:.2f}x | {_f(c['max_abs_dq_diff'])} |")
            lines.append("")
    if res.get("throughput"):
        lines += ["## Relaxation throughput (forward rollout, jitted, batched)", "",
                  "| size | B | K | real atoms | rollout s | atom-frames/s | GFLOP/s | load |", "|---|---|---|---|---|---|---|---|"]
        for r in res["throughput"]:
            lines.append(f"| {r['size']} | {r['batch_size']} | {r['frames']} | {r['real_atoms']} | {_f(r['rollout_s'])} | "
                         f"{r['atom_frames_per_s']:.0f} | {_f(r['gflops_per_s'])} | {_f(statistics.median(r['loadavg']))} |")
        lines.append("")
    if res.get("bf16"):
        b = res["bf16"]
        lines += ["## bfloat16 matmuls (`AdaptConfig(matmul_dtype='bfloat16')`)", "",
                  f"Small model (xyz+fourier) force-pretrained {b['pretrain_epochs']} epochs; {b['structures']} Si-defect "
                  f"structures relaxed with fixed step {b['step']}, at most {b['frames']} frames, stop_rms {b['stop_rms']}.", "",
                  "| quantity | value |", "|---|---|",
                  f"| mean Dq start -> reference | {b['dq_initial_mean']:.4f} |",
                  f"| mean Dq float32 end -> reference | {b['dq_float32_mean']:.4f} |",
                  f"| mean Dq bfloat16 end -> reference | {b['dq_bfloat16_mean']:.4f} |",
                  f"| mean / max Dq between float32 and bfloat16 end points | {b['dq_float32_vs_bfloat16_mean']:.4f} / {b['dq_float32_vs_bfloat16_max']:.4f} |",
                  f"| relative L2 force difference (start structures) | {b['force_relative_l2_diff']:.2e} |", "",
                  "| size | matmul dtype | K | remat | B | step s | load |", "|---|---|---|---|---|---|---|"]
        for t in b["timing"]:
            lines.append(f"| {t['size']} | {t['matmul_dtype']} | {t['frames']} | {t['remat']} | {t['batch_size']} | "
                         f"{_f(t['step_s'])} | {_f(statistics.median(t['loadavg']))} |")
        lines.append("")
    if res.get("bf16_checkpoint"):
        c = res["bf16_checkpoint"]
        lines += ["## bfloat16 matmuls with a trained checkpoint", "",
                  f"`{c['checkpoint']}`: every shipped Si-defect structure ({c['structures']}) relaxed with the "
                  f"checkpoint's step rule, at most {c['frames']} frames, stop_rms {c['stop_rms']}; same parameters.", "",
                  "| quantity | float32 | bfloat16 |", "|---|---|---|",
                  f"| mean Dq end -> reference | {c['dq_float32_mean']:.4f} | {c['dq_bfloat16_mean']:.4f} |",
                  f"| converged | {c['converged_float32']} | {c['converged_bfloat16']} |",
                  f"| mean frames | {c['mean_frames_float32']:.2f} | {c['mean_frames_bfloat16']:.2f} |",
                  f"| relaxation time s (sum of batches) | {c['relax_s_float32']:.2f} | {c['relax_s_bfloat16']:.2f} |", "",
                  f"Mean Dq start -> reference {c['dq_initial_mean']:.4f}; per-structure Dq change bf16 - f32: mean "
                  f"{c['dq_change_mean']:+.4f}, mean |.| {c['dq_change_abs_mean']:.4f}, max |.| {c['dq_change_abs_max']:.4f}; "
                  f"Dq between the float32 and bfloat16 end points: mean {c['dq_between_mean']:.4f}, max "
                  f"{c['dq_between_max']:.4f}.", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.rss_child:
        rss_child(FLAGS.rss_child, FLAGS.batch_size)
        return
    if FLAGS.quick:
        FLAGS.frames = ["75", "300"]
        FLAGS.published_frames = ["25"]
        FLAGS.published_remats = ["frame"]
        FLAGS.remats = ["none", "frame", "segment"]
        FLAGS.time_max_frames_small = 300
        FLAGS.time_max_frames_published = 25
        FLAGS.repeats = min(FLAGS.repeats, 2)
        FLAGS.grid_frames = 10
        FLAGS.grid_sizes = ["small"]
        FLAGS.grid_batch_sizes = [str(FLAGS.batch_size)]
        FLAGS.throughput_frames = 10
        FLAGS.throughput_sizes = ["small"]
        FLAGS.throughput_batches = ["1", "8"]
        FLAGS.bf16_pretrain_epochs = 2
        FLAGS.bf16_frames = 50
    out_dir = Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict = {"machine": machine_info(), "flags": {f: getattr(FLAGS, f) for f in (
        "quick", "sizes", "frames", "published_frames", "remats", "batch_size", "repeats", "grid_steps", "grid_frames",
        "grid_sizes", "grid_batch_sizes", "grid_chunk_sizes",
        "throughput_batches", "throughput_frames", "matmul_size")}}

    def save():
        res["wall_s"] = time.perf_counter() - t_start
        (out_dir / "results.json").write_text(json.dumps(res, indent=1))
        (out_dir / "results.md").write_text(markdown(res))

    if "matmul" in FLAGS.sections:
        res["matmul"] = bench_matmul(FLAGS.matmul_size, FLAGS.repeats)
        print(json.dumps({k: v for k, v in res["matmul"].items() if not isinstance(v, list)}), flush=True)
        save()
    if "bptt" in FLAGS.sections:
        res["bptt"] = []
        for size in FLAGS.sizes:
            frames = [int(k) for k in (FLAGS.frames if size == "small" else FLAGS.published_frames)]
            tmax = FLAGS.time_max_frames_small if size == "small" else FLAGS.time_max_frames_published
            tremats = None if size == "small" else FLAGS.time_remats_published
            remats = FLAGS.remats if size == "small" else FLAGS.published_remats
            res["bptt"] += bench_bptt(size, frames, remats, tmax, tremats, FLAGS.batch_size, FLAGS.repeats,
                                      FLAGS.rss and size in FLAGS.rss_sizes)
            save()
    if "grid" in FLAGS.sections:
        res["grid"] = [bench_grid(s, FLAGS.grid_steps, FLAGS.grid_frames, int(b), FLAGS.repeats,
                                  [int(c) for c in FLAGS.grid_chunk_sizes])
                       for s in FLAGS.grid_sizes for b in FLAGS.grid_batch_sizes]
        save()
    if "throughput" in FLAGS.sections:
        res["throughput"] = []
        for s in FLAGS.throughput_sizes:
            res["throughput"] += bench_throughput(s, [int(b) for b in FLAGS.throughput_batches], FLAGS.throughput_frames,
                                                  FLAGS.repeats)
        save()
    if "bf16" in FLAGS.sections and FLAGS.bf16:
        res["bf16"] = bench_bf16(FLAGS.bf16_pretrain_epochs, FLAGS.bf16_structures, FLAGS.bf16_frames, FLAGS.repeats,
                                 ["small"] if FLAGS.quick else [s for s in FLAGS.sizes], 25 if not FLAGS.quick else 10,
                                 FLAGS.batch_size)
        save()
    if "bf16_checkpoint" in FLAGS.sections and FLAGS.bf16_checkpoint:
        res["bf16_checkpoint"] = bench_bf16_checkpoint(FLAGS.bf16_checkpoint, FLAGS.bf16_checkpoint_frames,
                                                       FLAGS.batch_size)
        save()
    save()
    print(markdown(res))


if __name__ == "__main__":
    app.run(main)
