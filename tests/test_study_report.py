"""experiments/study_report.py: the study's report pieces read from experiments/results/."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    path = ROOT / "experiments" / "study_report.py"
    spec = importlib.util.spec_from_file_location("study_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def _row(task: str, label: str, mode: str, mcc: float) -> dict[str, Any]:
    return {"task": task, "label": label, "init": "pretrained", "mode": mode, "seeds": 1,
            "summary": {"mcc": [mcc, 0.0]}}  # fmt: skip


def test_downstream_pairs_by_pretraining_seed(report: Any, tmp_path: Path) -> None:
    """Best minus baseline MCC per task and mode, paired by the -sN seed of the label; a higher
    MCC is better (the opposite of bits per base)."""
    rows = []
    for seed, (base, best) in enumerate([(0.30, 0.35), (0.32, 0.36), (0.31, 0.37)]):
        rows += [_row("kingdom", f"baseline-s{seed}", "probe", base),
                 _row("kingdom", f"best-s{seed}", "probe", best),
                 _row("kingdom", f"baseline-s{seed}", "full", 0.5),
                 _row("kingdom", f"best-s{seed}", "full", 0.48 - 0.001 * seed)]  # fmt: skip
    (tmp_path / "ablation_downstream_hyena.json").write_text(json.dumps({"rows": rows}))
    text = report.downstream_section("hyena", "ce+cgr")
    probe = next(line for line in text.splitlines() if line.startswith("| kingdom | probe"))
    full = next(line for line in text.splitlines() if line.startswith("| kingdom | full"))
    assert "| 0.310 | +0.050 [" in probe and probe.endswith("| better |")
    assert "-0.020, -0.021, -0.022" in full and full.endswith("| worse |")


def test_missing_pieces_are_named_not_invented(report: Any) -> None:
    assert "Not run yet" in report.downstream_section("mamba", "ce+rc")
    assert "Not run yet" in report.ablation_section()
