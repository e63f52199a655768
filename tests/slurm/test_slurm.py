"""Slurm for real: the sbatch scripts submitted with sbatch to a two-node Slurm cluster on
127.0.0.1 (munge, slurmctld and slurmd "nodes" n1 and n2, started by tests/slurm/conftest.py
with launch/slurm/local_cluster.sh). One job trains over both nodes in per-node mode (a DeepSpeed
launcher per node, world size 2 over gloo), is requeued by USR1 to its batch step and resumes
with the same next batch; the run goes on in a new job in per-task mode, where node n2's ranks
are killed, the job fails with a message and ``scontrol requeue`` resumes it; a sweep runs as a
job array. The node names do not resolve here: the master address comes from Slurm's NodeAddr.

Stand-ins remain (tests/fixtures/slurm/bin, ``scontrol`` only) for the unit tests that need no
cluster and no root, and for what one host's Slurm cannot show: GPU counts and other node names
and addresses (a dry run of 2 nodes x 4 GPUs, gpu01 and gpu02 at 10.0.0.x), a failing
``scontrol requeue``, and the guard forwarding SIGTERM to its child (real Slurm signals every
process of the job itself, so the forwarding could not be told apart).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nucleo.slurm import allocation, launcher
from nucleo.train.checkpoint import complete_tags, latest_tag
from tests.conftest import ROOT
from tests.slurm.conftest import ISOLATE

BIN = ROOT / "tests" / "fixtures" / "slurm" / "bin"
PRETRAIN_SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
SWEEP_SBATCH = ROOT / "nucleo" / "slurm" / "sweep.sbatch"  # package data (launch/slurm links it)
TINY = {
    "arch": "transformer",
    "losses": ["ce"],
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2},
    "data": {"seq_len": 128, "num_workers": 0},
    "train": {"micro_batch_size": 8, "max_steps": 10, "lr": 3e-3, "warmup_steps": 2,
              "log_every": 5},
    "eval": {"every": 0, "windows_per_kingdom": 2},
    "checkpoint": {"every": 0, "export": False},
    "tracking": {"enabled": False},
}  # fmt: skip
#: a CPU job over both nodes: one task and one CPU a node, one rank a node (no GPUs here)
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
#: the first job checkpoints at EVERY and ends at STEPS < 2 x EVERY, so that the requeue (sent
#: after step EVERY + 1) always resumes from step EVERY, with room (~10 s of steps at the ~20
#: steps/s seen here) to arrive before the end; the second job trains on to MORE_STEPS,
#: leaving as much room for its failure
EVERY, STEPS, MORE_STEPS = 200, 399, 599
TOKENS_PER_STEP = 2 * 8 * 128  # 2 ranks x micro-batch 8 x 128 bases
LOSS = re.compile(r"^step (\d+)/\d+ \(\d+%\) \| loss (\S+) ", re.MULTILINE)


def stand_ins_path() -> str:
    """The stand-in scontrol first; this Python's bin last, only as a fallback ``python3``.
    (Not earlier: its pip ``ninja`` 1.13 logs other build hashes than Debian's 1.11, and each
    switch between the two rebuilds DeepSpeed's JIT op for every later start, ~60 s.)"""
    return f"{BIN}:{os.environ['PATH']}:{Path(sys.executable).parent}"


def sim_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A batch step's environment for the stand-in tests: 2 nodes, 1 "GPU" each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ISOLATE:
        env.pop(key, None)
    env.update(
        PATH=stand_ins_path(),
        SLURM_SIM_LOG=str(tmp_path / "slurm-sim.log"),
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="1",
        SLURM_SUBMIT_DIR=str(ROOT),
        NUCLEO_PYTHON=sys.executable,
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def sim_log(tmp_path: Path, tool: str) -> list[list[str]]:
    """argv of every call of a stand-in (``scontrol``), in order."""
    path = tmp_path / "slurm-sim.log"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [shlex.split(line)[1:] for line in lines if line.startswith(tool + " ")]


def after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def attempts(output: str) -> list[str]:
    """A job's output, one part per attempt (requeues append to the same file)."""
    return re.split(r"^(?=nucleo\.slurm: job \d+ \(restart \d+\))", output, flags=re.M)[1:]


def losses(text: str) -> dict[int, str]:
    """The training loss logged at each step (rank 0's progress lines)."""
    return {int(step): loss for step, loss in LOSS.findall(text)}


def kill_node(job: str, node_id: int) -> list[int]:
    """SIGKILL every process of ``job`` on its node ``node_id``, as if that node died: the
    step's tasks there, found by SLURM_JOB_ID and SLURM_NODEID in their environment (the batch
    step runs on node 0)."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_NODEID") == str(node_id):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
            except ProcessLookupError:
                pass
    return killed


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def per_node_job(slurm_cluster, sample_shards, tmp_path_factory):
    """``sbatch launch/slurm/pretrain.sbatch CONFIG --set ...`` over n1 and n2 in per-node mode,
    sent USR1 (``scancel --signal=USR1 --batch``) one step after its first checkpoint: the
    batch step requeues the job, whose second attempt resumes and trains to the end."""
    cluster, tmp = slurm_cluster, tmp_path_factory.mktemp("slurm-jobs")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = [str(config), "--set", f"data.shards={sample_shards}", "--set", f"run.root={tmp}/runs",
            "--set", f"train.max_steps={STEPS}", "--set", "train.log_every=1",
            "--set", f"checkpoint.every={EVERY}"]  # fmt: skip
    out = tmp / "per-node.out"
    env = cluster.env(NUCLEO_GPUS_PER_NODE="1")
    job = cluster.sbatch(
        [*CPU_JOB, f"--output={out}", "--open-mode=append", str(PRETRAIN_SBATCH), *args], env, tmp
    )
    cluster.wait_output(job, out, rf"^step {EVERY + 1}/{STEPS} ", timeout=180)
    signalled = cluster.run(["scancel", "--signal=USR1", "--batch", job])
    assert signalled.returncode == 0, signalled.stderr + cluster.logs(job, out)
    cluster.wait(job, lambda s: s.get("Restarts") == "1", "requeued", 60, out)
    record = cluster.done(job, out, timeout=180)
    return {"tmp": tmp, "job": job, "args": args, "output": out.read_text(), "out": out,
            "run_dir": tmp / "runs" / f"slurm-{job}", "record": record}  # fmt: skip


@pytest.mark.slow
def test_per_node_mode_trains_one_deepspeed_launcher_on_each_node(per_node_job):
    job, run_dir = per_node_job["job"], per_node_job["run_dir"]  # no run.name: named by the job
    first, second = attempts(per_node_job["output"])
    port = str(20000 + int(job) % 20000)
    # n1 and n2 do not resolve here: the master is n1's NodeAddr
    assert f"world size 2, mode per-node, master 127.0.0.1:{port}" in first, first[-3000:]
    assert per_node_job["record"]["NodeList"] == "n[1-2]"
    srun = shlex.split(re.search(r"nucleo\.slurm: srun: (.*)", first).group(1))
    assert srun[1:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"], srun
    assert srun[srun.index("-m") + 1 : srun.index("-m") + 3] == ["nucleo.slurm", "node"]

    # What each node's task actually exec'd, on which Slurm node: DeepSpeed's launcher with
    # that node's rank.
    execs = {rank: (host, line) for rank, host, line in
             re.findall(r"nucleo\.slurm: node (\d) \((\w+)\) exec: (.*)", first)}  # fmt: skip
    assert sorted(execs) == ["0", "1"], first[-3000:]
    assert {rank: host for rank, (host, _) in execs.items()} == {"0": "n1", "1": "n2"}
    for rank, (_, line) in execs.items():
        cmd = shlex.split(line)
        assert Path(cmd[0]).name == "deepspeed" and "--no_ssh" in cmd
        assert after(cmd, "--node_rank") == rank and after(cmd, "--num_nodes") == "2"
        assert after(cmd, "--num_gpus") == "1"
        assert after(cmd, "--master_addr") == "127.0.0.1" and after(cmd, "--master_port") == port
        assert after(cmd, "--hostfile") == str(run_dir / "hostfile")
        assert cmd[cmd.index("--module") :][:4] == ["--module", "--no_local_rank", "nucleo",
                                                    "pretrain"]  # fmt: skip
    assert (run_dir / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"

    # Both launchers started their rank of one world of two, in both attempts.
    for attempt in (first, second):
        for rank in ("0", "1"):
            assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in attempt
        assert attempt.count("dist_world_size=2") == 2 and "2 rank(s)" in attempt
    assert second.count("exits successfully") == 2 and f"step {STEPS}/{STEPS}" in second
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["tokens"] == STEPS * TOKENS_PER_STEP
    assert complete_tags(run_dir / "checkpoints") == [f"step_{EVERY:08d}", f"step_{STEPS:08d}"]


@pytest.mark.slow
def test_usr1_requeues_the_job_and_it_resumes_with_the_same_next_batch(per_node_job):
    job, run_dir = per_node_job["job"], per_node_job["run_dir"]
    first, second = attempts(per_node_job["output"])
    tag = f"step_{EVERY:08d}"
    assert f"scontrol requeue {job}" in first and "DUE TO JOB REQUEUE" in first, first[-3000:]
    assert f"job {job} (restart 1)" in second and f"resuming from {tag}" in second
    assert f"resumed {run_dir} from {tag} (step {EVERY}," in second

    # The first attempt went past its checkpoint before it was requeued; the second redid those
    # steps from the checkpoint, on the same batches: the same losses, to the last digit.
    before, after_requeue = losses(first), losses(second)
    assert EVERY + 1 <= max(before) < STEPS and min(after_requeue) == EVERY + 1
    redone = range(EVERY + 1, max(before) + 1)
    pairs = [(s, before[s], after_requeue[s]) for s in redone]
    assert all(a == b for _, a, b in pairs), pairs
    assert "stream restarts with a new order" not in per_node_job["output"]
    log = (run_dir / "slurm.log").read_text().splitlines()
    assert [line.split(" time=")[0] for line in log] == [
        f"job={job} restart=0 mode=per-node hosts=n1,n2 gpus_per_node=1 resume=-",
        f"job={job} restart=1 mode=per-node hosts=n1,n2 gpus_per_node=1 resume={tag}",
    ]


@pytest.fixture(scope="module")
def per_task_job(slurm_cluster, per_node_job):
    """The same run in a new job (``--set run.name=...``) in per-task mode, trained on to
    MORE_STEPS: after its first step, node n2's processes are killed; the job fails, and
    ``scontrol requeue`` resumes it from its latest checkpoint."""
    cluster, tmp, run_dir = slurm_cluster, per_node_job["tmp"], per_node_job["run_dir"]
    out = tmp / "per-task.out"
    args = [*per_node_job["args"], "--set", f"run.name={run_dir.name}",
            "--set", f"train.max_steps={MORE_STEPS}"]  # fmt: skip
    env = cluster.env(NUCLEO_GPUS_PER_NODE="1", NUCLEO_SLURM_MODE="per-task")
    job = cluster.sbatch(
        [*CPU_JOB, f"--output={out}", "--open-mode=append", str(PRETRAIN_SBATCH), *args], env, tmp
    )
    cluster.wait_output(job, out, rf"^step {STEPS + 1}/{MORE_STEPS} ", timeout=180)
    killed = kill_node(job, 1)
    assert killed, f"no process of job {job} on node 1\n{cluster.logs(job, out)}"
    failed = cluster.done(job, out, timeout=60, state="FAILED")
    failed_output, kept = out.read_text(), latest_tag(run_dir / "checkpoints")
    requeue = cluster.run(["scontrol", "requeue", job])
    assert requeue.returncode == 0, requeue.stderr + cluster.logs(job, out)
    cluster.wait(job, lambda s: s.get("Restarts") == "1" and s.get("JobState") != "FAILED",
                 "requeued", 30, out)  # fmt: skip
    cluster.done(job, out, timeout=180)
    return {"job": job, "run_dir": run_dir, "failed": failed, "failed_output": failed_output,
            "kept": kept, "output": out.read_text()}  # fmt: skip


@pytest.mark.slow
def test_per_task_mode_continues_the_run_in_a_new_job(per_task_job):
    job, run_dir = per_task_job["job"], per_task_job["run_dir"]
    first, second = attempts(per_task_job["output"])
    assert f"job {job} (restart 0)" in first and f"resuming from step_{STEPS:08d}" in first
    for attempt in (first, second):
        srun = shlex.split(re.search(r"nucleo\.slurm: srun: (.*)", attempt).group(1))
        assert srun[1:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"], srun
        assert "task" in srun and after(srun, "--resume") == str(run_dir)
        assert f"train.max_steps={MORE_STEPS}" in srun  # the user's overrides still apply
        for rank, host in (("0", "n1"), ("1", "n2")):  # Slurm's task ids -> torch.distributed's
            line = re.search(rf"nucleo\.slurm: task {rank} \(node {rank}, {host}\) exec: (.*)",
                             attempt)  # fmt: skip
            assert line, attempt[-3000:]
            assert f"RANK={rank} LOCAL_RANK=0 WORLD_SIZE=2 LOCAL_SIZE=1" in line.group(1)
            assert "MASTER_ADDR=127.0.0.1" in line.group(1)
        assert "exits successfully" not in attempt  # no DeepSpeed launcher in this mode
        assert "2 rank(s)" in attempt
    assert f"step {MORE_STEPS}/{MORE_STEPS}" in second
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == MORE_STEPS and summary["tokens"] == MORE_STEPS * TOKENS_PER_STEP
    assert complete_tags(run_dir / "checkpoints")[-1] == f"step_{MORE_STEPS:08d}"
    log = (run_dir / "slurm.log").read_text().splitlines()
    assert len(log) == 4 and f"job={job} restart=0 mode=per-task" in log[2]


@pytest.mark.slow
def test_a_dead_node_fails_the_job_with_a_message_and_requeue_resumes_it(per_task_job):
    job, run_dir, kept = per_task_job["job"], per_task_job["run_dir"], per_task_job["kept"]
    output = per_task_job["failed_output"]
    assert per_task_job["failed"]["ExitCode"] != "0:0"
    assert re.search(r"srun: error: n2: task 1: Killed", output), output[-3000:]
    assert kept is not None and int(kept.split("_")[1]) >= STEPS  # where the new job got to
    message = re.search(r"nucleo\.slurm: error: the ranks failed \(srun exited \d+.*", output)
    assert message, output[-3000:]
    assert f"Run {run_dir} resumes from {kept}: `scontrol requeue {job}`" in message.group(0)
    assert f"--set run.name={run_dir.name}" in message.group(0)
    assert "Traceback" not in message.group(0)

    _, second = attempts(per_task_job["output"])
    assert f"job {job} (restart 1)" in second and f"resuming from {kept}" in second
    step = int(kept.split("_")[1])
    assert min(losses(second)) == step + 1 and max(losses(second)) == MORE_STEPS
    log = (run_dir / "slurm.log").read_text().splitlines()
    assert log[3].startswith(f"job={job} restart=1 mode=per-task") and f"resume={kept}" in log[3]


# ----------------------------------------------------------------------------- sweep array


@pytest.mark.slow
def test_sweep_submits_a_job_array_whose_tasks_train_their_points(
    slurm_cluster, sample_shards, tmp_path
):
    cluster = slurm_cluster
    spec = tmp_path / "tiny-sweep.yaml"
    config = {**{k: v for k, v in TINY.items() if k not in ("arch", "losses")}}
    config["data"] = {**TINY["data"], "shards": str(sample_shards)}
    config["train"] = {**TINY["train"], "max_steps": 5}
    config["run"] = {"root": str(tmp_path / "runs")}
    points = [{"arch": "transformer", "model.d_model": 32},
              {"arch": "transformer", "model.d_model": 16}]  # fmt: skip
    spec.write_text(yaml.safe_dump({"name": "tiny", "config": config, "points": points}))
    sbatch_args = ["--sbatch-arg=--gpus-per-node=0", "--sbatch-arg=--cpus-per-task=1"]
    submit = [sys.executable, "-m", "nucleo", "sweep", "run", str(spec), "--slurm",
              "--max-parallel", "2", *sbatch_args]  # fmt: skip
    result = cluster.run(submit, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    sweep_dir = tmp_path / "runs" / "sweeps" / "tiny"
    state = json.loads((sweep_dir / "sweep.json").read_text())
    (job,) = state["slurm_jobs"]
    assert f"submitted job array {job} (2 points)" in result.stdout

    hosts = set()
    for task, point in enumerate(state["points"]):  # each task trains its own point, only
        out = sweep_dir / f"slurm-{job}_{task}.out"
        record = cluster.done(f"{job}_{task}", out, timeout=180)
        hosts.add(record["NodeList"])
        output = out.read_text()
        assert f"[sweep tiny 1/1] {point}: starting" in output, output[-3000:]
        (other,) = set(state["points"]) - {point}
        assert f"{other}: starting" not in output
        assert json.loads((sweep_dir / point / "summary.json").read_text())["step"] == 5
    assert hosts == {"n1", "n2"}  # --max-parallel 2: side by side, a node each
    status = cluster.run([sys.executable, "-m", "nucleo", "sweep", "status", str(spec)],
                         cwd=tmp_path)  # fmt: skip
    assert status.stdout.count("| finished |") == 2, status.stdout + status.stderr


def test_sweep_task_outside_an_array_says_so(tmp_path):
    result = run(["bash", str(SWEEP_SBATCH), "spec.yaml"], sim_env(tmp_path, SLURM_JOB_ID="1"))
    assert result.returncode != 0 and "job-array task" in result.stderr


# ----------------------------------------------------------------------------- the pieces


def test_outside_an_allocation_is_a_clear_error(tmp_path):
    env = sim_env(tmp_path)
    del env["SLURM_JOB_NODELIST"], env["SLURM_NNODES"], env["SLURM_GPUS_ON_NODE"]
    result = run(["bash", str(PRETRAIN_SBATCH), "experiments/configs/demo.yaml"], env, 60)
    assert result.returncode == 2
    assert "SLURM_JOB_ID is not set" in result.stderr and "Slurm allocation" in result.stderr
    assert "Traceback" not in result.stderr


def test_master_address_is_the_first_nodes_node_addr(tmp_path, monkeypatch):
    """``scontrol show node`` output as Slurm 22.05 prints it, one-line and multi-line; a
    missing node or address falls back to the name (it may still resolve)."""
    shown = (
        "NodeName=n1 Arch=x86_64 CoresPerSocket=1 \n   CPUAlloc=0 CPUEfctv=1 CPUTot=1\n"
        "   NodeAddr=127.0.0.1 NodeHostName=vm Version=22.05.8\n"
        "   OS=Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC Debian 6.1.0 \n   RealMemory=10000\n\n"
    )
    assert allocation.parse_node_addr(shown, "n1") == "127.0.0.1"
    assert allocation.parse_node_addr(shown, "n10") is None
    two = (
        "NodeName=gpu01 CPUTot=64 NodeAddr=10.1.0.1 NodeHostName=gpu01 State=IDLE\n"
        "NodeName=gpu02 CPUTot=64 NodeAddr=10.1.0.2 NodeHostName=gpu02 State=IDLE\n"
    )
    assert allocation.parse_node_addr(two, "gpu02") == "10.1.0.2"
    assert allocation.parse_node_addr("NodeName=x NodeAddr=(null) State=DOWN", "x") is None

    monkeypatch.setenv("PATH", stand_ins_path())
    monkeypatch.setenv("SLURM_SIM_HOSTS", "gpu01 gpu02")
    monkeypatch.setenv("SLURM_SIM_NODEADDR", "gpu01=10.1.0.1 gpu02=10.1.0.2")
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "4"}
    alloc = allocation.read_allocation(env)
    assert alloc.hosts == ["gpu01", "gpu02"] and alloc.master_addr == "10.1.0.1"
    assert allocation.read_allocation({**env, "MASTER_ADDR": "10.2.0.1"}).master_addr == "10.2.0.1"
    monkeypatch.setenv("SLURM_SIM_NODEADDR", "")  # scontrol: "Node gpu01 not found"
    assert allocation.read_allocation(env).master_addr == "gpu01"


def test_missing_scontrol_and_gpu_count_are_clear_errors(tmp_path, monkeypatch, capsys):
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]"}
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    assert launcher.main(["pretrain", "--dry-run", "--"], env) == 2
    assert "scontrol is not on PATH" in capsys.readouterr().err
    monkeypatch.setenv("PATH", stand_ins_path())
    assert launcher.main(["pretrain", "--dry-run", "--"], env) == 2
    assert "pass --gpus-per-node" in capsys.readouterr().err
    bad = {**env, "SLURM_NNODES": "3"}
    assert launcher.main(["pretrain", "--gpus-per-node", "1", "--dry-run", "--"], bad) == 2
    assert "SLURM_NNODES=3" in capsys.readouterr().err


def test_port_and_gpu_counts_from_the_slurm_environment():
    assert allocation.master_port("123456", {}) == 20000 + 123456 % 20000 == 23456
    assert allocation.master_port("123456", {"MASTER_PORT": "29500"}) == 29500
    assert 20000 <= allocation.master_port("abc", {}) < 40000
    assert allocation.parse_gpus("8") == allocation.parse_gpus("a100:8") == 8
    assert allocation.parse_gpus("gpu:a100:4,gpu:v100:4") == 8
    assert allocation.gpus_per_node({"SLURM_GPUS_PER_NODE": "h100:4"}) == 4
    assert allocation.gpus_per_node({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "4"}) == 2
    assert allocation.gpus_per_node({"SLURM_GPUS_ON_NODE": "2"}, override=3) == 3
    with pytest.raises(allocation.SlurmError, match="GPU count"):
        allocation.parse_gpus("lots")


def test_task_env_maps_slurm_task_ids_to_torch_distributed():
    """Task 5 of 2 nodes x 4 GPUs, as srun describes it: second node, local rank 1."""
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "8",
           "SLURM_NNODES": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}  # fmt: skip
    assert allocation.task_env(env, "gpu01", 23456) == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "4",
        "MASTER_ADDR": "gpu01", "MASTER_PORT": "23456",
    }  # fmt: skip
    with pytest.raises(allocation.SlurmError, match="cuda:LOCAL_RANK"):
        allocation.task_env({**env, "CUDA_VISIBLE_DEVICES": "1"}, "gpu01", 23456)


def test_per_task_dry_run_prints_each_rank_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", stand_ins_path())
    monkeypatch.setenv("SLURM_SIM_HOSTS", "gpu01 gpu02")
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2",
           "SLURM_CPUS_ON_NODE": "64"}  # fmt: skip
    argv = ["pretrain", "--mode", "per-task", "--gpus-per-node", "4", "--dry-run", "--",
            "--arch", "hyena", "--set", f"run.root={tmp_path}"]  # fmt: skip
    assert launcher.main(argv, env) == 0
    out = capsys.readouterr().out
    srun = shlex.split(re.search(r"srun: (.*)", out).group(1))
    assert srun[1:5] == ["--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=16"]
    assert srun[srun.index("-m") + 1 : srun.index("-m") + 3] == ["nucleo.slurm", "task"]
    assert after(srun, "--master-addr") == "gpu01" and after(srun, "--master-port") == "23456"
    assert srun[srun.index("--") + 1 :] == [
        "--arch", "hyena", "--set", f"run.root={tmp_path}", "--set", "run.name=slurm-123456",
    ]  # fmt: skip
    ranks = re.findall(r"task (\d) will run: RANK=(\d) LOCAL_RANK=(\d) WORLD_SIZE=8 LOCAL_SIZE=4",
                       out)  # fmt: skip
    assert [(int(t), int(r), int(lr)) for t, r, lr in ranks] == [(t, t, t % 4) for t in range(8)]
    assert not (tmp_path / "slurm-123456").exists()  # a dry run writes nothing


def test_plan_resumes_own_runs_and_refuses_foreign_ones(tmp_path):
    env = {"SLURM_JOB_ID": "55"}
    run_dir = tmp_path / "slurm-55"
    plan = launcher.plan_run(["--set", f"run.root={tmp_path}"], env)
    assert plan.run_dir == run_dir and plan.resume_tag is None and not plan.stale
    # an earlier attempt of this job died before its first checkpoint: start over
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}")
    (run_dir / "slurm.log").write_text("job=55 restart=0 mode=per-node\n")
    assert launcher.plan_run(["--set", f"run.root={tmp_path}"], env).stale
    # ... but a run this job did not start is never touched
    with pytest.raises(allocation.SlurmError, match="did not start"):
        launcher.plan_run(["--set", f"run.root={tmp_path}", "--set", "run.name=slurm-55"],
                          {"SLURM_JOB_ID": "56"})  # fmt: skip
    # a complete checkpoint: resume it, keeping the overrides; config path as first argument
    tag = run_dir / "checkpoints" / "step_00000020"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("")
    config = tmp_path / "c.yaml"
    config.write_text("train: {max_steps: 50}\n")
    plan = launcher.plan_run([str(config), "--set", f"run.root={tmp_path}"], env)
    assert plan.resume_tag == "step_00000020"
    assert plan.args == ["--config", str(config), "--set", f"run.root={tmp_path}",
                         "--set", "run.name=slurm-55", "--resume", str(run_dir)]  # fmt: skip


def test_usr1_requeues_the_job_and_term_reaches_the_child(tmp_path):
    """``guard`` (as sweep.sbatch uses it; the pretrain batch step shares its BatchStep)."""
    env = sim_env(tmp_path, SLURM_JOB_ID="4242")
    marker = tmp_path / "child-got-term"
    child = f"trap 'touch {marker}; exit 0' TERM; while true; do sleep 0.05; done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nucleo.slurm", "guard", "--", "bash", "-c", child],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # let it install its handlers and start the child
        proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + 20
        while not sim_log(tmp_path, "scontrol") and time.time() < deadline:
            time.sleep(0.05)
        assert sim_log(tmp_path, "scontrol") == [["requeue", "4242"]]
        assert proc.poll() is None  # requeueing is Slurm's job: the run goes on until killed
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and marker.exists(), out
    assert "scontrol requeue 4242" in out and "forwarding SIGTERM" in out


def test_usr1_handler_with_a_failing_scontrol(tmp_path, monkeypatch, capsys):
    failing = tmp_path / "scontrol"
    failing.write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    step = launcher.BatchStep("99")
    step.on_usr1(signal.SIGUSR1, None)
    assert not step.requeued
    assert "presently disabled" in capsys.readouterr().out


def test_a_retry_of_a_start_that_died_early_starts_over(tmp_path, monkeypatch, capsys):
    """Requeued before its first checkpoint: the job's own half-made run directory is cleared
    (its attempts log kept), the hostfile rewritten, and srun started without --resume."""
    monkeypatch.setenv("PATH", stand_ins_path())
    started: list[list[str]] = []
    monkeypatch.setattr(launcher.BatchStep, "run", lambda self, cmd: started.append(cmd) or 0)
    run_dir = tmp_path / "slurm-77"
    (run_dir / "checkpoints" / "step_00000010").mkdir(parents=True)  # never completed
    (run_dir / "config.yaml").write_text("{}")
    (run_dir / "slurm.log").write_text("job=77 restart=0 mode=per-node\n")
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "1",
           "SLURM_RESTART_COUNT": "1"}  # fmt: skip
    assert launcher.main(["pretrain", "--", "--set", f"run.root={tmp_path}"], env) == 0
    assert "earlier attempt of this job left no checkpoint" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir()) == ["hostfile", "slurm.log"]
    assert (run_dir / "slurm.log").read_text().splitlines()[1].startswith("job=77 restart=1")
    (cmd,) = started
    assert "--resume" not in cmd and cmd[-2:] == ["--set", "run.name=slurm-77"]
