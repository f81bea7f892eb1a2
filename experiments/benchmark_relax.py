"""Relax API throughput: in-flight batches vs fixed batches vs ASE's FIRE through the library calculator.

    nice python -m experiments.benchmark_relax --n=200 --checkpoint=runs/si_cpu/checkpoints/bptt_best

N start structures: the shipped test split of ``--dataset`` (default ``default:si_defects``, split as
``--num_test``) and generated Si defect starts (:func:`bptt_mlip.data.prototypes.si_defect_structure`,
``--generated`` of them), repeated with a small rattle (``--rattle`` Å, fresh per copy) up to ``--n``.
The model is a trained checkpoint (a random model does not relax, so its frame counts mean nothing).
Every API configuration runs twice: the first call includes compiling (and loading from JAX's
persistent cache), the second is the timed one. ASE's FIRE runs one structure at a time on the first
``--ase_subset`` structures, after one force call per atom bucket to compile.

Printed per configuration: wall time, structures/s, atom-frames/s (the force evaluations a structure
needs, its frames + 1, times its atoms, per second), structure-frames computed against needed, compiled
calls, the relaxer's compiled batch shapes, and XLA compile events of each call. A force-call section times one
force evaluation batched (as the API calls the model) against the calculator's single call, for the checkpoint's
model and a published-size ADAPT with random weights (its cost per call, not its relaxations). ``--out`` writes
JSON.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import common, timing

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 200, "Structures per API call.")
flags.DEFINE_string("checkpoint", "", "Trained model; default runs/si_cpu/checkpoints/bptt_best, else "
                    "runs/si_cpu_derived/checkpoints/bptt_best.")
flags.DEFINE_integer("generated", 40, "Generated Si defect starts added to the shipped test split.")
flags.DEFINE_float("rattle", 0.02, "Å, Gaussian rattle of each repeated copy (0: exact repeats).")
flags.DEFINE_list("methods", ["frame", "fire"], "Relaxation methods of the API.")
flags.DEFINE_integer("relax_batch_size", 16, "Rows per compiled batch (relax_structures batch_size).")
flags.DEFINE_list("buckets", [], "Atom-count buckets of the API (default: the library's DEFAULT_BUCKETS).")
flags.DEFINE_integer("ase_subset", 16, "Structures relaxed by ASE FIRE one at a time (0: skip).")
flags.DEFINE_string("out", "", "Optional JSON file for the rows.")
flags.DEFINE_integer("force_call_repeats", 20, "Timed force calls per path in the force-call section (0: skip): "
                     "batched as the API calls the model against the calculator one structure at a time.")
flags.DEFINE_bool("published_force_calls", True, "Time the force calls of a published-size ADAPT (random weights, "
                  "the checkpoint's inputs) too.")
flags.DEFINE_integer("matmul_size", 2048, "n of the n x n float32 matmul that measures the device's dense rate; the "
                     "API rows report their FLOP rate as a share of it (0: skip).")

DEFAULT_CHECKPOINTS = ("runs/si_cpu/checkpoints/bptt_best", "runs/si_cpu_derived/checkpoints/bptt_best")


def start_structures(n: int, generated: int, rattle: float, seed: int = 0) -> list:
    """``n`` ASE start structures: shipped test split + generated defect starts, repeated with a rattle."""
    from ase import Atoms

    from bptt_mlip.data import prototypes

    test = common.split(common.load_trajectories(FLAGS.dataset)[0])[0]
    base = [Atoms(numbers=t.species, positions=t.initial_positions, cell=t.cell, pbc=bool(np.any(t.cell)))
            for t in test]
    rng = np.random.default_rng(seed)
    for i in range(generated):
        kind = prototypes.SI_DEFECT_KINDS[i % len(prototypes.SI_DEFECT_KINDS)]
        species, pos, cell, _ = prototypes.si_defect_structure(kind, rng, prototypes.DefectSettings())
        base.append(Atoms(numbers=species, positions=pos, cell=cell, pbc=True))
    out = []
    for i in range(n):
        atoms = base[i % len(base)].copy()
        if i >= len(base) and rattle:
            atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        out.append(atoms)
    return out


def fire_config(model):
    """The FIRE settings of both FIRE paths (the API's and ASE's): the API's default for the model (ASE's, with the
    fmax saved with the model: the run's ``fire_fmax``, derived from its data)."""
    from bptt_mlip.workflow import model_io

    return model_io.fire_settings(model.meta)


