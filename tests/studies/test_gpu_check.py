"""launch/gpu_check.sh: the dry run plans every step; the report's arithmetic and tables."""

from __future__ import annotations

import math
import subprocess
import time

import pytest

from nucleo.studies import gpu_check
from tests.conftest import ROOT


@pytest.mark.slow
def test_the_dry_run_plans_every_step_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        ["launch/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "pytest -m gpu" in text
    assert "launch/precision_check.py --json transformer:0:bf16" in text
    for arch in gpu_check.FAMILIES:
        assert f"launch/pretrain.py --arch {arch}" in text, arch
    assert text.count("--set engine.precision=bf16") >= len(gpu_check.FAMILIES)
    if "0 GPU(s)" in text:  # a CPU machine: the several-GPU runs are skipped, and it says why
        assert "skipped train-all: the host has no GPU" in text
    assert f"would write {out}" in text and not out.exists()


def test_mfu_and_peaks():
    assert gpu_check.peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_check.peak_tflops("Some Future GPU") is None
    # 1M tokens/s at 6e8 FLOPs per token on one 1000-TFLOP/s GPU: 60%
    assert gpu_check.mfu(1e6, 6e8, 1000.0, 1) == pytest.approx(0.6)
    assert gpu_check.mfu(1e6, 6e8, 1000.0, 2) == pytest.approx(0.3)
    assert math.isnan(gpu_check.mfu(1e6, 6e8, None, 1))


def test_the_report_lists_steps_tables_and_skips(tmp_path):
    check = gpu_check.Check(
        out=tmp_path / "gpu.md", logs=ROOT / "runs" / "gpu_check" / "x", budget=570,
        kernel_budget=150, steps_per_run=40, size="small", peak=989.4, dry_run=False,
    )  # fmt: skip
    check.machine = {"gpus": 1, "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "driver": "580",
                     "cuda": "12.8", "cpu_cores": 16, "host": "h", "torch": "2.13.0",
                     "deepspeed": "0.19.8", "python": "3.11"}  # fmt: skip
    train = gpu_check.Step("train-1", "ok", seconds=200.0)
    train.rows = [{"family": "hyena", "status": "ok", "parameters": 6_000_000,
                   "tokens_per_second": 512_000.4, "tflops": 12.25, "mfu": 0.01238,
                   "bits_per_base": 1.93}]  # fmt: skip
    skipped = gpu_check.Step("train-all", "skipped", why="the host has 1 GPU")
    check.steps = [train, skipped]
    check.started = time.monotonic() - 300
    text = gpu_check.render(check, "launch/gpu_check.sh")
    assert "- command: `launch/gpu_check.sh`" in text and "1 x NVIDIA H200 (139.8 GiB)" in text
    assert "| hyena | ok | 6,000,000 | 512,000 | 12.2 | 1.24% | 1.930 |" in text
    assert "- train-all: the host has 1 GPU" in text and "took 5.0 min" in text


def test_junit_results_are_read(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="boom&#10;more">x</failure></testcase>'
        '<testcase classname="t" name="c"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    rows = gpu_check.junit_rows(xml)
    assert [(r["test"], r["outcome"], r["message"]) for r in rows] == [
        ("t::a", "passed", ""), ("t::b", "failed", "boom"), ("t::c", "skipped", "needs a CUDA GPU"),
    ]  # fmt: skip
