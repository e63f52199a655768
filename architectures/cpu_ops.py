"""Compiled CPU operators (``architectures/csrc``): built at first use, cached, optional.

They are compiled the way DeepSpeed builds its CPU ops: torch's C++ extension builder
(``torch.utils.cpp_extension.load``) with the g++ and ninja that set-up installs, into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), once per source version and
CPU type (the code is built for the CPU it runs on: ``-march=native``). The first use takes
about half a minute; later processes load the cached library in milliseconds.

Each has a pure-PyTorch counterpart that stays the readable reference and the fallback: when the
compiler is missing or the build fails, one log line says why and the PyTorch path runs.
``model.kernels=off`` (or ``NUCLEO_CPU_OPS=0``) never builds or loads them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger("nucleo")

SOURCES = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-ffast-math", "-march=native", "-fopenmp"]  # -ffast-math: vectorised exp

_LOADED: dict[str, ModuleType | None] = {}
_WHY: dict[str, str] = {}
_LOCK = threading.Lock()


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction sets: a build for one CPU type is not loaded on
    another (a shared home folder on a mixed cluster)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def enabled() -> bool:
    return os.environ.get("NUCLEO_CPU_OPS", "1") != "0"


def load_op(name: str) -> ModuleType | None:
    """The compiled op ``csrc/<name>.cpp`` (its module), or None when it cannot be built here
    (said once). Thread-safe; processes building at once wait on torch's lock file."""
    if not enabled():
        return None
    with _LOCK:
        if name not in _LOADED:
            _LOADED[name] = _build(name)
        return _LOADED[name]


def why_not(name: str) -> str:
    """Why ``load_op(name)`` returned None ("" if it did not)."""
    return _WHY.get(name, "")


def _build(name: str) -> ModuleType | None:
    import torch.utils.cpp_extension as cpp

    source = SOURCES / f"{name}.cpp"
    here = str(Path(sys.executable).parent)  # the venv's ninja, when the venv is not activated
    if shutil.which("ninja") is None and here not in os.environ.get("PATH", "").split(":"):
        os.environ["PATH"] = f"{here}:{os.environ.get('PATH', '')}"
    try:
        return cpp.load(
            name=f"nucleo_{name}_{_cpu_tag()}",
            sources=[str(source)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, a failed build: the PyTorch path runs
        first = str(err).strip().splitlines()[:1]
        _WHY[name] = ": ".join([type(err).__name__, *first])[:300]
        log.warning(
            "compiled CPU op %s not available (%s): running its pure-PyTorch version (slower). "
            "It needs g++ and ninja (launch/setup.sh installs ninja)",
            name, _WHY[name],
        )  # fmt: skip
        return None
