"""The fault suite: break real training runs the ways machines and people do, and check that
nothing is lost and every run recovers exactly.

    python experiments/fault_suite.py                       # 12 kill trials, all faults
    python experiments/fault_suite.py --trials 3 --out /tmp/r.md

Faults, each on a tiny transformer trained by ``python launch/pretrain.py`` on the bundled
genomes (60 steps, a checkpoint every 10 steps keeping 2, validation every 20):

- ``kill -9`` of the whole run, N times, at a random moment, during a checkpoint write (a
  step folder without its COMPLETE marker on disk) or during validation (right after the
  progress line that precedes it); every third trial also damages the newest checkpoint
  (64 bytes flipped, truncated, a file deleted, in turn) when there is an older one to fall
  back to. Each killed run is resumed with
  ``--resume`` until it finishes; its final weights must equal the uninterrupted run's.
- a full disk: the run directory on a small tmpfs (where the machine allows a mount) that
  fills during a checkpoint; the run must stop in one line with its last checkpoint whole,
  and, with space freed, resume to the same weights.
- a corrupt shard: ``nucleo data verify`` and training must name it.
- the tracking server stopped mid-run and started again (``mlflow server``): training must
  not stop or wait, and every metric must reach the store.

Writes a markdown report (command, machine, date, a row per fault, the totals: faults
injected, runs recovered exactly, data lost) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.report import header, run_record, write  # noqa: E402

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=128",
    "train.micro_batch_size=8", "train.max_steps=60", "train.lr=3e-3", "train.warmup_steps=5",
    "train.log_every=10", "eval.every=20", "eval.windows_per_kingdom=8", "checkpoint.every=10",
    "checkpoint.keep=2", "data.num_workers=1", "tracking.enabled=false",
]  # fmt: skip
DAMAGES = ("flip", "truncate", "delete")
PHASES = ("random", "checkpoint-write", "validation")


@dataclass
class Row:
    fault: str
    detail: str
    recovered: bool | None = None  # ended with the uninterrupted run's weights
    note: str = ""


@dataclass
class Run:
    """A ``launch/pretrain.py`` process in its own process group, its output collected."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds from the start, per line
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, args: list[str], env: dict[str, str] | None = None) -> Run:
        cmd = [sys.executable, "launch/pretrain.py", *args]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
        run = cls(proc)
        threading.Thread(target=run._read, daemon=True).start()
        return run

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.times.append(time.monotonic() - self.started)
            self.lines.append(line.rstrip("\n"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader thread drains the pipe
        return code

    def text(self) -> str:
        return "\n".join(self.lines)

    def training_span(self) -> tuple[float, float]:
        """(seconds to its first progress line, to its last one): when it trained."""
        steps = [
            t for t, line in zip(self.times, self.lines, strict=False) if line.startswith("step ")
        ]
        return (steps[0], steps[-1]) if steps else (0.0, 1.0)


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def pretrain_args(shards: Path, root: Path, name: str, *extra: str) -> list[str]:
    return sets(*TINY, f"data.shards={shards}", f"run.root={root}", f"run.name={name}", *extra)


def weights(run_dir: Path) -> dict:
    from nucleo.train.export import load_exported

    return load_exported(run_dir / "export")[0].state_dict()


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def finish(shards: Path, root: Path, run_dir: Path, max_resumes: int = 3) -> tuple[int, str]:
    """Resume ``run_dir`` until it has a summary; (resumes, their output)."""
    out = []
    for resumes in range(1, max_resumes + 1):
        # killed before it wrote its config: there is no run to resume, only to start again
        again = ["--resume", str(run_dir)] if (run_dir / "config.yaml").exists() else []
        run = Run.start([*again, *pretrain_args(shards, root, run_dir.name)])
        code = run.wait()
        out.append(run.text())
        if code == 0 and (run_dir / "summary.json").exists():
            return resumes, "\n".join(out)
    return max_resumes, "\n".join(out)


def kill_at(
    run: Run,
    run_dir: Path,
    phase: str,
    rng: random.Random,
    span: tuple[float, float],
    late: bool = False,
) -> str:
    """Kill ``run`` in ``phase`` (``late``: with two checkpoints on disk); returns where it
    was (the last progress line)."""
    ckpt = run_dir / "checkpoints"
    deadline = time.time() + 300
    if phase == "random":  # anywhere in the reference run's training
        time.sleep(max(0.0, rng.uniform(*span) - (time.monotonic() - run.started)))
    elif phase == "checkpoint-write":
        target = rng.choice([10, 20, 30, 40, 50])
        while time.time() < deadline and run.proc.poll() is None:
            writing = ckpt / f"step_{target:08d}"
            if writing.is_dir() and not (writing / "COMPLETE").exists():
                break
            time.sleep(0.001)
    else:  # validation follows the progress line of steps 20 and 40
        target = 40 if late else rng.choice([20, 40])
        while time.time() < deadline and run.proc.poll() is None:
            if any(line.startswith(f"step {target}/") for line in run.lines):
                break
            time.sleep(0.001)
    run.kill()
    progress = [line for line in run.lines if line.startswith("step ")]
    return progress[-1].split(" |")[0] if progress else "before step 1"


def damage_newest(run_dir: Path, how: str) -> str:
    from nucleo.train.checkpoint import complete_tags

    tags = complete_tags(run_dir / "checkpoints")
    if len(tags) < 2:  # damaging the only one leaves nothing to resume: not a recovery test
        return ""
    states = run_dir / "checkpoints" / tags[-1] / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    if how == "flip":
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(
            b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64]
        )
        states.write_bytes(bytes(data))
    elif how == "truncate":
        states.write_bytes(bytes(data[: len(data) // 3]))
    else:
        states.unlink()
    return f"{how} {tags[-1]}"


def kill_trials(
    n: int, shards: Path, work: Path, reference: dict, span: tuple[float, float], seed: int
) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for trial in range(n):
        phase = PHASES[trial % len(PHASES)]
        name = f"trial-{trial}"
        run_dir = work / "runs" / name
        run = Run.start(pretrain_args(shards, work / "runs", name))
        damaging = trial % 3 == 2
        where = kill_at(run, run_dir, phase, rng, span, late=damaging)
        detail = f"kill -9 ({phase}) at {where}"
        if (run_dir / "summary.json").exists():
            rows.append(Row("kill", detail, None, "ended before the kill; not counted"))
            print(f"trial {trial}: {detail}: ended before the kill", flush=True)
            continue
        note = ""
        if damaging:
            note = damage_newest(run_dir, DAMAGES[(trial // 3) % len(DAMAGES)])
            detail += f", then {note}" if note else " (one checkpoint: left whole)"
        resumes, output = finish(shards, work / "runs", run_dir)
        fell_back = "is damaged" in output
        ok = (run_dir / "summary.json").exists() and same(weights(run_dir), reference)
        info = f"{resumes} resume(s)" + ("; fell back past the damage" if fell_back else "")
        rows.append(Row("kill" + (" + damage" if note else ""), detail, ok, info))
        print(f"trial {trial}: {detail}: {'exact' if ok else 'DIFFERENT'} ({info})", flush=True)
    return rows


def mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a ``size`` tmpfs (e.g. "4m") on ``folder``: a disk that really fills (ENOSPC).
    False where the machine does not allow it (not root, no mount)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def disk_full(shards: Path, work: Path, reference: dict) -> Row:
    """The run directory on a tmpfs with room for a few checkpoints only."""
    disk = work / "small-disk"
    if not mount_tmpfs(disk, "4m"):
        return Row("disk full", "no tmpfs mount on this machine", None, "skipped")
    try:
        filler = disk / "filler"
        saved = sorted((work / "runs" / "reference" / "checkpoints").glob("step_*"))[-1]
        one = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())  # one checkpoint
        free = shutil.disk_usage(disk).free
        # room for about one and a half checkpoints: the second save fills the disk
        filler.write_bytes(b"\0" * max(0, free - int(1.5 * one) - 100_000))
        run = Run.start(pretrain_args(shards, disk, "full"))
        code = run.wait()
        errors = [line for line in run.lines if line.startswith("nucleo:")]
        stopped = code == 2 and len(errors) == 1 and "no space left" in errors[0]
        from nucleo.train.checkpoint import damage, latest_tag

        tag = latest_tag(disk / "full" / "checkpoints")
        whole = tag is not None and damage(disk / "full" / "checkpoints" / tag) is None
        filler.unlink()
        resumes, _ = finish(shards, disk, disk / "full")
        ok = stopped and whole and same(weights(disk / "full"), reference)
        said = f' ("{errors[0]}")' if errors else ""
        note = (f"stopped in one line: {stopped}{said}; last checkpoint {tag} whole: {whole}; "
                f"{resumes} resume(s) after freeing space")  # fmt: skip
        print(f"disk full: {'exact' if ok else 'DIFFERENT'} ({note})", flush=True)
        return Row("disk full", "checkpoint write on a full 4 MB tmpfs", ok, note)
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def corrupt_shard(shards: Path, work: Path) -> Row:
    """64 bytes flipped inside every training shard of one kingdom (the tars stay readable:
    only the manifest's checksums tell)."""
    bad = work / "bad-shards"
    shutil.copytree(shards, bad)
    tars = sorted((bad / "bacteria").glob("train-*.tar"))
    for tar in tars:
        data = bytearray(tar.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0x20 for b in data[middle : middle + 64])
        tar.write_bytes(bytes(data))
    verify = subprocess.run(
        [sys.executable, "-m", "nucleo", "data", "verify", "--shards", str(bad)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    named = verify.returncode != 0 and all(str(t) in verify.stdout for t in tars)
    # the natural mixture opens up to data.open_shards shards at once: bacteria's among them
    run = Run.start(pretrain_args(bad, work / "runs", "bad-shard"))
    code = run.wait()
    errors = [line for line in run.lines if line.startswith("nucleo: error:")]
    stopped = code == 2 and len(errors) == 1 and "bacteria/train-" in errors[0]
    said = f' ("{errors[0]}")' if errors else ""
    note = (
        f"verify names all {len(tars)}: {named}; training stops in one line naming one: "
        f"{stopped}{said}"
    )
    print(f"corrupt shard: {note}", flush=True)
    return Row("corrupt shards", f"64 bytes flipped inside each of the {len(tars)} bacteria "
               "training shards", named and stopped, note)  # fmt: skip


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server(store: Path, port: int) -> subprocess.Popen:
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow, "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    import urllib.request

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start in 120 s")


def tracking_outage(shards: Path, work: Path, reference: dict) -> Row:
    store = work / "mlflow-server"
    store.mkdir()
    port = _port()
    server = _server(store, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        # the run ends while the server restarts (~10 s, more on a loaded machine): its end
        # may wait up to tracking.timeout for the store
        run = Run.start(pretrain_args(shards, work / "runs", "outage", "tracking.enabled=true",
                                      "tracking.timeout=90"),
                        env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
        while not any(line.startswith("step 20/") for line in run.lines):
            if run.proc.poll() is not None:
                break
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        down_at = time.time()
        while not any(line.startswith("step 40/") for line in run.lines):
            if run.proc.poll() is not None:
                break
            time.sleep(0.05)
        trained_while_down = time.time() - down_at
        server = _server(store, port)
        code = run.wait()
        from mlflow.tracking import MlflowClient

        summary = json.loads((work / "runs" / "outage" / "summary.json").read_text())
        client = MlflowClient(tracking_uri=uri)
        steps = sorted(
            m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train/loss")
        )
        status = client.get_run(summary["mlflow_run_id"]).info.status
        ok = code == 0 and steps == list(range(10, 61, 10)) and status == "FINISHED"
        ok = ok and same(weights(work / "runs" / "outage"), reference)
        note = (f"trained 20 steps in {trained_while_down:.0f} s with the store down; the store "
                f"holds train/loss at steps {steps}, run {status}")  # fmt: skip
        print(f"tracking outage: {'ok' if ok else 'FAILED'} ({note})", flush=True)
        return Row("tracking server stopped", "mlflow server killed after step 20, restarted "
                   "after step 40", ok, note)  # fmt: skip
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def report(rows: list[Row], run: dict, seconds: float, data_lost: list[str]) -> list[str]:
    counted = [r for r in rows if r.recovered is not None]
    exact = sum(r.recovered for r in counted)
    lines = [
        "# Reliability: the fault suite", "", *header(run), f"- took {seconds / 60:.1f} min",
        f"- faults injected: {len(counted)}; recovered exactly (or, for the shard, detected and "
        f"named): {exact}; data lost: {len(data_lost)}"
        + (f" ({'; '.join(data_lost)})" if data_lost else " (the shards verify against their "
           "manifest after every fault; no complete checkpoint was lost but those damaged on "
           "purpose)"),
        "",
        "| fault | what was done | result | note |", "|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        result = {True: "ok", False: "FAILED", None: "n/a"}[r.recovered]
        lines.append(f"| {r.fault} | {r.detail} | {result} | {r.note} |")
    lines += ["", "A run is *recovered exactly* when its final weights are bit-identical to "
              "the uninterrupted run's (same seed, same data order).", ""]  # fmt: skip
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=12, help="kill -9 trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default="experiments/results/reliability.md")
    p.add_argument("--skip", nargs="*", default=[], choices=["disk", "shard", "tracking"])
    args = p.parse_args()
    started = time.time()
    run = run_record()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="nucleo-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shards = work / "shards"
        if not (shards / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "nucleo", "data", "build", "--sources",
                            "data_pipeline/sample/sources.tsv", "--out", str(shards)],
                           cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        reference_run = Run.start(pretrain_args(shards, work / "runs", "reference"))
        assert reference_run.wait() == 0, reference_run.text()[-3000:]
        reference = weights(work / "runs" / "reference")
        span = reference_run.training_span()
        rows = kill_trials(args.trials, shards, work, reference, span, args.seed)
        if "disk" not in args.skip:
            rows.append(disk_full(shards, work, reference))
        if "shard" not in args.skip:
            rows.append(corrupt_shard(shards, work))
        if "tracking" not in args.skip:
            rows.append(tracking_outage(shards, work, reference))
        verify = subprocess.run(
            [sys.executable, "-m", "nucleo", "data", "verify", "--shards", str(shards)],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        data_lost = [] if verify.returncode == 0 else [f"shards: {verify.stdout[-300:]}"]
        write(args.out, report(rows, run, time.time() - started, data_lost))
        bad = [r for r in rows if r.recovered is False] or data_lost
        return 1 if bad else 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
