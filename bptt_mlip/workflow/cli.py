"""Command line: relax structures with a trained checkpoint, or describe a checkpoint.

    python -m bptt_mlip relax POSCAR defect.cif frames.extxyz --checkpoint runs/si_cpu/checkpoints/bptt_best \\
        [--method frame|fire] [--out relaxed.extxyz] [--max-frames 75] [--fmax 0.05]
    python -m bptt_mlip info runs/si_cpu/checkpoints/bptt_best

(``bptt-mlip ...`` is the same once the package is installed.) Inputs are read with
``ase.io.read`` (extxyz, CIF, POSCAR/CONTCAR, anything ASE reads; every frame of a multi-frame
file); the output is one extxyz file with every relaxed structure, each frame's ``info`` holding
``num_frames``, ``converged``, ``diverged``, ``max_force``, ``method``, ``source`` and ``source_index``.
Structures outside the checkpoint's training domain (elements, atom counts, cells it was trained
on: :class:`bptt_mlip.data.domain.Domain`) are named in a warning line on stderr and relaxed
(``--out-of-domain=warn``, the default), refused (``error``: exit status 2, nothing written) or not
checked (``ignore``); the output's ``info`` then also holds ``in_domain``. Checkpoints saved
without a domain are not checked.

Exit status (scripts can tell the outcomes apart):

* 0: every structure relaxed without diverging (with ``--fail-on-unconverged``: and converged);
* 1: at least one structure diverged: a non-finite or too large frame, or a runaway end point
  (two atoms closer than half their covalent radii sum, an atom moved more than 5 Å, see
  :mod:`bptt_mlip.relax.runaway`);
* 2: usage errors (missing checkpoint, unreadable input, bad flags, structures refused with
  ``--out-of-domain=error``);
* 3: with ``--fail-on-unconverged``, none diverged but at least one did not converge within
  ``--max-frames``.

The output file is written for statuses 0, 1 and 3.

Compiled programs are kept in JAX's persistent compilation cache (:mod:`bptt_mlip.compile_cache`:
``$BPTT_MLIP_CACHE_DIR``, else ``~/.cache/bptt_mlip/jax``; ``BPTT_MLIP_CACHE_DIR=off`` disables it),
so a second call on the same machine skips most of the first call's compile time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_UNCONVERGED = 0, 1, 2, 3
"""The exit statuses of the module docstring."""

MODEL_TITLES = {"adapt": "ADAPT", "equivariant": "equivariant energy model"}
"""How ``info`` names each model kind of :mod:`bptt_mlip.models.registry`."""


class CliError(Exception):
    """A user-facing error: printed as ``bptt-mlip: error: ...`` with exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bptt-mlip", description="Relax structures with a BPTT-fine-tuned force model.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{relax,info}")

    r = sub.add_parser("relax", help="relax structures read from files; write extxyz",
                       description="Relax every structure of every INPUT file (extxyz, CIF, POSCAR, ... read with "
                                   "ase.io.read; all frames) and write them to one extxyz file.")
    r.add_argument("inputs", nargs="+", metavar="INPUT", help="structure files")
    r.add_argument("--checkpoint", "-c", required=True, metavar="DIR",
                   help="checkpoint directory (e.g. runs/si_cpu/checkpoints/bptt_best) or a run directory")
    r.add_argument("--method", choices=("frame", "fire"), default="frame",
                   help="'frame': the model's BPTT relaxation map X <- X + eta F(X) (default); "
                        "'fire': FIRE (ASE semantics)")
    r.add_argument("--out", "-o", default="relaxed.extxyz", metavar="OUT.extxyz",
                   help="output file (default: %(default)s)")
    r.add_argument("--max-frames", type=int, default=None,
                   help="most frames (frame method, default: the checkpoint's training setting, else 75) or FIRE "
                        "steps (fire method, default 200)")
    r.add_argument("--fmax", type=float, default=None,
                   help="FIRE convergence: largest per-atom force, eV/Å (default: the FIRE fmax of the checkpoint's "
                        "training run, else 0.05)")
    r.add_argument("--stop-rms", type=float, default=None,
                   help="frame method: stop when a frame's RMS movement is below this, Å (default: the checkpoint's "
                        "training stop rule, with its force stop, else 1e-3)")
    r.add_argument("--step-size", type=float, default=None,
                   help="frame method: fixed step eta (Å²/eV) instead of the checkpoint's step rule")
    r.add_argument("--batch-size", type=int, default=16, help="structures per compiled call (default: %(default)s)")
    r.add_argument("--format", default=None, help="ase.io format of the inputs (default: guessed from each file name)")
    r.add_argument("--out-of-domain", "--out_of_domain", dest="out_of_domain", choices=("warn", "error", "ignore"),
                   default="warn", help="structures outside the checkpoint's training domain (unseen elements, atom "
                                        "counts or cells): warn and relax, refuse (exit 2) or do not check "
                                        "(default: %(default)s)")
    r.add_argument("--fail-on-unconverged", "--fail_on_unconverged", dest="fail_on_unconverged",
                   action="store_true", help=f"exit with status {EXIT_UNCONVERGED} when a structure did not converge "
                                             f"(a diverged one always gives {EXIT_DIVERGED})")

    i = sub.add_parser("info", help="print what a checkpoint holds")
    i.add_argument("checkpoint", metavar="DIR", help="checkpoint directory or run directory")
    return p


