"""The optional CUDA kernels: what each replaces, how it is loaded, when it applies, and what
happens when it cannot run.

Three packages of the ``gpu`` extra have fused CUDA kernels for layers that nucleo also
implements in pure PyTorch (the readable reference paths, tied to the kernels by tests):

    selective_scan   mamba-ssm       Mamba's selective scan (architectures.selective_scan)
    causal_conv1d    causal-conv1d   Mamba's short causal depthwise convolution (layers)
    flash_attn       flash-attn      attention (architectures.transformer)

``model.kernels`` chooses, per run:

    auto       a kernel runs on CUDA when it loads and the layer suits it; otherwise the
               pure-PyTorch path runs, and one log line says which, why (the import error's
               own message) and how to install it
    required   any kernel the model would use that cannot run stops the run with that line
               (not installed, broken, on CPU, or a shape or dtype the kernel does not take)
    off        the pure-PyTorch paths everywhere

A kernel is "loaded" only after it imported *and* ran once on tiny CUDA tensors: mamba-ssm
imports without its compiled ``selective_scan_cuda`` and fails at the first call, and a wheel
built for another GPU architecture fails only when launched. Packages are never imported on
CPU, where they cannot work.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from nucleo.core.schema import ConfigError

log = logging.getLogger("nucleo")

KernelMode = Literal["auto", "required", "off"]
INSTALL = (
    "install a CUDA build of torch, then `pip install -e '.[gpu]' --no-build-isolation` "
    "(or `NUCLEO_GPU_KERNELS=1 launch/setup.sh`)"
)


def _smoke_selective_scan(fn: Callable) -> None:
    u = torch.randn(1, 8, 16, device="cuda")
    fn(u, u, -torch.ones(8, 4, device="cuda"), *torch.randn(2, 1, 4, 16, device="cuda"))


def _smoke_causal_conv1d(fn: Callable) -> None:
    fn(torch.randn(1, 8, 16, device="cuda"), torch.randn(8, 4, device="cuda"), None)


def _smoke_flash_attn(fn: Callable) -> None:
    q = torch.randn(1, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    fn(q, q, q, causal=True)


@dataclass(frozen=True)
class Kernel:
    """One optional kernel: ``module.attr`` of pip package ``package``, in place of
    ``replaces``; ``smoke`` runs it once on tiny CUDA tensors."""

    name: str
    package: str
    module: str
    attr: str
    replaces: str
    smoke: Callable[[Callable], None]
    half_only: bool = False  # takes bf16/fp16 activations only (flash-attn)

    def installed(self) -> bool:
        """Whether the package is installed at all (usable or not)."""
        top = self.module.split(".")[0]
        try:
            return importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            return False


SELECTIVE_SCAN = Kernel(
    "selective_scan", "mamba-ssm", "mamba_ssm.ops.selective_scan_interface",
    "selective_scan_fn", "nucleo's chunked pure-PyTorch selective scan", _smoke_selective_scan,
)  # fmt: skip
CAUSAL_CONV1D = Kernel(
    "causal_conv1d", "causal-conv1d", "causal_conv1d", "causal_conv1d_fn",
    "PyTorch's depthwise conv1d", _smoke_causal_conv1d,
)  # fmt: skip
FLASH_ATTN = Kernel(
    "flash_attn", "flash-attn", "flash_attn", "flash_attn_func",
    "PyTorch's scaled_dot_product_attention", _smoke_flash_attn, half_only=True,
)  # fmt: skip
KERNELS: dict[str, Kernel] = {k.name: k for k in (SELECTIVE_SCAN, CAUSAL_CONV1D, FLASH_ATTN)}

# name -> (the kernel function, or None and why not); per process, filled on first use on CUDA
_LOADED: dict[str, tuple[Callable | None, str]] = {}
_SAID: set[str] = set()  # fallback lines already logged


def load(kernel: Kernel) -> tuple[Callable | None, str]:
    """(function, "") when ``kernel`` imports and runs on this GPU, else (None, why). Cached."""
    if kernel.name not in _LOADED:
        try:
            fn = getattr(importlib.import_module(kernel.module), kernel.attr)
            kernel.smoke(fn)
            torch.cuda.synchronize()
            _LOADED[kernel.name] = (fn, "")
            log.info("using %s's CUDA kernel %s.%s", kernel.package, kernel.module, kernel.attr)
        except Exception as err:  # ImportError, a build without its extension, no GPU image
            first = str(err).strip().splitlines()[:1]
            _LOADED[kernel.name] = (None, ": ".join([type(err).__name__, *first]))
    return _LOADED[kernel.name]


def forget() -> None:
    """Clear what was loaded and said (tests)."""
    _LOADED.clear()
    _SAID.clear()


def _refuse(kernel: Kernel, why: str) -> ConfigError:
    return ConfigError(
        "model.kernels",
        f"required, but {kernel.package}'s {kernel.name} kernel cannot run: {why}; "
        f"set model.kernels=auto to run {kernel.replaces} instead",
    )


def use(
    kernel: Kernel, device: torch.device, mode: str, unsuitable: str | None = None
) -> Callable | None:
    """The kernel function to call for a layer on ``device``, or None for the PyTorch path.

    unsuitable: why this call's shapes or dtypes are not ones the kernel takes (None: they
    are). ``required`` raises a ConfigError where ``auto`` logs one line and falls back.
    """
    if mode == "off":
        return None
    if device.type != "cuda":
        if mode == "required":
            raise _refuse(kernel, f"the model is on {device.type}; the kernels are CUDA-only")
        return None
    if unsuitable:
        if mode == "required":
            raise _refuse(kernel, unsuitable)
        _say(kernel, unsuitable, install=False)
        return None
    fn, why = load(kernel)
    if fn is None:
        if mode == "required":
            raise _refuse(kernel, f"{why}. To get it: {INSTALL}")
        _say(kernel, why, install=True)
    return fn


def _say(kernel: Kernel, why: str, install: bool) -> None:
    key = f"{kernel.name}:{why}"
    if key in _SAID:
        return
    _SAID.add(key)
    tail = f" For the kernel: {INSTALL}." if install else ""
    log.warning(
        "%s not used (%s): running %s instead.%s",
        kernel.package, why, kernel.replaces, tail,
    )  # fmt: skip


def kernels_of(model: torch.nn.Module) -> list[Kernel]:
    """The kernels that ``model``'s layers can use (each layer lists its own in ``kernels``)."""
    names: dict[str, Kernel] = {}
    for module in model.modules():
        for kernel in getattr(module, "uses_kernels", ()):
            names[kernel.name] = kernel
    return [names[n] for n in sorted(names)]


