"""Memory probes: what the host and the devices have, and what arrays take."""

from __future__ import annotations

import math
import os
import resource
from typing import Any

import jax
import numpy as np


def host_memory(available: bool = False) -> int | None:
    """This machine's physical memory in bytes, or (`available`) what of it the
    kernel says is available now (MemAvailable: free plus reclaimable cache),
    where the OS says."""
    if available:
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        pages = "SC_AVPHYS_PAGES" if available else "SC_PHYS_PAGES"
        return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(free: bool = False) -> int | None:
    """One local device's memory in bytes (or, `free`, what it has left now),
    where the backend reports it; on the CPU, the host's RAM (available RAM)
    shared by this process's CPU devices."""
    if jax.default_backend() == "cpu":
        ram = host_memory(available=free)
        return ram // len(jax.local_devices()) if ram else None
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None or not free:
        return limit
    return max(limit - stats.get("bytes_in_use", 0), 0)


def peak_memory() -> dict:
    """Peak memory of this process so far: the accelerator's peak bytes in use
    where it reports them, else the process's peak resident set (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_mb": stats["peak_bytes_in_use"] / 2**20,
                "peak_memory_kind": f"{jax.default_backend()} peak bytes in use"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_mb": rss_kib / 2**10, "peak_memory_kind": "process peak RSS"}


def whole_bytes(tree: Any) -> int:
    """Bytes of every array in `tree`, each counted whole (not per shard)."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def device_bytes(tree: Any) -> int:
    """Bytes the first device holds of the placed arrays of `tree`."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            first = leaf.sharding.device_set and min(leaf.sharding.device_set, key=lambda d: d.id)
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == first)
        else:
            total += np.asarray(leaf).nbytes
    return total