def _load_model(path: str):
    from bptt_mlip.workflow import api

    try:
        return api.TrainedModel.load(path)
    except FileNotFoundError as err:
        raise CliError(str(err)) from None
    except Exception as err:  # corrupt or foreign directory
        raise CliError(f"cannot load checkpoint {path!r}: {type(err).__name__}: {err}") from None


def _read_inputs(paths: list[str], fmt: str | None) -> list[tuple[str, int, object]]:
    import ase.io

    out = []
    for path in paths:
        if not Path(path).exists():
            raise CliError(f"input file {path!r} does not exist")
        if Path(path).is_dir():
            raise CliError(f"input {path!r} is a directory, expected a structure file")
        try:
            frames = ase.io.read(path, index=":", format=fmt)
        except Exception as err:
            raise CliError(f"cannot read structures from {path!r}: {type(err).__name__}: {err}") from None
        if not isinstance(frames, list):
            frames = [frames]
        if not frames:
            raise CliError(f"no structures in {path!r}")
        out.extend((path, k, atoms) for k, atoms in enumerate(frames))
    return out


def _writable_info(info: dict) -> dict:
    """Keep only ``info`` entries extxyz can write (numbers, strings, bools, small numeric arrays)."""
    keep = {}
    for k, v in info.items():
        if isinstance(v, (str, bool, int, float, np.integer, np.floating, np.bool_)):
            keep[k] = v
        elif isinstance(v, np.ndarray) and v.dtype.kind in "biuf" and v.ndim <= 1:
            keep[k] = v
    return keep


def cmd_relax(args) -> int:
    import ase.io

    from bptt_mlip.workflow import api, model_io

    if args.max_frames is not None and args.max_frames < 1:
        raise CliError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.method == "fire" and args.step_size is not None:
        raise CliError("--step-size applies to --method=frame only")
    out_path = Path(args.out)
    if out_path.parent and not out_path.parent.exists():
        raise CliError(f"output folder {str(out_path.parent)!r} does not exist")
    items = _read_inputs(args.inputs, args.format)
    model = _load_model(args.checkpoint)
    kwargs = dict(method=args.method, batch_size=args.batch_size)
    if args.method == "frame":
        kwargs.update(max_frames=args.max_frames, stop_rms=args.stop_rms, step_size=args.step_size)
    else:
        kwargs.update(fire_config=model_io.fire_settings(model.meta, args.fmax, args.max_frames or None))
    atoms_list = [a for _, _, a in items]
    problems = _screen_domain(model, items, args.out_of_domain)
    kwargs.update(on_out_of_domain="ignore")  # checked and reported above, once
    try:
        res = api.relax(atoms_list, model, **kwargs)
    except ValueError as err:  # e.g. more atoms than the largest bucket, unknown element
        raise CliError(str(err)) from None

    written = []
    print(f"{'source':<32} {'#':>3} {'formula':<14} {'atoms':>5} {'frames':>6} {'converged':>9} {'max |F| eV/Å':>13}")
    for (path, k, _), atoms, nf, conv, div, fmax in zip(
        items, res.structures, res.num_frames, res.converged, res.diverged, res.max_force
    ):
        atoms.info = _writable_info(atoms.info)
        atoms.info.update(num_frames=int(nf), converged=bool(conv), diverged=bool(div), max_force=float(fmax),
                          method=args.method, source=str(path), source_index=int(k))
        atoms.arrays = {key: v for key, v in atoms.arrays.items()  # stale forces out; numeric arrays kept
                        if key in ("numbers", "positions") or (v.dtype.kind in "biuf" and "force" not in key)}
        written.append(atoms)
        flag = "yes" if conv else ("DIVERGED" if div else "no")
        print(f"{str(path)[-32:]:<32} {k:>3} {atoms.get_chemical_formula():<14} {len(atoms):>5} {int(nf):>6} "
              f"{flag:>9} {float(fmax):>13.4g}")
    if model.domain is not None and args.out_of_domain != "ignore":
        for atoms, structure_problems in zip(written, problems):
            atoms.info["in_domain"] = not structure_problems
    ase.io.write(out_path, written, format="extxyz")
    n_conv = int(np.sum(res.converged))
    print(f"{n_conv}/{len(written)} converged ({args.method}); wrote {out_path}")
    return exit_status(res.converged, res.diverged, args.fail_on_unconverged)


