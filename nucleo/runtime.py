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
