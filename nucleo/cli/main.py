"""The ``nucleo`` command: the parser, assembled from one module per command group.

    nucleo list | config | pretrain | export      nucleo.cli.train
    nucleo data ...                               nucleo.cli.data
    nucleo sweep | scaling | compare              nucleo.cli.studies
    nucleo tasks | finetune | generate | evaluate-generation      nucleo.cli.downstream
    nucleo predict | score | embed | evaluate     nucleo.cli.inference
    nucleo score-variants                         nucleo.cli.variants
    nucleo serve                                  nucleo.cli.serve
    nucleo baseline markov | score                nucleo.cli.baseline

Multi-process training goes through DeepSpeed's launcher: ``deepspeed launch/pretrain.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from nucleo import __version__
from nucleo.cli import baseline, data, downstream, inference, serve, studies, train, variants
from nucleo.cli.common import Parser, run
from nucleo.core.runtime import configure_threads
from nucleo.train.arguments import add_run_arguments


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser; imports no torch (each command imports what it needs)."""
    parser = Parser(prog="nucleo", description="Pretrain DNA language models.")
    parser.add_argument("--version", action="version", version=f"nucleo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (train, data, studies, downstream, inference, variants, serve, baseline):
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``nucleo ...``: parse, then run the command (user errors: one line, exit code 2)."""
    configure_threads()
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of launch/pretrain.py: the ``pretrain`` options, without a subcommand."""
    parser = Parser(
        prog="launch/pretrain.py", description="Pretrain a DNA language model with DeepSpeed."
    )
    add_run_arguments(parser)
    return run(train.cmd_pretrain, parser.parse_args(argv))
