"""Slurm launch without a cluster: the job scripts run as plain bash scripts, with stand-ins for
scontrol, srun and sbatch (tests/fixtures/slurm/bin) first on PATH. The two "nodes" are two
names of this machine (localhost, 127.0.0.1); srun starts every task here with the per-task
Slurm variables set as real srun does, so DeepSpeed and torch.distributed really run across
them (gloo, world size 2).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nucleo.slurm import allocation, launcher
from nucleo.train.checkpoint import complete_tags
from tests.conftest import ROOT

BIN = ROOT / "tests" / "fixtures" / "slurm" / "bin"
PRETRAIN_SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
SWEEP_SBATCH = ROOT / "nucleo" / "slurm" / "sweep.sbatch"  # package data (launch/slurm links it)
HOSTS = ["localhost", "127.0.0.1"]
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


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _job_id() -> str:
    """A random job id whose derived master port (20000 + id % 20000) is free here."""
    rng = random.Random()
    while True:
        job = rng.randrange(100_000, 999_999)
        if _free(allocation.master_port(str(job), {})):
            return str(job)


def stand_ins_path() -> str:
    """The stand-ins first; this Python's bin last, only as a fallback ``python3`` for them.
    (Not earlier: its pip ``ninja`` 1.13 logs other build hashes than Debian's 1.11, and each
    switch between the two rebuilds DeepSpeed's JIT op for every later start, ~60 s.)"""
    return f"{BIN}:{os.environ['PATH']}:{Path(sys.executable).parent}"


def sim_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a batch step in a 2-node allocation with 1 "GPU" per node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    isolate = "MASTER_ADDR MASTER_PORT RANK LOCAL_RANK WORLD_SIZE LOCAL_SIZE MLFLOW_TRACKING_URI"
    for key in [*isolate.split(), "NUCLEO_SLURM_MODE", "NUCLEO_GPUS_PER_NODE", "NUCLEO_HOME"]:
        env.pop(key, None)
    env.update(
        PATH=stand_ins_path(),
        SLURM_SIM_LOG=str(tmp_path / "slurm-sim.log"),
        SLURM_SIM_HOSTS=" ".join(HOSTS),
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="1",
        SLURM_SUBMIT_DIR=str(ROOT),
        NUCLEO_PYTHON=sys.executable,
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # two "nodes" share this machine's cores
        MKL_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def sim_log(tmp_path: Path, tool: str) -> list[list[str]]:
    """argv of every call of a stand-in (``srun``, ``sbatch``, ``scontrol``), in order."""
    path = tmp_path / "slurm-sim.log"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [shlex.split(line)[1:] for line in lines if line.startswith(tool + " ")]


def after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def per_node_job(sample_shards, tmp_path_factory):
    """``bash launch/slurm/pretrain.sbatch CONFIG --set ...`` in per-node mode, 10 steps."""
    tmp = tmp_path_factory.mktemp("slurm")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = [str(config), "--set", f"data.shards={sample_shards}", "--set", f"run.root={tmp}/runs"]
    job = _job_id()
    env = sim_env(tmp, SLURM_JOB_ID=job)
    result = run(["bash", str(PRETRAIN_SBATCH), *args], env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return {"tmp": tmp, "job": job, "args": args, "output": output, "run_dir": tmp / "runs"}


@pytest.mark.slow
def test_per_node_mode_trains_one_deepspeed_launcher_per_node(per_node_job):
    tmp, job, output = per_node_job["tmp"], per_node_job["job"], per_node_job["output"]
    run_dir = per_node_job["run_dir"] / f"slurm-{job}"  # no run.name: named after the job
    port = str(20000 + int(job) % 20000)
    assert f"world size 2, mode per-node, master localhost:{port}" in output

    (srun,) = sim_log(tmp, "srun")
    assert srun[:3] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"], srun
    assert srun[srun.index("-m") + 1 : srun.index("-m") + 3] == ["nucleo.slurm", "node"]

    # What each node's step actually exec'd: DeepSpeed's launcher with that node's rank.
    execs = dict(re.findall(r"nucleo\.slurm: node (\d) exec: (.*)", output))
    assert sorted(execs) == ["0", "1"], output[-3000:]
    for rank, line in execs.items():
        cmd = shlex.split(line)
        assert Path(cmd[0]).name == "deepspeed" and "--no_ssh" in cmd
        assert after(cmd, "--node_rank") == rank and after(cmd, "--num_nodes") == "2"
        assert after(cmd, "--num_gpus") == "1"
        assert after(cmd, "--master_addr") == "localhost" and after(cmd, "--master_port") == port
        assert after(cmd, "--hostfile") == str(run_dir / "hostfile")
        assert cmd[cmd.index("--module") :][:4] == [
            "--module",
            "--no_local_rank",
            "nucleo",
            "pretrain",
        ]
    assert (run_dir / "hostfile").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"

    # Both launchers started their rank of one world of two, and both ranks finished.
    for rank in ("0", "1"):
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in output
    assert output.count("dist_world_size=2") == 2
    assert output.count("exits successfully") == 2
    assert "2 rank(s)" in output and "step 10/10" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 10 and summary["tokens"] == 10 * 2 * 8 * 128  # both ranks' batches
    assert complete_tags(run_dir / "checkpoints") == ["step_00000010"]
    assert f"job={job} restart=0 mode=per-node" in (run_dir / "slurm.log").read_text()


@pytest.mark.slow
def test_requeued_job_resumes_its_run_in_per_task_mode(per_node_job):
    """The same job id again (a requeue), one Slurm task per GPU this time, with a higher
    train.max_steps: it finds slurm-<job>, resumes from step 10 and trains to 15."""
    tmp, job = per_node_job["tmp"], per_node_job["job"]
    run_dir = per_node_job["run_dir"] / f"slurm-{job}"
    env = sim_env(tmp, SLURM_JOB_ID=job, SLURM_RESTART_COUNT="1", NUCLEO_SLURM_MODE="per-task")
    args = [*per_node_job["args"], "--set", "train.max_steps=15"]
    result = run(["bash", str(PRETRAIN_SBATCH), *args], env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    assert f"job {job} (restart 1)" in output and "resuming from step_00000010" in output
    srun = sim_log(tmp, "srun")[-1]
    assert srun[:3] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"], srun
    assert "task" in srun and after(srun, "--resume") == str(run_dir)
    assert "train.max_steps=15" in srun  # the user's overrides still apply
    for rank in ("0", "1"):  # each task turned its Slurm ids into torch.distributed's
        line = re.search(rf"nucleo\.slurm: task {rank} \(node {rank}\) exec: (.*)", output)
        assert line, output[-3000:]
        assert f"RANK={rank} LOCAL_RANK=0 WORLD_SIZE=2 LOCAL_SIZE=1" in line.group(1)
    assert "exits successfully" not in output  # no DeepSpeed launcher in this mode
    assert f"resumed {run_dir} from step_00000010 (step 10" in output
    assert "2 rank(s)" in output and "step 15/15" in output and "step 5/15" not in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 15 and summary["tokens"] == 15 * 2 * 8 * 128
    assert complete_tags(run_dir / "checkpoints")[-1] == "step_00000015"
    attempts = (run_dir / "slurm.log").read_text().splitlines()
    assert len(attempts) == 2 and "restart=1 mode=per-task" in attempts[1]
    assert "resume=step_00000010" in attempts[1]


# ----------------------------------------------------------------------------- sweep array


@pytest.mark.slow
def test_sweep_submits_a_job_array_and_a_task_runs_its_point(sample_shards, tmp_path):
    spec = tmp_path / "tiny-sweep.yaml"
    config = {**{k: v for k, v in TINY.items() if k not in ("arch", "losses")}}
    config["data"] = {**TINY["data"], "shards": str(sample_shards)}
    config["train"] = {**TINY["train"], "max_steps": 5}
    config["run"] = {"root": str(tmp_path / "runs")}
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "config": config,
                "points": [
                    {"arch": "transformer", "model.d_model": 32},
                    {"arch": "transformer", "model.d_model": 16},
                ],
            }
        )
    )
    env = sim_env(tmp_path)
    result = run([sys.executable, "-m", "nucleo", "sweep", "run", str(spec), "--slurm",
                  "--max-parallel", "2"], env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (sbatch,) = sim_log(tmp_path, "sbatch")
    assert "--array=0-1%2" in sbatch and "--job-name=sweep-tiny" in sbatch
    assert sbatch[-2:] == [str(SWEEP_SBATCH), str(spec.resolve())]
    sweep_dir = tmp_path / "runs" / "sweeps" / "tiny"
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert state["slurm_jobs"] == ["4242"] and "submitted job array 4242" in result.stdout

    # Array task 0, as Slurm would start it: only point 0 runs (and finishes).
    env = sim_env(tmp_path, SLURM_JOB_ID="4243", SLURM_ARRAY_JOB_ID="4242",
                  SLURM_ARRAY_TASK_ID="0")  # fmt: skip
    result = run(["bash", str(SWEEP_SBATCH), str(spec)], env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    first, second = state["points"]
    assert f"[sweep tiny 1/1] {first}: starting" in output
    assert f"{second}: starting" not in output and f"| 1 | {second} | new |" in output
    summary = json.loads((sweep_dir / first / "summary.json").read_text())
    assert summary["step"] == 5
    assert not (sweep_dir / second).exists()


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
    assert "Traceback" not in result.stderr and not sim_log(tmp_path, "srun")


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
