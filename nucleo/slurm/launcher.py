"""Multi-node training under Slurm: one batch step resolves the run, srun starts the ranks.

    sbatch launch/slurm/pretrain.sbatch experiments/configs/x.yaml --set train.max_steps=5000
    python -m nucleo.slurm pretrain [--mode per-node|per-task] [--gpus-per-node G] [--dry-run] \\
        -- [CONFIG.yaml | --config CONFIG.yaml] [--arch A] [--losses L] [--set k=v ...]

The batch step (``pretrain``, on the first node of the allocation) expands the node list with
``scontrol show hostnames``, picks the master (the first host at its NodeAddr, port 20000 +
job id % 20000; MASTER_ADDR / MASTER_PORT choose others), writes a DeepSpeed hostfile into the
run directory and starts one srun:

- ``per-node`` (default): one task per node runs ``python -m nucleo.slurm node``, which execs
  DeepSpeed's launcher with ``--no_ssh --node_rank $SLURM_NODEID``; the launcher starts one
  process per GPU. No ssh or pdsh between nodes is needed.
- ``per-task``: one task per GPU runs ``python -m nucleo.slurm task``, which turns Slurm's task
  ids into RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_SIZE and execs ``python -m nucleo pretrain``
  directly, so Slurm itself sees, binds and accounts every rank.

Requeue: a run without ``run.name`` is named ``slurm-$SLURM_JOB_ID``, and a requeued job keeps
its id, so it finds its own run directory; when that holds a complete checkpoint, the batch step
adds ``--resume RUN_DIR`` (the user's ``--set`` overrides still apply). SIGUSR1 (sent by
``#SBATCH --signal=B:USR1@300`` before the time limit) makes the batch step run
``scontrol requeue $SLURM_JOB_ID``; SIGTERM is forwarded to srun. ``guard`` does the same for
any command (the sweep's job-array tasks). When the ranks fail (srun ends them all when one
dies), the batch step says which checkpoint the run resumes from and how.

This module holds the run planning, the signal handling and the steps; the allocation, the
hostfile and the command lines are in ``nucleo.slurm.allocation``. Imports nothing heavy at
module level: the ``node`` and ``task`` steps run on every node and only exec; the batch step
imports the config machinery (and torch) when it resolves the run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from nucleo.slurm.allocation import (
    PRETRAIN,
    SlurmError,
    deepspeed_executable,
    env_int,
    hostfile_text,
    node_command,
    read_allocation,
    require_env,
    simulated_task,
    srun_command,
    task_env,
)

MODES = ("per-node", "per-task")
EXIT_USAGE = 2
SHOWN = 16  # dry-run: commands shown per node / task before eliding the rest


def say(text: str, out: TextIO | None = None) -> None:
    """One line in one write: the steps of all nodes share one output (and print() writes the
    line and its newline separately when unbuffered, so lines of two nodes could interleave)."""
    out = out or sys.stdout
    out.write(f"nucleo.slurm: {text}\n")
    out.flush()


# ----------------------------------------------------------------------------- the run


@dataclass
class RunPlan:
    """The pretrain arguments to run, the run directory, and whether it resumes."""

    args: list[str]
    run_dir: Path
    resume_tag: str | None
    stale: bool = False  # an earlier attempt of this job died before its first checkpoint


def pretrain_parser() -> argparse.ArgumentParser:
    from nucleo.train.arguments import add_run_arguments

    parser = argparse.ArgumentParser(prog="nucleo pretrain")
    add_run_arguments(parser)
    return parser


def normalise_args(args: Sequence[str]) -> list[str]:
    """``CONFIG.yaml --set ...`` (the sbatch convention) -> ``--config CONFIG.yaml --set ...``."""
    args = list(args)
    if args and not args[0].startswith("-"):
        return ["--config", args[0], *args[1:]]
    return args


def default_run_name(env: Mapping[str, str]) -> str:
    """``slurm-<job id>``; a requeued job keeps its id, so it finds its own run again.
    Array tasks: ``slurm-<array job id>_<task id>``."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return f"slurm-{require_env(env, 'SLURM_JOB_ID', 'SLURM_JOBID')}"


def attempts_log(run_dir: Path) -> Path:
    return run_dir / "slurm.log"


def started_by(run_dir: Path, job_id: str) -> bool:
    """Whether an attempt of ``job_id`` already ran in ``run_dir`` (its slurm.log says so)."""
    log = attempts_log(run_dir)
    return log.is_file() and f"job={job_id} " in log.read_text()


