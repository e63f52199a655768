"""A real Slurm for the Slurm tests: munge, slurmctld and two slurmd "nodes" (n1, n2) on
127.0.0.1, started in a temporary folder by launch/slurm/local_cluster.sh (the script the README
shows; one place for how) and stopped by their process ids afterwards.

Needs root (the daemons run as root) and Debian's slurm-wlm and munge, which the fixture
installs when it can (``local_cluster.sh install``: apt-get as root); elsewhere the tests that
use it are skipped with the reason. A cluster that is installed but does not start fails them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

LOCAL_CLUSTER = ROOT / "launch" / "slurm" / "local_cluster.sh"
#: what a job must not inherit from the test's environment (a Slurm job of its own, a
#: torch.distributed launch, a tracking server)
ISOLATE = ["MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE",
           "MLFLOW_TRACKING_URI", "NUCLEO_SLURM_MODE", "NUCLEO_GPUS_PER_NODE",
           "NUCLEO_HOME"]  # fmt: skip
#: the states of a job that has ended (a requeued one is PENDING again)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip


#: daemon log lines that say nothing about a job (Debian's Slurm looks for PMIx at each start)
NOISE = re.compile(r"pmix|PMIx|MPI: Cannot create context")


def tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    text = [
        line for line in path.read_text(errors="replace").splitlines() if not NOISE.search(line)
    ]
    return "\n".join(line[:400] for line in text[-lines:])


@dataclass
class Cluster:
    """The running cluster: its folder (config, logs) and how tests talk to it."""

    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """A job's environment (sbatch passes the submitter's on): this cluster, CPU ranks on
        one thread each (two "nodes" share this machine's cores), no inherited Slurm job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        for key in ISOLATE:
            env.pop(key, None)
        env.update(
            SLURM_CONF=str(self.conf),
            NUCLEO_PYTHON=sys.executable,
            DS_ACCELERATOR="cpu",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        env.update(extra)
        return env

    def run(
        self, cmd: list[str], timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("env", self.env())
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )

    def sbatch(self, args: list[str], env: Mapping[str, str], cwd: Path) -> str:
        """Submit (from ``cwd``: the job's working directory); returns the job id."""
        result = self.run(["sbatch", "--parsable", *args], env=dict(env), cwd=cwd)
        assert result.returncode == 0, f"sbatch {args}: {result.stderr}\n{self.logs()}"
        return result.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...);
        empty once Slurm forgot the job (MinJobAge after its end)."""
        result = self.run(["scontrol", "--oneliner", "show", "job", job])
        fields: dict[str, str] = {}
        for key, value in re.findall(r"(?:^|\s)(\w+)=(\S*)", result.stdout):
            fields.setdefault(key, value)
        return fields

    def logs(self, job: str | None = None, output: Path | None = None) -> str:
        """Where to look when a job went wrong: its record, its output, the daemons' logs."""
        parts = []
        if job is not None:
            state = self.job(job)
            keys = ["JobState", "Reason", "Restarts", "ExitCode", "NodeList", "BatchHost"]
            parts.append(f"job {job}: " + " ".join(f"{k}={state.get(k)}" for k in keys))
        if output is not None:
            parts.append(f"--- {output.name} (last lines)\n{tail(output, 40)}")
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"):
            parts.append(f"--- {name}\n{tail(self.folder / name, 8)}")
        return "\n".join(parts)

    def wait(
        self,
        job: str,
        until: Callable[[dict[str, str]], bool],
        what: str,
        timeout: float,
        output: Path | None = None,
    ) -> dict[str, str]:
        """Poll the job's record until ``until`` holds; fail with the logs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job(job)
            if until(state):
                return state
            if time.monotonic() > deadline:
                logs = self.logs(job, output)
                self.run(["scancel", job])  # free the nodes for the other tests
                pytest.fail(f"job {job}: not {what} after {timeout:.0f} s\n{logs}")
            time.sleep(0.2)

    def wait_output(self, job: str, output: Path, pattern: str, timeout: float) -> re.Match[str]:
        """Poll the job's output for ``pattern``; fail early if the job ends without it."""
        deadline = time.monotonic() + timeout
        while True:
            text = output.read_text(errors="replace") if output.is_file() else ""
            found = re.search(pattern, text, re.MULTILINE)
            if found:
                return found
            ended = self.job(job).get("JobState") in ENDED
            if ended or time.monotonic() > deadline:
                why = "the job ended" if ended else f"{timeout:.0f} s passed"
                logs = self.logs(job, output)
                self.run(["scancel", job])
                pytest.fail(f"job {job}: no {pattern!r} in its output ({why})\n{logs}")
            time.sleep(0.1)

    def done(
        self, job: str, output: Path, timeout: float, state: str = "COMPLETED"
    ) -> dict[str, str]:
        """Wait for the job to end; fail unless it ended in ``state``."""
        ended = self.wait(job, lambda s: s.get("JobState") in ENDED, "ended", timeout, output)
        assert ended["JobState"] == state, self.logs(job, output)
        return ended


@pytest.fixture(scope="package")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two idle nodes, n1 and n2 (one CPU each), for this package's tests; SLURM_CONF is set
    for them and restored after."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster runs its daemons as root (run the tests as root)")
    install = subprocess.run(["bash", str(LOCAL_CLUSTER), "install"], capture_output=True,
                             text=True, timeout=900, check=False)  # fmt: skip
    if install.returncode != 0:
        why = (install.stderr or install.stdout).strip()[-500:]
        pytest.skip(f"cannot install Slurm (slurm-wlm, munge): {why}")
    folder = tmp_path_factory.mktemp("slurm")
    cluster = Cluster(folder)
    started = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", str(folder)],
                             capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    try:
        assert started.returncode == 0, f"{started.stderr}\n{cluster.logs()}"
        before = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            yield cluster
        finally:
            if before is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = before
    finally:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", str(folder)], timeout=120,
                       check=False)  # fmt: skip
