"""The GPU check (``launch/gpu_check.sh``): one command for whoever has a GPU host.

Steps, in order, each timed and each skipped with its reason when it cannot run or when the
time budget (``--budget``, 9.5 minutes by default) would not cover it:

    kernels     install the ``gpu`` extra's kernel packages that are missing (pip, no build
                isolation) within ``--kernel-budget`` seconds, then load each on the GPU
    tests       ``pytest -m gpu``: every CUDA kernel against its pure-PyTorch path, alone and
                inside models; every family on CUDA against CPU
    matrix      the precision check (nucleo.studies.precision) on the GPU: every family with bf16
                weights under ZeRO-0 and ZeRO-3 and with bf16 autocast under ZeRO-2
    train-1     every family, a short bf16 run of ``deepspeed --num_gpus 1 launch/pretrain.py``
                on the bundled genome sample: tokens/s, TFLOP/s and model FLOPs utilisation
                (nucleo.train.compute' count over the GPU's dense bf16 peak)
    train-all   the same on all GPUs of the host (NCCL), when it has more than one

It writes ``experiments/results/gpu.md`` (and ``gpu.json``) with the command, machine and date,
and keeps every step's log under ``runs/gpu_check/``. ``--dry-run`` prints the plan and runs
nothing (it works on any machine; the tests run it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("transformer", "hyena", "mamba", "caduceus", "multires", "hybrid")
MATRIX = [f"{a}:{s}:{p}" for a in FAMILIES for s, p in ((0, "bf16"), (3, "bf16"), (2, "autocast"))]
KERNEL_PACKAGES = ("causal-conv1d", "mamba-ssm", "flash-attn")  # quickest build first

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets), matched in order against
# torch.cuda.get_device_name(); --peak-tflops overrides.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.4), ("GH200", 989.4),
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 154.8),
]  # fmt: skip


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of the GPU called ``name`` (None: not in the table)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None, gpus: int) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over ``gpus`` x peak (NaN: no peak)."""
    if not peak:
        return float("nan")
    return tokens_per_second * flops_per_token / (peak * 1e12 * gpus)


@dataclass
class Step:
    """One step of the check: what it ran, how long, and what it found."""

    name: str
    status: str = "planned"  # ok, failed, skipped
    why: str = ""
    seconds: float = 0.0
    commands: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Check:
    """The check's settings and state."""

    out: Path
    logs: Path
    budget: float
    kernel_budget: float
    steps_per_run: int
    size: str
    peak: float | None
    dry_run: bool
    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[gpu_check {elapsed:5.0f}s] {text}", flush=True)

    def run(self, step: Step, cmd: list[str], log: str, timeout: float, env=None) -> int:
        """Run ``cmd`` (logged to logs/``log``), at most ``timeout`` seconds; returns its code
        (124 on timeout)."""
        step.commands.append(shlex.join(cmd))
        self.say("$ " + shlex.join(cmd))
        if self.dry_run:
            return 0
        path = self.logs / log
        with open(path, "w") as handle:
            try:
                proc = subprocess.run(
                    cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                )  # fmt: skip
                return proc.returncode
            except subprocess.TimeoutExpired:
                return 124


