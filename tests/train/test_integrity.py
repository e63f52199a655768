"""Checkpoints you can trust: digests, fallback past damage, no non-finite save, weights-only
loading, and a run that never checkpointed resumes afresh.

Runs are real (``python launch/pretrain.py``, one process, a tiny transformer on the bundled
genomes); damage is done to their files the way disks and people do it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nucleo.train.checkpoint import COMPLETE, complete_tags, damage, file_digests, latest_intact
from nucleo.train.export import load_exported
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # each test runs DeepSpeed training end to end

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=64",
    "train.micro_batch_size=4", "train.warmup_steps=0", "train.log_every=100",
    "eval.every=0", "eval.windows_per_kingdom=1", "tracking.enabled=false",
]  # fmt: skip
STATES = "mp_rank_00_model_states.pt"


def pretrain(shards: Path, root: Path, *args: str, sets: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch/pretrain.py", *args]
    for item in [*TINY, f"data.shards={shards}", f"run.root={root}", *sets]:
        cmd += ["--set", item]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def export(run_dir: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nucleo", "export", str(run_dir), "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def three_checkpoints(sample_shards, tmp_path_factory) -> Path:
    """A finished run with complete checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("runs")
    sets = ["train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=3", "run.name=r"]
    out = pretrain(sample_shards, root, sets=sets)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "r"


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_damage_names_flipped_truncated_and_missing_files(tmp_path):
    tag = tmp_path / "step_00000001"
    (tag / "sub").mkdir(parents=True)
    (tag / "a.pt").write_bytes(os.urandom(4096))
    (tag / "sub" / "b.pt").write_bytes(os.urandom(100))
    (tag / COMPLETE).write_text(json.dumps({"step": 1, "files": file_digests(tag)}))
    assert damage(tag) is None
    data = bytearray((tag / "a.pt").read_bytes())
    data[1000:1064] = bytes(b ^ 0xFF for b in data[1000:1064])  # 64 bytes flipped
    (tag / "a.pt").write_bytes(bytes(data))
    assert damage(tag) == "a.pt does not match its SHA-256 (corrupted)"
    (tag / "a.pt").write_bytes(bytes(data[:2000]))
    assert "a.pt is 2,000 bytes, 4,096 when saved" in damage(tag)
    (tag / "sub" / "b.pt").unlink()
    assert damage(tag) in ("sub/b.pt is missing", "a.pt is 2,000 bytes, 4,096 when saved "
                           "(truncated or changed)")  # fmt: skip
    (tag / COMPLETE).write_text("{not json")
    assert "marker is unreadable" in damage(tag)


def test_every_checkpoint_records_its_files_digests(three_checkpoints):
    ckpt = three_checkpoints / "checkpoints"
    assert complete_tags(ckpt) == ["step_00000002", "step_00000004", "step_00000006"]
    marker = json.loads((ckpt / "step_00000006" / COMPLETE).read_text())
    assert STATES in marker["files"] and len(marker["files"][STATES]["sha256"]) == 64
    assert latest_intact(ckpt) == "step_00000006"


@pytest.mark.parametrize("harm", ["flip", "truncate", "delete"])
def test_export_and_resume_fall_back_past_a_damaged_checkpoint(
    three_checkpoints, sample_shards, tmp_path, harm
):
    run = _copy(three_checkpoints, tmp_path)
    states = run / "checkpoints" / "step_00000006" / STATES
    data = bytearray(states.read_bytes())
    if harm == "flip":
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        states.write_bytes(bytes(data))
    elif harm == "truncate":
        states.write_bytes(bytes(data[: len(data) // 3]))
    else:
        states.unlink()
    out = export(run, tmp_path / "x")
    assert out.returncode == 0, out.stderr
    assert "step_00000006 is damaged" in out.stderr and "trying the one before" in out.stderr
    assert load_exported(tmp_path / "x")[2]["trained"]["checkpoint"] == "step_00000004"
    if harm != "flip":  # resuming is the same decision; one launch is enough
        return
    out = pretrain(sample_shards, tmp_path, "--resume", str(run), sets=["train.max_steps=6"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step_00000006 is damaged" in out.stdout and "from step_00000004" in out.stdout


def test_a_diverging_run_saves_nothing_non_finite_and_keeps_its_last_good_checkpoint(
    sample_shards, tmp_path
):
    """lr 1e4: the loss goes non-finite at step 6. With a checkpoint every step, keep=1 and
    no progress line before it (the worst case), the run stops in one line, step 6 is never
    saved and the step-5 checkpoint survives, finite."""
    sets = ["train.lr=1e4", "train.grad_clip=0", "train.max_steps=12", "checkpoint.every=1",
            "checkpoint.keep=1", "run.name=nan"]  # fmt: skip
    out = pretrain(sample_shards, tmp_path, sets=sets)
    assert out.returncode == 1, out.stderr[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("nucleo:")]
    assert "training diverged: the loss of step 6 is not finite" in line
    assert "last checkpoint: step_00000005" in line
    run = tmp_path / "nan"
    assert complete_tags(run / "checkpoints") == ["step_00000005"]
    export_out = export(run, tmp_path / "x")
    assert export_out.returncode == 0, export_out.stderr
    weights = load_exported(tmp_path / "x")[0].state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_settings_changed_at_resume_take_effect(three_checkpoints, sample_shards, tmp_path):
    """The optimizer's and schedule's saved state would otherwise bring back the old lr."""
    run = _copy(three_checkpoints, tmp_path)
    out = pretrain(sample_shards, tmp_path, "--resume", str(run),
                   sets=["train.max_steps=8", "train.lr=5e-4"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # the last step of the cosine schedule: lr x min_lr_ratio (0.1)
    assert "step 8/8 (100%)" in out.stdout and "lr 5.00e-05" in out.stdout, out.stdout


def test_a_run_that_never_checkpointed_resumes_afresh(sample_shards, tmp_path):
    sets = ["train.lr=1e4", "train.grad_clip=0", "train.max_steps=12", "checkpoint.every=50",
            "run.name=early"]  # fmt: skip
    assert pretrain(sample_shards, tmp_path, sets=sets).returncode == 1
    run = tmp_path / "early"
    assert (run / "config.yaml").is_file() and not complete_tags(run / "checkpoints")
    refused = pretrain(sample_shards, tmp_path, sets=sets)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    out = pretrain(sample_shards, tmp_path, "--resume", str(run),
                   sets=["train.lr=1e-3", "train.max_steps=4"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has no checkpoint yet: starting it afresh" in out.stdout
    assert json.loads((run / "summary.json").read_text())["step"] == 4


class _Planted:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_not_run(three_checkpoints, sample_shards, tmp_path):
    """A crafted model-states file, with COMPLETE's digests rewritten to match (an attacker
    can write both): ``nucleo export`` and ``--resume`` refuse it in one line, and the code
    in it never runs."""
    run = _copy(three_checkpoints, tmp_path)
    tag = run / "checkpoints" / "step_00000006"
    marker = tmp_path / "pwned"
    torch.save({"module": _Planted(marker)}, tag / STATES)
    complete = json.loads((tag / COMPLETE).read_text())
    complete["files"] = file_digests(tag)
    (tag / COMPLETE).write_text(json.dumps(complete))
    out = export(run, tmp_path / "x")
    assert out.returncode == 2
    assert "refused: it holds a reference to posix.system" in out.stderr, out.stderr
    resumed = pretrain(sample_shards, tmp_path, "--resume", str(run), sets=["train.max_steps=8"])
    assert resumed.returncode == 2 and "refused" in resumed.stderr, resumed.stderr[-2000:]
    assert not marker.exists(), "the planted code ran"
