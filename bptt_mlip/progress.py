"""Progress reporting for long loops: a bar with rate and ETA on a terminal, plain log lines
(at most one every ``log_interval_s`` seconds, and one at the end) when output is not a terminal.

Set ``BPTT_MLIP_PROGRESS=0`` to silence it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Sequence, TextIO

from bptt_mlip.data import batching


def count_batches(sizes: Sequence[int], batch_size: int, buckets: Sequence[int] = batching.DEFAULT_BUCKETS,
                  drop_remainder: bool = False) -> int:
    """Number of batches one epoch of bucketed batching yields for structures of these atom counts."""
    per_bucket: dict[int, int] = {}
    for n in sizes:
        b = batching.bucket_atoms(n, buckets)
        per_bucket[b] = per_bucket.get(b, 0) + 1
    if drop_remainder:
        return sum(c // batch_size for c in per_bucket.values())
    return sum(math.ceil(c / batch_size) for c in per_bucket.values())


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``p = Progress(total, "bptt epoch 1"); p.update(loss=...); ...; p.close()``."""

    def __init__(self, total: int, desc: str, *, stream: TextIO | None = None, log_interval_s: float = 30.0):
        self.total = max(int(total), 0)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = os.environ.get("BPTT_MLIP_PROGRESS", "1") != "0"
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else log_interval_s
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = -math.inf
        self._closed = False

    def line(self, postfix: dict | None = None) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (postfix or {}).items())
        return (f"{self.desc} {self.done}/{self.total} [{bar}] {rate:.2f} it/s "
                f"elapsed {_fmt_time(elapsed)} ETA {_fmt_time(eta)} {extra}").rstrip()

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < self.interval and self.done < self.total:
            return
        self._last = now
        text = self.line(postfix)
        if self.tty:
            self.stream.write("\r" + text[:160].ljust(100))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed or not self.enabled:
            return
        self._closed = True
        if self.tty:
            self.stream.write("\n")
        elif self.done < self.total or self._last == -math.inf:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
