"""Run outputs: JSON that always parses, an append-only metrics log, markdown tables.

Every number written by a run goes through :func:`jsonable` (numpy numbers become Python ones;
NaN and infinities, which JSON lacks, become the strings ``"nan"`` / ``"inf"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """``x`` with numpy arrays / numbers, tuples and dataclasses turned into JSON types;
    non-finite floats become strings (``"nan"``, ``"inf"``, ``"-inf"``)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else str(float(x))
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if dataclasses.is_dataclass(x):
        return jsonable(dataclasses.asdict(x))
    return x


def write_json(path: Path, obj: Any) -> None:
    """Write ``jsonable(obj)`` to ``path`` atomically (a temporary file renamed over it)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=False))
    os.replace(tmp, path)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` (dicts) over ``columns``; floats with 4 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


class MetricsWriter:
    """Append-only JSON-lines metrics, one object per call, flushed each time.

    Called as ``writer(phase, step, metrics)``, the signature the training loops log through.
    Every row but per-step ones (``phase == "bptt_step"``) is also echoed as one short line
    through ``echo``.
    """

    def __init__(self, path: Path, echo: Callable[[str], None] = print):
        self.path = Path(path)
        self._fh = open(self.path, "a", buffering=1)
        self._echo = echo
        self.t0 = time.time()

    def __call__(self, phase: str, step: int, metrics: dict) -> None:
        row = {"phase": phase, "step": int(step), "time_s": round(time.time() - self.t0, 3), **jsonable(metrics)}
        self._fh.write(json.dumps(row) + "\n")
        if phase != "bptt_step":
            short = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            self._echo(f"[{phase} {step}] {short}")

    def close(self) -> None:
        self._fh.close()