def exit_status(converged, diverged, fail_on_unconverged: bool = False) -> int:
    """The command's exit status from per-structure ``converged`` / ``diverged`` [n] flags (module docstring)."""
    if np.any(diverged):
        return EXIT_DIVERGED
    if fail_on_unconverged and not np.all(converged):
        return EXIT_UNCONVERGED
    return EXIT_OK


def _screen_domain(model, items: list[tuple[str, int, object]], mode: str) -> list[list[str]]:
    """Per input structure, its problems against the checkpoint's training domain; one warning line
    on stderr per structure outside it (``mode="warn"``), or a :class:`CliError` listing them (``"error"``)."""
    if model.domain is None or mode == "ignore":
        return [[] for _ in items]
    problems = model.domain.check_each([atoms for _, _, atoms in items])
    lines = [f"{path}[{k}] ({atoms.get_chemical_formula()}): {'; '.join(ps)}"
             for (path, k, atoms), ps in zip(items, problems) if ps]
    if lines and mode == "error":
        raise CliError(f"{len(lines)} structure(s) outside the checkpoint's training domain "
                       f"({model.domain.describe()}):\n  " + "\n  ".join(lines)
                       + "\n(--out-of-domain=warn relaxes them anyway)")
    for line in lines:
        print(f"bptt-mlip: warning: outside the training domain ({model.domain.describe()}): {line}",
              file=sys.stderr)
    return problems


def cmd_info(args) -> int:
    from bptt_mlip.training import checkpoint

    model = _load_model(args.checkpoint)
    meta = dict(model.meta)
    print(f"checkpoint: {model.source}")
    print(f"saved step: {checkpoint.latest_step(model.source)}")
    for key in ("role", "epoch"):
        if key in meta:
            print(f"{key}: {meta[key]}")
    print(f"model kind: {model.kind}")
    print(f"model config ({MODEL_TITLES.get(model.kind, model.kind)}):")
    for k, v in meta.get("model_config", {}).items():
        print(f"  {k} = {v}")
    print(f"parameters: {model.num_params()}")
    print("step config:")
    for k, v in meta.get("step_config", {}).items():
        print(f"  {k} = {v}")
    print(f"step: {model.step_description()}")
    print_statistics(model.normalizer)
    other = {k: v for k, v in meta.items() if k not in ("model_kind", "model_config", "step_config", "role", "epoch")}
    if other:
        print("other meta:")
        for k, v in other.items():
            print(f"  {k} = {v}")
    return 0


def print_statistics(statistics) -> None:
    """The model's training-set statistics: ADAPT's normaliser, or the equivariant model's energy scale."""
    from ase.data import chemical_symbols

    from bptt_mlip import descriptors
    from bptt_mlip.models import adapt

    if not isinstance(statistics, adapt.Normalizer):
        print("energy scale (training-set statistics):")
        print(f"  per-atom output scale: {float(statistics.energy_scale):.5g} eV")
        shift = np.asarray(statistics.element_shift)
        for z in np.nonzero(shift)[0]:
            print(f"  element shift {chemical_symbols[z]}: {shift[z]:.6g} eV/atom")
        return
    names = ["x", "y", "z", *descriptors.DESCRIPTOR_NAMES]
    print("normaliser (training-set statistics):")
    print(f"  {'input':<22} {'mean':>12} {'std':>12}")
    for name, mu, sd in zip(names, np.asarray(statistics.input_mean), np.asarray(statistics.input_std)):
        print(f"  {name:<22} {mu:>12.5g} {sd:>12.5g}")
    fm, fs = np.asarray(statistics.force_mean), np.asarray(statistics.force_std)
    mean, std = np.array2string(fm, precision=4), np.array2string(fs, precision=4)
    print(f"  {'force (x, y, z) eV/Å':<22} mean {mean} std {std}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bptt_mlip import compile_cache

    compile_cache.enable()  # the next call reuses this one's compiles ($BPTT_MLIP_CACHE_DIR; "off" disables)
    try:
        if args.command == "relax":
            return cmd_relax(args)
        return cmd_info(args)
    except CliError as err:
        print(f"bptt-mlip: error: {err}", file=sys.stderr)
        return 2
