"""What every experiment's report shares: the record of the run and writing it down.

A script records its run with ``run_record()`` (the command that reproduces it, the date, the
machine), opens its markdown with ``header(record)``, and writes the .md, with the .json beside
it, by ``write(path, lines, data)``. Reports rewritten from a stored .json pass that record to
``header``: they keep the run's date and machine, not today's.

The scripts import it as ``experiments.report`` with the repository root on ``sys.path`` (each
puts it there), as they import ``nucleo``. The machine itself is ``nucleo.core.machine``'s.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nucleo.core.machine import describe, summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def command_line() -> str:
    """The command that ran this script: ``python experiments/x.py --its --arguments``."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", str(name), shlex.join(sys.argv[1:])]).rstrip()


def run_record() -> dict[str, Any]:
    """``command``, ``date`` (UTC) and ``machine`` (``describe()``) of this run, for the .json."""
    return {
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": describe(),
    }


def machine_line(machine: Mapping[str, Any] | None = None) -> str:
    """A recorded ``describe()`` (with any extras) as one line; this machine's when None."""
    if machine is None:
        return summary()
    return ", ".join(f"{key} {value}" for key, value in machine.items())


def header(record: Mapping[str, Any]) -> list[str]:
    """The report's first bullets: the command, the date and the machine of ``record``."""
    return [
        f"- command: `{record['command']}`",
        f"- date: {record['date']}",
        f"- machine: {machine_line(record['machine'])}",
    ]


def write(md_path: Path | str, lines: Iterable[str], json_data: Any = None) -> Path:
    """Write ``lines`` to ``md_path`` (and ``json_data``, when given, to the .json beside it)."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    if json_data is not None:
        text = json.dumps(json_data, indent=1, default=str)
        md_path.with_suffix(".json").write_text(text + "\n")
    md_path.write_text("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {md_path}")
    return md_path
