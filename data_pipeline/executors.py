"""Where a shard build's tasks run, and the progress line of each stage.

``Executor`` runs tasks in this process; ``DaskExecutor`` on a Dask cluster: local worker
processes (``local_executor``, the command's default), a running scheduler
(``scheduler_executor``: ``--scheduler tcp://HOST:8786``), or Slurm jobs started by
dask-jobqueue (``slurm_executor``: ``--slurm-nodes N``). Dask was chosen over Ray and datatrove
(README, "Building at scale"): it is a pure-Python install, starts local workers in about a
second, schedules plain functions over files, and dask-jobqueue submits the same workers as
Slurm jobs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from nucleo.core.progress import duration, rate

#: the environment of every worker process: one thread each (the workers are the parallelism)
WORKER_ENV = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


#: Dask settings of the workers. Their statistical profiler (a stack sample every 10 ms,
#: holding the GIL) and frequent monitors cost the tasks ~20% on two cores; builds need neither.
WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ": WORKER_ENV,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


class Executor:
    """Runs a stage's tasks in this process, one after another."""

    workers = 1
    name = "in-process"

    def map(
        self, fn: Callable[[Any], Any], tasks: list[Any], sizes: list[int] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """(task index, result), as tasks finish; the largest ``sizes`` first, so that the
        stage does not end waiting on one big task started last."""
        for i in sorted(range(len(tasks)), key=lambda i: -(sizes or [0] * len(tasks))[i]):
            yield i, fn(tasks[i])

    def close(self) -> None:
        pass


class DaskExecutor(Executor):
    """Runs tasks on a Dask cluster; ``owned`` clusters are shut down by ``close``."""

    def __init__(self, client: Any, owned: Any = None, close_client: bool = False) -> None:
        self.client = client
        self.owned = owned
        self.close_client = close_client or owned is not None
        self.workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
        self.name = f"dask ({self.workers} workers, {client.scheduler.address})"

    def map(
        self, fn: Callable[[Any], Any], tasks: list[Any], sizes: list[int] | None = None
    ) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        sizes = sizes or [0] * len(tasks)
        futures = [
            self.client.submit(fn, t, pure=False, priority=s)
            for t, s in zip(tasks, sizes, strict=True)
        ]
        position = {f.key: i for i, f in enumerate(futures)}
        try:
            for future in as_completed(futures):
                yield position[future.key], future.result()
        finally:
            self.client.cancel(futures)

    def close(self) -> None:
        if self.close_client:
            self.client.close()
        if self.owned is not None:
            self.owned.close()


def local_executor(workers: int | None) -> Executor:
    """In-process (None), else ``workers`` local Dask worker processes of one thread each."""
    if workers is None:
        return Executor()
    import dask.config
    from distributed import Client

    # Dask's nannies give workers MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    # adaptive mmap threshold: every large array is mapped and unmapped afresh, and the scan ran
    # 1.6x slower than in a plain process (DESIGN.md, glibc malloc). Workers keep the default.
    with dask.config.set(WORKER_CONFIG):
        cluster = _local_cluster(workers)
    return DaskExecutor(Client(cluster), owned=cluster)


def _local_cluster(workers: int) -> Any:
    import logging

    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # any free port: several builds may run at once
        silence_logs=logging.ERROR,
    )


class StageProgress:
    """One line per stage: tasks done, records, bases, input MB/s and ETA (by input bytes);
    redrawn in place on a terminal, every ``every`` seconds elsewhere."""

    def __init__(self, stage: str, tasks: int, total_bytes: int, stream: Any = sys.stderr,
                 every: float = 10.0) -> None:  # fmt: skip
        self.stage, self.tasks, self.total = stage, tasks, max(1, total_bytes)
        self.stream, self.every = stream, every
        self.done = self.records = self.bases = self.bytes = self.skipped = 0
        self.started = self._shown = time.time()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def line(self) -> str:
        elapsed = max(1e-9, time.time() - self.started)
        speed = self.bytes / elapsed
        eta = (self.total - self.bytes) / speed if speed > 0 and self.done < self.tasks else 0
        share = self.done / max(1, self.tasks)
        bar = "#" * round(20 * share) + "." * (20 - round(20 * share))
        resumed = f", {self.skipped} already done" if self.skipped else ""
        counts = f"{rate(self.records)} records | " if self.records else ""
        counts += f"{rate(self.bases)}b | " if self.bases else ""
        return (
            f"{self.stage:<7}[{bar}] {self.done}/{self.tasks}{resumed} | {counts}"
            f"{speed / 1e6:.1f} MB/s | {duration(elapsed)} | ETA {duration(eta)}"
        )

    def update(self, result: dict[str, Any], nbytes: int = 0) -> None:
        self.done += 1
        self.skipped += bool(result.get("skipped"))
        self.records += int(result.get("records", 0))
        self.bases += int(result.get("bases", 0))
        self.bytes += nbytes
        now = time.time()
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif now - self._shown >= self.every:
            self.stream.write(self.line() + "\n")
            self._shown = now

    def close(self) -> float:
        if self.stream is not None:
            self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
            self.stream.flush()
        return time.time() - self.started


