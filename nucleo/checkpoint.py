"""DeepSpeed checkpoints with client state, marked complete only once every rank has written.

Layout of a run directory::

    runs/<name>/config.yaml                       the resolved config
    runs/<name>/checkpoints/step_00000200/        DeepSpeed's files for that step
    runs/<name>/checkpoints/step_00000200/COMPLETE   written last, by rank 0
    runs/<name>/export/                           portable model (see nucleo.export)

A checkpoint without COMPLETE (a crash or preemption during the save) is never resumed from;
older checkpoints are pruned only after a newer one is complete.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nucleo.engine import on_main
from nucleo.schema import check

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


@dataclass
class CheckpointConfig:
    """every: optimizer steps between checkpoints (0: only at the end).
    keep: complete checkpoints kept (older ones are deleted). export: write the portable
    export (config.json, model.safetensors, tokenizer.json) at the end of training."""

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
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    _barrier()

    def mark_and_prune() -> None:
        (root / tag / "config.yaml").write_text(config_yaml)
        marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
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


def load_checkpoint(engine: Any, ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer, schedule; return the client state saved with them."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{Path(ckpt_dir) / tag}: DeepSpeed could not load this checkpoint")
    return client_state or {}
