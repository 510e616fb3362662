"""The persistent XLA compilation cache: a second run of the same recipe (same
shapes, same jax and device) loads its compiled steps instead of compiling.

    JAXLORA_CACHE_DIR           default ~/.cache/jaxlora; executables go to xla/
    JAXLORA_COMPILATION_CACHE   "off" disables it
    JAX_COMPILATION_CACHE_DIR   when set, JAX's own setting is left as it is
    JAXLORA_CACHE_MIN_SECONDS   compilations quicker than this are not stored (0.5)

Entries are keyed by JAX on the computation, the compile options, the jax
version and the device, so a stale entry is never used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIN_COMPILE_SECONDS = 0.5  # quicker compilations are not worth a file


def enable() -> Path | None:
    """Point JAX at the cache folder; returns it (None when disabled)."""
    import jax

    if os.environ.get("JAXLORA_COMPILATION_CACHE", "").lower() in ("off", "0", "false"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    root = Path(os.environ.get("JAXLORA_CACHE_DIR") or Path.home() / ".cache" / "jaxlora")
    folder = root / "xla"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds())
    return folder


def min_seconds() -> float:
    """JAXLORA_CACHE_MIN_SECONDS, or a UserError naming it."""
    from jaxlora.errors import UserError

    value = os.environ.get("JAXLORA_CACHE_MIN_SECONDS", "").strip()
    if not value:
        return MIN_COMPILE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise UserError(f"JAXLORA_CACHE_MIN_SECONDS={value!r}: give a number of seconds, 0 or more")
    return seconds


def entries(folder: Path | None) -> int:
    """How many executables the cache holds."""
    if folder is None or not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.name.endswith("-cache"))


@dataclass(frozen=True)
class Snapshot:
    """The cache folder JAX uses (None: no cache) and how many entries it held."""

    dir: str | None
    entries: int


def snapshot() -> Snapshot:
    """The cache as a run starts, to tell later what the run added to it."""
    import jax

    folder = jax.config.jax_compilation_cache_dir
    return Snapshot(folder, entries(Path(folder) if folder else None))


def record(since: Snapshot) -> dict:
    """The manifest's record of the cache: no entry added since `since` means
    every compiled function came from it."""
    return {"dir": since.dir, "entries_added": (
        entries(Path(since.dir)) - since.entries if since.dir else None)}
