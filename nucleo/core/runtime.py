"""Process set-up that must happen before torch is imported.

Imports nothing heavy: launchers call ``configure_threads()`` first thing.
"""

from __future__ import annotations

import os


def configure_threads() -> int:
    """Give each local process an equal share of the CPU cores, unless OMP_NUM_THREADS is set.

    Sets OMP_NUM_THREADS and MKL_NUM_THREADS to cores // local processes.

    Without this, N processes on N cores each start N OpenMP threads; DESIGN.md measured runs
    10-30x slower that way. The deepspeed launcher exports LOCAL_SIZE (processes on this node),
    torchrun LOCAL_WORLD_SIZE. Returns the thread count in effect.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(1, local))
    # Both: an MKL_NUM_THREADS inherited from a parent process would oversubscribe the cores
    # in matrix products (measured: 2 ranks on 2 cores ran at 9.3k instead of 16k tokens/s).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    return threads


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def configure_allocator(mode: str) -> bool:
    """Make glibc keep freed memory for reuse ("cached") instead of returning it ("system").

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it when freed, so a
    long-sequence training step page-faults (and zeroes) each of its large activations anew:
    measured, Hyena at 16k tokens trained 1.75-2x faster with the cache, Mamba 1.67x, at ~1.4x
    the peak memory (experiments/results/architectures.md). "cached" turns mmap off and trimming
    off (what MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11 do at start-up); "system" leaves
    glibc as it is. Returns whether the setting took effect (False off glibc).
    """
    if mode == "system":
        return True
    if mode != "cached":
        raise ValueError(f"allocator mode must be 'cached' or 'system', got {mode!r}")
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
