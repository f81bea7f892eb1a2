"""Flags shared by the experiment scripts (absl; import defines them once) and the glue that
hands their values to the library (data sets, splits, model files, run directories)."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from absl import flags, logging

from bptt_mlip.data import curation, datasets
from bptt_mlip.models import registry
from bptt_mlip.workflow import model_io, report
from bptt_mlip.workflow.report import jsonable, markdown_table, write_json  # noqa: F401  (the scripts' writers)
from experiments import configs

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
flags.DEFINE_bool(
    "allow_incomplete_runs", False,
    "Keep the complete frames of a vasprun.xml / OUTCAR cut off mid-run (no closing </modeling> tag / final timing "
    "footer), with a warning naming the last frame; by default such a file is an error (or, with "
    "--skip_bad_records, skipped and counted as 'incomplete'): its last frame is not the relaxed end point.",
)
flags.DEFINE_bool(
    "keep_variable_cell", False,
    "Train on variable-cell relaxations (the cell changes between frames, e.g. VASP ISIF=3). By default they are "
    "left out and counted as 'variable_cell': the force models have no cell input and cannot follow the strain.",
)

# ---- model
flags.DEFINE_enum("model", "adapt", list(configs.MODEL_NAMES),
                  "Force model: 'adapt' (the published ADAPT, raw Cartesian coordinates), 'periodic_adapt' (ADAPT "
                  "with attention on minimum-image pair distances within --cutoff), 'equivariant' (a conservative "
                  "rotation-equivariant energy model with periodic neighbour lists, forces -dE/dX).")
flags.DEFINE_enum("net_force", "free", ["free", "zero"], "ADAPT: 'zero' subtracts each structure's mean force.")
flags.DEFINE_float("cutoff", 5.0, "periodic_adapt / equivariant: neighbour cutoff in Å (below half the cell width).")
flags.DEFINE_integer("channels", 16, "equivariant: channels per irrep of the node features.")
flags.DEFINE_integer("max_angular", 2, "equivariant: largest angular order l of the spherical harmonics.")
flags.DEFINE_integer("d_model", 64, "ADAPT width.")
flags.DEFINE_integer("d_ff", 128, "ADAPT feed-forward width.")
flags.DEFINE_integer("num_heads", 4, "Attention heads.")
flags.DEFINE_integer("num_layers", 2, "Encoder blocks (ADAPT) or interaction blocks (equivariant).")
flags.DEFINE_float("dropout", 0.0, "Dropout rate during pretraining (BPTT rollouts are deterministic).")
flags.DEFINE_integer("embed_hidden", 128, "First embedding layer width.")
flags.DEFINE_enum("input_encoding", "xyz", ["xyz", "xyz+fourier"], "Per-atom position encoding.")

# ---- rollout
flags.DEFINE_integer("max_frames", 75, "Most frames per relaxation (paper: 75 defects, 45 crystals).")
flags.DEFINE_float("stop_rms", 1e-3, "Stop a structure when its RMS movement in a frame is below this (Å).")
flags.DEFINE_float("stop_fmax", 0.0, "Also stop a structure once the largest force on its atoms is below this (eV/Å; "
                   "the ASE fmax rule, checked before each frame); 0 = off.")
flags.DEFINE_enum("remat", "frame", ["none", "frame", "segment"], "Rematerialisation of the rollout in BPTT.")
flags.DEFINE_integer("compact_levels", 2, "Call the force model only on the structures still running, in the "
                     "smallest of batch_size, batch_size/2, ... (at most this many halvings) rows that holds them "
                     "(RolloutConfig.compact_levels; 0 = every frame on the whole batch).")
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
    flags.DEFINE_integer("pretrain_frame_stride", 1,
                         "Use every k-th frame of each training trajectory for pretraining.")
    flags.DEFINE_bool("pretrain_augment_rotation", False, "Rotate every pretraining frame (and its forces) randomly.")
    flags.DEFINE_float("pretrain_augment_translation", 0.0, "Translate every pretraining frame by up to this many Å.")


def load_pretrained(path: str):
    """(config, normalizer, model_params) of a saved model (see ``model_io.load_model``)."""
    cfg, normalizer, params, _ = model_io.load_model(path)
    return cfg, normalizer, params["model"]


def pretrain_model(train_set, val, log, mesh=None):
    """Load --pretrained, or pretrain a new --model on ``train_set``: (config, statistics, params, history).

    A new model's statistics are fitted on the training frames (ADAPT's normaliser, the equivariant
    model's energy scale), and its config to the training and validation frames (the equivariant
    model's neighbour capacity; a cell narrower than twice --cutoff stops here, naming it)."""
    import jax

    from bptt_mlip.training import loops

    if FLAGS.pretrained:
        cfg, normalizer, params = load_pretrained(FLAGS.pretrained)
        info(f"loaded pretrained model from {FLAGS.pretrained} ({cfg})")
        return cfg, normalizer, params, []
    cfg = registry.fit_config(model_config(), list(train_set) + list(val))
    normalizer = registry.fit_statistics(cfg, train_set)
    info(f"{configs.model_name(cfg)} model {cfg}; statistics fitted on {len(train_set)} training trajectories")
    init = registry.init_params(cfg, jax.random.PRNGKey(FLAGS.seed))
    pre_train = train_set
    if FLAGS.pretrain_frame_stride > 1:
        pre_train = [curation.subsample_frames(t, FLAGS.pretrain_frame_stride) for t in train_set]
    params, history = loops.pretrain(
        registry.make_train_force_fn(cfg, normalizer), registry.make_force_fn(cfg, normalizer), init, pre_train, val,
        epochs=FLAGS.pretrain_epochs, batch_size=FLAGS.pretrain_batch_size,
        optim_config=configs.pretrain_optim_config(flag_values()),
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


def model_config():
    """The config of the --model the flags describe (``AdaptConfig`` or ``EquivariantConfig``)."""
    return configs.model_config(flag_values())


def rollout_config(**overrides):
    return configs.rollout_config(flag_values(), **overrides)


def load_trajectories(
    spec: str,
    *,
    skip_bad: bool | None = None,
    min_distance: float | None = None,
    min_frames: int | None = None,
    max_trajectories: int | None = None,
    return_skipped: bool = False,
):
    """``datasets.load_dataset_spec`` of a --dataset spec, reporting on stdout; unset keyword
    arguments take the flag values (--skip_bad_records, --min_atom_distance, --min_frames,
    --max_trajectories; --allow_incomplete_runs and --keep_variable_cell once flags are parsed). Returns
    ``(kept, report)``, or ``(kept, report, skipped)`` with ``return_skipped``."""
    load = datasets.load_dataset_spec(
        spec,
        skip_bad_records=FLAGS.skip_bad_records if skip_bad is None else skip_bad,
        min_atom_distance=FLAGS.min_atom_distance if min_distance is None else min_distance,
        # read only once flags are parsed: library callers (tests) use this without absl's app.run
        allow_incomplete=FLAGS.is_parsed() and FLAGS.allow_incomplete_runs,
        keep_variable_cell=FLAGS.is_parsed() and FLAGS.keep_variable_cell,
        min_frames=FLAGS.min_frames if min_frames is None else min_frames,
        max_trajectories=FLAGS.max_trajectories if max_trajectories is None else max_trajectories,
        report=info,
    )
    if return_skipped:
        return load.trajectories, load.report, load.skipped
    return load.trajectories, load.report


# argument of the split functions -> the flag that sets it
SPLIT_FLAGS = {"num_test": "num_test", "num_val": "num_val", "folds": "cv_folds", "fold": "cv_fold"}


def split(trajs):
    """(test, val, train): ``datasets.split_by_position`` by --num_test / --num_val, or with
    --cv_folds ``datasets.split_fold`` (fold --cv_fold, seed --cv_seed); errors name the flags."""
    try:
        if FLAGS.cv_folds:
            return datasets.split_fold(trajs, FLAGS.cv_folds, FLAGS.cv_fold, FLAGS.cv_seed, FLAGS.num_val)
        return datasets.split_by_position(trajs, FLAGS.num_test, FLAGS.num_val)
    except ValueError as err:
        raise ValueError(as_flag_names(str(err), SPLIT_FLAGS)) from None


def as_flag_names(message: str, flag_of: dict[str, str]) -> str:
    """``message`` with every ``name=`` of an argument in ``flag_of`` written as ``--flag=``."""
    for name, flag in flag_of.items():
        message = re.sub(rf"(?<![-\w]){re.escape(name)}=", f"--{flag}=", message)
    return message


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
        raise FileExistsError(
            f"run directory {d} exists and is not empty; pass --overwrite or choose another --workdir"
        )
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


def metrics_writer(path: Path) -> report.MetricsWriter:
    """metrics.jsonl of a run, echoing each summary row as a progress line."""
    return report.MetricsWriter(path, echo=info)




def step_rule_meta(step_rule, modifiers=None) -> dict:
    """A step rule (with its per-frame modifiers) in the stored form ``model_io.save_model`` takes."""
    if isinstance(step_rule, dict):
        return step_rule
    if hasattr(step_rule, "to_dict"):
        from bptt_mlip.relax import scan, step_rules

        return step_rules.step_rule_to_dict(step_rule, modifiers or scan.FrameModifiers())
    from bptt_mlip.training import checkpoint

    return checkpoint.config_to_dict(step_rule)


def training_domain(train_set):
    """The ``bptt_mlip.data.domain.Domain`` of training trajectories (None for None or an empty set)."""
    from bptt_mlip.data.domain import Domain

    return Domain.from_trajectories(train_set) if train_set else None


def save_model(path: Path, params, normalizer, cfg, step_rule, extra: dict, modifiers=None, *, train_set=None):
    """``model_io.save_model`` with the step rule given as a rule object (or its stored dict); with
    ``train_set`` (the training trajectories) the model carries their ``Domain``."""
    return model_io.save_model(path, params, normalizer, cfg, step_rule_meta(step_rule, modifiers), extra,
                               domain=training_domain(train_set))


def save_pretrained(workdir: Path, cfg, normalizer, model_params, history: list, *, train_set=None) -> Path:
    """Save a pretrained model (no step rule trained yet: the default rule) as
    ``<workdir>/checkpoints/pretrained``, with the ``Domain`` of ``train_set`` (the training
    trajectories) when given; returns that directory."""
    path = workdir / "checkpoints" / "pretrained"
    model_io.save_model(path, {"model": model_params, "step_rule": {}}, normalizer, cfg, {},
                        {"role": "pretrained", "history": history}, domain=training_domain(train_set))
    return path


def explicit_run_flags(exclude: tuple[str, ...] = ()) -> list[str]:
    """The flags of this module given on the command line (not defaults, not ``exclude``), as
    ``--name=value`` arguments to hand on to ``experiments.finetune`` runs started by a driver
    script, so that e.g. ``crossval --dataset=FILE`` runs every fold on FILE."""
    module_flags = FLAGS.flags_by_module_dict().get(__name__, [])
    return [f.serialize() for f in module_flags if f.present and f.name not in exclude]


def command_line() -> str:
    return " ".join([Path(sys.executable).name] + sys.argv)


def run_main(main) -> None:
    """``absl.app.run(main)``, except that a usage error (``app.UsageError``: bad flag values, a run
    directory that cannot be used) is printed alone, with a one-line pointer to the flag help, and
    exits with status 2, instead of after the script's whole flag help. JAX's persistent compilation
    cache is on (:mod:`bptt_mlip.compile_cache`), so a second run skips most compile time."""
    from absl import app

    def checked_main(argv):
        from bptt_mlip import compile_cache

        compile_cache.enable()  # reuse compiles across runs ($BPTT_MLIP_CACHE_DIR; "off" disables)
        try:
            return main(argv)
        except app.UsageError as err:
            script = Path(sys.argv[0]).stem or "script"
            print(f"{script}: error: {err}\n(--helpfull lists every flag with its help)",
                  file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(checked_main)


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
