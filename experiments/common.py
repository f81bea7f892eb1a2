"""Flags and helpers shared by the experiment scripts (absl). Import defines the flags once."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags, logging

from bptt_mlip.training import checkpoint
from bptt_mlip.models import adapt as model
from bptt_mlip.relax import scan as relax
from bptt_mlip.data import curation, generator, readers

FLAGS = flags.FLAGS

# ---- data
flags.DEFINE_string(
    "dataset", "default:si_defects",
    "Where trajectories come from: 'default:<name>' (shipped: si_defects, crystals), a dataset folder "
    "(manifest.json + cache.npz), or comma-separated files (extxyz, vasprun.xml[.gz], OUTCAR, MPtrj .json).",
)
flags.DEFINE_integer("max_trajectories", 0, "Use only the first N trajectories after curation (0 = all).")
flags.DEFINE_integer("num_test", 40, "The first N curated trajectories are the test split (paper appendix C.1).")
flags.DEFINE_integer("num_val", 20, "The next N are validation (best-epoch choice, early stopping); the rest train.")
flags.DEFINE_integer("min_frames", 3, "Curation: drop trajectories with fewer frames (paper: more than two).")
flags.DEFINE_bool(
    "skip_bad_records", False,
    "Leave out invalid trajectories (non-finite numbers, unknown elements, fewer than 2 frames, atoms closer than "
    "--min_atom_distance, atom counts or species changing between frames) instead of stopping; they are counted "
    "with their reasons in the log and results.json.",
)
flags.DEFINE_integer("cv_folds", 0, "k-fold cross-validation over trajectories (0 = off): the test split is fold "
                     "--cv_fold of a seeded (--cv_seed) partition into k folds, instead of the first --num_test; "
                     "validation is the first --num_val of the rest, the others train.")
flags.DEFINE_integer("cv_fold", 0, "Which fold is the test split (0 .. --cv_folds - 1).")
flags.DEFINE_integer("cv_seed", 0, "Seed of the fold partition (fixed across a study, independent of --seed).")
flags.DEFINE_float("min_atom_distance", 0.5, "Validation: two atoms closer than this (Å, minimum image) in the first "
                   "or last frame make a trajectory invalid; 0 = no check.")

# ---- model
flags.DEFINE_integer("d_model", 64, "ADAPT width.")
flags.DEFINE_integer("d_ff", 128, "ADAPT feed-forward width.")
flags.DEFINE_integer("num_heads", 4, "Attention heads.")
flags.DEFINE_integer("num_layers", 2, "Encoder blocks.")
flags.DEFINE_float("dropout", 0.0, "Dropout rate during pretraining (BPTT rollouts are deterministic).")
flags.DEFINE_integer("embed_hidden", 128, "First embedding layer width.")
flags.DEFINE_enum("input_encoding", "xyz", ["xyz", "xyz+fourier"], "Per-atom position encoding.")

# ---- rollout
flags.DEFINE_integer("max_frames", 75, "Most frames per relaxation (paper: 75 defects, 45 crystals).")
flags.DEFINE_float("stop_rms", 1e-3, "Stop a structure when its RMS movement in a frame is below this (Å).")
flags.DEFINE_enum("remat", "frame", ["none", "frame", "segment"], "Rematerialisation of the rollout in BPTT.")
flags.DEFINE_integer("batch_size", 8, "Structures per BPTT / evaluation batch.")

# ---- devices
flags.DEFINE_bool("data_parallel", False, "Split every training batch over all devices (jax.sharding; parameters "
                  "replicated). --batch_size, --pretrain_batch_size and --force_batch_size must be multiples of the "
                  "device count.")
flags.DEFINE_string("coordinator_address", "", "Multi-host: host:port of process 0 for jax.distributed.initialize "
                    "(every process runs the same command with its own --process_id and --workdir).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes (> 1 calls jax.distributed.initialize).")
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index in [0, --num_processes).")

flags.DEFINE_string("workdir", "runs/default", "Run directory (config, checkpoints, metrics, tables, plots).")
flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty existing run directory.")
flags.DEFINE_integer("seed", 0, "Seed of every random choice in the run.")


def define_pretrain_flags() -> None:
    """Flags of force pretraining (shared by pretrain.py and finetune.py)."""
    flags.DEFINE_string("pretrained", "", "Checkpoint directory of a pretrained model; empty = pretrain here.")
    flags.DEFINE_integer("pretrain_epochs", 10, "Force-pretraining epochs over every training frame.")
    flags.DEFINE_integer("pretrain_batch_size", 32, "Frames per pretraining batch.")
    flags.DEFINE_float("pretrain_lr", 5e-4, "Adam learning rate of pretraining (paper's ADAPT: 5e-5 for ~80 epochs).")
    flags.DEFINE_integer("pretrain_warmup_steps", 0, "Linear learning-rate warmup of pretraining over this many steps.")
    flags.DEFINE_integer("pretrain_frame_stride", 1, "Use every k-th frame of each training trajectory for pretraining.")
    flags.DEFINE_bool("pretrain_augment_rotation", False, "Rotate every pretraining frame (and its forces) randomly.")
    flags.DEFINE_float("pretrain_augment_translation", 0.0, "Translate every pretraining frame by up to this many Å.")


def load_pretrained(path: str):
    """(config, normalizer, model_params) from a saved model checkpoint."""
    saved, normalizer, meta = checkpoint.restore_model(path)
    if "model_config" not in meta:
        raise ValueError(f"{path}: checkpoint metadata has no model_config; was it written by bptt-mlip?")
    return checkpoint.adapt_config_from_dict(meta["model_config"]), normalizer, saved["model"]


def pretrain_model(train_set, val, log, mesh=None):
    """Load --pretrained, or pretrain a new model on ``train_set``: (config, normalizer, params, history)."""
    import jax

    from bptt_mlip.training import loops
    from bptt_mlip.training import optim

    if FLAGS.pretrained:
        cfg, normalizer, params = load_pretrained(FLAGS.pretrained)
        info(f"loaded pretrained model from {FLAGS.pretrained} ({cfg})")
        return cfg, normalizer, params, []
    cfg = model_config()
    normalizer = loops.normalizer_from_trajectories(train_set)
    init = model.init_params(cfg, jax.random.PRNGKey(FLAGS.seed))
    pre_train = train_set
    if FLAGS.pretrain_frame_stride > 1:
        pre_train = [generator.subsample_frames(t, FLAGS.pretrain_frame_stride) for t in train_set]
    params, history = loops.pretrain(
        model.make_train_force_fn(cfg, normalizer), model.make_force_fn(cfg, normalizer), init, pre_train, val,
        epochs=FLAGS.pretrain_epochs, batch_size=FLAGS.pretrain_batch_size,
        optim_config=optim.OptimConfig(learning_rate=FLAGS.pretrain_lr, clip_norm=1.0, freeze_step=True,
                                       warmup_steps=FLAGS.pretrain_warmup_steps),
        seed=FLAGS.seed, log=log, augment_rotation=FLAGS.pretrain_augment_rotation,
        augment_translation=FLAGS.pretrain_augment_translation, mesh=mesh,
    )
    return cfg, normalizer, params, history


def setup_devices(batch_sizes: dict[str, int] | None = None):
    """Join a multi-host job (--num_processes > 1) and return the data-parallel mesh
    (--data_parallel) or None. Call it first in ``main``, before any other JAX work. Every
    size in ``batch_sizes`` ({flag name: value}) must be divisible by the device count."""
    from absl import app

    from bptt_mlip.training import parallel

    if FLAGS.num_processes > 1:
        if not FLAGS.coordinator_address:
            raise app.UsageError(f"--num_processes={FLAGS.num_processes} needs --coordinator_address=host:port")
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise app.UsageError(f"--process_id={FLAGS.process_id} is not in [0, {FLAGS.num_processes})")
        if not FLAGS.data_parallel:
            raise app.UsageError("--num_processes > 1 needs --data_parallel")
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if not FLAGS.data_parallel:
        return None
    mesh = parallel.make_mesh()
    n = mesh.devices.size
    bad = [f"--{k}={v}" for k, v in (batch_sizes or {}).items() if v % n]
    if bad:
        raise app.UsageError(f"--data_parallel over {n} devices: {', '.join(bad)} not divisible by {n}")
    info(f"data parallel over {n} devices ({jax_device_kinds(mesh)}), {FLAGS.num_processes} process(es)")
    return mesh


def jax_device_kinds(mesh) -> str:
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    return ", ".join(kinds)


def info(message: str) -> None:
    """A progress line on stdout (absl's own INFO logging is left to --verbosity, since orbax
    logs every file operation there)."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def quiet_libraries() -> None:
    """Keep absl INFO logs of libraries (orbax) out of the console unless --verbosity asks for them."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def model_config() -> model.AdaptConfig:
    return model.AdaptConfig(
        d_model=FLAGS.d_model, d_ff=FLAGS.d_ff, num_heads=FLAGS.num_heads, num_layers=FLAGS.num_layers,
        dropout=FLAGS.dropout, embed_hidden=FLAGS.embed_hidden, input_encoding=FLAGS.input_encoding,
    )


def rollout_config(**overrides) -> relax.RolloutConfig:
    base = dict(max_frames=FLAGS.max_frames, stop_rms=FLAGS.stop_rms, remat=FLAGS.remat)
    base.update(overrides)
    return relax.RolloutConfig(**base)


def _read_files(paths, skip_bad: bool, skipped: list):
    """Read data files; with ``skip_bad`` a file that fails validation is retried trajectory by
    trajectory (extxyz) or left out whole (other formats), each failure appended to ``skipped``."""
    from bptt_mlip.data.trajectory import TrajectoryError, error_reason

    out = []
    for p in paths:
        try:
            out.extend(readers.read_trajectories([p]))
            continue
        except TrajectoryError as err:
            if not skip_bad:
                raise
            first = err
        if readers.guess_format(p) == "extxyz":
            out.extend(_read_extxyz_per_trajectory(p, skipped))
        else:
            skipped.append({"where": str(p), "reason": error_reason(first), "message": str(first)})
    return out


def _read_extxyz_per_trajectory(path, skipped: list):
    """Group an extxyz file's frames by ``traj_id`` as ``readers.read_extxyz`` does, keeping the
    trajectories that validate and recording the others."""
    import io
    import warnings

    import ase.io

    from bptt_mlip.data.trajectory import TrajectoryError, error_reason

    text = readers._read_text(Path(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
    groups: dict[str, list] = {}
    for i, atoms in enumerate(frames):
        key = atoms.info.get("traj_id")
        key = readers._stem(Path(path)) if key is None else str(key)
        groups.setdefault(key, []).append((int(atoms.info.get("frame", i)), atoms))
    out = []
    for key, items in groups.items():
        items.sort(key=lambda q: q[0])
        try:
            out.append(readers.from_ase_frames([a for _, a in items], source=str(path), traj_id=key))
        except TrajectoryError as err:
            skipped.append({"where": f"{path} trajectory {key!r}", "reason": error_reason(err), "message": str(err)})
    return out


def load_trajectories(
    spec: str,
    *,
    skip_bad: bool | None = None,
    min_distance: float | None = None,
    min_frames: int | None = None,
    max_trajectories: int | None = None,
    return_skipped: bool = False,
):
    """Trajectories from a --dataset spec, validated and curated; logs the curation report.

    Every trajectory is checked (``trajectory.check_relaxation``: finite numbers, known
    elements, consistent atom counts, at least 2 frames, no atoms closer than ``min_distance`` Å
    in the first and last frames). An invalid one raises ``TrajectoryError`` naming file,
    trajectory and frame, unless ``skip_bad`` (default --skip_bad_records), which leaves it out.
    Returns ``(kept, report)``, or ``(kept, report, skipped)`` with ``return_skipped`` where
    ``skipped`` is ``trajectory.skipped_summary(...)`` (count, reasons, records).
    Unset keyword arguments take the flag values.
    """
    from bptt_mlip.data import trajectory

    skip_bad = FLAGS.skip_bad_records if skip_bad is None else skip_bad
    min_distance = FLAGS.min_atom_distance if min_distance is None else min_distance
    min_frames = FLAGS.min_frames if min_frames is None else min_frames
    max_trajectories = FLAGS.max_trajectories if max_trajectories is None else max_trajectories
    skipped: list[dict] = []
    if spec.startswith("default:"):
        trajs = generator.load_default_dataset(spec.split(":", 1)[1])
    elif Path(spec).is_dir():
        trajs = generator.load_dataset(spec)
    else:
        paths = [p for p in spec.split(",") if p]
        if not paths:
            raise ValueError("--dataset is empty; give default:<name>, a dataset folder or data files")
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"--dataset: no such file(s): {missing}")
        trajs = _read_files(paths, skip_bad, skipped)
    good, bad = trajectory.check_relaxations(trajs, skip_bad=skip_bad, min_distance=min_distance)
    skipped.extend(bad)
    summary = trajectory.skipped_summary(skipped)
    if skipped:
        info(f"skipped {len(skipped)} invalid trajectories (--skip_bad_records): {summary['by_reason']}")
        for rec in skipped:
            info(f"  skipped [{rec['reason']}] {rec['message']}")
    kept, report = curation.curate(good, min_frames=min_frames)
    info(f"dataset {spec}: {report}")
    if max_trajectories:
        kept = kept[:max_trajectories]
    if not kept:
        raise ValueError(f"--dataset={spec}: no usable trajectories ({report}; {len(skipped)} skipped as invalid)")
    return (kept, report, summary) if return_skipped else (kept, report)


def split(trajs):
    """(test, val, train): by position, first num_test, next num_val, rest (paper appendix C.1);
    with --cv_folds=k, test is fold --cv_fold of ``curation.kfold_splits`` and validation the
    first --num_val of the remaining trajectories (in dataset order)."""
    n_test, n_val = FLAGS.num_test, FLAGS.num_val
    if FLAGS.cv_folds:
        rest_idx, test_idx = curation.kfold_splits(len(trajs), FLAGS.cv_folds, FLAGS.cv_seed)[FLAGS.cv_fold]
        if n_val >= len(rest_idx):
            raise ValueError(f"--num_val={n_val} >= {len(rest_idx)} trajectories outside test fold {FLAGS.cv_fold}: "
                             "no training data left")
        rest = [trajs[i] for i in rest_idx]
        return [trajs[i] for i in test_idx], rest[:n_val], rest[n_val:]
    if n_test + n_val >= len(trajs):
        raise ValueError(
            f"--num_test={n_test} + --num_val={n_val} >= {len(trajs)} usable trajectories: no training data left; "
            "lower --num_test / --num_val or add data"
        )
    test, rest = curation.split_test_train(trajs, n_test)
    val, train = curation.split_test_train(rest, n_val)
    return test, val, train


def prepare_workdir(workdir: str, overwrite: bool, resume: bool = False) -> Path:
    """Create the run directory; refuse to write into a non-empty one unless ``overwrite``.

    With ``resume`` the directory must hold an earlier run (config.json) and nothing is deleted."""
    d = Path(workdir)
    if resume:
        if overwrite:
            raise ValueError("--resume and --overwrite contradict each other: --overwrite deletes the run to resume")
        if not (d / "config.json").exists():
            raise FileNotFoundError(
                f"--resume: no checkpoint to resume from: {d} holds no earlier run (no config.json); "
                "run without --resume to start one"
            )
        (d / "plots").mkdir(parents=True, exist_ok=True)
        return d
    if d.exists() and any(d.iterdir()) and not overwrite:
        raise FileExistsError(f"run directory {d} exists and is not empty; pass --overwrite or choose another --workdir")
    if d.exists() and overwrite:
        for sub in ("checkpoints", "plots"):
            shutil.rmtree(d / sub, ignore_errors=True)
        for f in ("metrics.jsonl", "results.json", "results.md", "grid.json"):
            (d / f).unlink(missing_ok=True)
    (d / "plots").mkdir(parents=True, exist_ok=True)
    return d


def flag_values() -> dict[str, Any]:
    """Flags defined by this project's modules (not absl's own)."""
    out = {}
    for module in (m for m in FLAGS.flags_by_module_dict() if "experiments" in m or m == "__main__"):
        for f in FLAGS.flags_by_module_dict()[module]:
            out[f.name] = f.value
    return out


class MetricsWriter:
    """Append-only JSON-lines metrics, one object per log call, flushed each time."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", buffering=1)
        self.t0 = time.time()

    def __call__(self, phase: str, step: int, metrics: dict) -> None:
        row = {"phase": phase, "step": int(step), "time_s": round(time.time() - self.t0, 3), **_jsonable(metrics)}
        self._fh.write(json.dumps(row) + "\n")
        if phase != "bptt_step":
            short = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            info(f"[{phase} {step}] {short}")

    def close(self):
        self._fh.close()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else str(float(x))
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if dataclasses.is_dataclass(x):
        return _jsonable(dataclasses.asdict(x))
    return x


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False))
    os.replace(tmp, path)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def save_model(path: Path, params, normalizer, cfg: model.AdaptConfig, step_cfg: relax.StepConfig, extra: dict):
    """Save an evaluation-ready model checkpoint (orbax) with its configs."""
    import jax
    import optax

    from bptt_mlip.training import steps as train

    state = train.create_train_state(params, optax.identity(), jax.random.PRNGKey(0))
    meta = {
        "model_config": checkpoint.config_to_dict(cfg),
        "step_config": checkpoint.config_to_dict(step_cfg),
        **_jsonable(extra),
    }
    checkpoint.save_checkpoint(path, 0, state, normalizer, meta)


def command_line() -> str:
    return " ".join([Path(sys.executable).name] + sys.argv)


def run_finetune(run_dir: Path, args: list[str], log_path: Path) -> bool:
    """Run ``experiments.finetune`` with ``args`` into ``run_dir`` as a subprocess (its output
    goes to ``log_path``), unless ``run_dir`` already holds results.json. True on success."""
    import subprocess

    if (run_dir / "results.json").exists():
        return True
    cmd = [sys.executable, "-m", "experiments.finetune", *args, f"--workdir={run_dir}", "--overwrite"]
    info(f"run {run_dir}: {' '.join(cmd[3:])}")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        info(f"run {run_dir} FAILED (exit {proc.returncode}); see {log_path}")
        return False
    info(f"run {run_dir} done in {time.time() - t0:.0f} s")
    return True
