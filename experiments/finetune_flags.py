"""Flags of the main job (``experiments.finetune``) and the checks only flags can make.

The library's configs check their own fields (see ``experiments.configs``); here are the
checks across flags, of counts and rates the configs do not hold, and of the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from absl import flags

from experiments import common, configs

common.define_pretrain_flags()

flags.DEFINE_list(
    "grid_steps",
    ["0.005", "0.01", "0.015", "0.02", "0.025", "0.03", "0.035", "0.04", "0.045", "0.05", "0.055", "0.06", "0.065",
     "0.07", "0.075", "0.08"],
    "Fixed step sizes (Å²/eV) of the grid search.",
)
flags.DEFINE_integer("grid_max_trajectories", 0, "Grid-search on at most this many training trajectories (0 = all).")
flags.DEFINE_bool("grid_on_test", True,
                  "Also report test Dq at every grid step (paper table 6; never used for choices).")

flags.DEFINE_enum("step_kind", "fixed", ["fixed", "learnable", "neural"], "BPTT step-size rule.")
flags.DEFINE_float("init_step", 0.0, "Initial step size for BPTT; 0 = the best grid step (chosen on training data).")
flags.DEFINE_float("init_step_scale", 1.0,
                   "Multiply the initial BPTT step by this (figure 3a: learnable step from far-off starts).")
flags.DEFINE_float("max_step", 0.0, "Learnable step: cap (Å²/eV) on the step the frames use, min(eta, cap); it also "
                   "caps the initial step. 0 = unbounded. Clearly below 2/k (0.9x in docs/results.md) keeps the "
                   "learned step stable for a model whose stiffest curvature at the end points is k "
                   "(python -m experiments.frame_stability prints 2/k).")
flags.DEFINE_float("head_max_scale", 0.0, "Neural step head: 0 = unbounded linear output (appendix A); c > 1 = step "
                   "bounded to (0, c x the initial step) through a sigmoid.")
flags.DEFINE_float("momentum", 0.0, "Heavy-ball momentum weight of the frame rule (paper ablation: 0.05).")
flags.DEFINE_float("anneal", 1.0, "Multiplicative step annealing per frame (paper ablation: 0.99).")
flags.DEFINE_float("noise_std", 0.0, "Exploration noise on each frame's update (Å).")
flags.DEFINE_float("max_displacement", 0.0, "Cap on an atom's displacement per frame (Å); 0 = none.")
flags.DEFINE_bool("random_stopping", False, "Randomly vary the stopping rule per batch (paper table 5).")

flags.DEFINE_integer("bptt_epochs", 5, "BPTT fine-tuning epochs.")
flags.DEFINE_enum("gradient", "bptt", ["bptt", "implicit", "guided"],
                  "How the end-point loss is differentiated: through every frame (bptt), implicitly at the converged "
                  "end point (implicit), or BPTT through the first --unroll_frames frames plus the implicit "
                  "gradient of the rest (guided); see bptt_mlip.training.implicit_steps.")
flags.DEFINE_enum("relaxer", "frame", ["frame", "fire"],
                  "The relaxation BPTT differentiates: the step rule's frames (frame), or FIRE with --fire_fmax and "
                  "at most --max_frames steps (fire; the tuned model is then tested with FIRE against the pretrained "
                  "model's FIRE).")
flags.DEFINE_integer("unroll_frames", 0, "--gradient=guided: frames differentiated by BPTT before the implicit tail "
                     "(0 = pure implicit, --max_frames = plain BPTT).")
flags.DEFINE_enum("implicit_null_modes", "auto", ["auto", "none", "translations", "rigid"],
                  "Modes projected out of the implicit solve: auto = translations for translation-invariant models "
                  "(periodic_adapt, equivariant), none for ADAPT (its raw-coordinate input is not invariant).")
flags.DEFINE_float("guidance_weight", 1.0, "--gradient=guided: weight of the window's end-point loss.")
flags.DEFINE_float("bptt_lr", 1e-4, "Adam learning rate of the model during BPTT.")
flags.DEFINE_float("step_lr", 1e-3, "Adam learning rate of the step-size parameters.")
flags.DEFINE_float("clip_norm", 1.0, "Global-norm gradient clip (0 = off).")
flags.DEFINE_float("proximal_weight", 0.0, "Proximal pull toward the pretrained weights (0 = off).")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay during BPTT.")
flags.DEFINE_float("dq_weight", 1.0, "Weight of the end-point Dq in the BPTT objective (0 = force term only).")
flags.DEFINE_float("force_weight", 0.0, "Weight of a force-matching term (mean squared force error, (eV/Å)^2, on "
                   "--force_batch_size reference frames of the training trajectories per step); 0 = the paper's "
                   "Dq-only objective.")
flags.DEFINE_integer("force_batch_size", 32, "Reference frames per BPTT step for the force term.")
flags.DEFINE_bool("augment_rotation", False, "Rotate every training relaxation and force frame by a random rotation "
                  "(positions, target, cell and forces together).")
flags.DEFINE_float("augment_translation", 0.0, "Translate every training example by a random vector with components "
                   "in [-x, x] Å (0 = off).")
flags.DEFINE_integer("start_stride", 0, "Start BPTT rollouts also from every k-th stored frame of a training "
                     "trajectory (target: its last frame); 0 = from the first frame only (the paper).")
flags.DEFINE_integer("patience", 0, "Stop BPTT once the validation Dq has not improved for this many epochs "
                     "(0 = run every epoch); the best-validation model is kept either way.")
flags.DEFINE_bool("freeze_model", False, "Train only the step size (figure 5a).")
flags.DEFINE_bool("random_init", False, "BPTT from random weights instead of the pretrained model (figure 5b).")

flags.DEFINE_bool("fire", True, "Evaluate the pretrained model with FIRE (ASE semantics) on the test split.")
flags.DEFINE_float("fire_fmax", 0.05, "FIRE convergence: largest per-atom force below this (eV/Å).")
flags.DEFINE_integer("fire_max_steps", 500, "FIRE step limit.")
flags.DEFINE_bool("derive_settings", True,
                  "Take each of --stop_rms, --stop_fmax, --grid_steps and --fire_fmax not given explicitly from the "
                  "training trajectories (their force scale, per-frame movements and the step that best explains "
                  "them); the values used and their sources are logged and written to results.md / results.json. "
                  "false = the flag defaults.")
flags.DEFINE_integer("long_rollout_factor", 4,
                     "When most of the pretrained best-grid test rollouts end at --max_frames without converging, "
                     "relax the test split again with this many times --max_frames (pretrained and BPTT) and report "
                     "that ratio beside the plain one; 0 = never.")

flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its newest good checkpoint (same flags); the "
                  "result is bit-identical to an uninterrupted run on the same machine.")
flags.DEFINE_integer("checkpoint_every", 50, "Save the full BPTT training state every N steps (and after every "
                     "epoch); 0 = only after every epoch.")
flags.DEFINE_integer("max_consecutive_bad_steps", 10, "Stop BPTT after more than this many consecutive steps with a "
                     "non-finite loss or gradient (each is skipped); the last good checkpoint stays on disk.")

# flags a resumed run may change without changing its numbers
RESUME_FREE_FLAGS = ("resume", "overwrite", "checkpoint_every")


def given_flags(names: tuple[str, ...]) -> set[str]:
    """The flags of ``names`` given explicitly (command line or flagfile), not left at their defaults."""
    return {name for name in names if flags.FLAGS[name].present}


def flag_problems(v: dict[str, Any]) -> list[str]:
    """Contradictory or impossible settings in the flag values ``v`` (name -> value), each a
    sentence naming the flags; empty when the settings are usable. Checked before any work."""
    out = []

    def need(cond, msg):
        if not cond:
            out.append(msg)

    need(v["num_test"] >= 0, f"--num_test={v['num_test']} must be >= 0")
    need(v["num_val"] >= 0, f"--num_val={v['num_val']} must be >= 0")
    if v["max_trajectories"] > 0 and not v["cv_folds"]:
        need(v["num_test"] + v["num_val"] < v["max_trajectories"],
             f"--num_test={v['num_test']} + --num_val={v['num_val']} >= --max_trajectories={v['max_trajectories']}: "
             "no training trajectories would be left")
    if v["cv_folds"]:
        need(v["cv_folds"] >= 2, f"--cv_folds={v['cv_folds']} must be >= 2 (or 0 = off)")
        need(0 <= v["cv_fold"] < max(v["cv_folds"], 1),
             f"--cv_fold={v['cv_fold']} must be in 0..{v['cv_folds'] - 1} (--cv_folds={v['cv_folds']})")
    need(v["max_trajectories"] >= 0, f"--max_trajectories={v['max_trajectories']} must be >= 0 (0 = all)")
    need(v["bptt_epochs"] >= 0, f"--bptt_epochs={v['bptt_epochs']} must be >= 0")
    need(v["pretrain_epochs"] >= 0, f"--pretrain_epochs={v['pretrain_epochs']} must be >= 0")
    for name in ("bptt_lr", "step_lr", "pretrain_lr"):
        need(v[name] >= 0, f"--{name}={v[name]} is a negative learning rate")
    need(v["init_step_scale"] > 0, f"--init_step_scale={v['init_step_scale']} must be > 0")
    need(v["max_step"] >= 0, f"--max_step={v['max_step']} must be >= 0 (0 = unbounded)")
    need(not v["max_step"] or v["step_kind"] == "learnable",
         f"--max_step={v['max_step']} caps a learnable step; --step_kind={v['step_kind']} has none to cap")
    need(v["init_step"] >= 0, f"--init_step={v['init_step']} must be >= 0 (0 = best grid step)")
    if v.get("relaxer") == "fire":
        need(v["fire"], "--relaxer=fire compares the tuned model's FIRE with the pretrained model's: needs --fire")
        need(v.get("gradient", "bptt") == "bptt",
             f"--relaxer=fire is differentiated by BPTT only; --gradient={v.get('gradient')} works with the frame map")
        need(v.get("step_kind", "fixed") == "fixed",
             f"--relaxer=fire has no step rule to learn; --step_kind={v.get('step_kind')} needs --relaxer=frame")
    if v["random_stopping"]:
        need(v["max_frames"] >= 50, "--random_stopping draws the frame limit from [50, --max_frames], but "
             f"--max_frames={v['max_frames']} < 50")
    if v["freeze_model"] and v["bptt_epochs"] > 0:
        need(v["step_kind"] != "fixed",
             "--freeze_model with --step_kind=fixed leaves nothing to train (the model is frozen and the fixed step "
             "has no gradient); use --step_kind=learnable or neural, or --bptt_epochs=0")
    need(v["stop_rms"] > 0, f"--stop_rms={v['stop_rms']} must be > 0")
    need(v["stop_fmax"] >= 0, f"--stop_fmax={v['stop_fmax']} must be >= 0 (0 = off)")
    need(v["fire_fmax"] > 0, f"--fire_fmax={v['fire_fmax']} must be > 0")
    need(v["long_rollout_factor"] >= 0, f"--long_rollout_factor={v['long_rollout_factor']} must be >= 0 (0 = off)")
    for name in ("batch_size", "pretrain_batch_size", "pretrain_frame_stride", "max_consecutive_bad_steps"):
        need(v[name] >= 1, f"--{name}={v[name]} must be >= 1")
    need(v["checkpoint_every"] >= 0, f"--checkpoint_every={v['checkpoint_every']} must be >= 0 (0 = every epoch)")
    need(v["min_atom_distance"] >= 0, f"--min_atom_distance={v['min_atom_distance']} must be >= 0 (0 = no check)")
    if v["force_weight"] > 0:
        need(v["force_batch_size"] >= 1, f"--force_batch_size={v['force_batch_size']} must be >= 1")
    if v["patience"] > 0:
        need(v["num_val"] > 0, f"--patience={v['patience']} needs validation data, but --num_val=0")
    for name in ("start_stride", "patience", "clip_norm", "proximal_weight", "weight_decay", "dropout"):
        need(v[name] >= 0, f"--{name}={v[name]} must be >= 0")
    need(v["anneal"] <= 1, f"--anneal={v['anneal']} must be in (0, 1]")
    out.extend(_grid_step_problems(v["grid_steps"]))
    need(not (v["resume"] and v["overwrite"]),
         "--resume and --overwrite contradict each other: --overwrite deletes the run to resume")
    if v["pretrained"]:
        need(Path(v["pretrained"]).is_dir(), f"--pretrained={v['pretrained']}: no such checkpoint directory")
    return out + configs.config_problems(v)


def _grid_step_problems(grid_steps: list[str]) -> list[str]:
    try:
        steps = [float(x) for x in grid_steps]
    except ValueError:
        return [f"--grid_steps={','.join(grid_steps)}: not a list of numbers"]
    if not steps:
        return ["--grid_steps is empty"]
    if not all(x > 0 for x in steps):
        return [f"--grid_steps={','.join(grid_steps)}: every step size must be > 0"]
    return []
