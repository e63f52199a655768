"""DeepSpeed everywhere: one CPU process, several gloo processes, or many GPUs on many nodes.

``setup_distributed`` makes a plain ``python`` start look like a one-process ``deepspeed``
launch (DeepSpeed otherwise asks for mpi4py) and makes the one device decision
(``engine.device``, nucleo.core.device) that DeepSpeed's accelerator, the model and the batches
share. ``build_engine`` turns the optimizer, schedule and batch settings into a DeepSpeed
config and wraps the model; ZeRO stage and precision come from ``EngineConfig``.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from nucleo.core.device import resolve_for_training
from nucleo.core.runtime import configure_allocator
from nucleo.core.schema import ConfigError, check

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation and batch arithmetic.

    max_steps: optimizer steps. micro_batch_size: windows per rank per forward.
    grad_accum: micro-batches per optimizer step; the global batch in windows is
        micro_batch_size x grad_accum x world size. lr: peak learning rate, reached after
        warmup_steps of linear warm-up, then cosine decay to lr x min_lr_ratio at max_steps.
    grad_clip: global gradient-norm clip (0 turns it off). seed: model init, data order,
        dropout. log_every: steps between progress lines and metric logs.
    compile: torch.compile each block of the model (compiled once per distinct block, at the
        first step: 2-6 s for tiny models on CPU). Off by default: measured on CPU it speeds up
        hyena (1.3-1.6x), multires (1.2-1.4x) and transformer (1.1x), not mamba, caduceus or
        hybrid (0.9-1.05x); experiments/results/architectures.md. Not with ZeRO-3.
    """

    max_steps: int = 1000
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    compile: bool = False

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        check(self.log_every >= 1, "log_every", "must be >= 1")


@dataclass
class EngineConfig:
    """How DeepSpeed runs the model.

    device: auto (CUDA when a GPU is visible, else CPU; DS_ACCELERATOR decides when set), cpu
        or cuda (each rank takes cuda:LOCAL_RANK).
    zero_stage: 0 (plain data parallel) to 3 (parameters, gradients and optimizer states
        partitioned). precision: fp32, or bf16 weights and activations with fp32 master
        weights (DeepSpeed's bf16). deepspeed: extra DeepSpeed config merged over the one
        nucleo writes (e.g. ``{zero_optimization: {offload_optimizer: {device: cpu}}}``).
    backend: torch.distributed backend; auto picks nccl on GPU and gloo on CPU.
    cpu_allocator: on CPU, "cached" makes glibc keep freed memory for reuse instead of
        mapping and page-faulting every large activation anew (1.7-2x faster at 16k tokens,
        ~1.4x peak memory); "system" leaves glibc's defaults (nucleo.core.runtime).
    """

    device: str = "auto"
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    cpu_allocator: Literal["cached", "system"] = "cached"
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(
            self.device in ("auto", "cpu", "cuda"),
            "device",
            f"{self.device!r} is not valid; choose 'auto', 'cpu' or 'cuda' "
            "(each rank takes cuda:LOCAL_RANK)",
        )
        for key in self.deepspeed:
            check(
                key not in _OWNED,
                f"deepspeed.{key}",
                f"set by nucleo from {_OWNED.get(key)}; change that instead",
            )


# DeepSpeed keys that nucleo writes from its own settings (a second source would disagree)
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x ranks",
    "gradient_clipping": "train.grad_clip",
    "bf16": "engine.precision",
    "fp16": "engine.precision (bf16 or fp32)",
    "optimizer": "train (nucleo's AdamW)",
    "scheduler": "train (warm-up and cosine)",
}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SHM_DIR = "/dev/shm"


def shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU all-reduce keeps this rank's 67 MB shared-memory workspace."""
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def _unlink_shm_buffer(device: torch.device) -> None:
    """Remove this rank's shared-memory *name* once every local rank has mapped it.

    DeepSpeed's CPU communicator creates a 67 MB POSIX shared-memory segment per rank and
    never unlinks it, so every run (and every killed run) leaves 67 MB per rank in /dev/shm
    until the machine reboots: a few hundred runs fill RAM. Mappings outlive the name, so
    unlinking after all ranks have opened each other's segments (the barrier) is safe, and
    the memory is freed when the last process exits, however it exits.
    """
    if device.type != "cpu":
        return
    torch.distributed.barrier()
    path = shm_buffer_path(torch.distributed.get_rank())
    # absent when the ranks are not all local or DeepSpeed runs without its shm communicator
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def stale_jit_locks(max_age_s: float = 600.0) -> list[str]:
    """torch JIT-extension build locks older than ``max_age_s`` seconds.

    A process killed while DeepSpeed builds or loads an op (``deepspeed_shm_comm`` on CPU)
    leaves ``<extensions dir>/<op>/lock``, and every later process waits on it forever. A real
    build takes about a minute, so a lock ten minutes old is almost surely stale.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    now = time.time()
    found = []
    for lock in glob.glob(os.path.join(root, "*", "*", "lock")):
        with contextlib.suppress(OSError):
            if now - os.path.getmtime(lock) > max_age_s:
                found.append(lock)
    return sorted(found)


_SOLO = "NUCLEO_SOLO_WORLD"  # "<pid>:<port>" of the world of one this process made up


def _inherited_solo_world() -> bool:
    """Whether RANK & co. were made up by a parent process for its own world of one (and
    inherited: a sweep point, a subprocess of a script that trained), not set by a launcher:
    the parent may still hold that port."""
    pid, _, port = os.environ.get(_SOLO, "").partition(":")
    return bool(pid) and pid != str(os.getpid()) and port == os.environ.get("MASTER_PORT")


def setup_distributed(cfg: EngineConfig) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) on ``cfg.device``."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_for_training(cfg.device, local_rank)  # sets DS_ACCELERATOR
    if "RANK" not in os.environ or _inherited_solo_world():  # a plain start: a world of one
        inherited = "RANK" in os.environ
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if inherited or "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ[_SOLO] = f"{os.getpid()}:{os.environ['MASTER_PORT']}"
    cuda = device.type == "cuda"
    if cfg.backend == "nccl" and not cuda:
        raise ConfigError("engine.backend", "nccl needs CUDA; this run is on cpu (use auto)")
    if not cuda:
        configure_allocator(cfg.cpu_allocator)
    for lock in stale_jit_locks():
        log.warning(
            "%s is over 10 minutes old: a killed process left it, and start-up will wait on it "
            "forever. Delete it if no other run is starting.",
            lock,
        )
    import deepspeed

    _agree_accelerator(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        _unlink_shm_buffer(device)
    elif cuda:
        torch.cuda.set_device(device)
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


def shutdown_distributed(together: bool = False) -> None:
    """Tear down the process group before the interpreter exits: left to exit-time
    destructors, gloo's threads can abort the process ("terminate called without an active
    exception", exit code 6) after training has finished.

    together: the run ended normally on every rank, so the ranks first meet (gloo: a monitored
    barrier that gives up after a minute rather than hang), then tear down at once; a rank that
    tore down while a peer still talked to it could abort the same way. After an error, a peer
    may be anywhere, so there is no meeting."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if together and torch.distributed.get_world_size() > 1:
            with contextlib.suppress(Exception):  # a peer that is gone: tear down anyway
                if torch.distributed.get_backend() == "gloo":
                    torch.distributed.monitored_barrier(timeout=timedelta(seconds=60))
                else:
                    torch.distributed.barrier()
        with contextlib.suppress(Exception):  # a peer may already be gone
            torch.distributed.destroy_process_group()
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches its process groups (and its communication backend) in module globals;
    once the process group is destroyed they are stale, and the next engine of this process
    (a fine-tuning after a pretraining, the next test) would fail with "Group ... is not
    registered". Forget them, so the next setup_distributed starts clean."""
    import deepspeed.comm.comm as comm
    import deepspeed.utils.groups as groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith("_GROUP"):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mesh_device = None
    comm.cdb = None


def _agree_accelerator(device: torch.device) -> None:
    """Make DeepSpeed's accelerator the one for ``device``, even if DeepSpeed chose one
    before (it reads DS_ACCELERATOR once, at its first use)."""
    from deepspeed.accelerator import real_accelerator

    current = real_accelerator.ds_accelerator
    if current is not None and current._name == device.type:
        return
    if device.type == "cuda":
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
    else:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
    real_accelerator.set_accelerator(Accelerator())


def on_main(action: Callable[[], T], is_main: bool) -> T:
    """Run ``action`` on rank 0 only and return its result on every rank.

    If it raises, the error is raised on every rank, so no rank waits forever at the next
    collective for one that failed (file-system work, run directories, checkpoint markers).
    """
    result: Any = None
    if is_main:
        try:
            result = action()
        except Exception as err:
            result = err
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, Exception):
        raise result
    return result


