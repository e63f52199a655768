"""Every family x {fp32, bf16 weights, bf16 autocast} x ZeRO 0-3, in one and two processes.

The matrix runs in tests/precision_worker.py (real DeepSpeed engines on real DNA: training,
validation, checkpoint and resume, export from the fp32 masters, the offline ``nucleo export``
path), once per process count, on the suite's device; each combination is a test here. One
process: all 72 combinations, without a launcher. Two processes (``deepspeed --num_gpus 2``):
bf16 weights under every stage, plus autocast under ZeRO-3 and fp32 under ZeRO-2.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEVICE, ROOT, launch_env
from tests.precision_worker import TINY

FAMILIES = sorted(TINY)
ONE = [f"{a}:{s}:{p}" for a in FAMILIES for s in range(4) for p in ("fp32", "bf16", "autocast")]
TWO = [f"{a}:{s}:bf16" for a in FAMILIES for s in range(4)]
TWO += [f"{a}:3:autocast" for a in FAMILIES] + [f"{a}:2:fp32" for a in FAMILIES]
WORKER = str(ROOT / "tests" / "precision_worker.py")


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
    return _run([sys.executable, WORKER, str(root), *ONE], 1)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("precision2")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_port()), WORKER, str(root), *TWO]
    return _run(cmd, 2)


def _check(result: dict | None, combo: str) -> None:
    assert result is not None, f"{combo}: no result (the worker died before it)"
    assert "error" not in result, f"{combo}: {result['error']} | {result.get('trace', '')}"
    losses, norms = result["losses"], result["grad_norms"]
    assert all(math.isfinite(x) for x in losses + norms + [result["eval_loss"]]), result
    assert losses[-1] < losses[0] - 0.15, losses  # it learns (ln 4 = 1.39 is the floor)
    assert result["weights_ok"], result["weight_dtypes"]
    assert result["export_dtypes"] == ["torch.float32"]
    assert result["offline_equals_masters"], "nucleo export's weights differ from the masters"
    assert result["resume_ok"], f"resume diverged by {result['resume_max_diff']}"
    assert result["resumed_losses"] == pytest.approx(losses[3:], rel=1e-3)
    gap, scale = result["export_logit_gap"], result["export_logit_scale"]
    assert gap <= 0.03 * scale + 0.02, (gap, scale)  # fp32 export vs the engine's bf16


@pytest.mark.parametrize("combo", ONE)
def test_one_process(one_process, combo):
    _check(one_process.get(combo), combo)
    assert one_process[combo]["device"] == DEVICE.type


@pytest.mark.slow
@pytest.mark.parametrize("combo", TWO)
def test_two_processes(two_processes, combo):
    _check(two_processes.get(combo), combo)
    assert two_processes[combo]["world_size"] == 2
