"""MLflow tracking on rank 0, through an explicit ``MlflowClient`` (no global active run).

Default store: ``sqlite:///<run.root>/mlflow.db`` with artifacts in ``<run.root>/mlartifacts``,
so every run under ``runs/`` is in one store that ``mlflow ui`` can compare;
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point elsewhere (a server, another database).
Metrics are buffered and sent with ``log_batch`` (one call per ~100 metrics instead of one each).
If the store fails, a warning is printed once and training goes on without tracking.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nucleo.schema import flatten

F = TypeVar("F", bound=Callable[..., Any])
_MAX_PARAM_CHARS = 6000


@dataclass
class TrackingConfig:
    """enabled: log to MLflow. uri: tracking URI (null: $MLFLOW_TRACKING_URI, else a SQLite
    store in run.root). experiment: MLflow experiment name. tags: extra run tags."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "nucleo"
    tags: dict[str, str] = field(default_factory=dict)


def default_uri(runs_root: str | Path) -> str:
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def resolve_uri(cfg: TrackingConfig, runs_root: str | Path, previous: str | None = None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the store a resumed run used before,
    else the SQLite store in the runs root."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or previous or default_uri(runs_root)


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the checkout holding nucleo ('+dirty' if modified), or 'unknown'."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def _safe(method: F) -> F:
    """Run a tracker method; on any error warn once and turn tracking off."""

    @functools.wraps(method)
    def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # the store may fail in any way; training must not
            self.active = False
            print(
                f"warning: MLflow tracking failed ({type(err).__name__}: {err}); "
                "training continues without tracking",
                file=sys.stderr,
                flush=True,
            )
            return None

    return wrapper  # type: ignore[return-value]


class Tracker:
    """Logs one training run; a no-op on ranks other than 0 or when disabled."""

    def __init__(
        self,
        cfg: TrackingConfig,
        runs_root: str | Path,
        enabled: bool,
        previous_uri: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.uri = resolve_uri(cfg, runs_root, previous_uri)
        self.runs_root = Path(runs_root)
        self.active = enabled and cfg.enabled
        self.run_id: str | None = None
        self._buffer: list[Any] = []
        self._client: Any = None

    @_safe
    def start(self, run_name: str, run_id: str | None, tags: dict[str, str]) -> str | None:
        """Create the run (or reopen ``run_id`` when resuming); returns its id.

        A resumed run whose MLflow run is not in this store gets a new run, tagged with the
        old id (``nucleo.resumed_from_run``).
        """
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        if run_id:
            try:
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            except MlflowException as err:
                if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
                    raise
                tags = {**tags, "nucleo.resumed_from_run": run_id}
        experiment = self._client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = (self.runs_root.resolve() / "mlartifacts").as_uri()
            experiment_id = self._client.create_experiment(self.cfg.experiment, location)
        else:
            experiment_id = experiment.experiment_id
        run = self._client.create_run(
            experiment_id, run_name=run_name, tags={**tags, **self.cfg.tags}
        )
        self.run_id = run.info.run_id
        return self.run_id

    @_safe
    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [
            Param(key, str(value)[:_MAX_PARAM_CHARS]) for key, value in flatten(config).items()
        ]
        for i in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[i : i + 100])

    @_safe
    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_safe
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics; they are sent by ``flush`` (or when the buffer holds 500)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._buffer) >= 500:
            self.flush()

    @_safe
    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._client.log_batch(self.run_id, metrics=chunk)

    @_safe
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    @_safe
    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self._client.set_terminated(self.run_id, status=status)


def run_tags(cfg: Any, world_size: int) -> dict[str, str]:
    """Tags that let runs be compared: architecture, losses, data, code version, machine."""
    from nucleo import __version__

    return {
        "nucleo.arch": cfg.arch,
        "nucleo.losses": ",".join(cfg.losses),
        "nucleo.kingdoms": ",".join(cfg.data.kingdoms or ["all"]),
        "nucleo.shards": str(cfg.data.shards),
        "nucleo.tokenizer": cfg.data.tokenizer,
        "nucleo.world_size": str(world_size),
        "nucleo.precision": cfg.engine.precision,
        "nucleo.zero_stage": str(cfg.engine.zero_stage),
        "nucleo.version": __version__,
        "git.commit": git_commit(),
        "host": socket.gethostname(),
    }
