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

import contextlib
import getpass
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
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


# ----------------------------------------------------------------------------- models, data


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a registered model's name (MLflow's rule), or None."""
    if not name.strip():
        return "must not be empty"
    if "/" in name or ":" in name or name.strip(".") == "":
        return f"{name!r} may not contain '/' or ':' (e.g. nucleo-transformer-small)"
    return None


class ModelWriteError(RuntimeError):
    """Writing the model folder failed on this machine (not the store): retrying cannot help."""


class ModelLog:
    """Log one MLflow model into a run, as MLflow 3's ``log_model`` does, through an explicit
    client: a logged model of the run's experiment (``runs:/<run>/<name>`` and
    ``models:/<model id>`` resolve to it), linked as the run's output, its folder written by
    ``write(folder, mlflow.models.Model)`` (the flavour: this layer knows none, see
    ``nucleo.downstream.pyfunc``) and uploaded, marked READY, and, with ``register_as``, a new
    version of that registered model (created if new).

    Calling it again after a failure resumes at the step that failed (the tracker retries
    while the store is down), so a retry adds no second model or version.
    """

    def __init__(
        self,
        write: Callable[[Path, Any], Any],
        name: str = "model",
        register_as: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.write, self.name, self.register_as, self.tags = write, name, register_as, tags
        self.model: Any = None  # the LoggedModel, once created
        self._done: set[str] = set()
        self.version: int | None = None

    @property
    def uri(self) -> str | None:
        return f"models:/{self.model.model_id}" if self.model is not None else None

    def __call__(self, mlflow_client: Any, run_id: str) -> None:
        import tempfile

        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model

        if self.model is None:
            experiment = mlflow_client.get_run(run_id).info.experiment_id
            self.model = mlflow_client.create_logged_model(
                experiment, name=self.name, source_run_id=run_id, tags=self.tags
            )
        model_id = self.model.model_id
        if "linked" not in self._done:
            mlflow_client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
            self._done.add("linked")
        if "uploaded" not in self._done:
            with tempfile.TemporaryDirectory(prefix="nucleo-model-") as tmp:
                local = Path(tmp) / "model"
                spec = Model(artifact_path=self.model.artifact_location, model_uuid=model_id,
                             run_id=run_id, model_id=model_id)  # fmt: skip
                try:
                    self.write(local, spec)
                except Exception as err:
                    self._failed(mlflow_client)
                    raise ModelWriteError(f"writing the MLflow model failed: {err}") from err
                mlflow_client.log_model_artifacts(model_id, str(local))
            self._done.add("uploaded")
        if "ready" not in self._done:
            mlflow_client.finalize_logged_model(model_id, "READY")
            self._done.add("ready")
        if self.register_as and self.version is None:
            location = self.model.artifact_location
            self.version = register(mlflow_client, self.register_as, model_id, location, run_id)

    def _failed(self, mlflow_client: Any) -> None:
        # the store may be down too; the write error is what matters
        with contextlib.suppress(Exception):
            mlflow_client.finalize_logged_model(self.model.model_id, "FAILED")


def register(
    mlflow_client: Any, name: str, model_id: str, location: str, run_id: str | None
) -> int:
    """A new version of registered model ``name`` (created if new) from logged model
    ``model_id`` whose artifacts are at ``location``; returns the version number. The source
    is the location, not ``models:/<model id>``: MLflow 3.17's SQL registry resolves that URI
    through the process-global tracking URI, not this client's store."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if "ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = mlflow_client.create_model_version(
        name, source=location, run_id=run_id, model_id=model_id,
        await_creation_for=0,
    )  # fmt: skip
    return int(version.version)


def log_model(
    mlflow_client: Any,
    run_id: str,
    write: Callable[[Path, Any], Any],
    name: str = "model",
    register_as: str | None = None,
) -> tuple[str, int | None]:
    """``ModelLog`` at once: (``models:/<model id>``, registered version or None)."""
    job = ModelLog(write, name, register_as)
    job(mlflow_client, run_id)
    return str(job.uri), job.version


def dataset_input(shard_dir: str | Path, context: str = "training") -> Any:
    """An MLflow dataset input for a shard set: named after its folder, sourced at its absolute
    path, its digest the first 16 hex digits of a SHA-256 over every shard's path and SHA-256
    in its manifest (the same shards give the same digest, on any machine), its profile the
    records, bases and shards per split; tagged ``mlflow.data.context=<context>``."""
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from data_pipeline import storage
    from data_pipeline.shards import load_manifest

    if storage.is_url(shard_dir):  # a shard set in an object store: its URL, no credentials
        name, kind, uri = storage.name(shard_dir), "uri", storage.redact(shard_dir)
        manifest = load_manifest(shard_dir)
    else:
        root = Path(shard_dir).resolve()
        name, kind, uri = root.name, "local", root.as_uri()
        manifest = load_manifest(root)
    shards = sorted(
        (shard["path"], shard["sha256"])
        for splits in manifest["kingdoms"].values()
        for entry in splits.values()
        for shard in entry["shards"]
    )
    digest = hashlib.sha256("".join(f"{p}\t{h}\n" for p, h in shards).encode()).hexdigest()
    profile: dict[str, Any] = {"kingdoms": sorted(manifest["kingdoms"]), "shards": len(shards)}
    for split in ("train", "val"):
        parts = [k[split] for k in manifest["kingdoms"].values() if split in k]
        profile[split] = {key: sum(p[key] for p in parts) for key in ("records", "bases")}
    dataset = Dataset(
        name=name, digest=digest[:16], source_type=kind, source=json.dumps({"uri": uri}),
        profile=json.dumps(profile),
    )  # fmt: skip
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])
