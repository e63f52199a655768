"""What every command shares: the parser class (one-line errors, defaults in the help), the
argument types that name what would be valid, the one vocabulary of flags, and ``run``, which
turns a user's mistake into one line on stderr and exit code 2.

The vocabulary (README, "The command line"): ``--shards DIR`` a shard folder; ``--out PATH``
what a command writes (a file or a folder, its help says which); ``--batch-size N`` items per
forward pass (its help gives the unit); ``--window TOKENS`` model input length, ``--length
BASES`` the length of what is built or generated; ``--device auto``; ``--tracking-uri``,
``--runs-root``, ``--experiment`` the MLflow store; ``--tag KEY=VALUE`` an MLflow tag filter.

Imports nothing heavy (the CLI builds its parsers before torch loads).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from nucleo.core.device import CHOICES

EXIT_USAGE = 2


class UserError(Exception):
    """An error caused by input (config, files); printed without a traceback."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ``(default: X)`` after every flag that has a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``nucleo: error: <what> (see --help)``,
    exit code 2, and whose help shows defaults. Its sub-command parsers are of the same class."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"nucleo: error: {message} (see {self.prog} --help)\n")


def at_least(low: int) -> Callable[[str], int]:
    """An argument type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not valid (a whole number >= {low})")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number(
    low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:  # fmt: skip
    """An argument type: a finite number in [low, high] (``*_open``: that end excluded)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    valid = f"a number in {left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value < low or (low_open and value == low)
        too_high = value > high or (high_open and value == high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is not valid ({valid})")
        return value

    parse.__name__ = valid
    return parse


positive = number(0.0, low_open=True)


def warn(text: str) -> None:
    """A warning line on stderr (stdout may be a TSV being written)."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the vocabulary


def add_shards(p: argparse.ArgumentParser, *, required: bool = True, what: str = "") -> None:
    """``--shards DIR``: a shard folder (holds manifest.json)."""
    p.add_argument("--shards", required=required, metavar="DIR",
                   help=what or "shard folder (holds manifest.json)")  # fmt: skip


def add_out(
    p: argparse.ArgumentParser, what: str, *, required: bool = False, default: str | None = None
) -> None:
    """``--out PATH``: what the command writes; ``what`` says whether a file or a folder."""
    p.add_argument("--out", required=required, default=default, metavar="PATH", help=what)


def add_batch_size(p: argparse.ArgumentParser, unit: str, default: int) -> None:
    """``--batch-size N``: ``unit`` per forward pass (windows, records, sequences)."""
    p.add_argument("--batch-size", type=at_least(1), default=default, metavar="N",
                   help=f"{unit} per forward pass")  # fmt: skip


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device``: auto (CUDA when a GPU is visible), cpu, cuda, cuda:N."""
    p.add_argument("--device", default="auto",
                   help=f"{CHOICES} (auto: CUDA when a GPU is visible)")  # fmt: skip


def add_store(p: argparse.ArgumentParser, *, tags: bool = True) -> None:
    """The MLflow store: ``--tracking-uri``, ``--runs-root`` (and ``--tag`` filters)."""
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///RUNS_ROOT/mlflow.db)")  # fmt: skip
    p.add_argument("--runs-root", default="runs", help="where the default store lives")
    if tags:
        p.add_argument("--tag", action="append", metavar="KEY=VALUE",
                       help="only runs with this MLflow tag (repeatable)")  # fmt: skip


# ----------------------------------------------------------------------------- running


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)``; a user's mistake becomes one line on stderr and exit code 2
    (``NUCLEO_DEBUG=1``: the traceback instead)."""
    from data_pipeline.corpus import FetchError
    from data_pipeline.readers import SequenceFormatError
    from data_pipeline.sources import DownloadError
    from nucleo.core.registry import UnknownNameError
    from nucleo.core.schema import ConfigError

    try:
        return func(args)
    except ConfigError as err:
        print(f"nucleo: config error: {err}", file=sys.stderr)
    except (
        UserError,
        SequenceFormatError,
        UnknownNameError,
        FileNotFoundError,
        FileExistsError,
        ValueError,  # input checks of the data pipeline (kingdom names, shard counts, ...)
        FetchError,  # failed package fetches (nucleo data corpus)
        DownloadError,  # failed RefSeq downloads
    ) as err:
        if os.environ.get("NUCLEO_DEBUG"):
            raise
        print(f"nucleo: error: {err}", file=sys.stderr)
    except FloatingPointError as err:  # training diverged (nucleo.train.trainer.Diverged)
        print(f"nucleo: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, permissions, a folder where a file should be
        if os.environ.get("NUCLEO_DEBUG"):
            raise
        print(f"nucleo: error: {os_error_line(err)}", file=sys.stderr)
    return EXIT_USAGE


_OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "write elsewhere",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a path component is a file, not a folder",
}


def os_error_line(err: OSError) -> str:
    """``<file>: <what> (<what to do>)`` for an OSError."""
    where = err.filename or "(no file named)"
    what = (err.strerror or str(err)).lower()
    hint = _OS_HINTS.get(err.errno or 0)
    return f"{where}: {what}" + (f" ({hint})" if hint else "")
