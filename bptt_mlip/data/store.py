"""Datasets on disk: save and load trajectories, and the datasets shipped with the package.

A dataset is a folder: ``cache.npz`` (concatenated arrays + offsets, written with fixed zip
timestamps so equal data gives equal bytes), ``manifest.json`` (how it was made, statistics,
file hashes, library versions) and optionally ``trajectories.extxyz.gz`` (every frame, with
``traj_id`` and ``frame`` in the info line). The shipped ones live in ``bptt_mlip/data/default``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from bptt_mlip.data.curation import subsample_frames
from bptt_mlip.data.trajectory import Trajectory, make_trajectory, mass_weighted_distance

CACHE_NAME = "cache.npz"
MANIFEST_NAME = "manifest.json"
EXTXYZ_NAME = "trajectories.extxyz.gz"
FORMAT_VERSION = 2
"""Layout of ``cache.npz``. Version 2 adds ``frame_cells`` (every frame's cell of variable-cell
trajectories); a dataset without variable-cell trajectories is still written as version 1, byte
for byte what version-1 code wrote and reads, and version-1 files load unchanged."""
FIXED_CELL_FORMAT_VERSION = 1

# ----------------------------------------------------------------------------- statistics


def dataset_statistics(trajs: Sequence[Trajectory]) -> dict:
    """Frame-count and initial -> final Dq (amu^0.5 Å) statistics, plus atom counts and max forces."""
    frames = np.array([t.num_frames for t in trajs])
    dq = np.array([mass_weighted_distance(t) for t in trajs])
    atoms = np.array([t.num_atoms for t in trajs])
    out = {
        "num_trajectories": len(trajs),
        "num_frames": int(frames.sum()),
        "frames_per_trajectory": {"mean": float(frames.mean()), "median": float(np.median(frames)),
                                  "min": int(frames.min()), "max": int(frames.max())},
        "atoms_per_structure": {"min": int(atoms.min()), "max": int(atoms.max())},
        "dq_initial_final": {"mean": float(dq.mean()), "median": float(np.median(dq)),
                             "min": float(dq.min()), "max": float(dq.max())},
    }
    if all(t.forces is not None for t in trajs):
        f0 = np.array([t.max_force()[0] for t in trajs])
        f1 = np.array([t.max_force()[-1] for t in trajs])
        out["max_force_first"] = {"mean": float(f0.mean()), "max": float(f0.max())}
        out["max_force_last"] = {"mean": float(f1.mean()), "max": float(f1.max())}
    return out


# ----------------------------------------------------------------------------- storage


def _write_npz(path: Path, arrays: dict) -> None:
    """``np.savez_compressed``-compatible file with fixed zip timestamps (equal arrays => equal bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def trajectories_to_arrays(trajs: Sequence[Trajectory], dtype=np.float32) -> dict:
    """Concatenate trajectories into flat arrays with offsets (the ``cache.npz`` layout).

    Keys: format_version, species [sum n] int32, atom_offsets [K+1], frame_offsets [K+1]
    (into the frame axis), positions/forces [sum_k T_k n_k, 3] ``dtype``, energies [sum T] float64,
    cells [K, 3, 3] (first frame's, Å), pbc [K, 3], traj_ids [K] str, sources [K] str; and, only
    when some trajectory has per-frame cells (format version 2), frame_cells [sum T, 3, 3] float64
    (every frame's cell, Å; the first frame's cell repeated for fixed-cell trajectories) with
    has_frame_cells [K] bool saying which trajectories had them.
    """
    n = np.array([t.num_atoms for t in trajs], np.int64)
    tt = np.array([t.num_frames for t in trajs], np.int64)
    has_f = all(t.forces is not None for t in trajs)
    has_e = all(t.energies is not None for t in trajs)
    arrays = {
        "format_version": np.array(FORMAT_VERSION, np.int32),
        "species": np.concatenate([t.species for t in trajs]).astype(np.int32),
        "atom_offsets": np.concatenate([[0], np.cumsum(n)]).astype(np.int64),
        "frame_offsets": np.concatenate([[0], np.cumsum(tt)]).astype(np.int64),
        "positions": np.concatenate([t.positions.reshape(-1, 3) for t in trajs]).astype(dtype),
        "cells": np.stack([t.cell if t.cell is not None else np.zeros((3, 3)) for t in trajs]).astype(np.float64),
        "pbc": np.array([t.pbc for t in trajs], bool),
        "traj_ids": np.array([t.traj_id for t in trajs], dtype=np.str_),
        "sources": np.array([t.source for t in trajs], dtype=np.str_),
    }
    if has_f:
        arrays["forces"] = np.concatenate([t.forces.reshape(-1, 3) for t in trajs]).astype(dtype)
    if has_e:
        arrays["energies"] = np.concatenate([t.energies for t in trajs]).astype(np.float64)
    if not any(t.cells is not None for t in trajs):
        arrays["format_version"] = np.array(FIXED_CELL_FORMAT_VERSION, np.int32)
        return arrays
    arrays["has_frame_cells"] = np.array([t.cells is not None for t in trajs], bool)
    arrays["frame_cells"] = np.concatenate([_frame_cells(t) for t in trajs]).astype(np.float64)
    return arrays


def _frame_cells(traj: Trajectory) -> np.ndarray:
    """[T, 3, 3] cells of every frame (Å): the per-frame ones, else the fixed cell (zeros without one)."""
    if traj.cells is not None:
        return np.asarray(traj.cells, np.float64)
    cell = traj.cell if traj.cell is not None else np.zeros((3, 3))
    return np.broadcast_to(np.asarray(cell, np.float64), (traj.num_frames, 3, 3))


def trajectories_from_arrays(arrays, source: str | None = None) -> list[Trajectory]:
    """Inverse of :func:`trajectories_to_arrays` (positions/forces come back as float64, per-frame
    cells exactly). Raises ValueError for a format version newer than this code reads."""
    # stored with shape (1,): the writer's ascontiguousarray makes 0-d arrays 1-d
    version = int(np.ravel(arrays["format_version"])[0]) if "format_version" in arrays else 1
    if version > FORMAT_VERSION:
        raise ValueError(f"cache format version {version} is newer than this library reads ({FORMAT_VERSION})")
    ao, fo = arrays["atom_offsets"], arrays["frame_offsets"]
    has_cells = arrays["has_frame_cells"] if "has_frame_cells" in arrays else np.zeros(len(ao) - 1, bool)
    pos = arrays["positions"]
    forces = arrays["forces"] if "forces" in arrays else None
    energies = arrays["energies"] if "energies" in arrays else None
    out, row = [], 0
    for k in range(len(ao) - 1):
        n, t = int(ao[k + 1] - ao[k]), int(fo[k + 1] - fo[k])
        sl = slice(row, row + t * n)
        row += t * n
        cell = np.asarray(arrays["cells"][k], np.float64)
        out.append(
            make_trajectory(
                arrays["species"][ao[k] : ao[k + 1]],
                pos[sl].reshape(t, n, 3),
                cell=cell if np.any(cell) else None,
                pbc=tuple(arrays["pbc"][k]),
                forces=None if forces is None else forces[sl].reshape(t, n, 3),
                energies=None if energies is None else energies[fo[k] : fo[k + 1]],
                source=str(arrays["sources"][k]) if source is None else source,
                traj_id=str(arrays["traj_ids"][k]),
                cells=np.asarray(arrays["frame_cells"][fo[k] : fo[k + 1]], np.float64) if has_cells[k] else None,
            )
        )
    return out


def write_extxyz(trajs: Sequence[Trajectory], path: Path) -> None:
    """Every frame to an extended XYZ file (gzip with mtime 0 if the name ends in .gz)."""
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    buf = io.StringIO()
    for t in trajs:
        for i in range(t.num_frames):
            cell = t.cells[i] if t.cells is not None else t.cell
            atoms = Atoms(numbers=t.species, positions=t.positions[i], cell=cell, pbc=t.pbc)
            atoms.info["traj_id"] = t.traj_id
            atoms.info["frame"] = i
            atoms.calc = SinglePointCalculator(
                atoms,
                energy=None if t.energies is None else float(t.energies[i]),
                forces=None if t.forces is None else t.forces[i],
            )
            ase.io.write(buf, atoms, format="extxyz")
    data = buf.getvalue().encode()
    path = Path(path)
    if path.suffix == ".gz":
        with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
            gz.write(data)
    else:
        path.write_bytes(data)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _versions() -> dict:
    import ase
    import jax

    try:
        import jax_md

        jmd = getattr(jax_md, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        jmd = None
    return {"python": platform.python_version(), "numpy": np.__version__, "ase": ase.__version__,
            "jax": jax.__version__, "jax_md": jmd}


def save_dataset(
    trajs: Sequence[Trajectory], out_dir, *, manifest: dict, write_xyz: bool = True, dtype=np.float32,
    frame_stride: int = 1,
) -> dict:
    """Write ``cache.npz`` (+ ``trajectories.extxyz.gz``) and ``manifest.json`` into ``out_dir``.

    ``manifest`` holds generation settings; counts, statistics (of the full trajectories),
    file hashes and library versions are added. ``frame_stride`` > 1 stores only every
    stride-th frame plus the last (to keep shipped files small; first and last frames are
    always exact). Returns the full manifest.
    """
    out = Path(out_dir)
    full_stats = dataset_statistics(trajs)
    trajs = [subsample_frames(t, frame_stride) for t in trajs]
    out.mkdir(parents=True, exist_ok=True)
    arrays = trajectories_to_arrays(trajs, dtype)
    _write_npz(out / CACHE_NAME, arrays)
    files = {CACHE_NAME: _sha256(out / CACHE_NAME)}
    if write_xyz:
        write_extxyz(trajs, out / EXTXYZ_NAME)
        files[EXTXYZ_NAME] = _sha256(out / EXTXYZ_NAME)
    full = dict(manifest)
    full.update(
        format_version=int(np.ravel(arrays["format_version"])[0]),
        dtype=np.dtype(dtype).name,
        statistics=full_stats,
        stored={"frame_stride": int(frame_stride), "num_frames": int(sum(t.num_frames for t in trajs))},
        files=files,
        sizes_bytes={k: (out / k).stat().st_size for k in files},
        versions=_versions(),
    )
    (out / MANIFEST_NAME).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def load_dataset(directory) -> list[Trajectory]:
    """Load a dataset folder: the ``cache.npz`` when it matches the manifest's hash and counts,
    else the extxyz file. Raises ``FileNotFoundError`` / ``ValueError`` naming the folder."""
    from bptt_mlip.data.readers import read_extxyz

    d = Path(directory)
    manifest_path = d / MANIFEST_NAME
    if not manifest_path.exists():
        raise FileNotFoundError(f"{d}: no {MANIFEST_NAME}; not a dataset folder")
    manifest = json.loads(manifest_path.read_text())
    stats = manifest.get("statistics", {})
    cache = d / CACHE_NAME
    problems = []
    if cache.exists():
        want = manifest.get("files", {}).get(CACHE_NAME)
        if want is None or _sha256(cache) == want:
            with np.load(cache, allow_pickle=False) as z:
                trajs = trajectories_from_arrays({k: z[k] for k in z.files}, source=str(cache))
            stored = manifest.get("stored", {}).get("num_frames", stats.get("num_frames"))
            total = sum(t.num_frames for t in trajs)
            if len(trajs) == stats.get("num_trajectories", len(trajs)) and total == (stored or total):
                return trajs
            problems.append("cache counts differ from the manifest")
        else:
            problems.append("cache hash differs from the manifest")
    xyz = d / EXTXYZ_NAME
    if xyz.exists():
        return read_extxyz(xyz)
    raise ValueError(f"{d}: cannot load ({'; '.join(problems) or 'no cache.npz and no extxyz'})")


def default_dataset_dir():
    """Path of the shipped datasets (``bptt_mlip/data/default``)."""
    import importlib.resources

    return importlib.resources.files("bptt_mlip.data") / "default"


def load_default_dataset(name: str = "si_defects") -> list[Trajectory]:
    """Load a shipped dataset: 'si_defects' (Si point defects, 64-atom host, SW) or 'crystals'."""
    import importlib.resources

    base = default_dataset_dir()
    folder = base / name
    if not folder.is_dir():
        available = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise FileNotFoundError(f"no shipped dataset {name!r} in {base}; available: {available}")
    with importlib.resources.as_file(folder) as path:
        return load_dataset(path)
