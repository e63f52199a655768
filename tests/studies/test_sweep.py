"""Sweeps (nucleo.studies.sweep): specs, points, a real two-point sweep under one MLflow parent."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from mlflow.tracking import MlflowClient

from nucleo.cli.main import main
from nucleo.core.schema import ConfigError
from nucleo.studies.sweep import Sweep, expand, load_spec
from nucleo.train.components import build_model
from nucleo.train.compute import ComputeCounter
from nucleo.train.config import load_config

TINY_MODEL = {"arch": "transformer", "model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2}


def _spec(tmp_path, shards=None, **changes) -> dict:
    spec = {
        "name": "tiny",
        "experiment": "sweep-test",
        "config": {
            "data": {"shards": str(shards or tmp_path / "none"), "seq_len": 64},
            "train": {"max_steps": 4, "micro_batch_size": 4, "log_every": 2, "warmup_steps": 1},
            "eval": {"every": 0, "windows_per_kingdom": 2},
            "checkpoint": {"every": 2, "export": False},
            "run": {"root": str(tmp_path / "runs")},
        },
        "points": [TINY_MODEL],
        "grid": {"losses": ["ce", "ce,rc"]},
    }
    spec.update(changes)
    return spec


def _write(tmp_path, spec: dict):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_points_cross_the_list_the_grid_and_the_seeds_then_add_the_extra_ones(tmp_path):
    spec = _spec(
        tmp_path,
        points=[TINY_MODEL, {"arch": "hyena", "model.d_model": 16, "model.n_layers": 1}],
        seeds=[0, 1],
        extra=[{"arch": "hyena", "model.d_model": 8, "losses": "ce", "train.max_steps": 2}],
    )
    points = expand(load_spec(_write(tmp_path, spec)))
    assert len(points) == 2 * 2 * 2 + 2
    names = [p.name for p in points]
    assert names[0] == "transformer-d_model16-n_layers1-n_heads2-ce-seed0"
    assert "hyena-d_model16-n_layers1-ce+rc-seed1" in names
    assert names[-1] == "hyena-d_model8-ce-max_steps2-seed1"
    last = points[-1].config
    assert (last.arch, last.losses, last.train.max_steps, last.train.seed) == (
        "hyena",
        ["ce"],
        2,
        1,
    )
    assert points[0].run_dir == tmp_path / "runs" / "sweeps" / "tiny" / names[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gird": {}}, "gird: unknown key"),
        ({"grid": {"losses": "ce"}}, "grid.losses: expected a non-empty list"),
        ({"name": "a b"}, "name: need a folder name"),
        ({"points": [TINY_MODEL, TINY_MODEL]}, "are both 'transformer-d_model16"),
        ({"grid": {"train.lr": [1e-3, "fast"]}}, "train.lr: point transformer-"),
    ],
)
def test_bad_specs_name_the_key_and_the_spec(tmp_path, change, message):
    path = _write(tmp_path, _spec(tmp_path, **change))
    with pytest.raises(ConfigError, match="sweep spec") as err:
        expand(load_spec(path))
    assert message in str(err.value)


@pytest.mark.slow
def test_a_point_another_live_sweep_process_runs_is_skipped(tmp_path):
    """``sweep run --point`` in parallel: a point whose lock names a live process is
    ``running`` (and neither restarted nor deleted); a stale lock is ignored."""
    import subprocess
    import sys

    sweep = Sweep(load_spec(_write(tmp_path, _spec(tmp_path))))
    point = sweep.points[0]
    point.run_dir.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sweep.lock_path(point).write_text(f"{other.pid}\n")
        assert sweep.status(point) == "running" and sweep.holder(point) == other.pid
    finally:
        other.kill()
        other.wait()
    assert sweep.status(point) == "new"  # the holder died: the lock is stale


def test_a_sweep_runs_each_point_as_a_child_run_skips_finished_ones_and_resumes(
    sample_shards, tmp_path, capfd
):
    path = _write(tmp_path, _spec(tmp_path, sample_shards))
    assert main(["sweep", "run", str(path), "--dry-run"]) == 0
    assert capfd.readouterr().out.count("-m nucleo pretrain --config") == 2

    assert main(["sweep", "run", str(path)]) == 0
    out = capfd.readouterr().out
    assert out.count(": starting") == 2 and "2/2 points, 0 failed" in out
    sweep = Sweep(load_spec(path))
    state = json.loads(sweep.state_file.read_text())
    client = MlflowClient(tracking_uri=sweep.uri)
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    summaries, flops = [], []
    for point in sweep.points:
        summary = json.loads((point.run_dir / "summary.json").read_text())
        summaries.append(summary)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == state["parent_run_id"]
        assert run.data.tags["sweep.losses"] == ",".join(point.config.losses)
        assert run.data.params["derived.non_embedding_parameters"]
        # compute: 4 steps x 4 windows x 3 (fwd + bwd) x passes x forward FLOPs of a window
        cfg = load_config(point.run_dir / "config.yaml")
        counter = ComputeCounter(build_model(cfg.arch, cfg.model, _char()), 4)
        passes = 2 if "rc" in cfg.losses else 1
        assert summary["flops"] == pytest.approx(
            4 * 4 * 3 * passes * counter.forward_per_window(64)
        )
        assert run.data.metrics["train/flops"] == pytest.approx(summary["flops"])
        flops.append(summary["flops"])
    assert flops[1] == pytest.approx(2 * flops[0])  # the rc strand is a second pass

    assert main(["sweep", "run", str(path)]) == 0
    assert capfd.readouterr().out.count("finished, skipped") == 2

    spec = _spec(tmp_path, sample_shards)
    spec["config"]["train"]["max_steps"] = 6
    _write(tmp_path, spec)
    assert main(["sweep", "run", str(path), "--point", "0"]) == 0
    out = capfd.readouterr().out
    assert ": resuming" in out and "resumed" in out and "(step 4," in out
    point = Sweep(load_spec(path)).points[0]
    grown = json.loads((point.run_dir / "summary.json").read_text())
    assert grown["step"] == 6 and grown["mlflow_run_id"] == summaries[0]["mlflow_run_id"]
    assert main(["sweep", "status", str(path)]) == 0
    table = capfd.readouterr().out
    assert "| 0 | transformer-" in table and "| finished | 6 |" in table and "| new |" not in table
    assert "| interrupted | 4 |" in table  # point 1: finished at 4 steps, now short of 6


@pytest.mark.slow
def test_one_smoke_point_of_every_family_runs_through_a_sweep(sample_shards, tmp_path, capfd):
    """Every family (nucleo.studies.precision's tiny settings, 2 steps, its default loss: ce, or mlm
    for caduceus) as a point of one ``nucleo sweep run`` on the sample shards: each finishes as
    an MLflow child run with a finite loss."""
    from nucleo.studies.precision import TINY

    points = [
        {"arch": arch, **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)}}
        for arch, sets in sorted(TINY.items())
    ]
    spec = _spec(tmp_path, sample_shards, points=points, grid={})
    spec["config"]["train"].update(max_steps=2, log_every=1)
    path = _write(tmp_path, spec)
    assert main(["sweep", "run", str(path)]) == 0
    assert f"{len(TINY)}/{len(TINY)} points, 0 failed" in capfd.readouterr().out
    sweep = Sweep(load_spec(path))
    client = MlflowClient(tracking_uri=sweep.uri)
    assert sorted(p.config.arch for p in sweep.points) == sorted(TINY)
    for point in sweep.points:
        summary = json.loads((point.run_dir / "summary.json").read_text())
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED" and summary["step"] == 2, point.name
        assert math.isfinite(run.data.metrics["train/loss"]), point.name


def _char():
    from data_pipeline.tokenizers import CharTokenizer

    return CharTokenizer()