def describe_machine() -> dict[str, Any]:
    """GPU(s), driver, CUDA, torch, DeepSpeed, CPU cores, Python: for the report's header."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cpu_cores": len(os.sched_getaffinity(0)),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if info["gpus"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if info["gpus"] else "cpu")
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as err:  # reported, not fatal: the steps that need it will say so
        info["deepspeed"] = f"not importable ({type(err).__name__})"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "?"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        info["driver"] = "no nvidia-smi"
    return info


# ------------------------------------------------------------------------------------ steps


def step_kernels(check: Check, step: Step) -> None:
    """Install missing kernel packages within the kernel budget, then load each on the GPU."""
    from architectures import kernels as k

    spent = time.monotonic()
    for package in KERNEL_PACKAGES:
        kernel = next(x for x in k.KERNELS.values() if x.package == package)
        row: dict[str, Any] = {"package": package, "kernel": kernel.name}
        if kernel.installed():
            row["install"] = "already installed"
        else:
            left = check.kernel_budget - (time.monotonic() - spent)
            if left < 30:
                row["install"] = f"skipped: kernel budget ({check.kernel_budget:.0f} s) spent"
            else:
                cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", package]
                env = {"MAX_JOBS": str(max(1, (os.cpu_count() or 2) - 1)),
                       "PIP_CONSTRAINT": str(pin_torch(check))}  # fmt: skip
                code = check.run(step, cmd, f"pip-{package}.log", left, env)
                row["install"] = {0: "installed", 124: f"build did not finish in {left:.0f} s"}.get(
                    code, f"pip failed (exit {code}; logs/pip-{package}.log)"
                )
        step.rows.append(row)
    if check.dry_run:
        return
    # a fresh process: packages installed above import cleanly there
    probe = "import json; from architectures import kernels as k; print(json.dumps(k.status()))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    status = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
    for row in step.rows:
        entry = status.get(row["kernel"], {})
        row["loads"] = entry.get("usable", False)
        row["error"] = entry.get("error", "" if entry else out.stderr.strip()[-300:])


def pin_torch(check: Check) -> Path:
    """A pip constraints file holding the installed torch (a kernel build must not swap it)."""
    path = check.logs / "torch-constraint.txt"
    if not check.dry_run:
        version = check.machine["torch"].split("+")[0]
        path.write_text(f"torch=={version}\n")
    return path


def step_tests(check: Check, step: Step) -> None:
    xml = check.logs / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "tests/"]  # fmt: skip
    code = check.run(
        step, cmd, "gpu-tests.log", max(30.0, check.left() - 60), {"DS_ACCELERATOR": "cuda"}
    )
    if check.dry_run:
        return
    step.rows = junit_rows(xml) if xml.exists() else []
    if code not in (0, 5) or any(r["outcome"] == "failed" for r in step.rows):
        step.status, step.why = "failed", f"pytest exit {code}; logs/gpu-tests.log"


def junit_rows(path: Path) -> list[dict[str, str]]:
    """(test, outcome, message) per test case of a JUnit XML file written by pytest."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag != "skipped" else "skipped"
                message = (
                    (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                )
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                     "message": message})  # fmt: skip
    return rows


def step_matrix(check: Check, step: Step) -> None:
    from nucleo.studies.precision import problems

    cmd = [sys.executable, "launch/precision_check.py", "--json", *MATRIX]
    log = check.logs / "matrix.log"
    code = check.run(
        step, cmd, "matrix.log", max(30.0, check.left() - 30), {"DS_ACCELERATOR": "cuda"}
    )
    if check.dry_run:
        return
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            wrong = problems(result)
            losses = result.get("losses") or [float("nan")]
            step.rows.append({
                "combo": result["combo"], "ok": not wrong, "problems": "; ".join(wrong)[:300],
                "loss": f"{losses[0]:.3f} -> {losses[-1]:.3f}", "seconds": result["seconds"],
            })  # fmt: skip
    if code != 0 or len(step.rows) < len(MATRIX) or not all(r["ok"] for r in step.rows):
        step.status, step.why = "failed", f"exit {code}; logs/matrix.log"


def family_args(arch: str, check: Check, shards: Path, root: Path, name: str) -> list[str]:
    """``launch/pretrain.py`` arguments of one family's short bf16 run."""
    sets = [
        f"model.size={check.size}", "data.seq_len=1024", "train.micro_batch_size=16",
        f"train.max_steps={check.steps_per_run}", "train.warmup_steps=5",
        f"train.log_every={max(1, check.steps_per_run // 4)}", "eval.every=0",
        "eval.windows_per_kingdom=2", "checkpoint.every=0", "tracking.enabled=false",
        "engine.precision=bf16", f"data.shards={shards}", f"run.root={root}", f"run.name={name}",
    ]  # fmt: skip
    if arch in ("hyena", "multires"):
        sets.append("model.max_len=1024")
    if arch == "hybrid":
        sets += ["model.hyena.max_len=1024", "model.multires.max_len=1024"]
    args = ["--arch", arch, *(["--losses", "ce"] if arch != "caduceus" else [])]
    return args + [x for s in sets for x in ("--set", s)]


