"""MLflow tracking on rank 0, through an explicit ``MlflowClient`` (no global active run).

Default store: ``sqlite:///<run.root>/mlflow.db`` with artifacts in ``<run.root>/mlartifacts``,
so every run under ``runs/`` is in one store that ``mlflow ui`` can compare;
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point elsewhere (a server, another database).
Metrics are buffered and sent with ``log_batch`` (one call per ~1000 metrics instead of one
each) by a background thread; if the store is unreachable, a warning is printed once, records
are kept and sent when it answers again, and training never waits on it.

Besides metrics, params and artifacts, a run gets: its shard set as the dataset input
(``log_dataset``, context ``training``, digest from the manifest's checksums); ``system/*``
metrics (CPU, memory, disk, network, GPU) sampled every ``tracking.system_metrics`` seconds by
MLflow's own monitors but sent through this tracker's buffer (MLflow's monitor thread talks to
the store itself and stops for good at its first failure); and, at the end, its export as the
run's MLflow model (``log_model``), registered as ``tracking.register_as``. The model's flavour
comes from the caller: ``log_model`` takes a writer (``nucleo.downstream.pyfunc.save_pyfunc``,
handed down by the command line), because this layer may not import the downstream one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.storage import redact
from nucleo.core.schema import check, flatten
from nucleo.train import store
from nucleo.train.sysmetrics import SystemMetrics

_MAX_PARAM_CHARS = 6000


#: ``write(export folder, new model folder, mlflow.models.Model)``: writes an MLflow model
ModelWriter = Callable[[Path, Path, Any], Any]


@dataclass
class TrackingConfig:
    """enabled: log to MLflow. uri: tracking URI (null: $MLFLOW_TRACKING_URI, else a SQLite
    store in run.root). experiment: MLflow experiment name. tags: extra run tags.
    timeout: seconds the run's start and end may wait for the store (then it goes on).
    log_model: log the final export as the run's MLflow model (``runs:/<run id>/model``, a
    pyfunc: nucleo.downstream.pyfunc); needs checkpoint.export. register_as: also register
    it as a new version of this registered model (e.g. ``dna-transformer``; needs a store with
    a model registry: SQLite or a server). model_timeout: seconds the end of the run may wait,
    beyond ``timeout``, for its model to be written, uploaded and registered while the store
    answers. system_metrics: seconds between samples of CPU, memory, disk, network and GPU use
    (``system/*`` metrics, at the training step of the sample); 0 turns them off."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "nucleo"
    tags: dict[str, str] = field(default_factory=dict)
    timeout: float = 20.0
    log_model: bool = True
    register_as: str | None = None
    model_timeout: float = 600.0
    system_metrics: float = 10.0

    def __post_init__(self) -> None:
        check(self.timeout > 0, "timeout", f"must be > 0 seconds, got {self.timeout}")
        check(self.model_timeout >= 0, "model_timeout", f"must be >= 0, got {self.model_timeout}")
        check(self.system_metrics >= 0, "system_metrics", f"must be >= 0 s (0: off), got "
              f"{self.system_metrics}")  # fmt: skip
        if self.register_as is not None:
            problem = store.model_name_problem(self.register_as)
            check(problem is None, "register_as", f"{problem}")
            check(self.log_model, "register_as", "needs tracking.log_model=true")


class Tracker:
    """Logs one training run; a no-op on ranks other than 0 or when disabled.

    Every call only queues its work; one background thread talks to the store, in order.
    When the store is unreachable the thread keeps the queue (metrics up to
    ``MAX_BUFFERED``), says so once, and retries with a growing pause (5 s to 2 min) until it
    answers again. Training waits on it only at ``start`` and ``end`` (at most
    ``tracking.timeout`` seconds each) and at a checkpoint's ``flush`` (at most 3 s, and not
    at all once the store is known to be down).
    """

    MAX_BUFFERED = 200_000  # metrics held while the store is down (then the oldest go)

    def __init__(
        self,
        cfg: TrackingConfig,
        runs_root: str | Path,
        enabled: bool,
        previous_uri: str | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.uri = store.resolve_uri(cfg.uri, runs_root, previous_uri)
        self.runs_root = Path(runs_root)
        self.active = enabled and cfg.enabled
        self.run_id: str | None = None
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._client: Any = None
        self._ops: deque[tuple[str, Callable[[], Any]]] = deque()
        self._metrics: list[Any] = []  # buffered, sent in batches of 1000
        self._dropped = 0
        self._cond = threading.Condition()
        self._busy = False
        self._sending = 0  # metrics in the batch being sent (more may arrive meanwhile)
        self._down: str | None = None  # why the store is unreachable, while it is
        self._closing = False
        self._ending = False  # end() is waiting for the queue
        self._thread: threading.Thread | None = None
        self._step = 0  # the latest training step logged (system metrics are logged at it)
        self._system: SystemMetrics | None = None

    # ------------------------------------------------------------------ public, all non-blocking

    def start(self, run_name: str, run_id: str | None, tags: dict[str, str]) -> str | None:
        """Create the run (or reopen ``run_id`` when resuming); returns its id, or None if the
        store did not answer within ``tracking.timeout`` (the run is created when it does:
        read ``run_id`` later). A resumed run whose MLflow run is not in this store gets a new
        run, tagged with the old id (``nucleo.resumed_from_run``)."""
        if not self.active:
            return None
        if self.uri.startswith(("http://", "https://")):
            bound_http_waits()
        self._thread = threading.Thread(target=self._work, name="nucleo-mlflow", daemon=True)
        self._thread.start()
        self._queue("start", lambda: self._start(run_name, run_id, tags))
        if self.cfg.system_metrics > 0:
            self._system = SystemMetrics(self._record, self.cfg.system_metrics)
            self._system.start()
        self.wait(self.cfg.timeout)
        return self.run_id

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [
            Param(key, str(value)[:_MAX_PARAM_CHARS]) for key, value in flatten(config).items()
        ]
        for i in range(0, len(params), 100):
            chunk = params[i : i + 100]
            self._queue(
                "params",
                lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk),  # type: ignore[misc]
            )

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._queue("tags", lambda: self._client.log_batch(self.run_id, tags=batch))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics; the thread sends them in batches (``flush`` asks it to now)."""
        self._step = max(self._step, step)
        self._record(metrics, step)

    def _record(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Buffer ``metrics`` at ``step`` (None: the latest training step logged)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        step = self._step if step is None else step

        now = int(time.time() * 1000)
        with self._cond:
            self._metrics.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            excess = len(self._metrics) - self.MAX_BUFFERED
            if excess > 0:
                del self._metrics[:excess]
                self._dropped += excess
                self._sending = max(0, self._sending - excess)  # some of the batch in flight
            self._cond.notify_all()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = str(path)
        self._queue("artifact", lambda: self._client.log_artifact(self.run_id, path, artifact_path))

    def log_dataset(self, shard_dir: str | Path) -> None:
        """The shard set as the run's dataset input (``store.dataset_input``: context
        ``training``, digest from the manifest's checksums); a manifest that cannot be read
        is a warning, not an error (the loader has read it already)."""
        if not self.active:
            return
        try:
            entry = store.dataset_input(shard_dir, "training")
        except (OSError, ValueError, KeyError) as err:
            self._say(f"warning: {shard_dir}: not logged as the run's dataset ({_brief(err)})")
            return
        self._queue("dataset", lambda: self._client.log_inputs(self.run_id, datasets=[entry]))

    def log_model(self, folder: str | Path, write: ModelWriter | None) -> None:
        """Log export ``folder`` as the run's MLflow model ``model``, written by ``write`` (a
        flavour from a higher layer: ``nucleo.downstream.pyfunc.save_pyfunc``), and register
        it as ``tracking.register_as`` when set; queued like everything else (``end`` waits
        for it up to ``tracking.model_timeout`` more while the store answers). A model that
        cannot be written is reported and skipped; the export in the run folder stays."""
        if not (self.active and self.cfg.log_model):
            return
        if write is None:
            if self.cfg.register_as:
                self._say(
                    f"note: tracking.register_as={self.cfg.register_as}: nothing registered: "
                    "this fit() was given no model writer (the nucleo command line gives one)"
                )
            return
        source = Path(folder)
        job = store.ModelLog(
            lambda path, spec: write(source, path, spec),
            register_as=self.cfg.register_as,
            tags={"nucleo.source": str(source)},
        )

        def action() -> None:
            run_id = self.run_id
            assert run_id is not None  # queued operations run after the run's start
            job(self._client, run_id)
            where = f"{job.uri} (runs:/{run_id}/model)"
            if job.version is not None:
                where += f", registered as models:/{job.register_as}/{job.version}"
            self._say(f"MLflow model {where}")

        self._queue("model", action)

    def flush(self, timeout: float = 3.0) -> None:
        """Wait up to ``timeout`` s for the thread to send what is queued; not at all while the
        store is known to be down (it stays queued and is sent when the store answers)."""
        if self.active and self._down is None:
            self.wait(timeout)

    def end(self, status: str = "FINISHED") -> None:
        """Send what is queued and mark the run ended, waiting up to ``tracking.timeout`` s
        (2 s for a run that failed while the store is down); what the store did not take by
        then is reported, not waited for."""
        if not self.active or self._thread is None:
            return
        if self._system is not None:
            self._system.stop()  # its last sample is queued before the run ends
        self._ending = True
        self._queue("end", lambda: self._client.set_terminated(self.run_id, status=status))
        # a run that failed while the store is down does not wait long for it
        patience = self.cfg.timeout
        if status != "FINISHED" and self._down:
            patience = min(patience, 2.0)
        done = self.wait(patience)
        with self._cond:
            model_pending = any(kind == "model" for kind, _ in self._ops)
        if not done and model_pending and self._down is None and self.cfg.model_timeout > 0:
            self._say(
                f"waiting up to {self.cfg.model_timeout:.0f} s more for the MLflow model "
                "(tracking.model_timeout)"
            )
            done = self.wait(self.cfg.model_timeout)
            patience += self.cfg.model_timeout
        with self._cond:
            self._closing = True
            left = len(self._ops) + len(self._metrics)
            self._cond.notify_all()
        if not done:
            self._say(
                f"warning: MLflow store {self.uri} did not take the run's last "
                f"{left} record(s) (metrics, tags, its end) in {patience:.0f} s: they "
                "are lost; the checkpoints and summary.json hold the run"
            )

    def wait(self, timeout: float) -> bool:
        """Wait until everything queued is sent (True) or ``timeout`` s passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._ops or self._metrics or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    # ----------------------------------------------------------------------- the thread

    def _queue(self, kind: str, action: Callable[[], Any]) -> None:
        if not self.active:
            return
        with self._cond:
            self._ops.append((kind, action))
            self._cond.notify_all()

    def _next(self) -> tuple[str, Callable[[], Any]] | None:
        """The next piece of work: queued operations first (they include the run's start),
        then a batch of metrics; None once closing and idle."""
        with self._cond:
            while not (self._ops or (self._metrics and self.run_id)):
                if self._closing:
                    return None
                self._cond.wait(1.0)
            self._busy = True
            if self._ops:
                return self._ops[0]
            batch = self._metrics[:1000]
            self._sending = len(batch)
            return "metrics", lambda: self._client.log_batch(self.run_id, metrics=batch)

    def _done(self, kind: str) -> None:
        with self._cond:
            if kind == "metrics":  # only what was sent: more may have arrived meanwhile
                del self._metrics[: self._sending]
            else:
                self._ops.popleft()
            self._busy = False
            self._cond.notify_all()

    def _work(self) -> None:
        pause = 5.0
        while (item := self._next()) is not None:
            kind, action = item
            try:
                action()
            except Exception as err:  # the store may fail in any way; training must not
                if _permanent(err):  # a bad value: retrying would never help
                    what = "MLflow refused" if kind != "model" else "could not log the"
                    self._say(f"warning: {what} {kind} ({_brief(err)}); skipped")
                    self._done(kind)
                    if kind == "start":  # no run to log into: tracking is off
                        with self._cond:
                            self.active = False
                            self._ops.clear()
                            self._metrics.clear()
                            self._cond.notify_all()
                        return
                    continue
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                if self._down is None:
                    self._down = _brief(err)
                    what = "cannot write: its disk is full" if _disk_full(err) else "unreachable"
                    self._say(
                        f"warning: MLflow store {self.uri} {what} ({self._down}); "
                        "training goes on, metrics are kept and sent when it answers "
                        "(retrying with a growing pause)"
                    )
                with self._cond:
                    if self._closing:
                        return
                    # while end() waits for the store, try it every 2 s
                    self._cond.wait(min(pause, 2.0) if self._ending else pause)
                pause = min(120.0, pause * 2)
                continue
            self._done(kind)
            if self._down is not None:
                dropped = f"; {self._dropped} older metrics were dropped" if self._dropped else ""
                self._say(f"MLflow store {self.uri} answers again: sending what was kept{dropped}")
                self._down, pause = None, 5.0

    def _start(self, run_name: str, run_id: str | None, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException

        self._client = store.client(self.uri)
        if run_id:
            try:
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return
            except MlflowException as err:
                if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
                    raise
                tags = {**tags, "nucleo.resumed_from_run": run_id}
        experiment_id = store.experiment_id(self._client, self.cfg.experiment, self.runs_root)
        run = self._client.create_run(
            experiment_id, run_name=run_name, tags={**tags, **self.cfg.tags}
        )
        self.run_id = run.info.run_id


def bound_http_waits() -> None:
    """Make each MLflow HTTP request give up within ~10 s instead of retrying for minutes (7
    retries with exponential backoff were measured at ~255 s): the Tracker retries itself,
    in the background. A user's own settings of these variables win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _permanent(err: Exception) -> bool:
    """An error that retrying cannot fix (a value the store rejects, a model that cannot be
    written here), not an outage."""
    if isinstance(err, store.ModelWriteError):
        return True
    code = str(getattr(err, "error_code", ""))
    return any(c in code for c in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"))


def _disk_full(err: Exception) -> bool:
    """Whether ``err`` (from SQLite, the file system or a server) says no space is left."""
    text = str(err).lower()
    return any(k in text for k in ("disk is full", "no space left", "disk full", "enospc"))


def _brief(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def run_tags(cfg: Any, world_size: int) -> dict[str, str]:
    """Tags that let runs be compared: architecture, losses, data, code version, machine."""
    return {
        **store.source_tags(),
        "nucleo.arch": cfg.arch,
        "nucleo.losses": ",".join(cfg.losses),
        "nucleo.kingdoms": ",".join(cfg.data.kingdoms or ["all"]),
        "nucleo.shards": redact(str(cfg.data.shards)),  # a URL's credentials stay out
        "nucleo.tokenizer": cfg.data.tokenizer,
        "nucleo.world_size": str(world_size),
        "nucleo.precision": cfg.engine.precision,
        "nucleo.zero_stage": str(cfg.engine.zero_stage),
    }
