"""DeepSpeed checkpoints with client state, marked complete only once every rank has written.

Layout of a run directory::

    runs/<name>/config.yaml                       the resolved config
    runs/<name>/checkpoints/step_00000200/        DeepSpeed's files for that step
    runs/<name>/checkpoints/step_00000200/COMPLETE   written last, by rank 0
    runs/<name>/export/                           portable model (see nucleo.train.export)

A checkpoint without COMPLETE (a crash or preemption during the save) is never resumed from;
older checkpoints are pruned only after a newer one is complete. COMPLETE records the size and
SHA-256 of every file of the checkpoint: resume and ``nucleo export`` verify them and fall back
to the newest checkpoint that is whole, saying so (``latest_intact``).

Loading never runs code from a checkpoint: inside ``weights_only()`` every ``torch.load``,
DeepSpeed's included, loads tensors and plain data only (plus the few DeepSpeed classes its
checkpoints hold), so a crafted pickle in a run directory is refused, not executed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_pipeline.shards import sha256_file
from nucleo.core.schema import check
from nucleo.train.engine import DistInfo, on_main

if TYPE_CHECKING:
    from nucleo.train.config import RunConfig

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


@dataclass
class CheckpointConfig:
    """every: optimizer steps between checkpoints (0: only at the end).
    keep: complete checkpoints kept (older ones are deleted). export: write the portable
    export (config.json, model.safetensors, the tokenizer files: nucleo.train.export) at the end
    of training."""

    every: int = 500
    keep: int = 2
    export: bool = True

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", "must be >= 0")
        check(self.keep >= 1, "keep", "must be >= 1")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def file_digests(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file of a checkpoint but its marker."""
    out = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE):
        rel = str(path.relative_to(tag_dir))
        out[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def damage(tag_dir: str | Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None: they are as saved).

    Checkpoints marked before nucleo recorded digests cannot be checked and pass.
    """
    tag_dir = Path(tag_dir)
    try:
        marker = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError) as err:
        return f"its {COMPLETE} marker is unreadable ({type(err).__name__})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if files is None:
        return None
    for rel, want in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{rel} is {size:,} bytes, {want['bytes']:,} when saved (truncated or changed)"
    got = file_digests(tag_dir)
    for rel, want in files.items():
        if got[rel]["sha256"] != want["sha256"]:
            return f"{rel} does not match its SHA-256 (corrupted)"
    return None


def latest_intact(ckpt_dir: str | Path, say: Callable[[str], None] = print) -> str | None:
    """The newest complete checkpoint whose files verify; each damaged newer one is named in
    one line. None when there is none."""
    for tag in reversed(complete_tags(ckpt_dir)):
        problem = damage(Path(ckpt_dir) / tag)
        if problem is None:
            return tag
        say(f"warning: checkpoint {Path(ckpt_dir) / tag} is damaged: {problem}; "
            "trying the one before")  # fmt: skip
    return None


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than weights and plain data (refused, not run)."""


def _deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed's checkpoints hold besides tensors (found by loading every ZeRO
    stage x precision with ``weights_only=True``); all are plain data holders."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only() -> Iterator[None]:
    """Within the block, every ``torch.load`` (DeepSpeed's own calls too, which ask for full
    unpickling) loads weights only; anything else raises UnsafeCheckpointError."""
    original = torch.load
    allowed = _deepspeed_globals()

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f"a reference to {found.group(1)}" if found else "objects other than tensors"
            raise UnsafeCheckpointError(
                f"{f}: refused: it holds {what}, not only weights and plain data; nucleo loads "
                "checkpoints weights-only and never runs code from them"
            ) from None

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(
    engine: Any,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    config_yaml: str,
    keep: int,
    is_main: bool,
) -> Path:
    """Save on every rank, then mark complete and prune on rank 0.

    A step that already has a complete checkpoint (a finished run resumed) is left as it is;
    a half-written one is removed first, so COMPLETE is only ever next to a whole save.
    """
    tag = tag_for(step)
    root = Path(ckpt_dir)
    if (root / tag / COMPLETE).is_file():
        return root / tag
    on_main(lambda: shutil.rmtree(root / tag, ignore_errors=True), is_main)
    try:  # a failed save has no COMPLETE: it is never resumed from, and removed next time
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    except (OSError, RuntimeError) as err:
        # torch.save reports a full disk as a RuntimeError ("iostream error"); say what it is
        if _disk_full(root):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / tag)) from err
        if isinstance(err, OSError) and err.filename is None:  # name where the write went
            raise OSError(err.errno, err.strerror, str(root / tag)) from err
        raise
    _barrier()

    def mark_and_prune() -> None:
        (root / tag / "config.yaml").write_text(config_yaml)
        marker = {
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": file_digests(root / tag),
        }
        (root / tag / COMPLETE).write_text(json.dumps(marker) + "\n")
        done = complete_tags(root)
        for old in done[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
        newest_kept = done[-keep:][0]
        for path in root.iterdir():  # half-written saves older than what is kept
            if _TAG.match(path.name) and path.name < newest_kept and path.name not in done:
                shutil.rmtree(path, ignore_errors=True)

    on_main(mark_and_prune, is_main)
    return root / tag


def _disk_full(folder: Path, slack: int = 1 << 20) -> bool:
    """Whether the file system holding ``folder`` has (almost) no space left."""
    try:
        return shutil.disk_usage(folder).free < slack
    except OSError:
        return False


def load_checkpoint(engine: Any, ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer, schedule; return the client state saved with them.
    Weights-only: a file holding anything else is refused (UnsafeCheckpointError)."""
    with weights_only():
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{Path(ckpt_dir) / tag}: DeepSpeed could not load this checkpoint")
    return client_state or {}


def prepare_run_dir(
    cfg: RunConfig, dist: DistInfo, resume: str | Path | None, say: Any = print
) -> tuple[Path, str | None]:
    """(run directory, checkpoint tag to resume from or None), the same on every rank.

    Refuses to overwrite another run. Resuming takes the newest checkpoint whose files verify
    (naming any damaged newer one); a run that never saved a checkpoint starts afresh in its
    own directory.
    """

    def make() -> tuple[Path, str | None]:
        tag = None
        if resume:
            run_dir = Path(resume)
            if not (run_dir / "config.yaml").is_file():
                raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
            ckpt = run_dir / "checkpoints"
            tag = latest_intact(ckpt, say)
            if tag is None and complete_tags(ckpt):
                raise FileNotFoundError(
                    f"{ckpt}: every checkpoint is damaged (above); nothing to resume. Move "
                    "the run directory away to start again"
                )
            if tag is None:
                say(f"{run_dir} has no checkpoint yet: starting it afresh")
        else:
            name = cfg.run.name or "{}-{}-{}-{}".format(
                cfg.arch, "+".join(cfg.losses), time.strftime("%Y%m%d-%H%M%S"),
                os.urandom(2).hex(),  # runs started in the same second stay apart
            )  # fmt: skip
            run_dir = Path(cfg.run.root) / name
            if (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists():
                raise FileExistsError(
                    f"{run_dir} already holds a run; resume it with --resume {run_dir}, "
                    "or choose another --set run.name=..."
                )
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, tag

    return on_main(make, dist.is_main)
