"""Worked example: fine-tune a tiny ADAPT on the bundled real GaN DFT relaxations, then use it.

    python -m experiments.example_gan                      # data from ../shared/data/dft (repo-relative)
    python -m experiments.example_gan --data_dir=/path/to/dft --workdir=runs/example_gan --overwrite

A few minutes on 2 CPU cores: (1) read the four GaN VASP relaxations (Mg on a Ga site, charge 0
and -1; N vacancy, charge 0 and +1; 31-32 atoms, 5-8 ionic steps) and hold one out
(``--test_name``); (2) pretrain a tiny ADAPT on the DFT forces of every training frame; (3)
grid-search the fixed step on the training relaxations, then fine-tune model and step with
BPTT; (4) save both models and report Dq; (5) load them as ``TrainedModel`` and relax a freshly
rattled 32-atom wurtzite supercell (frame map and FIRE), measuring how close it returns to the
ideal crystal; (6) draw the held-out defect's neighbourhood. Writes ``results.json``,
``plots/test_defect.png`` and ``checkpoints/{pretrained,bptt}`` into ``--workdir``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from bptt_mlip.data import batching
from bptt_mlip.models import adapt as model
from bptt_mlip.relax.scan import FrameModifiers, RolloutConfig
from bptt_mlip.relax.step_rules import FixedStep, LearnableStep, step_rule_to_dict
from bptt_mlip.training import checkpoint, evaluate, loops, optim
from bptt_mlip.training import steps as train
from bptt_mlip.workflow import api, model_io
from bptt_mlip.workflow.report import write_json
from experiments import example_gan_parts as parts

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


def save(path: Path, params, normalizer, cfg, step_rule, role: str) -> None:
    model_io.save_model(path, params, normalizer, cfg, step_rule_to_dict(step_rule),
                        {"role": role, "data": "GaN DFT relaxations (example_gan)"})


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
    files, train_set, test = parts.load_gan(FLAGS.data_dir, FLAGS.test_name, log)

    # 2. pretrain
    cfg = model.AdaptConfig(d_model=FLAGS.d_model, d_ff=2 * FLAGS.d_model, num_heads=2, num_layers=1, dropout=0.0,
                            embed_hidden=FLAGS.d_model)
    normalizer = model.normalizer_from_trajectories(train_set)
    force_fn = model.make_force_fn(cfg, normalizer)
    t0 = time.time()
    init = model.init_params(cfg, jax.random.PRNGKey(FLAGS.seed))
    pre_params, pre_hist = loops.pretrain(
        model.make_train_force_fn(cfg, normalizer), force_fn, init, train_set, [], epochs=FLAGS.pretrain_epochs,
        batch_size=32,
        optim_config=optim.OptimConfig(learning_rate=FLAGS.pretrain_lr, clip_norm=1.0, freeze_step_rule=True),
        seed=FLAGS.seed,
    )
    t_pre = time.time() - t0
    force_err = {split: evaluate.evaluate_forces(force_fn, pre_params, batching.force_batches(ts, 32))
                 for split, ts in (("train", train_set), ("test", test))}
    log(f"pretrained {model.count_params(pre_params)} parameters in {t_pre:.0f} s; force RMSE train "
        f"{force_err['train']['force_rmse']:.3f} (zero-force {force_err['train']['zero_force_rmse']:.3f}), test "
        f"{force_err['test']['force_rmse']:.3f} (zero-force {force_err['test']['zero_force_rmse']:.3f}) eV/Å")

    # 3. grid search on training relaxations, then BPTT
    eval_rollout = RolloutConfig(max_frames=FLAGS.max_frames, stop_rms=1e-3, remat="none")
    grid = evaluate.grid_table(force_fn, pre_params, train_set, GRID, eval_rollout, batch_size=4)
    best_step = GRID[int(np.argmin(grid["mean_dq"]))]
    log("grid search (train mean Dq): " + ", ".join(f"{s:g}:{d:.3f}" for s, d in zip(GRID, grid["mean_dq"]))
        + f" -> eta = {best_step:g}")
    fixed = FixedStep(best_step)
    pre_full = {"model": pre_params, "step_rule": fixed.init()}
    learnable = LearnableStep(best_step)
    bptt_cfg = train.BPTTConfig(rollout=RolloutConfig(max_frames=FLAGS.max_frames, remat="frame"))
    t0 = time.time()
    bptt_params, bptt_hist, _ = loops.bptt_finetune(
        force_fn, learnable, {"model": pre_params, "step_rule": learnable.init()}, train_set, [],
        bptt_config=bptt_cfg,
        optim_config=optim.OptimConfig(learning_rate=FLAGS.bptt_lr, step_rule_learning_rate=1e-3, clip_norm=1.0),
        epochs=FLAGS.bptt_epochs, batch_size=4, seed=FLAGS.seed,
    )
    t_bptt = time.time() - t0
    eta = float(bptt_params["step_rule"]["eta"])
    log(f"BPTT {FLAGS.bptt_epochs} epochs in {t_bptt:.0f} s: train loss {bptt_hist[0]['train_loss']:.4f} -> "
        f"{bptt_hist[-1]['train_loss']:.4f}, learned eta {eta:.4g}")

    # 4. save, evaluate Dq (pretrained + best fixed step; BPTT) on train and held-out
    save(work / "checkpoints" / "pretrained", pre_full, normalizer, cfg, fixed, "pretrained_best_grid_step")
    save(work / "checkpoints" / "bptt", bptt_params, normalizer, cfg, learnable, "bptt_last_epoch")
    table = {}
    for label, p, rule in (("pretrained", pre_full, fixed), ("bptt", bptt_params, learnable)):
        for split, ts in (("train", train_set), ("test", test)):
            summ, _ = evaluate.relaxation_table(force_fn, rule, p, ts, FrameModifiers(), eval_rollout, batch_size=4)
            table[f"{label}_{split}"] = summ
    for k, v in table.items():
        log(f"  {k:<18} mean Dq {v['mean_dq']:.4f} (initial {v['mean_dq_initial']:.4f}), frames "
            f"{v['mean_frames']:.1f}, converged {v['num_converged']}/{v['num_structures']}")

    # 5. load the checkpoints and relax a new structure: a rattled ideal GaN supercell
    tuned = api.TrainedModel.load(work / "checkpoints" / "bptt")
    pre = api.TrainedModel.load(work / "checkpoints" / "pretrained")
    ref_cell = test[0].cell if test[0].cell is not None else train_set[0].cell
    new_rows, ideal_force, lattice = parts.relax_new_supercell({"pretrained": pre, "bptt": tuned}, ref_cell,
                                                             rattle=FLAGS.rattle, seed=FLAGS.seed + 11,
                                                             stop_rms=FLAGS.new_stop_rms)
    for r in new_rows:
        log("  new GaN supercell: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in r.items()))
    # 6. defect neighbourhood of the held-out relaxation
    parts.draw_defect(test[0], tuned, FLAGS.max_frames, work / "plots" / "test_defect.png")
    results = {
        "data": [str(f) for f in files], "test": FLAGS.test_name,
        "train": [parts.trajectory_name(t) for t in train_set],
        "model_config": checkpoint.config_to_dict(cfg), "num_params": model.count_params(pre_params),
        "pretrain_force_errors": force_err,
        "grid": dict(zip(map(str, GRID), map(float, grid["mean_dq"]))), "best_grid_step": best_step,
        "learned_eta": eta, "bptt_loss": [bptt_hist[0]["train_loss"], bptt_hist[-1]["train_loss"]],
        "dq": table, "new_structure": new_rows, "max_force_on_ideal_crystal_bptt": ideal_force,
        "lattice": lattice, "timings_s": {"pretrain": t_pre, "bptt": t_bptt, "total": time.time() - t_start},
    }
    write_json(work / "results.json", results)
    log(f"model force on the ideal crystal (BPTT model): max {ideal_force:.3f} eV/Å")
    log(f"done in {time.time() - t_start:.0f} s; wrote {work}/results.json, plots/test_defect.png, checkpoints/")


if __name__ == "__main__":
    app.run(main)
