"""The model behind ``nucleo serve``: loading it, and the one thread that runs it, micro-batched.

MODEL is an export folder, a classifier folder (``nucleo finetune`` output, with
classifier.json), or an MLflow model (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
``models:/m-<id>``, ``runs:/RUN_ID/model``), downloaded, then loaded from the folder its MLmodel
names as the ``export`` artifact (``nucleo.downstream.pyfunc``; else ``artifacts/export``).

Request handlers (on the server's event loop) encode and check their sequences, then hand a
``Job`` to the ``Batcher`` and await its asyncio future. The worker thread takes the first
waiting job and gathers more, up to ``max_batch`` sequences: those already queued, and those
that arrive within ``wait_s`` of the first (default 0: a lone request is never delayed, and
requests that queue while the model is busy share the next pass). It runs the rows of each
kind in right-padded batches with an attention mask: a sequence's numbers do not depend on what
shares its batch (the families' padding contract, tests/architectures/test_padding.py), so
batched answers equal unbatched ones.
``batching=False`` runs each job alone (one request, one forward pass): the benchmark's
baseline. Only this thread touches the model, so forward passes never run concurrently.

The batch-level computations (``score_rows``, ``embed_rows``) are the one-window cases of
``nucleo.downstream.inference.log_likelihood`` and ``embed_sequence`` (mean pooling), for
many sequences in one padded batch; ``classify_rows`` is ``classifier.predict_proba``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nucleo.core.device import resolve as resolve_device
from nucleo.downstream.classifier import masked_mean, pad, predict_proba
from nucleo.downstream.inference import window_scores

MLFLOW_SCHEMES = ("models:/", "runs:/")
DEFAULT_MAX_LENGTH = 1024  # tokens: nucleo score's and embed's default window

# ----------------------------------------------------------------------------- loading


@dataclass
class Served:
    """A loaded model and what it can do. kind: ``language model`` or ``classifier``."""

    source: str  # what the user named (a folder or an MLflow URI)
    kind: str
    model: nn.Module  # the export's model, or the SequenceClassifier
    tokenizer: Any
    meta: dict[str, Any]  # the export's config.json
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)  # classifier.json

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone if self.kind == "classifier" else self.model  # type: ignore[return-value]

    @property
    def causal(self) -> bool:
        return bool(self.meta.get("causal", True))

    @property
    def routes(self) -> list[str]:
        if self.kind == "classifier":
            return ["classify", "embed"]
        return ["score", "embed", "generate"] if self.causal else ["embed"]

    def describe(self) -> str:
        """``a causal transformer language model (0.8M parameters, char tokenizer)``."""
        params = sum(p.numel() for p in self.model.parameters())
        what = "causal" if self.causal else "bidirectional"
        extra = f", classes {', '.join(self.info['classes'])}" if self.kind == "classifier" else ""
        return (
            f"a {what} {self.meta['arch']} {self.kind} ({params / 1e6:.2f}M parameters, "
            f"{self.meta.get('tokenizer', '?')} tokenizer{extra})"
        )


def resolve_model(source: str, tracking_uri: str | None = None, runs_root: str = "runs") -> Path:
    """The local folder of ``source``: itself, or the export folder of an MLflow model
    downloaded from the store ``nucleo.train.store.resolve_uri`` names."""
    if not source.startswith(MLFLOW_SCHEMES):
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{source}: no such folder; give an export folder, a classifier folder "
                "(nucleo finetune output), or an MLflow model URI (models:/NAME/VERSION, "
                "models:/NAME@ALIAS, runs:/RUN_ID/model)"
            )
        return path
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from nucleo.train.store import client, resolve_uri

    uri = resolve_uri(tracking_uri, runs_root)
    try:
        location = _location(source, client(uri))
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=tempfile.mkdtemp(prefix="nucleo-serve-"),
                tracking_uri=uri,
            )
        )  # fmt: skip
    except (MlflowException, OSError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"{source}: cannot be fetched from the MLflow store {uri} ({detail}); check the name "
            "and version (or --tracking-uri)"
        ) from None
    export = _export_folder(local)
    if export is None:
        raise FileNotFoundError(
            f"{source}: downloaded to {local}, but it holds no export (an MLmodel whose "
            "'export' artifact has a config.json, or artifacts/export/); serve models logged "
            "by nucleo"
        )
    return export


def _location(source: str, mlflow_client: Any, depth: int = 0) -> str:
    """The artifact location (file://, s3://, ...) of a models:/ or runs:/ URI, found with
    ``mlflow_client``: MLflow's own resolution of these URIs reads the process-wide registry
    URI, not the store given to it."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if source.startswith("models:/"):
        base, inner = ModelsArtifactRepository.split_models_uri(source)
        found = get_model_name_and_version(mlflow_client, base)
        if len(found) == 1:  # models:/m-<id>: an MLflow 3 logged model
            root = mlflow_client.get_logged_model(found[0]).artifact_location
        else:
            root = mlflow_client.get_model_version_download_uri(*found)
    else:  # runs:/RUN_ID/PATH: a model the run logged under that name, else the run's artifacts
        run_id, inner = RunsArtifactRepository.parse_runs_uri(source)
        name, _, rest = inner.partition("/")
        run = mlflow_client.get_run(run_id)
        logged = mlflow_client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'"
        )
        model = next((m for m in logged if m.source_run_id == run_id), None)
        root, inner = (model.artifact_location, rest) if model else (run.info.artifact_uri, inner)
    location = root.rstrip("/") + (f"/{inner}" if inner else "")
    if location.startswith(MLFLOW_SCHEMES) and depth < 3:  # a version registered from a URI
        return _location(location, mlflow_client, depth + 1)
    return location


