"""The flags that make a run config: shared by ``nucleo pretrain``, ``nucleo config``,
``launch/pretrain.py`` and the Slurm launcher, so that all of them read a run the same way.

Imports nothing heavy until ``config_from_args`` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nucleo.train.config import RunConfig


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --arch, --losses, --set KEY=VALUE (repeatable), --resume RUN_DIR."""
    parser.add_argument("--config", help="YAML run config (see experiments/configs/)")
    parser.add_argument("--arch", help="architecture name (nucleo list)")
    parser.add_argument("--losses", help="comma-separated loss names, e.g. ce or ce,rc,cgr")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.max_steps=50 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its latest complete checkpoint (its config.yaml is the base)",
    )
    # The deepspeed launcher passes --local_rank=N; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config the flags describe (``--resume RUN_DIR``: that run's config as the base)."""
    from nucleo.train.config import load_config

    path = args.config
    if args.resume and not path:
        path = Path(args.resume) / "config.yaml"
    return load_config(path, arch=args.arch, losses=args.losses, overrides=args.overrides)
