"""Worked example: fine-tune a tiny ADAPT on the bundled real GaN DFT relaxations, then use it.

    python -m experiments.example_gan                      # data from ../shared/data/dft (repo-relative)
    python -m experiments.example_gan --data_dir=/path/to/dft --workdir=runs/example_gan --overwrite

Steps (a few minutes on 2 CPU cores):

1. read the four GaN VASP relaxations (``GaN_*.vasprun.xml.gz``: Mg on a Ga site in charge states
   0 and -1, N vacancy in charge states 0 and +1; 31-32 atoms, 5-8 ionic steps each);
   hold one out (``--test_name``), train on the others;
2. pretrain a tiny ADAPT on the DFT forces of every training frame;
3. grid-search the fixed step on the training relaxations, then fine-tune model and step with BPTT;
4. save both models (``checkpoints/pretrained``, ``checkpoints/bptt``) and report the held-out Dq;
5. load the fine-tuned checkpoint with :class:`bptt_mlip.api.TrainedModel` and relax a new
   structure: a freshly rattled 32-atom wurtzite GaN supercell (DFT lattice constants), with the
   model's own relaxation map and with FIRE; measure how close it returns to the ideal crystal;
6. draw the held-out defect's neighbourhood (predicted against DFT relaxed positions).

Writes ``results.json``, ``results.md``, ``plots/`` and the checkpoints into ``--workdir``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from bptt_mlip import descriptors
from bptt_mlip.workflow import api
from bptt_mlip.training import checkpoint
from bptt_mlip.relax import fire
from bptt_mlip.training import loops
from bptt_mlip.models import adapt as model
from bptt_mlip.training import optim
from bptt_mlip.workflow import plots_structure
from bptt_mlip.training import steps as train
from bptt_mlip.relax.scan import RolloutConfig, StepConfig, init_step_params, make_step_size_fn
from bptt_mlip.data import curation, readers

ROOT = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", str(ROOT / ".." / "shared" / "data" / "dft"), "Folder with GaN_*.vasprun.xml.gz.")
flags.DEFINE_string("workdir", "runs/example_gan", "Output folder.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --workdir.")
flags.DEFINE_string("test_name", "GaN_v_N_q1", "Trajectory held out for testing (file name stem).")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and the rattle.")
flags.DEFINE_integer("d_model", 32, "ADAPT width (tiny model).")
flags.DEFINE_integer("pretrain_epochs", 1500, "Force-pretraining epochs (one batch per epoch here).")
flags.DEFINE_float("pretrain_lr", 3e-3, "Pretraining learning rate.")
flags.DEFINE_integer("bptt_epochs", 40, "BPTT epochs.")
flags.DEFINE_float("bptt_lr", 3e-4, "BPTT learning rate of the model.")
flags.DEFINE_integer("max_frames", 40, "Frames per relaxation (training and evaluation).")
flags.DEFINE_float("rattle", 0.05, "Std (Å) of the Gaussian rattle of the new GaN supercell.")
flags.DEFINE_float("new_stop_rms", 1e-4, "Frame-method stop (Å) when relaxing the new supercell.")

GRID = [0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1]


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def save(path: Path, params, normalizer, cfg, step_cfg, role: str) -> None:
    state = train.create_train_state(params, optax.identity(), jax.random.PRNGKey(0))
    meta = {"model_config": checkpoint.config_to_dict(cfg), "step_config": checkpoint.config_to_dict(step_cfg),
            "role": role, "data": "GaN DFT relaxations (example_gan)"}
    checkpoint.save_checkpoint(path, 0, state, normalizer, meta)


def ideal_gan_supercell(a: float, c: float, u: float = 0.377):
    """32-atom 2x2x2 wurtzite GaN."""
    from ase.build import bulk

    return bulk("GaN", "wurtzite", a=a, c=c, u=u) * (2, 2, 2)


def distance_to(positions: np.ndarray, ideal: np.ndarray, masses: np.ndarray) -> tuple[float, float]:
    """(RMS distance Å, Dq amu^0.5 Å) to the ideal positions after removing the mean translation."""
    d = positions - ideal
    d = d - d.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(d * d, -1)))), float(np.sqrt(np.sum(masses[:, None] * d * d)))


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    t_start = time.time()
    work = Path(FLAGS.workdir)
    if work.exists() and any(work.iterdir()):
        if not FLAGS.overwrite:
            raise SystemExit(f"{work} exists and is not empty; pass --overwrite or another --workdir")
        shutil.rmtree(work)
    (work / "plots").mkdir(parents=True, exist_ok=True)

    # 1. data
    files = sorted(Path(FLAGS.data_dir).glob("GaN_*.vasprun.xml.gz"))
    if not files:
        raise SystemExit(f"no GaN_*.vasprun.xml.gz in {FLAGS.data_dir!r} (set --data_dir)")
    trajs, report = curation.curate(readers.read_trajectories(files), min_frames=3)
    log(f"read {len(files)} files: {report}")
    name = lambda t: Path(t.source).name.split(".")[0]  # noqa: E731
    test = [t for t in trajs if name(t) == FLAGS.test_name]
    train_set = [t for t in trajs if name(t) != FLAGS.test_name]
    if len(test) != 1:
        raise SystemExit(f"--test_name={FLAGS.test_name!r} matches {len(test)} trajectories; names: {[name(t) for t in trajs]}")
    for t in trajs:
        log(f"  {name(t):<16} {t.num_atoms} atoms, {t.num_frames} frames, max force {t.max_force()[0]:.3f} -> "
            f"{t.max_force()[-1]:.3f} eV/Å {'(test)' if t in test else ''}")

    # 2. pretrain
    cfg = model.AdaptConfig(d_model=FLAGS.d_model, d_ff=2 * FLAGS.d_model, num_heads=2, num_layers=1, dropout=0.0,
                            embed_hidden=FLAGS.d_model)
    normalizer = loops.normalizer_from_trajectories(train_set)
    force_fn = model.make_force_fn(cfg, normalizer)
    t0 = time.time()
    init = model.init_params(cfg, jax.random.PRNGKey(FLAGS.seed))
    pre_params, pre_hist = loops.pretrain(
        model.make_train_force_fn(cfg, normalizer), force_fn, init, train_set, [], epochs=FLAGS.pretrain_epochs,
        batch_size=32, optim_config=optim.OptimConfig(learning_rate=FLAGS.pretrain_lr, clip_norm=1.0, freeze_step=True),
        seed=FLAGS.seed,
    )
    t_pre = time.time() - t0
    from bptt_mlip.training import evaluate
    from bptt_mlip.data import batching

    force_err = {split: evaluate.evaluate_forces(force_fn, pre_params, batching.force_batches(ts, 32))
                 for split, ts in (("train", train_set), ("test", test))}
    log(f"pretrained {model.count_params(pre_params)} parameters in {t_pre:.0f} s; force RMSE train "
        f"{force_err['train']['force_rmse']:.3f} (zero-force {force_err['train']['zero_force_rmse']:.3f}), test "
        f"{force_err['test']['force_rmse']:.3f} (zero-force {force_err['test']['zero_force_rmse']:.3f}) eV/Å")

    # 3. grid search on training relaxations, then BPTT
    eval_rollout = RolloutConfig(max_frames=FLAGS.max_frames, stop_rms=1e-3, remat="none")
    grid = loops.grid_search(force_fn, pre_params, train_set, GRID, eval_rollout, batch_size=4)
    best_step = GRID[int(np.argmin(grid["mean_dq"]))]
    log(f"grid search (train mean Dq): " + ", ".join(f"{s:g}:{d:.3f}" for s, d in zip(GRID, grid["mean_dq"]))
        + f" -> eta = {best_step:g}")
    fixed = StepConfig(kind="fixed", init_step=best_step)
    pre_full = {"model": pre_params, "step": {"eta": jnp.asarray(best_step, jnp.float32)}}
    step_cfg = StepConfig(kind="learnable", init_step=best_step)
    step_fn = make_step_size_fn(step_cfg)
    bptt_cfg = train.BPTTConfig(step=step_cfg, rollout=RolloutConfig(max_frames=FLAGS.max_frames, remat="frame"))
    t0 = time.time()
    bptt_params, bptt_hist, _ = loops.bptt_finetune(
        force_fn, step_fn, {"model": pre_params, "step": init_step_params(step_cfg)}, train_set, [],
        bptt_config=bptt_cfg,
        optim_config=optim.OptimConfig(learning_rate=FLAGS.bptt_lr, step_learning_rate=1e-3, clip_norm=1.0),
        epochs=FLAGS.bptt_epochs, batch_size=4, seed=FLAGS.seed,
    )
    t_bptt = time.time() - t0
    eta = float(bptt_params["step"]["eta"])
    log(f"BPTT {FLAGS.bptt_epochs} epochs in {t_bptt:.0f} s: train loss {bptt_hist[0]['train_loss']:.4f} -> "
        f"{bptt_hist[-1]['train_loss']:.4f}, learned eta {eta:.4g}")

    # 4. save, evaluate Dq (pretrained + best fixed step; BPTT) on train and held-out
    save(work / "checkpoints" / "pretrained", pre_full, normalizer, cfg, fixed, "pretrained_best_grid_step")
    save(work / "checkpoints" / "bptt", bptt_params, normalizer, cfg, step_cfg, "bptt_last_epoch")
    table = {}
    for label, p, sc in (("pretrained", pre_full, fixed), ("bptt", bptt_params, step_cfg)):
        for split, ts in (("train", train_set), ("test", test)):
            summ, _ = loops.relaxation_table(force_fn, make_step_size_fn(sc), p, ts, sc, eval_rollout, batch_size=4)
            table[f"{label}_{split}"] = summ
    for k, v in table.items():
        log(f"  {k:<18} mean Dq {v['mean_dq']:.4f} (initial {v['mean_dq_initial']:.4f}), frames "
            f"{v['mean_frames']:.1f}, converged {v['num_converged']}/{v['num_structures']}")

    # 5. load the checkpoint and relax a new structure: a rattled ideal GaN supercell
    tuned = api.TrainedModel.load(work / "checkpoints" / "bptt")
    pre = api.TrainedModel.load(work / "checkpoints" / "pretrained")
    ref_cell = test[0].cell if test[0].cell is not None else train_set[0].cell
    a, c = float(np.linalg.norm(ref_cell[0])) / 2, float(np.linalg.norm(ref_cell[2])) / 2
    ideal = ideal_gan_supercell(a, c)
    rattled = ideal.copy()
    rattled.rattle(FLAGS.rattle, seed=FLAGS.seed + 11)
    masses = descriptors.atomic_masses(ideal.numbers)
    start_rms, start_dq = distance_to(rattled.positions, ideal.positions, masses)
    new_rows = [{"model": "start (rattled)", "rms_to_ideal_A": start_rms, "dq_to_ideal": start_dq}]
    for label, m in (("pretrained", pre), ("bptt", tuned)):
        for method in ("frame", "fire"):
            t0 = time.time()
            kw = dict(max_frames=200, stop_rms=FLAGS.new_stop_rms) if method == "frame" else dict(fire_config=fire.FireConfig(fmax=0.05, max_steps=300))
            out = api.relax(rattled, m, method=method, **kw)
            rms, dq = distance_to(out.structure.positions, ideal.positions, masses)
            new_rows.append({"model": label, "method": method, "rms_to_ideal_A": rms, "dq_to_ideal": dq,
                             "frames": int(out.num_frames[0]), "converged": bool(out.converged[0]),
                             "max_force": float(out.max_force[0]), "wall_s": time.time() - t0})
    ideal_force = float(api.relax(ideal, tuned, max_frames=1).max_force[0])  # model force on the ideal crystal
    for r in new_rows:
        log("  new GaN supercell: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))

    # 6. defect neighbourhood of the held-out relaxation
    t = test[0]
    pred = api.relax(readers_to_atoms(t), tuned, max_frames=FLAGS.max_frames).structure.positions
    plots_structure.defect_neighbourhood(t.initial_positions, pred, t.final_positions, work / "plots" / "test_defect.png",
                                         species=t.species, cell=t.cell, radius=4.0)
    results = {
        "data": [str(f) for f in files], "test": FLAGS.test_name, "train": [name(t) for t in train_set],
        "model_config": checkpoint.config_to_dict(cfg), "num_params": model.count_params(pre_params),
        "pretrain_force_errors": force_err,
        "grid": dict(zip(map(str, GRID), map(float, grid["mean_dq"]))), "best_grid_step": best_step,
        "learned_eta": eta, "bptt_loss": [bptt_hist[0]["train_loss"], bptt_hist[-1]["train_loss"]],
        "dq": table, "new_structure": new_rows, "max_force_on_ideal_crystal_bptt": ideal_force,
        "lattice": {"a": a, "c": c}, "timings_s": {"pretrain": t_pre, "bptt": t_bptt, "total": time.time() - t_start},
    }
    (work / "results.json").write_text(json.dumps(results, indent=2, default=float))
    log(f"model force on the ideal crystal (BPTT model): max {ideal_force:.3f} eV/Å")
    log(f"done in {time.time() - t_start:.0f} s; wrote {work}/results.json, plots/test_defect.png, checkpoints/")


def readers_to_atoms(t):
    """The first frame of a trajectory as ASE Atoms."""
    from ase import Atoms

    return Atoms(numbers=t.species, positions=t.initial_positions, cell=t.cell, pbc=t.pbc)


if __name__ == "__main__":
    app.run(main)