def _export_folder(local: Path) -> Path | None:
    """The export inside a downloaded MLflow model: the path its MLmodel gives the pyfunc's
    ``export`` artifact (``nucleo.downstream.pyfunc``), else ``artifacts/export``."""
    import yaml

    candidates = [local / "artifacts" / "export"]
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        spec = yaml.safe_load(mlmodel.read_text()) or {}
        flavor = spec.get("flavors", {}).get("python_function", {})
        entry = (flavor.get("artifacts") or {}).get("export") or {}
        if isinstance(entry, dict) and entry.get("path"):
            candidates.insert(0, local / entry["path"])
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def load_served(
    source: str, device: str = "auto", tracking_uri: str | None = None, runs_root: str = "runs"
) -> Served:
    """Load ``source`` (see ``resolve_model``) on ``device``: a classifier when its folder has
    classifier.json, else an export."""
    from nucleo.downstream.classifier import load_classifier
    from nucleo.train.export import load_exported

    root = resolve_model(source, tracking_uri, runs_root)
    dev = resolve_device(device)
    if (root / "classifier.json").is_file():
        model, tokenizer, info = load_classifier(root, dev)
        meta = json.loads((root / "config.json").read_text())
        return Served(source, "classifier", model, tokenizer, meta, dev, info)
    model, tokenizer, meta = load_exported(root, dev)
    return Served(source, "language model", model, tokenizer, meta, dev)


def default_max_length(served: Served) -> int:
    """Tokens per sequence when --max-length is not given: a classifier's fine-tuning length,
    else ``DEFAULT_MAX_LENGTH``."""
    return int(served.info.get("max_tokens") or DEFAULT_MAX_LENGTH)


# ----------------------------------------------------------------------------- the worker


@dataclass
class Row:
    """One sequence of a request: its token ids [T] int64 and, for a classifier that averages
    both strands, the ids of its reverse complement."""

    ids: np.ndarray
    rc: np.ndarray | None = None


@dataclass
class Job:
    """A request's work: ``kind`` names the handler; ``rows`` its sequences (empty for
    ``generate``, whose settings are in ``params``). The result is set on ``future``."""

    kind: str
    rows: list[Row]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    params: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- batch arithmetic


@torch.no_grad()
def score_rows(
    model: nn.Module, tokenizer: Any, rows: Sequence[np.ndarray], device: torch.device
) -> list[dict[str, Any]]:
    """Per sequence (one window each): the sum of log p(token | earlier tokens) in nats, tokens
    and bases scored, bits per base (None when nothing was scored: a one-token sequence)."""
    tokens, mask = pad(list(rows), np.arange(len(rows)), tokenizer.pad_id)
    scores = window_scores(model, tokenizer, tokens.to(device), mask.to(device))
    out = []
    for row, (nats, scored, bases) in zip(rows, scores, strict=True):
        bits = -nats / math.log(2) / bases if bases else None
        out.append(
            {
                "tokens": len(row),
                "tokens_scored": scored,
                "bases_scored": bases,
                "log_likelihood_nats": nats,
                "bits_per_base": bits,
            }
        )
    return out