def bucket_kwargs() -> dict:
    """``{"buckets": ...}`` of ``--buckets`` (the same for the API and the calculator), or ``{}`` for the defaults."""
    return {"buckets": tuple(int(b) for b in FLAGS.buckets)} if FLAGS.buckets else {}


def api_row(objs, model, method: str, in_flight: bool, compiles: timing.CompileCounter) -> dict:
    from bptt_mlip.workflow import api

    kw = dict(method=method, batch_size=FLAGS.relax_batch_size, in_flight=in_flight, progress=False,
              on_out_of_domain="ignore", **bucket_kwargs())
    if method == "fire":
        kw["fire_config"] = fire_config(model)
    compiles.reset()
    t0 = time.perf_counter()
    api.relax_structures(objs, model, **kw)
    first_s, first_compiles = time.perf_counter() - t0, compiles.reset()
    t0 = time.perf_counter()
    out = api.relax_structures(objs, model, **kw)
    wall = time.perf_counter() - t0
    atoms = np.array([len(o) for o in objs])
    w = out.work
    return dict(method=method, path="in flight" if in_flight else "fixed batches", n=len(objs), wall_s=wall,
                first_call_s=first_s, structures_per_s=len(objs) / wall,
                atom_frames_per_s=float(np.sum(atoms * (out.num_frames + 1))) / wall,
                mean_frames=float(out.num_frames.mean()), max_frames=int(out.num_frames.max()),
                converged=float(out.converged.mean()), slot_frames=w["slot_frames"], frames_needed=w["frames_needed"],
                computed_over_needed=w["slot_frames"] / w["frames_needed"], batch_calls=w["batch_calls"],
                compiled_shapes=w["compiled_shapes"], compiles_first_call=first_compiles,
                compiles_second_call=compiles.reset(), num_frames=out.num_frames.tolist())


def ase_row(objs, model, fire_row: dict | None) -> dict:
    from ase.optimize import FIRE

    from bptt_mlip.workflow import calculator

    config = fire_config(model)
    fmax, steps = config.fmax, config.max_steps
    for atoms in objs:  # compile the calculator's force call for every bucket first
        work = atoms.copy()
        work.calc = calculator.BPTTCalculator(model, **bucket_kwargs())
        work.get_forces()
    nsteps, t0 = [], time.perf_counter()
    for atoms in objs:
        work = atoms.copy()
        work.calc = calculator.BPTTCalculator(model, **bucket_kwargs())
        opt = FIRE(calculator.forces_only(work), logfile=None)
        opt.run(fmax=fmax, steps=steps)
        nsteps.append(opt.nsteps)
    wall = time.perf_counter() - t0
    atom_frames = float(np.sum(np.array([len(o) for o in objs]) * (np.array(nsteps) + 1)))
    row = dict(method="fire", path="ASE FIRE + calculator, one at a time", n=len(objs), wall_s=wall,
               structures_per_s=len(objs) / wall, atom_frames_per_s=atom_frames / wall,
               mean_frames=float(np.mean(nsteps)), max_frames=int(np.max(nsteps)), num_frames=nsteps)
    if fire_row is not None:  # same model, same FIRE: the API's steps on these structures should agree
        row["steps_equal_api"] = int(np.sum(np.array(nsteps) == np.array(fire_row["num_frames"][: len(objs)])))
    return row


def force_call_flops(model, objs, batch_size: int) -> dict:
    """XLA's FLOP count of one compiled force call on a full batch of ``batch_size`` rows of the
    bucket that holds ``objs[0]``: ``{"bucket_atoms", "flops_per_slot_frame"}`` (one padded row, one
    frame; the relax API computes ``slot_frames`` of them). Slots of a larger bucket cost more than this,
    so a call with mixed buckets gets a lower bound of its FLOP rate."""
    import jax

    batch, n = timing.copies_batch(objs[0], batch_size, bucket_kwargs())
    compiled = jax.jit(model.force_fn).lower(model.model_params, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"bucket_atoms": n, "flops_per_slot_frame": float(cost.get("flops", 0.0)) / batch_size}