def plan_run(args: Sequence[str], env: Mapping[str, str]) -> RunPlan:
    """Resolve the config as pretrain will, name the run, and decide whether to resume.

    The job's own run directory with a complete checkpoint is resumed (a requeue or a
    resubmission with the same ``run.name``); one without a checkpoint is reused only if an
    earlier attempt of this same job made it (it died before its first checkpoint).
    """
    from nucleo.train.arguments import config_from_args
    from nucleo.train.checkpoint import latest_tag

    args = normalise_args(args)
    ns = pretrain_parser().parse_args(args)
    cfg = config_from_args(ns)
    if ns.resume:
        run_dir = Path(ns.resume).resolve()
        return RunPlan(args, run_dir, latest_tag(run_dir / "checkpoints"))
    if cfg.run.name is None:
        name = default_run_name(env)
        args = [*args, "--set", f"run.name={name}"]
    else:
        name = cfg.run.name
    run_dir = (Path(cfg.run.root) / name).resolve()
    tag = latest_tag(run_dir / "checkpoints")
    if tag is not None:
        return RunPlan([*args, "--resume", str(run_dir)], run_dir, tag)
    stale = (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()
    if stale and not started_by(run_dir, require_env(env, "SLURM_JOB_ID", "SLURM_JOBID")):
        raise SlurmError(
            f"{run_dir} holds a run without a complete checkpoint that this job did not start; "
            "choose another --set run.name=..., or delete it"
        )
    return RunPlan(args, run_dir, None, stale=stale)


# ----------------------------------------------------------------------------- signals


def request_requeue(job_id: str, out: TextIO | None = None) -> bool:
    """``scontrol requeue JOB``: Slurm ends the job and queues it again under the same id, and
    the next attempt resumes from the latest checkpoint. Returns whether scontrol agreed."""
    say(f"USR1 (the time limit is near): scontrol requeue {job_id}", out)
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        say("cannot requeue: scontrol is not on PATH", out)
        return False
    if result.returncode != 0:
        say(f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}", out)
        return False
    return True


class BatchStep:
    """Runs the srun child; requeues on SIGUSR1 and forwards SIGTERM to srun."""

    def __init__(self, job_id: str, out: TextIO | None = None) -> None:
        self.job_id = job_id
        self.out = out
        self.child: subprocess.Popen[bytes] | None = None
        self.requeued = False

    def on_usr1(self, signum: int, frame: FrameType | None) -> None:
        self.requeued = request_requeue(self.job_id, self.out) or self.requeued

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        if self.child is not None and self.child.poll() is None:
            say(f"forwarding {signal.Signals(signum).name} to srun", self.out)
            self.child.send_signal(signum)

    def run(self, cmd: Sequence[str]) -> int:
        signal.signal(signal.SIGUSR1, self.on_usr1)
        signal.signal(signal.SIGTERM, self.on_term)
        try:
            self.child = subprocess.Popen(list(cmd))
        except FileNotFoundError:
            raise SlurmError(f"{cmd[0]} is not on PATH") from None
        code = self.child.wait()
        return 128 - code if code < 0 else code


# ----------------------------------------------------------------------------- subcommands


def cmd_pretrain(opts: argparse.Namespace, args: list[str], env: Mapping[str, str]) -> int:
    """The batch step: resolve the run, write the hostfile, print the commands, run srun."""
    alloc = read_allocation(env, opts.gpus_per_node)
    plan = plan_run(args, env)
    hostfile = plan.run_dir / "hostfile"
    say(
        f"job {alloc.job_id} (restart {alloc.restart_count}): {alloc.nodes} node(s) x "
        f"{alloc.gpus_per_node} GPU(s) = world size {alloc.world_size}, mode {opts.mode}, "
        f"master {alloc.master_addr}:{alloc.master_port}"
    )
    if plan.resume_tag:
        say(f"run {plan.run_dir}: resuming from {plan.resume_tag}")
    else:
        note = " (an earlier attempt of this job left no checkpoint: starting over)"
        say(f"run {plan.run_dir}: starting{note if plan.stale else ''}")
    srun = srun_command(opts.mode, alloc, hostfile, plan.args)
    say(f"srun: {shlex.join(srun)}")
    if opts.mode == "per-node":
        deepspeed = deepspeed_executable()
        for rank in range(min(alloc.nodes, SHOWN)):
            node = node_command(alloc.nodes, rank, alloc.gpus_per_node, alloc.master_addr,
                                alloc.master_port, hostfile, plan.args, deepspeed)  # fmt: skip
            say(f"node {rank} ({alloc.hosts[rank]}) will run: {shlex.join(node)}")
    else:
        for rank in range(min(alloc.world_size, SHOWN)):
            tenv = task_env(simulated_task(rank, alloc), alloc.master_addr, alloc.master_port)
            shown = " ".join(f"{k}={v}" for k, v in tenv.items())
            say(f"task {rank} will run: {shown} {shlex.join([sys.executable, *PRETRAIN])} ...")
    if alloc.nodes > SHOWN or (opts.mode == "per-task" and alloc.world_size > SHOWN):
        say("... (the rest alike)")
    if opts.dry_run:
        say(f"dry run: would write {hostfile}:\n{hostfile_text(alloc)}".rstrip())
        return 0
    if plan.stale:  # keep only the record of the attempts
        attempts = attempts_log(plan.run_dir).read_text()
        shutil.rmtree(plan.run_dir)
        plan.run_dir.mkdir(parents=True)
        attempts_log(plan.run_dir).write_text(attempts)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    hostfile.write_text(hostfile_text(alloc))
    say(f"hostfile {hostfile}")
    with attempts_log(plan.run_dir).open("a") as log:
        log.write(
            f"job={alloc.job_id} restart={alloc.restart_count} mode={opts.mode} "
            f"hosts={','.join(alloc.hosts)} gpus_per_node={alloc.gpus_per_node} "
            f"resume={plan.resume_tag or '-'} time={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        )
    step = BatchStep(alloc.job_id)
    code = step.run(srun)
    say(f"srun exited {code}")
    if code != 0:
        say(after_failure(code, plan.run_dir, alloc.job_id, step.requeued))
    return code


def after_failure(code: int, run_dir: Path, job_id: str, requeued: bool) -> str:
    """What an ended step leaves: the checkpoint the run resumes from, and how to resume it
    (srun's own lines above name the node and task that failed)."""
    from nucleo.train.checkpoint import latest_tag

    tag = latest_tag(run_dir / "checkpoints")
    if requeued:
        start = f"from {tag}" if tag else "from the start (no complete checkpoint yet)"
        return f"job {job_id} requeued: its next attempt resumes run {run_dir} {start}"
    failed = (
        f"error: the ranks failed (srun exited {code}: a rank or a node died, or the step was "
        "cancelled; srun's lines above name them). "
    )
    if tag is None:
        return failed + (
            f"Run {run_dir} has no complete checkpoint: `scontrol requeue {job_id}` starts it over"
        )
    return failed + (
        f"Run {run_dir} resumes from {tag}: `scontrol requeue {job_id}`, or sbatch the same "
        f"arguments with --set run.name={run_dir.name}"
    )


def cmd_node(opts: argparse.Namespace, args: list[str], env: Mapping[str, str]) -> int:
    """One node's step (per-node mode): exec DeepSpeed's launcher with this node's rank."""
    node_rank = env_int(require_env(env, "SLURM_NODEID"), "SLURM_NODEID")
    if not 0 <= node_rank < opts.nodes:
        raise SlurmError(f"SLURM_NODEID={node_rank} is outside 0..{opts.nodes - 1}")
    cmd = node_command(opts.nodes, node_rank, opts.gpus_per_node, opts.master_addr,
                       opts.master_port, opts.hostfile, args, deepspeed_executable())  # fmt: skip
    host = env.get("SLURMD_NODENAME", "?")  # the Slurm node this task runs on
    say(f"node {node_rank} ({host}) exec: {shlex.join(cmd)}")
    os.execv(cmd[0], cmd)
    return 0  # not reached


def cmd_task(opts: argparse.Namespace, args: list[str], env: Mapping[str, str]) -> int:
    """One rank's step (per-task mode): set torch.distributed's variables, exec nucleo pretrain."""
    tenv = task_env(env, opts.master_addr, opts.master_port)
    cmd = [sys.executable, *PRETRAIN, *args]
    if env.get("SLURM_LOCALID") == "0":  # one line per node, not one per rank
        node = f"{env.get('SLURM_NODEID', '?')}, {env.get('SLURMD_NODENAME', '?')}"
        shown = " ".join(f"{k}={v}" for k, v in tenv.items())
        say(f"task {tenv['RANK']} (node {node}) exec: {shown} {shlex.join(cmd)}")
    os.execve(cmd[0], cmd, {**env, **tenv})
    return 0  # not reached


def cmd_guard(opts: argparse.Namespace, args: list[str], env: Mapping[str, str]) -> int:
    """Run a command as a child, requeue the job on SIGUSR1 and forward SIGTERM: for job
    scripts (sweep.sbatch) that would lose a bash trap to ``exec``."""
    if not args:
        raise SlurmError("guard needs a command after --")
    return BatchStep(require_env(env, "SLURM_JOB_ID", "SLURM_JOBID")).run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nucleo.slurm",
        description="Launch nucleo pretraining inside a Slurm allocation.",
        epilog="Pretrain arguments follow '--': [CONFIG.yaml] [--arch A] [--set k=v ...]",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="the batch step: resolve the run, then srun the ranks")
    p.add_argument("--mode", choices=MODES, default="per-node")
    p.add_argument("--gpus-per-node", type=int, help="default: what Slurm allocated")
    p.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("node", help="per-node step: exec deepspeed --no_ssh for this node")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--hostfile", type=Path, required=True)
    p.set_defaults(func=cmd_node)
    p = sub.add_parser("task", help="per-task step: exec nucleo pretrain as one rank")
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.set_defaults(func=cmd_task)
    p = sub.add_parser("guard", help="run a command; requeue the job on SIGUSR1")
    p.set_defaults(func=cmd_guard)
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    split = argv.index("--") if "--" in argv else len(argv)
    opts = build_parser().parse_args(argv[:split])
    func: Callable[[argparse.Namespace, list[str], Mapping[str, str]], int] = opts.func
    from nucleo.core.schema import ConfigError  # light: yaml only

    try:
        return func(opts, argv[split + 1 :], env)
    except SlurmError as err:
        print(f"nucleo.slurm: error: {err}", file=sys.stderr)
    except (ConfigError, FileNotFoundError) as err:
        print(f"nucleo.slurm: config error: {err}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