@torch.no_grad()
def embed_rows(
    model: nn.Module, tokenizer: Any, rows: Sequence[np.ndarray], device: torch.device
) -> list[list[float]]:
    """[D] per sequence: the mean of its tokens' final hidden states (padding excluded)."""
    tokens, mask = pad(list(rows), np.arange(len(rows)), tokenizer.pad_id)
    tokens, mask = tokens.to(device), mask.to(device)
    hidden = model(tokens, attention_mask=mask).hidden.float()
    return masked_mean(hidden, mask).cpu().numpy().astype(np.float32).tolist()


def classify_rows(
    model: nn.Module, tokenizer: Any, rows: Sequence[Row], device: torch.device
) -> list[list[float]]:
    """[C] class probabilities per sequence (both strands averaged when the rows carry rc)."""
    ids = [r.ids for r in rows]
    rc = [r.rc for r in rows] if rows and rows[0].rc is not None else None
    probs = predict_proba(model, ids, len(ids), tokenizer.pad_id, device, rc)  # type: ignore[arg-type]
    return probs.tolist()


#: handler(rows) -> one result per row; generate's handler takes the job's params instead
RowHandler = Callable[[list[Row]], list[Any]]


class Batcher:
    """The single model-worker thread and its queue (see the module docstring).

    handlers: ``kind -> handler(rows) -> one result per row``, batched across jobs;
    solo: ``kind -> handler(params) -> result``, one job at a time (generation).
    """

    def __init__(
        self,
        handlers: dict[str, RowHandler],
        solo: dict[str, Callable[[dict[str, Any]], Any]],
        max_batch: int = 32,
        wait_s: float = 0.0,
        batching: bool = True,
    ) -> None:
        self.handlers, self.solo = handlers, solo
        self.max_batch, self.wait_s, self.batching = max_batch, wait_s, batching
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="nucleo-model", daemon=True)
        self.forward_passes = 0  # batched forward passes run (tests and the benchmark read it)
        self._thread.start()

    async def run(self, kind: str, rows: list[Row], params: dict[str, Any] | None = None) -> Any:
        """Queue a job and wait for its result (a list, one item per row; or generate's)."""
        loop = asyncio.get_running_loop()
        job = Job(kind, rows, loop, loop.create_future(), params or {})
        self._queue.put(job)
        return await job.future

    def close(self) -> None:
        """Stop the worker once the jobs already queued are done."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- on the worker thread

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` and the jobs that arrive within the wait, up to max_batch rows; and
        whether the stop signal came meanwhile."""
        jobs, rows = [first], len(first.rows)
        if not self.batching or first.kind in self.solo:
            return jobs, False
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.rows)
        return jobs, False

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            for job in [j for j in jobs if j.kind in self.solo]:
                self._settle(job, lambda job=job: self.solo[job.kind](job.params))
            for kind in dict.fromkeys(j.kind for j in jobs if j.kind not in self.solo):
                self._run_rows([j for j in jobs if j.kind == kind], self.handlers[kind])
            if stop:
                return

    def _run_rows(self, jobs: list[Job], handler: RowHandler) -> None:
        """Every row of ``jobs`` through ``handler``, sorted by length (less padding), in
        batches of at most max_batch rows; each job gets its own rows' results back."""
        items = [(j, i, row) for j, job in enumerate(jobs) for i, row in enumerate(job.rows)]
        items.sort(key=lambda item: len(item[2].ids))
        results: list[list[Any]] = [[None] * len(job.rows) for job in jobs]
        try:
            for start in range(0, len(items), self.max_batch):
                chunk = items[start : start + self.max_batch]
                self.forward_passes += 1
                for (j, i, _row), value in zip(
                    chunk, handler([row for _, _, row in chunk]), strict=True
                ):
                    results[j][i] = value
        except Exception as err:  # a failed forward pass fails its requests, not the worker
            for job in jobs:
                self._resolve(job, error=err)
            return
        for job, values in zip(jobs, results, strict=True):
            self._resolve(job, values)

    def _settle(self, job: Job, compute: Callable[[], Any]) -> None:
        try:
            value = compute()
        except Exception as err:
            self._resolve(job, error=err)
            return
        self._resolve(job, value)

    @staticmethod
    def _resolve(job: Job, value: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():  # the client went away and the request was cancelled
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            job.loop.call_soon_threadsafe(settle)
