"""Whole files only: checks that a DFT output file holds a finished run before its frames are
trusted, and parser failures turned into :class:`~bptt_mlip.data.trajectory.TrajectoryError`
naming the file, trajectory and frame.

A VASP run cut off mid-way (job killed, disk full, copy interrupted) still parses: pymatgen and
ASE quietly return the ionic steps written so far, and the last of them, which a relaxation
dataset uses as the relaxed target, is then just where the run stopped. So completeness is read
from the file's own end markers, not from what the parser returned:

* ``vasprun.xml`` is finished when it ends with the closing ``</modeling>`` tag; its complete
  ionic steps are its closed ``</calculation>`` blocks.
* ``OUTCAR`` is finished when it carries VASP's closing "General timing and accounting" footer;
  its complete ionic steps have both a force table (closed by a "total drift" line) and the
  free-energy block VASP prints after it.

An unfinished file raises ``TrajectoryError`` (reason ``incomplete``) saying which frame is the
last complete one, unless the caller allows incomplete runs; then the complete frames are kept
with an :class:`IncompleteRunWarning` naming the last frame.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib

from bptt_mlip.data.trajectory import REASON_DAMAGED_FILE, REASON_INCOMPLETE, REASON_UNKNOWN_ELEMENT, TrajectoryError

VASPRUN_END_TAG = "</modeling>"
VASPRUN_STEP_END = "</calculation>"
OUTCAR_FOOTER = "General timing and accounting"
OUTCAR_FORCES_END = "total drift:"
OUTCAR_ENERGY = "FREE ENERGIE OF THE ION-ELECTRON SYSTEM"

_KIND_LABEL = {"vasprun": "vasprun.xml", "outcar": "OUTCAR"}
_END_MARKER = {"vasprun": f"no closing {VASPRUN_END_TAG} tag",
               "outcar": f"no final '{OUTCAR_FOOTER}' footer"}


class IncompleteRunWarning(UserWarning):
    """An unfinished DFT run was kept (``allow_incomplete``): its last frame is where it was cut off."""


def complete_steps(text: str, kind: str) -> tuple[bool, int]:
    """``(finished, number of complete ionic steps)`` of a ``kind`` ('vasprun' | 'outcar') file's text."""
    if kind == "vasprun":
        return text.rstrip().endswith(VASPRUN_END_TAG), text.count(VASPRUN_STEP_END)
    if kind == "outcar":
        # The footer is the last thing VASP writes; look only near the end (an OUTCAR is large).
        return OUTCAR_FOOTER in text[-20000:], min(text.count(OUTCAR_FORCES_END), text.count(OUTCAR_ENERGY))
    raise ValueError(f"kind must be 'vasprun' or 'outcar', got {kind!r}")


def frames_to_keep(text: str, kind: str, where: str, *, allow_incomplete: bool) -> int | None:
    """How many leading frames of a ``kind`` file to keep: ``None`` (all) for a finished run.

    An unfinished run raises ``TrajectoryError`` (reason ``incomplete``, naming ``where`` and the
    last complete frame) unless ``allow_incomplete``; then it returns the number of complete ionic
    steps (the reader warns with :func:`warn_incomplete` once it knows how many it parsed). A run
    without one complete ionic step always raises.
    """
    finished, num_steps = complete_steps(text, kind)
    if finished:
        return None
    if num_steps == 0:
        raise TrajectoryError(f"{where}: {_incomplete_label(kind)}; not one complete ionic step", REASON_INCOMPLETE)
    if not allow_incomplete:
        raise TrajectoryError(
            f"{where}: {_incomplete_label(kind)}; the last complete ionic step is frame {num_steps - 1} "
            f"({num_steps} frames), where the run stopped, not its relaxed end point. Pass "
            "allow_incomplete=True (--allow_incomplete_runs) to keep these frames anyway",
            REASON_INCOMPLETE,
        )
    return num_steps


def warn_incomplete(where: str, kind: str, num_frames: int) -> None:
    """Warn (:class:`IncompleteRunWarning`) that an unfinished run was kept with ``num_frames`` frames."""
    warnings.warn(
        f"{where}: {_incomplete_label(kind)}; keeping {num_frames} frames: the last, frame {num_frames - 1}, is "
        "where the run stopped, not its relaxed end point",
        IncompleteRunWarning,
        stacklevel=3,
    )


def _incomplete_label(kind: str) -> str:
    return f"incomplete {_KIND_LABEL[kind]} ({_END_MARKER[kind]}: the run was cut off)"


def damaged_gzip_error(path, err: Exception) -> TrajectoryError:
    """The error for a gzip file that cannot be decompressed (truncated or corrupted)."""
    return TrajectoryError(
        f"{path}: damaged gzip file, cannot decompress it ({type(err).__name__}: {err}); "
        "the file is truncated or corrupted",
        REASON_DAMAGED_FILE,
    )


GZIP_ERRORS = (EOFError, OSError, zlib.error)
"""What ``gzip.decompress`` raises on truncated or corrupted data (``BadGzipFile`` is an OSError)."""


def unknown_element_error(where: str, err: Exception) -> TrajectoryError | None:
    """A ``TrajectoryError`` (reason ``unknown_element``) when ``err`` is a parser's complaint about an
    element symbol (ASE: ``KeyError('Xx')``; pymatgen: ``ValueError("'Xx' is not a valid Element")``),
    else None."""
    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str):
        symbol = err.args[0]
    elif isinstance(err, ValueError) and "valid element" in str(err).lower():
        symbol = str(err).split(" is not")[0].strip("'\" ")
    else:
        return None
    return TrajectoryError(f"{where}: unknown element {symbol!r}, expected an element symbol H .. Og",
                           REASON_UNKNOWN_ELEMENT)


@contextlib.contextmanager
def parser_errors(where: str, what: str, *, element_where: str | None = None):
    """Turn a parser's failure inside the block into ``TrajectoryError`` naming ``where``: an unknown
    element symbol -> reason ``unknown_element`` (naming ``element_where``, default ``where``; for a
    VASP file the atom list of frame 0, shared by every frame); anything else the parser raises
    (truncated XML, malformed numbers, ...) -> reason ``damaged_file`` ("cannot parse ``what``")."""
    try:
        yield
    except TrajectoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure means the file cannot be trusted
        named = unknown_element_error(element_where or where, err)
        if named is None:
            named = TrajectoryError(
                f"{where}: cannot parse {what} ({type(err).__name__}: {err}); the file is damaged or not {what}",
                REASON_DAMAGED_FILE,
            )
        raise named from err
