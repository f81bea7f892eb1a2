"""Datasets by name: load a dataset spec (shipped set, dataset folder or files) validated and
curated, and split it into test, validation and training trajectories.

    from bptt_mlip.data import datasets
    load = datasets.load_dataset_spec("default:si_defects")
    test, val, train = datasets.split_by_position(load.trajectories, num_test=40, num_val=20)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from bptt_mlip.data import checks, curation, readers, store, trajectory
from bptt_mlip.data.trajectory import Trajectory, TrajectoryError

DEFAULT_PREFIX = "default:"


@dataclasses.dataclass(frozen=True)
class DatasetLoad:
    """What :func:`load_dataset_spec` returns.

    Attributes:
      trajectories: the valid, curated trajectories kept (in dataset order, at most
        ``max_trajectories`` of them when that is set).
      report: the :class:`~bptt_mlip.data.curation.CurationReport` of curation.
      skipped: ``checks.skipped_summary(...)`` of the records left out
        (``{"num_skipped", "by_reason", "records"}``): invalid ones with ``skip_bad_records``,
        variable-cell ones (reason ``variable_cell``) unless ``keep_variable_cell``.
    """

    trajectories: list[Trajectory]
    report: curation.CurationReport
    skipped: dict


def _skip_record(where: str, err: Exception) -> dict:
    return {"where": where, "reason": trajectory.error_reason(err), "message": str(err)}


def read_files(
    paths: Sequence[str | Path], *, skip_bad_records: bool = False, allow_incomplete: bool = False
) -> tuple[list[Trajectory], list[dict]]:
    """Read data files (format guessed from each name): ``(trajectories, skipped)``.

    Without ``skip_bad_records`` an invalid record raises its ``TrajectoryError`` (a run cut off
    mid-way, a damaged file, an unknown element symbol included). With it, an extxyz file is read
    trajectory by trajectory (keeping its valid ones); a file of another format, or a file that
    cannot be read at all (damaged gzip), is left out whole. Each record left out is a
    ``{"where", "reason", "message"}`` dict in ``skipped``. ``allow_incomplete`` keeps the
    complete frames of a vasprun.xml / OUTCAR cut off mid-run (with a warning naming the last).
    """
    out: list[Trajectory] = []
    skipped: list[dict] = []
    for path in paths:
        try:
            out.extend(readers.read_trajectories([path], allow_incomplete=allow_incomplete))
            continue
        except TrajectoryError as err:
            if not skip_bad_records:
                raise
            first = err
        if readers.guess_format(path) != "extxyz":
            skipped.append(_skip_record(str(path), first))
            continue
        try:
            records = list(readers.iter_extxyz_trajectories(path))
        except TrajectoryError as err:
            skipped.append(_skip_record(str(path), err))
            continue
        for record in records:
            if record.error is None:
                out.append(record.trajectory)
            else:
                skipped.append(_skip_record(f"{path} trajectory {record.traj_id!r}", record.error))
    return out, skipped


def data_files_in(folder: str | Path) -> list[Path]:
    """The data files of a folder that is not a dataset folder, sorted by name: every file whose format
    :func:`readers.guess_format` knows. One run saved twice (``NAME.vasprun.xml[.gz]`` beside
    ``NAME.OUTCAR[.gz]``) is read once, from its vasprun.xml, so that it cannot land in two splits.
    Raises FileNotFoundError when there is none."""
    files = []
    for path in sorted(Path(folder).iterdir()):
        try:
            if path.is_file():
                files.append((path, readers.guess_format(path)))
        except ValueError:
            continue  # not a data file (README, scripts, ...)
    runs = {_run_name(p) for p, fmt in files if fmt == "vasprun"}
    kept = [p for p, fmt in files if not (fmt == "outcar" and _run_name(p) in runs)]
    if not kept:
        raise FileNotFoundError(f"{folder}: no {store.MANIFEST_NAME} and no data files (extxyz, vasprun.xml, OUTCAR, "
                                "MPtrj .json)")
    return kept


def _run_name(path: Path) -> str:
    """``NAME`` of ``NAME.vasprun.xml.gz`` / ``NAME.OUTCAR`` / ``NAME_OUTCAR``: the run a VASP file belongs to."""
    name = path.name.lower().removesuffix(".gz")
    for marker in ("vasprun.xml", "vasprun", "outcar", ".xml"):
        name = name.replace(marker, "")
    return name.strip("._-")


def read_dataset_spec(
    spec: str, *, skip_bad_records: bool = False, allow_incomplete: bool = False
) -> tuple[list[Trajectory], list[dict]]:
    """Trajectories of ``spec`` as read, before validation and curation: ``(trajectories, skipped)``.

    ``spec`` is ``"default:<name>"`` (a shipped set, see ``store.load_default_dataset``), a
    dataset folder (``manifest.json`` + ``cache.npz``), a folder of data files (:func:`data_files_in`)
    or comma-separated files (extxyz,
    vasprun.xml[.gz], OUTCAR, MPtrj .json; see :func:`read_files`). Raises ValueError for an
    empty spec and FileNotFoundError naming missing files.
    """
    if spec.startswith(DEFAULT_PREFIX):
        return store.load_default_dataset(spec[len(DEFAULT_PREFIX):]), []
    if Path(spec).is_dir():
        if (Path(spec) / store.MANIFEST_NAME).exists():
            return store.load_dataset(spec), []
        spec = ",".join(str(p) for p in data_files_in(spec))
    paths = [p for p in spec.split(",") if p]
    if not paths:
        raise ValueError("dataset spec is empty; give default:<name>, a dataset folder or data files")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"dataset spec {spec!r}: no such file(s): {missing}")
    return read_files(paths, skip_bad_records=skip_bad_records, allow_incomplete=allow_incomplete)


def load_dataset_spec(
    spec: str,
    *,
    skip_bad_records: bool = False,
    min_atom_distance: float = 0.5,
    min_frames: int = 3,
    max_trajectories: int = 0,
    allow_incomplete: bool = False,
    keep_variable_cell: bool = False,
    cell_tolerance: float = checks.DEFAULT_CELL_TOLERANCE,
    report: Callable[[str], None] = print,
) -> DatasetLoad:
    """Trajectories of a dataset spec (see :func:`read_dataset_spec`), validated and curated.

    Every trajectory is checked (``checks.check_relaxation``: finite numbers, known elements,
    consistent atom counts, at least 2 frames, no two atoms closer than ``min_atom_distance`` Å
    in the first and last frames; 0 = no distance check). An invalid one, and a vasprun.xml /
    OUTCAR cut off mid-run or a damaged file, raises ``TrajectoryError`` naming file, trajectory
    and frame, unless ``skip_bad_records``, which leaves it out and counts it by reason.
    ``allow_incomplete`` keeps the complete frames of a run cut off mid-way instead (warning).

    Variable-cell relaxations (lattice change above ``cell_tolerance`` Å, e.g. VASP ISIF=3) are
    always left out and counted with reason ``variable_cell`` (the force models cannot follow a
    changing box) unless ``keep_variable_cell``. Curation then drops trajectories with fewer
    than ``min_frames`` frames; ``max_trajectories`` > 0 keeps only the first that many. The
    skipped records and the curation report are passed to ``report`` (one line each). Raises
    ValueError when no trajectory is left.
    """
    trajs, skipped = read_dataset_spec(spec, skip_bad_records=skip_bad_records, allow_incomplete=allow_incomplete)
    good, bad = checks.check_relaxations(trajs, skip_bad=skip_bad_records, min_distance=min_atom_distance)
    skipped = skipped + bad
    if skipped:
        report(f"skipped {len(skipped)} invalid trajectories (skip_bad_records): "
               f"{checks.skipped_summary(skipped)['by_reason']}")
    if not keep_variable_cell:
        good, variable = checks.split_variable_cell(good, tolerance=cell_tolerance)
        if variable:
            report(f"skipped {len(variable)} variable-cell trajectories (keep_variable_cell=False)")
        skipped = skipped + variable
    for record in skipped:
        report(f"  skipped [{record['reason']}] {record['message']}")
    summary = checks.skipped_summary(skipped)
    kept, curation_report = curation.curate(good, min_frames=min_frames)
    report(f"dataset {spec}: {curation_report}")
    if max_trajectories:
        kept = kept[:max_trajectories]
    if not kept:
        raise ValueError(
            f"dataset {spec!r}: no usable trajectories ({curation_report}; {len(skipped)} skipped: "
            f"{summary['by_reason']})"
        )
    return DatasetLoad(kept, curation_report, summary)


def split_by_position(trajs: Sequence, num_test: int, num_val: int) -> tuple[list, list, list]:
    """``(test, val, train)`` by position: the first ``num_test`` items, the next ``num_val``,
    the rest (the paper's appendix C.1 split). Raises ValueError when no training item is left."""
    if num_test < 0 or num_val < 0:
        raise ValueError(f"num_test={num_test} and num_val={num_val} must be >= 0")
    if num_test + num_val >= len(trajs):
        raise ValueError(
            f"num_test={num_test} + num_val={num_val} >= {len(trajs)} usable trajectories: no training data left; "
            "lower num_test / num_val or add data"
        )
    test, rest = curation.split_test_train(trajs, num_test)
    val, train = curation.split_test_train(rest, num_val)
    return test, val, train


def split_fold(trajs: Sequence, folds: int, fold: int, seed: int, num_val: int) -> tuple[list, list, list]:
    """``(test, val, train)`` for k-fold cross-validation: test is fold ``fold`` of the seeded
    partition ``curation.kfold_splits(len(trajs), folds, seed)``; validation the first
    ``num_val`` of the remaining items (in dataset order), training the others. Raises
    ValueError for a fold outside ``0..folds - 1`` or when no training item is left."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold={fold} must be in 0..{folds - 1} (folds={folds})")
    if num_val < 0:
        raise ValueError(f"num_val={num_val} must be >= 0")
    rest_idx, test_idx = curation.kfold_splits(len(trajs), folds, seed)[fold]
    if num_val >= len(rest_idx):
        raise ValueError(
            f"num_val={num_val} >= {len(rest_idx)} trajectories outside test fold {fold}: no training data left"
        )
    rest = [trajs[i] for i in rest_idx]
    return [trajs[i] for i in test_idx], rest[:num_val], rest[num_val:]