def step_train(check: Check, step: Step, gpus: int, shards: Path) -> None:
    root = check.logs / f"runs-{gpus}gpu"
    for arch in FAMILIES:
        if check.left() < 45:
            step.rows.append({"family": arch, "status": "skipped: time budget spent"})
            continue
        name = f"{arch}-{gpus}gpu"
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [deepspeed, "--num_gpus", str(gpus), "launch/pretrain.py",
               *family_args(arch, check, shards, root, name)]  # fmt: skip
        code = check.run(step, cmd, f"train-{name}.log", min(240.0, check.left()),
                         {"DS_ACCELERATOR": "cuda"})  # fmt: skip
        if check.dry_run:
            continue
        summary_path = root / name / "summary.json"
        if code != 0 or not summary_path.exists():
            step.rows.append(
                {"family": arch, "status": f"failed (exit {code}; logs/train-{name}.log)"}
            )
            continue
        s = json.loads(summary_path.read_text())
        rate = s.get("recent_tokens_per_second") or s["tokens_per_second"]
        achieved = rate * s["flops_per_token"]
        step.rows.append({
            "family": arch, "status": "ok", "parameters": s["parameters"]["total"],
            "tokens_per_second": rate, "tflops": achieved / 1e12,
            "mfu": mfu(rate, s["flops_per_token"], check.peak, gpus),
            "bits_per_base": s["final_validation"].get("val/bits_per_base", float("nan")),
            "loss_note": f"{s['step']} steps", "wall_seconds": s["wall_seconds"],
        })  # fmt: skip
    if any(r["status"].startswith("failed") for r in step.rows):
        step.status, step.why = "failed", "see the rows"


def sample_shards(check: Check, step: Step) -> Path:
    """The bundled sample, sharded (the demo's folder, built once)."""
    shards = ROOT / "data" / "shards" / "sample"
    if not (shards / "manifest.json").exists():
        cmd = [sys.executable, "-m", "nucleo", "data", "build", "--sources",
               "data_pipeline/sample/sources.tsv", "--out", str(shards), "--overwrite"]  # fmt: skip
        if check.run(step, cmd, "shards.log", 300) != 0:
            raise RuntimeError("could not shard the bundled sample; logs/shards.log")
    return shards


# ----------------------------------------------------------------------------------- report


