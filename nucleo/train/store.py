"""The one seam to MLflow: which store, which experiment, which tags, one run.

Everything that writes to or reads from MLflow (the trainer's ``Tracker``, fine-tuning, sweeps,
scaling fits, ``nucleo compare``) resolves the store with ``resolve_uri``, finds or creates its
experiment with ``experiment_id`` and tags its runs with ``source_tags``, so that runs from all
of them sit side by side in ``mlflow ui``.

An explicit ``MlflowClient`` throughout, never MLflow's fluent API: ``set_tracking_uri`` is
process-global and exported to child processes, and a library must not redirect the runs its
caller starts next.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def default_uri(runs_root: str | Path = "runs") -> str:
    """The SQLite store beside the runs: ``sqlite:///<runs_root>/mlflow.db`` (absolute)."""
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def resolve_uri(
    uri: str | None = None, runs_root: str | Path = "runs", previous: str | None = None
) -> str:
    """The store to use: ``uri`` (a flag or ``tracking.uri``), else $MLFLOW_TRACKING_URI, else
    the store a resumed run used before, else the SQLite store in ``runs_root``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or previous or default_uri(runs_root)


def client(uri: str) -> Any:
    """An ``MlflowClient`` for the store at ``uri`` (mlflow is imported here, not before)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client: Any, name: str, runs_root: str | Path = "runs") -> str:
    """The id of experiment ``name``, created if new. In a SQLite store its artifacts go to
    ``<runs_root>/mlartifacts`` (beside the database, not the current directory)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if str(mlflow_client.tracking_uri).startswith("sqlite:///"):
        location = (Path(runs_root).resolve() / "mlartifacts").as_uri()
    return str(mlflow_client.create_experiment(name, location))


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


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (the UI shows them: commit, entry point, user) plus the host
    and nucleo's version."""
    from nucleo import __version__

    commit = git_commit()
    return {
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
        "git.commit": commit,
        "host": socket.gethostname(),
        "nucleo.version": __version__,
    }


@contextmanager
def tracked_run(
    uri: str,
    experiment: str,
    name: str,
    tags: dict[str, str],
    runs_root: str | Path = "runs",
) -> Iterator[tuple[Any, str]]:
    """(MlflowClient, run id) of a new run of ``experiment`` in the store at ``uri``, tagged
    with ``source_tags()`` and ``tags``; ended FINISHED, or FAILED on an exception."""
    mlflow_client = client(uri)
    exp = experiment_id(mlflow_client, experiment, runs_root)
    run_id = mlflow_client.create_run(
        exp, run_name=name, tags={**source_tags(), **tags}
    ).info.run_id
    try:
        yield mlflow_client, run_id
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")
