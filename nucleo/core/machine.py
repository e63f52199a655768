"""What reports record about the machine they ran on (benchmarks, scaling fits, data stats)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> dict[str, str]:
    """CPU model, cores, memory, Python, torch and OS of this machine."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": str(len(os.sched_getaffinity(0))),
        "memory_gb": f"{memory:.0f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
    }


def summary() -> str:
    """``describe()`` as one line: ``cpu X, cores 2, memory_gb 24 GiB, ...``."""
    return ", ".join(f"{key} {value}" for key, value in describe().items())