def add_matmul_share(rows: list[dict], flops: dict, matmul_gflops: float) -> None:
    """Achieved GFLOP/s of each API row (its computed slot-frames x the force call's FLOPs per slot-frame,
    over its wall time) and its share of the dense matmul rate; in place."""
    for r in rows:
        if "slot_frames" in r:
            r["gflops_per_s"] = r["slot_frames"] * flops["flops_per_slot_frame"] / r["wall_s"] / 1e9
            r["matmul_share"] = r["gflops_per_s"] / matmul_gflops


def checkpoint_path() -> str:
    if FLAGS.checkpoint:
        return FLAGS.checkpoint
    for path in DEFAULT_CHECKPOINTS:
        if Path(path).exists():
            return path
    raise app.UsageError(f"no trained checkpoint at {' or '.join(DEFAULT_CHECKPOINTS)}: pass --checkpoint "
                                "(a random model does not relax, so its frame counts would mean nothing)")


def main(argv):
    del argv
    import jax

    from bptt_mlip.workflow import api

    model = api.TrainedModel.load(checkpoint_path())
    objs = start_structures(FLAGS.n, FLAGS.generated, FLAGS.rattle)
    compiles = timing.CompileCounter()
    rows = []
    for method in FLAGS.methods:
        for in_flight in (True, False):
            rows.append(api_row(objs, model, method, in_flight, compiles))
            common.info(_line(rows[-1]))
    if FLAGS.ase_subset:
        fire_rows = [r for r in rows if r["method"] == "fire" and r["path"] == "in flight"]
        rows.append(ase_row(objs[: FLAGS.ase_subset], model, fire_rows[0] if fire_rows else None))
        common.info(_line(rows[-1]))
    extra = {}
    if FLAGS.matmul_size:
        extra["matmul"] = timing.dense_matmul(FLAGS.matmul_size, 5)
        extra["force_call"] = force_call_flops(model, objs, FLAGS.relax_batch_size)
        add_matmul_share(rows, extra["force_call"], extra["matmul"]["gflops"])
        for r in rows:
            if "matmul_share" in r:
                common.info(f"{r['method']} {r['path']}: {r['gflops_per_s']:.2f} GFLOP/s = "
                            f"{100 * r['matmul_share']:.1f}% of the {extra['matmul']['gflops']:.1f} GFLOP/s matmul")
    if FLAGS.force_call_repeats:
        models = {"checkpoint": model, **({"published size, random weights": timing.published_size(model)}
                                          if FLAGS.published_force_calls else {})}
        extra["force_calls"] = [timing.force_call_row(name, m, objs[0], FLAGS.relax_batch_size,
                                                      FLAGS.force_call_repeats, bucket_kwargs())
                                for name, m in models.items()]
        for r in extra["force_calls"]:
            common.info(f"force call, {r['model']} ({r['params']} parameters, {r['atoms']} atoms): batched "
                        f"{r['batched_atoms_per_s']:.0f} atoms/s, calculator {r['calculator_atoms_per_s']:.0f} "
                        f"atoms/s, ratio {r['batched_over_calculator']:.2f}")
    meta = dict(command=common.command_line(), date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.processor()
                or platform.machine(), cpus=os.cpu_count(), load_1min=os.getloadavg()[0], devices=str(jax.devices()),
                checkpoint=checkpoint_path(), model=model.config.__class__.__name__, params=model.num_params(),
                atoms=sorted(set(len(o) for o in objs)), **extra)
    common.info(json.dumps(meta))
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


def _line(r: dict) -> str:
    text = (f"{r['method']:5s} {r['path']:38s} n={r['n']:4d} {r['wall_s']:7.2f} s  {r['structures_per_s']:7.2f} "
            f"structures/s  {r['atom_frames_per_s']:9.0f} atom-frames/s  mean frames {r['mean_frames']:.1f}")
    if "slot_frames" in r:
        text += (f"  computed/needed {r['slot_frames']}/{r['frames_needed']} = {r['computed_over_needed']:.2f}"
                 f"  calls {r['batch_calls']}  shapes {r['compiled_shapes']}  compiles {r['compiles_first_call']}"
                 f" then {r['compiles_second_call']}  first call {r['first_call_s']:.1f} s")
    if "steps_equal_api" in r:
        text += f"  steps equal to the API's: {r['steps_equal_api']}/{r['n']}"
    return text


if __name__ == "__main__":
    common.run_main(main)
