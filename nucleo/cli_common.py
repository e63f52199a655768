"""What every command's parser shares: one-line errors, and argument types that name what
would be valid.

Imports nothing heavy (the CLI builds its parsers before torch loads).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``nucleo: error: <what> (see --help)``,
    exit code 2. Its sub-command parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"nucleo: error: {message} (see {self.prog} --help)\n")


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
    import sys

    print(f"warning: {text}", file=sys.stderr, flush=True)
