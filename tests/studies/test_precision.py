"""Every family x {fp32, bf16 weights, bf16 autocast} x ZeRO 0-3, in one and two processes.

The matrix runs in launch/precision_check.py (nucleo.studies.precision: real DeepSpeed engines
on real DNA: training, validation, checkpoint and resume, export from the fp32 masters, the
offline ``nucleo export`` path, fine-tuning), once per process count, on the suite's device;
each combination is a test here. One process: all 72 combinations, without a launcher, and
train.compile on the family it speeds up (multires) and on one behind compiled CPU ops (mamba).
Two processes (``deepspeed --num_gpus 2``): bf16 weights under every stage, plus autocast under
ZeRO-3 and fp32 under ZeRO-2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nucleo.studies.precision import combos, problems
from tests.conftest import DEVICE, ROOT, launch_env

ONE = [*combos(), "mamba:2:bf16:compile", "multires:0:fp32:compile"]  # train.compile
TWO = combos(precisions=["bf16"]) + combos(stages=[3], precisions=["autocast"])
TWO += combos(stages=[2], precisions=["fp32"])
WORKER = str(ROOT / "launch" / "precision_check.py")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], procs: int) -> dict[str, dict]:
    out = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(procs), capture_output=True, text=True, timeout=900
    )
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            results[result["combo"]] = result
    if not results:
        raise AssertionError(
            f"the worker reported nothing:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
        )
    return results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("precision1")
    return _run([sys.executable, WORKER, "--json", "--out", str(root), *ONE], 1)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("precision2")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_port()), WORKER, "--json"]
    cmd += ["--out", str(root), *TWO]
    return _run(cmd, 2)


def _check(result: dict | None, combo: str) -> None:
    assert result is not None, f"{combo}: no result (the worker died before it)"
    assert not problems(result), f"{combo}: {problems(result)}"


@pytest.mark.slow
@pytest.mark.parametrize("combo", ONE)
def test_one_process(one_process, combo):
    _check(one_process.get(combo), combo)
    assert one_process[combo]["device"] == DEVICE.type


@pytest.mark.slow
@pytest.mark.parametrize("combo", TWO)
def test_two_processes(two_processes, combo):
    _check(two_processes.get(combo), combo)
    assert two_processes[combo]["world_size"] == 2