def check_kernels(
    model: torch.nn.Module, device: torch.device, mode: str, bf16: bool = True
) -> list[str]:
    """Before training: load every kernel the model can use on ``device`` under ``mode``
    (``bf16``: whether activations are bf16, which flash-attn needs).

    Returns "package kernel" for those that will run. ``required`` raises when one cannot;
    ``auto`` logs its one line now rather than at the first step.
    """
    running = []
    for kernel in kernels_of(model):
        unsuitable = None
        if kernel.half_only and not bf16:
            unsuitable = "fp32 activations; it takes bf16 (engine.precision or model.autocast)"
            if mode == "auto":  # nothing is missing: fp32 simply has no such kernel
                continue
        if use(kernel, device, mode, unsuitable) is not None:
            running.append(f"{kernel.package} {kernel.name}")
    return running


def require_suitable(mode: str, problems: Iterable[tuple[str, str]]) -> None:
    """At config time under ``required``: raise for the first (key, problem), if any."""
    if mode != "required":
        return
    for key, problem in problems:
        raise ConfigError(key, f"{problem} (model.kernels=required); or set model.kernels=auto")


def status(kernels: Iterable[Kernel] = KERNELS.values()) -> dict[str, dict[str, Any]]:
    """For reports: per kernel, whether it is installed and whether it loads (CUDA only)."""
    out = {}
    for kernel in kernels:
        entry: dict[str, Any] = {"package": kernel.package, "installed": kernel.installed()}
        if torch.cuda.is_available() and entry["installed"]:
            fn, why = load(kernel)
            entry.update(usable=fn is not None, error=why)
        out[kernel.name] = entry
    return out
