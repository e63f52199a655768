"""Sweeps: a base run config plus a grid (and/or a list) of overrides, one training run a point.

A spec is YAML::

    name: scaling                      # the sweep's folder: <run.root>/sweeps/<name>
    experiment: nucleo-scaling         # MLflow experiment (default: the name)
    base: ../configs/demo.yaml         # optional run config, relative to the spec
    config: {...}                      # optional run config sections, merged over ``base``
    set: {train.max_steps: 300}        # overrides for every point (dotted keys)
    points:                            # a list of alternatives ...
      - {arch: hyena, model.d_model: 64, model.n_layers: 2}
      - {arch: transformer, model.d_model: 64, model.n_layers: 2, model.n_heads: 4}
    grid:                              # ... crossed with every combination of these
      losses: [ce, "ce,rc,cgr"]
    seeds: [0, 1]                      # crossed too (train.seed)
    extra:                             # more points, each whole (not crossed with the grid)
      - {arch: hyena, model.d_model: 64, losses: ce, train.max_steps: 150}
    launcher: [python, -m, nucleo, pretrain]   # optional: how a point is started

Points are ``points x grid x seeds``, then ``extra x seeds``; each gets a readable name made of
its values, so a point keeps its name (and its run directory) when others are added. Every point
becomes one run under ``<run.root>/sweeps/<name>/<point>``, an MLflow child run (tag
``mlflow.parentRunId``) of the sweep's parent run, all in one store. Running the sweep again
skips finished points and resumes interrupted ones from their latest checkpoint; with
``--slurm`` the points become a job array (``launch/slurm/sweep.sbatch``), one task a point.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import yaml

from nucleo.core.progress import duration
from nucleo.core.schema import ConfigError, set_path, to_dict
from nucleo.slurm import SCRIPTS
from nucleo.train import store
from nucleo.train.checkpoint import latest_tag
from nucleo.train.config import RunConfig, read_yaml, resolve

SPEC_KEYS = (
    "name", "experiment", "base", "config", "set", "points", "grid", "extra", "seeds", "launcher",
)  # fmt: skip
DEFAULT_LAUNCHER = [sys.executable, "-m", "nucleo", "pretrain"]
SWEEP_SBATCH = SCRIPTS / "sweep.sbatch"


@dataclass
class Point:
    """One run of a sweep: its overrides (dotted key -> value) and resolved config."""

    index: int
    name: str
    overrides: dict[str, Any]
    config: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.root) / self.config.run.name  # type: ignore[operator]


@dataclass
class SweepSpec:
    """A parsed sweep spec (see the module docstring); ``path`` is where it was read."""

    path: Path
    name: str
    experiment: str
    base: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    extra: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    launcher: list[str] = field(default_factory=lambda: list(DEFAULT_LAUNCHER))


def _error(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(key, f"{message} (sweep spec {path})")


def _mapping(value: Any, path: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _error(path, key, f"expected a mapping, got {value!r}")
    return value


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; errors name the spec file and the key."""
    return load_spec_from(read_yaml(path), Path(path))


