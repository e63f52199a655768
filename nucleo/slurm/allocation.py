"""The pure side of the Slurm launcher: the allocation read from Slurm's environment, the
DeepSpeed hostfile, the master address and port, the per-task torch.distributed variables and
the srun / deepspeed command lines. Nothing here starts a process but ``scontrol show
hostnames`` and ``scontrol show node``, so the launcher's steps (``nucleo.slurm.launcher``) stay
thin and these parts are testable without a cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PRETRAIN = ["-m", "nucleo", "pretrain"]  # how a rank starts: python -m nucleo pretrain ARGS
PORT_BASE, PORT_SPAN = 20000, 20000


class SlurmError(Exception):
    """A problem with the allocation or the tools (no Slurm, no scontrol): no traceback."""


def require_env(env: Mapping[str, str], *keys: str) -> str:
    """The first of ``keys`` set in ``env``; a clear error when none is (not in an allocation)."""
    for key in keys:
        if env.get(key):
            return env[key]
    raise SlurmError(
        f"{keys[0]} is not set: this must run inside a Slurm allocation "
        "(sbatch launch/slurm/pretrain.sbatch CONFIG.yaml ..., or inside salloc)"
    )


def env_int(value: str, key: str) -> int:
    """``value`` (of the variable ``key``) as an integer, else a SlurmError naming it."""
    try:
        return int(value)
    except ValueError:
        raise SlurmError(f"{key}={value!r} is not an integer") from None


# ----------------------------------------------------------------------------- the allocation


@dataclass(frozen=True)
class Allocation:
    """What the batch step needs to know about the job: its id, hosts and GPUs per host."""

    job_id: str
    hosts: list[str]
    gpus_per_node: int
    master_port: int
    restart_count: int = 0
    cpus_on_node: int | None = None
    master_address: str | None = None  # where the first host is reached (default: its name)

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def master_addr(self) -> str:
        return self.master_address or self.hosts[0]

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def expand_hostnames(nodelist: str) -> list[str]:
    """``node[1-2],gpu7`` -> [node1, node2, gpu7], through ``scontrol show hostnames``.

    Slurm's compressed host-list syntax has ranges, zero padding and nested lists; scontrol is
    the one parser that is always right, and it is present wherever a job runs.
    """
    if shutil.which("scontrol") is None:
        raise SlurmError("scontrol is not on PATH: cannot expand SLURM_JOB_NODELIST")
    result = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SlurmError(
            f"scontrol show hostnames {nodelist!r} failed ({result.returncode}): "
            f"{result.stderr.strip()}"
        )
    hosts = result.stdout.split()
    if not hosts:
        raise SlurmError(f"scontrol show hostnames {nodelist!r} printed no host")
    if len(set(hosts)) != len(hosts):
        raise SlurmError(f"the node list {nodelist!r} names a host twice: {hosts}")
    return hosts


def parse_node_addr(text: str, name: str) -> str | None:
    """NodeAddr of node ``name`` in ``scontrol show node`` output (one- or multi-line records),
    or None when that record or its address is missing."""
    for record in re.split(r"(?=\bNodeName=)", text):
        fields = dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", record))
        if fields.get("NodeName") == name:
            addr = fields.get("NodeAddr", "")
            return addr if addr and addr != "(null)" else None
    return None


def node_address(name: str) -> str:
    """The address of node ``name`` as Slurm reaches it (its NodeAddr), else the name itself.

    A node name need not resolve (slurm.conf may map ``n1`` to ``NodeAddr=10.0.0.7``); the
    master address must, on every node, or torch.distributed waits for it until its timeout.
    """
    if shutil.which("scontrol") is None:
        return name
    try:
        result = subprocess.run(
            ["scontrol", "show", "node", name],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return name
    if result.returncode != 0:
        return name
    return parse_node_addr(result.stdout, name) or name


def parse_gpus(value: str) -> int:
    """GPUs per node from SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE: ``8``, ``a100:8``,
    ``gpu:a100:4,gpu:v100:4`` (summed)."""
    try:
        return sum(int(part.rsplit(":", 1)[-1]) for part in value.split(",") if part)
    except ValueError:
        raise SlurmError(f"cannot read a GPU count from {value!r}; pass --gpus-per-node") from None


def gpus_per_node(env: Mapping[str, str], override: int | None = None) -> int:
    """Processes per node: ``--gpus-per-node``, else what Slurm allocated on this node."""
    if override is not None:
        count = override
    elif env.get("SLURM_GPUS_ON_NODE"):
        count = parse_gpus(env["SLURM_GPUS_ON_NODE"])
    elif env.get("SLURM_GPUS_PER_NODE"):
        count = parse_gpus(env["SLURM_GPUS_PER_NODE"])
    else:
        raise SlurmError(
            "no GPU count: the job has no --gpus-per-node (SLURM_GPUS_ON_NODE is not set); "
            "pass --gpus-per-node G (on CPU nodes: the processes per node)"
        )
    if count < 1:
        raise SlurmError(f"gpus per node must be >= 1, got {count}")
    return count


def master_port(job_id: str, env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else 20000 + job id % 20000: the same on every node without any
    exchange, and different for two jobs that share a first node (unless 20000 apart)."""
    if env.get("MASTER_PORT"):
        return env_int(env["MASTER_PORT"], "MASTER_PORT")
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + number % PORT_SPAN