def deepspeed_config(train: TrainConfig, engine: EngineConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for these settings (logged with the run), with
    ``engine.deepspeed`` merged over it."""
    return _merge(_base_config(train, engine, world_size), engine.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _base_config(train: TrainConfig, engine: EngineConfig, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": engine.zero_stage},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW: no JIT-built ops
        "bf16": {"enabled": engine.precision == "bf16"},
        "steps_per_print": 10**9,  # nucleo prints its own progress
        "wall_clock_breakdown": False,
    }


def lr_lambda(train: TrainConfig):
    """Multiplier of the peak lr at optimizer step s: linear warm-up, then cosine decay."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return factor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices of linear layers; not norms, biases or embeddings."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_matrix = isinstance(module, nn.Linear) and name == "weight"
            (decay if is_matrix and not _is_tied_embedding(model, param) else no_decay).append(
                param
            )
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _is_tied_embedding(model: nn.Module, param: nn.Parameter) -> bool:
    return any(isinstance(m, nn.Embedding) and m.weight is param for m in model.modules())


def needs_own_grad_norm(engine: EngineConfig) -> bool:
    """DeepSpeed records the global gradient norm itself except for fp32 without ZeRO."""
    return engine.zero_stage == 0 and engine.precision == "fp32"


def grad_norm(model: nn.Module) -> float:
    """L2 norm of all gradients of ``model`` (call after the all-reduce, before the step)."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def build_engine(model: nn.Module, train: TrainConfig, engine: EngineConfig, dist: DistInfo):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warm-up/cosine schedule."""
    import deepspeed

    cuda = dist.device.type == "cuda"
    if engine.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("engine.precision=bf16 but this GPU has no bf16; use fp32")
    optimizer = torch.optim.AdamW(
        parameter_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.betas[0], train.betas[1]),
        eps=train.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    if train.compile:  # refused with ZeRO-3 when the config was read (check_compile)
        compile_blocks(model)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model.to(dist.device),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(train, engine, dist.world_size),
    )
    _unprime_optimizer(ds_engine)
    return ds_engine


def check_compile(train: TrainConfig, engine: EngineConfig) -> None:
    """train.compile and ZeRO-3 do not go together: ZeRO-3 gathers each layer's parameters
    in module hooks, which torch.compile traces with the parameters still partitioned."""
    if train.compile and engine.zero_stage == 3:
        raise ConfigError(
            "train.compile",
            "not with engine.zero_stage=3 (ZeRO-3 gathers parameters in module hooks that "
            "torch.compile traces with the parameters still partitioned); use ZeRO 0-2 or "
            "train.compile=false",
        )


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each of ``model.blocks`` in place (regional compilation: identical blocks
    share one compiled graph, and parameter names, checkpoints and ZeRO's hooks are those of
    the uncompiled model). Operations dynamo cannot trace (nucleo's compiled CPU ops, CUDA
    kernels behind custom autograd functions) run between compiled graphs."""
    limit = torch._dynamo.config.recompile_limit  # one graph per distinct block type and shape
    torch._dynamo.config.recompile_limit = max(limit, 64)
    for block in getattr(model, "blocks", []):
        block.compile(dynamic=False)


def apply_current_settings(ds_engine: Any, train: TrainConfig) -> None:
    """After loading a checkpoint: the run's settings now, not those saved with it.

    The optimizer's and the schedule's state dicts bring back the lr, betas, eps and weight
    decay they were saved with, so ``--resume RUN --set train.lr=...`` would change nothing
    (a diverged run resumed "with a lower lr" would diverge again). The schedule's position
    (its step) is kept; its shape follows the current ``train`` settings.
    """
    sched = ds_engine.lr_scheduler
    if sched is None:
        return
    sched.base_lrs = [train.lr for _ in sched.base_lrs]
    factor = lr_lambda(train)(sched.last_epoch)
    for group in sched.optimizer.param_groups:
        group["lr"] = train.lr * factor
        group["betas"] = (train.betas[0], train.betas[1])
        group["eps"] = train.eps
        if group.get("weight_decay", 0.0) > 0:  # the decayed group; the other stays at 0
            group["weight_decay"] = train.weight_decay


def _unprime_optimizer(ds_engine: Any) -> None:
    """Undo DeepSpeed's priming step of the client optimizer (bf16 without ZeRO).

    DeepSpeed's fp16/bf16 wrapper without ZeRO (``FP16_UnfusedOptimizer``) creates AdamW's
    state by stepping once on zero gradients: the moments stay zero but the step count starts
    at 1, so Adam's bias corrections are wrong for the first tens of steps (with betas 0.9 and
    0.95 the first update was 0.73 x lr instead of lr, measured). Resetting the counts makes
    bf16 without ZeRO take the same steps as every other configuration (the primed step's
    weight decay, lr x weight_decay at step 0 of the warm-up, is left: about 1e-6).
    """
    if type(ds_engine.optimizer).__name__ != "FP16_UnfusedOptimizer":
        return
    for state in ds_engine.optimizer.optimizer.state.values():
        if "step" in state:
            step = state["step"]
            state["step"] = torch.zeros_like(step) if torch.is_tensor(step) else 0