def run_stage(
    executor: Executor, stage: str, fn: Callable[[Any], Any], tasks: list[dict[str, Any]],
    sizes: list[int], progress: Any, seconds: dict[str, float],
    memory: dict[str, float] | None = None,
) -> list[Any]:  # fmt: skip
    """Results of ``fn`` over ``tasks`` in task order, with a progress line; the stage's time
    goes to ``seconds``, the largest peak memory of a task's process (MiB) to ``memory``."""
    bar = StageProgress(stage, len(tasks), sum(sizes), progress)
    results: list[Any] = [None] * len(tasks)
    peak = 0.0
    for i, result in executor.map(fn, tasks, sizes):
        results[i] = result
        peak = max(peak, float(result.get("peak_rss_mb", 0.0)))
        bar.update(result, sizes[i])
    seconds[stage] = round(seconds.get(stage, 0.0) + bar.close(), 2)
    if memory is not None and peak:
        memory[stage] = round(max(memory.get(stage, 0.0), peak), 1)
    return results


class SchedulerError(ValueError):
    """No Dask scheduler at the address given (a user's setting: one line, no traceback)."""


def scheduler_executor(address: str, timeout: float = 10.0, worker_wait: float = 120.0) -> Executor:
    """The workers of a running Dask scheduler (``dask scheduler`` + ``dask worker``, e.g.
    started inside a Slurm allocation with ``srun``). A scheduler that does not answer within
    ``timeout`` s, or that has no worker after ``worker_wait`` s (workers may still be starting),
    is a one-line error rather than a build that waits for ever."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout)
    except OSError as err:
        raise SchedulerError(f"--scheduler {address}: no Dask scheduler answers ({err})") from None
    try:
        client.wait_for_workers(1, timeout=worker_wait)
    except TimeoutError:
        client.close()
        raise SchedulerError(
            f"--scheduler {address}: the scheduler has no workers after {worker_wait:.0f} s "
            f"(start some: dask worker {address} --nworkers N --nthreads 1)"
        ) from None
    return DaskExecutor(client, owned=None, close_client=True)


def slurm_cluster(
    nodes: int,
    cores: int,
    memory: str,
    walltime: str = "04:00:00",
    partition: str | None = None,
    account: str | None = None,
    extra: list[str] | None = None,
) -> Any:
    """dask-jobqueue's SLURMCluster: ``nodes`` jobs (0: none yet) of ``cores`` one-thread
    worker processes each, running this Python with the workers' settings (WORKER_CONFIG)."""
    from dask_jobqueue import SLURMCluster

    settings = " ".join(f"{k.upper().replace('.', '__').replace('-', '_')}={v!r}"
                        for k, v in WORKER_CONFIG.items() if "pre-spawn" not in k)  # fmt: skip
    cluster = SLURMCluster(
        cores=cores,
        processes=cores,
        memory=memory,
        walltime=walltime,
        queue=partition,
        account=account,
        python=sys.executable,
        job_extra_directives=extra or [],
        # the nannies' environment and the workers' settings, as for local workers
        job_script_prologue=[
            f'export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{WORKER_ENV}"',
            *(f"export DASK_{s}" for s in settings.split()),
        ],
    )
    if nodes:
        cluster.scale(jobs=nodes)
    return cluster


def slurm_executor(
    nodes: int,
    cores: int,
    memory: str,
    walltime: str = "04:00:00",
    partition: str | None = None,
    account: str | None = None,
    extra: list[str] | None = None,
    wait: float = 600.0,
) -> Executor:
    """Run on ``slurm_cluster``'s jobs; waits up to ``wait`` s for the first worker."""
    from distributed import Client

    cluster = slurm_cluster(nodes, cores, memory, walltime, partition, account, extra)
    client = Client(cluster)
    try:
        client.wait_for_workers(1, timeout=wait)
    except TimeoutError:
        script = cluster.job_script()
        client.close()
        cluster.close()
        raise TimeoutError(
            f"no Slurm worker started within {wait:.0f} s (see squeue); the job script: "
            + " | ".join(line for line in script.splitlines() if line.strip())
        ) from None
    return DaskExecutor(client, owned=cluster)
