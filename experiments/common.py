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

from bptt_mlip import checkpoint, model, relax
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

flags.DEFINE_string("workdir", "runs/default", "Run directory (config, checkpoints, metrics, tables, plots).")
flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty existing run directory.")
flags.DEFINE_integer("seed", 0, "Seed of every random choice in the run.")


def define_pretrain_flags() -> None:
    """Flags of force pretraining (shared by pretrain.py and finetune.py)."""
    flags.DEFINE_string("pretrained", "", "Checkpoint directory of a pretrained model; empty = pretrain here.")
    flags.DEFINE_integer("pretrain_epochs", 10, "Force-pretraining epochs over every training frame.")
    flags.DEFINE_integer("pretrain_batch_size", 32, "Frames per pretraining batch.")
    flags.DEFINE_float("pretrain_lr", 5e-4, "Adam learning rate of pretraining (paper's ADAPT: 5e-5 for ~80 epochs).")
    flags.DEFINE_integer("pretrain_frame_stride", 1, "Use every k-th frame of each training trajectory for pretraining.")


def load_pretrained(path: str):
    """(config, normalizer, model_params) from a saved model checkpoint."""
    saved, normalizer, meta = checkpoint.restore_model(path)
    if "model_config" not in meta:
        raise ValueError(f"{path}: checkpoint metadata has no model_config; was it written by bptt-mlip?")
    return checkpoint.adapt_config_from_dict(meta["model_config"]), normalizer, saved["model"]


def pretrain_model(train_set, val, log):
    """Load --pretrained, or pretrain a new model on ``train_set``: (config, normalizer, params, history)."""
    import jax

    from bptt_mlip import loops, optim

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
        optim_config=optim.OptimConfig(learning_rate=FLAGS.pretrain_lr, clip_norm=1.0, freeze_step=True),
        seed=FLAGS.seed, log=log,
    )
    return cfg, normalizer, params, history


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


def load_trajectories(spec: str):
    """Trajectories from a --dataset spec, curated; logs the curation report."""
    if spec.startswith("default:"):
        trajs = generator.load_default_dataset(spec.split(":", 1)[1])
    elif Path(spec).is_dir():
        trajs = generator.load_dataset(spec)
    else:
        paths = [p for p in spec.split(",") if p]
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"--dataset: no such file(s): {missing}")
        trajs = readers.read_trajectories(paths)
    kept, report = curation.curate(trajs, min_frames=FLAGS.min_frames)
    info(f"dataset {spec}: {report}")
    if FLAGS.max_trajectories:
        kept = kept[: FLAGS.max_trajectories]
    return kept, report


def split(trajs):
    """(test, val, train) by position: first num_test, next num_val, rest (paper appendix C.1)."""
    n_test, n_val = FLAGS.num_test, FLAGS.num_val
    if n_test + n_val >= len(trajs):
        raise ValueError(
            f"--num_test={n_test} + --num_val={n_val} leaves no training data out of {len(trajs)} trajectories"
        )
    test, rest = curation.split_test_train(trajs, n_test)
    val, train = curation.split_test_train(rest, n_val)
    return test, val, train


def prepare_workdir(workdir: str, overwrite: bool) -> Path:
    """Create the run directory; refuse to write into a non-empty one unless ``overwrite``."""
    d = Path(workdir)
    if d.exists() and any(d.iterdir()) and not overwrite:
        raise FileExistsError(f"run directory {d} exists and is not empty; pass --overwrite or choose another --workdir")
    if d.exists() and overwrite:
        for sub in ("checkpoints", "plots"):
            shutil.rmtree(d / sub, ignore_errors=True)
        for f in ("metrics.jsonl", "results.json", "results.md"):
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

    from bptt_mlip import train

    state = train.create_train_state(params, optax.identity(), jax.random.PRNGKey(0))
    meta = {
        "model_config": checkpoint.config_to_dict(cfg),
        "step_config": checkpoint.config_to_dict(step_cfg),
        **_jsonable(extra),
    }
    checkpoint.save_checkpoint(path, 0, state, normalizer, meta)


def command_line() -> str:
    return " ".join([Path(sys.executable).name] + sys.argv)
