"""JAX's persistent compilation cache for the CLI, the relax API and the experiment scripts.

Every new process compiles its rollouts, FIRE loops and training steps again (seconds to tens of
seconds each on a CPU). JAX can keep compiled executables on disk, keyed by the program, the JAX
and XLA versions, the device kind and the compile options, and reuse them in the next process.
:func:`enable` turns that on for one directory:

    from bptt_mlip import compile_cache
    compile_cache.enable()                      # $BPTT_MLIP_CACHE_DIR or ~/.cache/bptt_mlip/jax
    compile_cache.enable("/scratch/me/jax")     # an explicit folder

Location, in order: the ``path`` argument, the environment variable ``BPTT_MLIP_CACHE_DIR``,
``$XDG_CACHE_HOME/bptt_mlip/jax``, ``~/.cache/bptt_mlip/jax``. Setting ``BPTT_MLIP_CACHE_DIR``
to ``off`` (or ``none``, ``0``, ``false``, empty) disables it. A cache entry can never give a
wrong result (the key holds everything the executable depends on); a stale or unreadable entry
only costs a recompile. Deleting the folder is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "BPTT_MLIP_CACHE_DIR"
_DISABLED = {"off", "none", "0", "false", ""}


def default_dir() -> Path | None:
    """The cache folder the environment asks for, or None when ``BPTT_MLIP_CACHE_DIR`` disables it."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in _DISABLED else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bptt_mlip" / "jax"


def enable(path: str | os.PathLike | None = None, *, min_compile_seconds: float = 0.0) -> Path | None:
    """Keep compiled executables in ``path`` (see the module docstring for the default) and reuse them.

    Args:
      path: cache folder, created if missing; None takes :func:`default_dir`.
      min_compile_seconds: only compilations that took at least this long are written (0: every
        one, so that a second process on the same inputs compiles nothing at all).

    Returns the folder in use, or None when disabled or when the folder cannot be created (then
    nothing changes: the cache is an optimisation, never a reason to fail).
    """
    folder = Path(path).expanduser() if path is not None else default_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def enable_unless_configured() -> Path | None:
    """:func:`enable` with the default location, unless this process already set a cache folder (then
    that one stays). The relax API calls this, so library users get the cache without asking and
    keep control of it (``BPTT_MLIP_CACHE_DIR=off``, or their own ``jax_compilation_cache_dir``)."""
    return active_dir() or enable()


def active_dir() -> Path | None:
    """The folder JAX's persistent cache writes to in this process, or None when it is off."""
    value = jax.config.jax_compilation_cache_dir
    return Path(value) if value else None
