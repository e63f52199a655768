"""The fault suite, small: real runs killed (-9) mid-step, mid-checkpoint and mid-validation
(one with its newest checkpoint damaged), a full disk, corrupted shards and a tracking server
that goes away, each checked by ``experiments/fault_suite.py`` itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_killed_damaged_full_and_cut_off_runs_recover_exactly(sample_shards, tmp_path):
    shutil.copytree(sample_shards, tmp_path / "shards")  # the suite's work folder reuses them
    out = tmp_path / "reliability.md"
    done = subprocess.run(
        [sys.executable, "experiments/fault_suite.py", "--trials", "3", "--seed", "1",
         "--work", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    assert "FAILED" not in report and "data lost: 0" in report, report
    rows = [line for line in report.splitlines() if line.startswith("| kill")]
    assert len(rows) == 3 and all("| ok |" in row or "| n/a |" in row for row in rows), report
    assert "| corrupt shards |" in report and "| tracking server stopped |" in report
