"""System metrics of a training run: CPU, memory, disk, network and GPU use, sampled in a
thread of rank 0 by MLflow's own monitors and handed to the tracker as ``system/*`` metrics.

Why not MLflow's ``SystemMetricsMonitor``: its thread talks to the store itself (one
``get_run`` per sample, blocking writes), stops for good at its first failure, and its
``finish`` joins that thread without a timeout; here sampling never touches the store, and the
tracker sends the samples with everything else (kept while the store is down).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any


class SystemMetrics:
    """Samples the machine every ``every`` seconds in a thread of its own, with MLflow's
    monitors (CPU and memory, disk, network through psutil; NVIDIA GPUs through pynvml when it
    is installed, else this process's CUDA memory from torch), and hands each sample to
    ``record`` as ``system/*`` metrics (MLflow's names, so its UI shows them as system
    metrics). Sampling never touches the store: a slow or absent one cannot stall it."""

    def __init__(self, record: Callable[[dict[str, float]], None], every: float) -> None:
        self.record, self.every = record, every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitors: list[Any] = []

    def start(self) -> None:
        try:
            self._monitors = _monitors()
            for monitor in self._monitors:  # a first reading: CPU use is measured between two
                monitor.collect_metrics()
                monitor.clear_metrics()
        except Exception as err:  # psutil missing or refused: training goes on without them
            say = f"warning: no system metrics ({type(err).__name__}: {err})"
            print(say, file=sys.stderr, flush=True)
            self._monitors = []
            return
        self._thread = threading.Thread(target=self._loop, name="nucleo-sysmetrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, after one last sample (so even a short run has one)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        metrics: dict[str, float] = {}
        for monitor in self._monitors:
            try:
                monitor.collect_metrics()
                metrics.update(monitor.aggregate_metrics())
            except Exception:  # one monitor failing (a GPU gone) must not stop the others
                pass
            finally:
                monitor.clear_metrics()
        if metrics:
            self.record({f"system/{k}": float(v) for k, v in metrics.items()})


def _monitors() -> list[Any]:
    """MLflow's system monitors for this machine (a GPU one only where a GPU is in use)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    torch = sys.modules.get("torch")  # only if training imported it: never initialise CUDA here
    if torch is None or not torch.cuda.is_initialized():
        return monitors
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())  # needs pynvml (nvidia-ml-py)
    except Exception:
        monitors.append(_torch_cuda_monitor(torch))
    return monitors


def _torch_cuda_monitor(torch: Any) -> Any:
    """Memory of this process's current CUDA device, from torch (when pynvml is absent)."""
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor

    class TorchCudaMonitor(BaseMetricsMonitor):
        def collect_metrics(self) -> None:
            index = torch.cuda.current_device()
            mb = 1e6
            self._metrics[f"gpu_{index}_memory_allocated_megabytes"].append(
                torch.cuda.memory_allocated(index) / mb
            )
            self._metrics[f"gpu_{index}_memory_reserved_megabytes"].append(
                torch.cuda.memory_reserved(index) / mb
            )

        def aggregate_metrics(self) -> dict[str, float]:
            return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items()}

    return TorchCudaMonitor()