def read_allocation(env: Mapping[str, str], gpus: int | None = None) -> Allocation:
    """The allocation this process runs in, from the Slurm environment. The master is the
    first host, at MASTER_ADDR if set (e.g. its address on the fast network), else at its
    NodeAddr."""
    job_id = require_env(env, "SLURM_JOB_ID", "SLURM_JOBID")
    nodelist = require_env(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = expand_hostnames(nodelist)
    declared = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if declared and env_int(declared, "SLURM_NNODES") != len(hosts):
        raise SlurmError(f"SLURM_NNODES={declared} but {nodelist!r} expands to {hosts}")
    cpus = env.get("SLURM_CPUS_ON_NODE")
    return Allocation(
        job_id=job_id,
        hosts=hosts,
        gpus_per_node=gpus_per_node(env, gpus),
        master_port=master_port(job_id, env),
        restart_count=env_int(env.get("SLURM_RESTART_COUNT") or "0", "SLURM_RESTART_COUNT"),
        cpus_on_node=env_int(cpus, "SLURM_CPUS_ON_NODE") if cpus else None,
        master_address=env.get("MASTER_ADDR") or node_address(hosts[0]),
    )


def hostfile_text(alloc: Allocation) -> str:
    """DeepSpeed's hostfile: ``host slots=G`` per node (also usable with pdsh launches)."""
    return "".join(f"{host} slots={alloc.gpus_per_node}\n" for host in alloc.hosts)


# ----------------------------------------------------------------------------- the commands


def deepspeed_executable() -> str:
    """The ``deepspeed`` of this Python's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("deepspeed")
    if beside.is_file():
        return str(beside)
    found = shutil.which("deepspeed")
    if found is None:
        raise SlurmError(f"no deepspeed beside {sys.executable} nor on PATH")
    return found


def node_command(
    nodes: int,
    node_rank: int,
    gpus: int,
    master_addr: str,
    port: int,
    hostfile: Path,
    args: Sequence[str],
    deepspeed: str = "deepspeed",
) -> list[str]:
    """DeepSpeed's launcher for one node: ``gpus`` local ranks, global ranks from node_rank.

    ``--no_ssh`` makes it start only this node's processes; it still needs the hostfile (with
    none it assumes one node and forces the master to 127.0.0.1).
    """
    return [
        deepspeed, "--no_ssh", "--hostfile", str(hostfile),
        "--num_nodes", str(nodes), "--node_rank", str(node_rank), "--num_gpus", str(gpus),
        "--master_addr", master_addr, "--master_port", str(port),
        "--module", "--no_local_rank", *PRETRAIN[1:], *args,
    ]  # fmt: skip


def srun_command(mode: str, alloc: Allocation, hostfile: Path, args: Sequence[str]) -> list[str]:
    """The one srun of the batch step: a task per node (per-node) or per GPU (per-task)."""
    n, g = alloc.nodes, alloc.gpus_per_node
    per_node = 1 if mode == "per-node" else g
    cmd = ["srun", f"--nodes={n}", f"--ntasks={n * per_node}", f"--ntasks-per-node={per_node}"]
    if alloc.cpus_on_node:  # srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05+)
        cmd.append(f"--cpus-per-task={max(1, alloc.cpus_on_node // per_node)}")
    cmd += ["--kill-on-bad-exit=1", sys.executable, "-m", "nucleo.slurm"]
    where = ["--master-addr", alloc.master_addr, "--master-port", str(alloc.master_port)]
    if mode == "per-node":
        cmd += ["node", "--nodes", str(n), "--gpus-per-node", str(g), *where]
        cmd += ["--hostfile", str(hostfile)]
    else:
        cmd += ["task", *where]
    return [*cmd, "--", *args]


def tasks_per_node(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node: SLURM_NTASKS_PER_NODE, else the first count of
    SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE (``8(x2)``), else tasks / nodes."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return env_int(env["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE")
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            return env_int(env[key].split("(")[0].split(",")[0], key)
    tasks = env_int(require_env(env, "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"), "SLURM_NTASKS")
    return max(1, tasks // env_int(env.get("SLURM_NNODES") or "1", "SLURM_NNODES"))


def task_env(env: Mapping[str, str], master_addr: str, port: int) -> dict[str, str]:
    """torch.distributed's variables for one srun task: rank = SLURM_PROCID, local rank =
    SLURM_LOCALID (the engine uses cuda:LOCAL_RANK), world = SLURM_NTASKS."""
    rank = require_env(env, "SLURM_PROCID")
    local = require_env(env, "SLURM_LOCALID")
    world = require_env(env, "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")
    local_size = tasks_per_node(env)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if visible and len(visible) < local_size:
        raise SlurmError(
            f"this task sees {len(visible)} GPU(s) (CUDA_VISIBLE_DEVICES={','.join(visible)}) "
            f"but {local_size} tasks share the node and each uses cuda:LOCAL_RANK; "
            "let every task see all of the node's GPUs (no --gpus-per-task / --gpu-bind)"
        )
    return {
        "RANK": rank, "LOCAL_RANK": local, "WORLD_SIZE": world, "LOCAL_SIZE": str(local_size),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(port),
    }  # fmt: skip


def simulated_task(rank: int, alloc: Allocation) -> dict[str, str]:
    """The Slurm variables srun gives task ``rank`` in per-task mode (for --dry-run)."""
    g = alloc.gpus_per_node
    return {
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % g),
        "SLURM_NODEID": str(rank // g), "SLURM_NTASKS": str(alloc.world_size),
        "SLURM_NNODES": str(alloc.nodes), "SLURM_NTASKS_PER_NODE": str(g),
    }  # fmt: skip