def load_spec_from(raw: dict[str, Any], path: Path) -> SweepSpec:
    """Check a sweep spec given as data; ``path`` (where it was, or would be, read) names it
    in errors and anchors a relative ``base``."""
    for key in raw:
        if key not in SPEC_KEYS:
            raise _error(path, str(key), f"unknown key; valid: {', '.join(SPEC_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _error(path, "name", f"need a folder name (letters, digits, _ . -), got {name!r}")
    base: dict[str, Any] = {}
    if raw.get("base"):
        base_path = (path.parent / str(raw["base"])).resolve()
        if not base_path.is_file() and Path(str(raw["base"])).is_file():
            base_path = Path(str(raw["base"])).resolve()  # relative to the working directory
        base = read_yaml(base_path)
    for section, value in _mapping(raw.get("config"), path, "config").items():
        if isinstance(value, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **value}
        else:
            base[section] = value
    lists = {}
    for key in ("points", "extra"):
        lists[key] = raw.get(key) or []
        if not isinstance(lists[key], list) or not all(isinstance(p, dict) for p in lists[key]):
            raise _error(path, key, "expected a list of mappings (dotted key -> value)")
    grid = _mapping(raw.get("grid"), path, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _error(path, f"grid.{key}", f"expected a non-empty list, got {values!r}")
    seeds = raw.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise _error(path, "seeds", f"expected a list of integers, got {seeds!r}")
    launcher = raw.get("launcher") or list(DEFAULT_LAUNCHER)
    if isinstance(launcher, str):
        launcher = shlex.split(launcher)
    return SweepSpec(
        path=path,
        name=name,
        experiment=str(raw.get("experiment") or name),
        base=base,
        overrides=_mapping(raw.get("set"), path, "set"),
        points=[dict(p) for p in lists["points"]],
        grid=grid,
        extra=[dict(p) for p in lists["extra"]],
        seeds=list(seeds),
        launcher=[str(x) for x in launcher],
    )


def _slug(key: str, value: Any) -> str:
    if isinstance(value, list):
        value = "+".join(str(v) for v in value)
    text = str(value).replace(",", "+").replace(" ", "")
    short = key.rsplit(".", 1)[-1]
    if key in ("arch", "losses"):
        short = ""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "", f"{short}{text}")


def point_name(overrides: dict[str, Any]) -> str:
    """A readable run name from a point's values: ``hyena-d_model64-n_layers2-ce+rc-seed0``."""
    return "-".join(_slug(k, v) for k, v in overrides.items()) or "base"


def _apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        set_path(raw, [p for p in key.split(".") if p], value)
    return raw


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the sweep, each resolved (a bad value fails here, naming the point)."""
    base_cfg = resolve(_apply(spec.base, spec.overrides))
    root = Path(base_cfg.run.root) / "sweeps" / spec.name
    keys = list(spec.grid)
    combos = [
        dict(zip(keys, values, strict=True)) for values in itertools.product(*spec.grid.values())
    ]
    seeds: list[int | None] = list(spec.seeds) or [None]
    points: list[Point] = []
    names: dict[str, int] = {}
    crossed = [{**a, **c} for a, c in itertools.product(spec.points or [{}], combos)]
    if spec.extra and not spec.points and not spec.grid:
        crossed = []  # only listed points
    for point, seed in itertools.product([*crossed, *spec.extra], seeds):
        chosen = dict(point)
        if seed is not None:
            chosen["train.seed"] = seed
        name = point_name(chosen)
        if name in names:
            raise _error(spec.path, "points", f"two points are both {name!r}; make them differ")
        names[name] = len(points)
        raw = _apply(spec.base, {**spec.overrides, **chosen})
        raw.setdefault("run", {})
        raw["run"] = {**raw["run"], "root": str(root), "name": name}
        try:
            cfg = resolve(raw)
        except ConfigError as err:
            raise _error(spec.path, err.key, f"point {name}: {err.message}") from None
        points.append(Point(len(points), name, chosen, cfg))
    return points


class Sweep:
    """A sweep's runs, its MLflow parent run and its state file (``sweep.json``)."""

    def __init__(self, spec: SweepSpec, out: TextIO | None = None) -> None:
        self.spec = spec
        self.points = expand(spec)
        first = self.points[0].config
        self.dir = Path(first.run.root)
        self.runs_root = self.dir.parent.parent  # <run.root>/sweeps/<name>
        self.uri = store.resolve_uri(first.tracking.uri, self.runs_root)
        self.state_file = self.dir / "sweep.json"
        self.out = out or sys.stdout

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def read_state(self) -> dict[str, Any]:
        if self.state_file.is_file():
            return json.loads(self.state_file.read_text())
        return {}

    def write_state(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def parent_run(self) -> str:
        """The sweep's MLflow parent run id: the one in sweep.json, else a new one."""
        from mlflow.exceptions import MlflowException

        state = self.read_state()
        client = store.client(self.uri)
        run_id = state.get("parent_run_id")
        if run_id and state.get("tracking_uri") == self.uri:
            try:
                client.get_run(run_id)
                if state.get("points") != [p.name for p in self.points]:  # the spec grew
                    state["points"] = [p.name for p in self.points]
                    self.write_state(state)
                    client.set_tag(run_id, "nucleo.sweep_points", str(len(self.points)))
                return run_id
            except MlflowException:
                pass  # the store was replaced: start a new parent
        experiment_id = store.experiment_id(client, self.spec.experiment, self.runs_root)
        tags = {
            **store.source_tags(),
            "nucleo.sweep": self.spec.name,
            "nucleo.sweep_parent": "true",
            "nucleo.sweep_points": str(len(self.points)),
        }
        run = client.create_run(experiment_id, run_name=f"sweep-{self.spec.name}", tags=tags)
        client.log_artifact(run.info.run_id, str(self.spec.path), "sweep")
        run_id = run.info.run_id
        self.write_state(
            {
                "name": self.spec.name,
                "spec": str(self.spec.path.resolve()),
                "experiment": self.spec.experiment,
                "tracking_uri": self.uri,
                "parent_run_id": run_id,
                "points": [p.name for p in self.points],
                "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }
        )
        return run_id

    def status(self, point: Point) -> str:
        """``finished``, ``running`` (another live sweep process on this machine holds its lock:
        ``sweep run --point`` in parallel), ``interrupted`` (a checkpoint to resume), or ``new``."""
        if self.holder(point) is not None:
            return "running"
        summary = point.run_dir / "summary.json"
        if summary.is_file():
            done = json.loads(summary.read_text())
            if int(done.get("step", 0)) >= point.config.train.max_steps:
                return "finished"
        if latest_tag(point.run_dir / "checkpoints") is not None:
            return "interrupted"
        return "new"

    @staticmethod
    def lock_path(point: Point) -> Path:
        return point.run_dir.parent / f".{point.run_dir.name}.lock"

    def holder(self, point: Point) -> int | None:
        """The live process (pid) that runs ``point``, or None (a stale lock is ignored)."""
        try:
            pid = int(self.lock_path(point).read_text().strip())
        except (OSError, ValueError):
            return None
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def point_config(self, point: Point, parent_run_id: str) -> Path:
        """Write the point's run config (tracked as a child of the sweep); returns its path."""
        cfg = copy.deepcopy(point.config)
        tags = {
            **cfg.tracking.tags,
            "mlflow.parentRunId": parent_run_id,
            "nucleo.sweep": self.spec.name,
            "nucleo.point": point.name,
            **{f"sweep.{k}": str(v) for k, v in point.overrides.items()},
        }
        # the sweep's store and experiment; the point keeps its other tracking settings
        cfg.tracking = replace(
            cfg.tracking, uri=self.uri, experiment=self.spec.experiment, tags=tags
        )
        path = self.dir / "configs" / f"{point.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return path

    def command(self, point: Point, parent_run_id: str) -> list[str]:
        """The command that runs (or resumes) ``point``."""
        state = self.status(point)
        if state == "interrupted" or state == "finished":
            steps = f"train.max_steps={point.config.train.max_steps}"
            return [*self.spec.launcher, "--resume", str(point.run_dir), "--set", steps]
        return [*self.spec.launcher, "--config", str(self.point_config(point, parent_run_id))]

    def run(
        self, only: list[int] | None = None, fail_fast: bool = False, dry_run: bool = False
    ) -> int:
        """Run the points (``only``: these indices) one after another; returns how many failed."""
        chosen = [p for p in self.points if only is None or p.index in only]
        for index in only or []:
            if not 0 <= index < len(self.points):
                raise ConfigError("--point", f"{index} is not a point; 0..{len(self.points) - 1}")
        parent = "DRY-RUN" if dry_run else self.parent_run()
        started, failed, ran = time.perf_counter(), 0, 0
        for n, point in enumerate(chosen, 1):
            state = self.status(point)
            head = f"[sweep {self.spec.name} {n}/{len(chosen)}] {point.name}"
            if state == "finished":
                self.say(f"{head}: finished, skipped")
                continue
            if state == "running":
                self.say(f"{head}: running in process {self.holder(point)}, skipped")
                continue
            if state == "new" and point.run_dir.exists() and not dry_run:
                shutil.rmtree(point.run_dir)  # a start that died before its first checkpoint
            cmd = self.command(point, parent)
            self.say(f"{head}: {'resuming' if state == 'interrupted' else 'starting'}")
            self.say("  " + shlex.join(cmd))
            if dry_run:
                continue
            lock = self.lock_path(point)
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.write_text(f"{os.getpid()}\n")
            try:
                code = subprocess.run(cmd, check=False).returncode
            finally:
                lock.unlink(missing_ok=True)
            ran += 1
            if code != 0:
                failed += 1
                self.say(f"{head}: FAILED (exit {code})")
                if fail_fast:
                    break
            elapsed = time.perf_counter() - started
            left = sum(1 for p in chosen[n:] if self.status(p) not in ("finished", "running"))
            eta = elapsed / ran * left
            self.say(
                f"[sweep {self.spec.name}] {n}/{len(chosen)} points, {failed} failed, "
                f"elapsed {duration(elapsed)}, ETA {duration(eta)}"
            )
        if not dry_run:
            self.close_parent()
        return failed

    def close_parent(self) -> None:
        """Mark the parent run FINISHED once every point is (else leave it RUNNING)."""
        from mlflow.tracking import MlflowClient

        state = self.read_state()
        finished = sum(1 for p in self.points if self.status(p) == "finished")
        client = MlflowClient(tracking_uri=self.uri)
        client.log_metric(state["parent_run_id"], "points_finished", finished)
        if finished == len(self.points):
            client.set_terminated(state["parent_run_id"], "FINISHED")

    def submit_slurm(self, sbatch_args: list[str], max_parallel: int | None = None) -> str:
        """Submit the points as a Slurm job array; returns the job id."""
        self.parent_run()
        array = f"0-{len(self.points) - 1}" + (f"%{max_parallel}" if max_parallel else "")
        cmd = [
            "sbatch", f"--array={array}", f"--job-name=sweep-{self.spec.name}",
            f"--output={self.dir / 'slurm-%A_%a.out'}", *sbatch_args,
            str(SWEEP_SBATCH), str(self.spec.path.resolve()),
        ]  # fmt: skip
        if self.spec.launcher != DEFAULT_LAUNCHER:  # the tasks read the spec's, not ours
            cmd += ["--launcher", shlex.join(self.spec.launcher)]
        self.say(shlex.join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
        match = re.search(r"(\d+)", result.stdout)
        job = match.group(1) if match else result.stdout.strip()
        state = self.read_state()
        state.setdefault("slurm_jobs", []).append(job)
        self.write_state(state)
        self.say(f"submitted job array {job} ({len(self.points)} points); state in {self.dir}")
        return job

    def table(self) -> str:
        """Markdown: each point, its status, and its final validation bits per base."""
        rows = ["| # | point | status | step | bits/base |", "|---|---|---|---|---|"]
        for p in self.points:
            step, bits = "", ""
            summary = p.run_dir / "summary.json"
            if summary.is_file():
                done = json.loads(summary.read_text())
                step = str(done.get("step", ""))
                value = done.get("final_validation", {}).get("val/bits_per_base")
                bits = f"{value:.4f}" if value is not None else ""
            rows.append(f"| {p.index} | {p.name} | {self.status(p)} | {step} | {bits} |")
        return "\n".join(rows)
