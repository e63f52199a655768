"""The house: nucleo's layers hold (import contract), the lower layers type-check, modules stay
small, the CLI is quick to start and speaks one vocabulary, with help and a default shown on
every flag."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nucleo import __version__
from nucleo.cli.main import build_parser
from tests.conftest import ROOT

MAX_LINES = 500


def test_imports_only_go_down_the_layers():
    """pyproject.toml's import-linter contracts: cli > studies | api > downstream | slurm >
    train > families > core, and nothing installed imports experiments/ or tests/."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_ground_floor_and_the_training_layer_type_check():
    """mypy over nucleo/core and nucleo/train (pyproject.toml's [tool.mypy])."""
    mypy = Path(sys.executable).with_name("mypy")
    result = subprocess.run([str(mypy)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_module_of_nucleo_is_over_500_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "nucleo").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_the_parser_imports_no_torch_and_nucleo_help_is_quick():
    probe = (
        "import sys; from nucleo.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'deepspeed', 'mlflow', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nucleo", "--help"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"nucleo --help took {best:.2f} s"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"nucleo {__version__}"


def _commands(parser: argparse.ArgumentParser, prefix: str = "nucleo"):
    """(name, parser) of every command and subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


COMMANDS = dict(_commands(build_parser()))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_has_help_and_the_vocabulary_is_one(name):
    parser = COMMANDS[name]
    flags = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        for flag in action.option_strings:
            flags[flag] = action
    # one word for each thing (README, "The command line")
    for old in ("--batch", "--out-dir", "--output", "--shard-dir", "--outdir", "--gpus"):
        assert old not in flags, f"{name}: {old} (the vocabulary says otherwise)"
    assert not any(a.dest == "dir" for a in parser._actions), f"{name}: a shard folder is --shards"
    if "--device" in flags:
        assert flags["--device"].default == "auto"
    if "--tag" in flags:
        assert flags["--tag"].metavar == "KEY=VALUE", f"{name}: --tag is an MLflow tag filter"
    text = parser.format_help()
    for flag, action in flags.items():
        if action.default not in (None, False, [], argparse.SUPPRESS) and flag.startswith("--"):
            assert "default" in (action.help or "") or "(default:" in text, (name, flag)