def render(check: Check, command: str) -> str:
    """The markdown report."""
    m = check.machine
    total = time.monotonic() - check.started
    gpu = f"{m.get('gpus', 0)} x {m.get('gpu', 'no GPU')} ({m.get('gpu_memory_gib', '?')} GiB)"
    lines = [
        "# GPU check", "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; took {total / 60:.1f} min",
        f"- machine: {gpu}, driver {m.get('driver')}, CUDA {m.get('cuda')}, "
        f"{m.get('cpu_cores')} CPU cores, host {m.get('host')}",
        f"- software: torch {m.get('torch')}, DeepSpeed {m.get('deepspeed')}, "
        f"Python {m.get('python')}",
        f"- MFU peak: {check.peak or 'unknown'} TFLOP/s dense bf16 per GPU", "",
        "| step | status | seconds | note |", "|---|---|---|---|",
    ]  # fmt: skip
    for s in check.steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.why} |")
    for s in check.steps:
        if not s.rows:
            continue
        lines += ["", f"## {s.name}", ""]
        keys = list(dict.fromkeys(k for r in s.rows for k in r))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in s.rows:
            lines.append("| " + " | ".join(_cell(k, r.get(k, "")) for k in keys) + " |")
    skipped = [s for s in check.steps if s.status == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {s.name}: {s.why}" for s in skipped]
    lines += ["", "Logs of every step: `" + str(check.logs.relative_to(ROOT)) + "/`.", ""]
    return "\n".join(lines)


FORMATS: dict[str, Callable[[Any], str]] = {
    "mfu": lambda v: "n/a" if v != v else f"{100 * v:.2f}%",
    "tflops": lambda v: f"{v:.1f}",
    "tokens_per_second": lambda v: f"{v:,.0f}",
    "bits_per_base": lambda v: "n/a" if v != v else f"{v:.3f}",
    "parameters": lambda v: f"{v:,}",
}


def _cell(key: str, value: Any) -> str:
    if key in FORMATS and isinstance(value, int | float) and not isinstance(value, bool):
        return FORMATS[key](value)
    return str(value).replace("|", "/")


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--budget", type=float, default=570, help="seconds for the whole check")
    p.add_argument("--kernel-budget", type=float, default=150,
                   help="seconds for building missing kernel packages (0: do not try)")  # fmt: skip
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per training run")
    p.add_argument("--size", default="small", help="model size preset of the training runs")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    p.add_argument("--out", default="experiments/results/gpu.md", help="report to write")
    p.add_argument("--skip", nargs="+", default=[], choices=["kernels", "tests", "matrix",
                   "train-1", "train-all"], help="steps to leave out")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    check = Check(
        out=ROOT / args.out, logs=ROOT / "runs" / "gpu_check" / stamp, budget=args.budget,
        kernel_budget=args.kernel_budget, steps_per_run=args.steps, size=args.size,
        peak=args.peak_tflops, dry_run=args.dry_run,
    )  # fmt: skip
    check.machine = describe_machine()
    gpus = check.machine["gpus"]
    check.peak = check.peak or peak_tflops(check.machine.get("gpu", ""))
    check.say(f"machine: {gpus} GPU(s) {check.machine.get('gpu', '')}; budget {args.budget:.0f} s")
    if not args.dry_run:
        check.logs.mkdir(parents=True, exist_ok=True)
    no_gpu = "" if gpus else "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    if no_gpu and not args.dry_run:
        print(f"gpu_check: {no_gpu}; nothing to check (try --dry-run)", file=sys.stderr)
        return 2
    plan: list[tuple[str, Callable[[Step], None], float, str]] = [
        ("kernels", lambda s: step_kernels(check, s), 40, ""),
        ("tests", lambda s: step_tests(check, s), 60, ""),
        ("matrix", lambda s: step_matrix(check, s), 60, ""),
        ("train-1", lambda s: step_train(check, s, 1, sample_shards(check, s)), 90, ""),
        ("train-all", lambda s: step_train(check, s, gpus, sample_shards(check, s)), 90,
         "" if gpus > 1 else f"the host has {gpus or 'no'} GPU (one-GPU runs above)"),
    ]  # fmt: skip
    for name, action, need, skip_reason in plan:
        step = Step(name)
        check.steps.append(step)
        if name in args.skip:
            step.status, step.why = "skipped", "--skip"
        elif skip_reason:
            step.status, step.why = "skipped", skip_reason
        elif check.left() < need:
            step.status, step.why = (
                "skipped",
                f"time budget: {check.left():.0f} s left, needs ~{need}",
            )
        else:
            check.say(f"step {name}")
            began = time.monotonic()
            try:
                action(step)
                if step.status == "planned":
                    step.status = "planned" if args.dry_run else "ok"
            except Exception as err:  # one step failing must not lose the others' results
                step.status, step.why = "failed", f"{type(err).__name__}: {err}"
            step.seconds = time.monotonic() - began
        if step.status == "skipped":
            check.say(f"skipped {name}: {step.why}")
    command = "launch/gpu_check.sh " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.dry_run:
        check.say(f"dry run: would write {check.out} (and {check.out.with_suffix('.json')})")
        return 0
    check.out.parent.mkdir(parents=True, exist_ok=True)
    check.out.write_text(render(check, command.strip()))
    data = {"command": command.strip(), "machine": check.machine,
            "steps": [s.__dict__ for s in check.steps]}  # fmt: skip
    check.out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    check.say(f"wrote {check.out}")
    failed = [s.name for s in check.steps if s.status == "failed"]
    if failed:
        check.say(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
