"""One device decision for every command: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

``auto`` (every default) is CUDA when PyTorch sees a GPU, else the CPU. Asking for CUDA where
there is none is a one-line error, not a traceback deep in a forward pass. Training also has
DeepSpeed's accelerator to agree with: ``DS_ACCELERATOR`` (which the ``deepspeed`` launcher and
DeepSpeed itself read) decides ``auto`` when it is set, contradicting it is an error, and
``nucleo.train.engine`` sets it to the decision before DeepSpeed is imported, so DeepSpeed, the
model and the batches are always on the same device.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHOICES = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A device that is not valid or not here; the message is one line naming the flag."""


def valid(spec: str) -> bool:
    """Whether ``spec`` is one of ``CHOICES`` (whatever this machine has)."""
    return bool(_SPEC.match(str(spec)))


def _no_cuda() -> str:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"PyTorch sees no CUDA GPU (torch {torch.__version__}, {build})"


def resolve(spec: str | torch.device = "auto", flag: str = "--device") -> torch.device:
    """The torch.device for ``spec``; ``flag`` names the option in errors."""
    import torch

    spec = str(spec)
    if not valid(spec):
        raise DeviceError(f"{flag}: {spec!r} is not a device; choose {CHOICES}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{flag}: {spec} asked for, but {_no_cuda()}; use cpu or auto")
    device = torch.device(spec)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"{flag}: {spec}, but this machine has {count} CUDA device(s)")
    return device


def resolve_for_training(spec: str, local_rank: int, flag: str = "engine.device") -> torch.device:
    """This rank's device for ``spec`` (auto, cpu or cuda), agreed with ``DS_ACCELERATOR``.

    CUDA ranks get ``cuda:LOCAL_RANK``. Sets ``DS_ACCELERATOR`` to the decision.
    """
    import torch

    if spec not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"{flag}: {spec!r}; choose auto, cpu or cuda (a rank takes its own GPU)")
    accel = os.environ.get("DS_ACCELERATOR", "").strip()
    if accel and accel not in ("cpu", "cuda"):
        raise DeviceError(f"DS_ACCELERATOR={accel}: nucleo trains on cpu or cuda; unset it")
    if accel and spec != "auto" and accel != spec:
        raise DeviceError(
            f"{flag}={spec} but DS_ACCELERATOR={accel}: DeepSpeed and the model would disagree; "
            f"unset DS_ACCELERATOR or set {flag}={accel}"
        )
    chosen = accel if spec == "auto" and accel else spec
    device = resolve(chosen, flag if not accel or spec != "auto" else "DS_ACCELERATOR")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DeviceError(
                f"{flag}: local rank {local_rank} needs cuda:{local_rank}, but this machine has "
                f"{count} CUDA device(s); start fewer processes per node"
            )
        device = torch.device("cuda", local_rank)
    os.environ["DS_ACCELERATOR"] = device.type
    return device
