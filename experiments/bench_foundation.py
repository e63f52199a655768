"""Benchmark the foundation: reading, sharding, loading, training throughput, the demo.

    .venv/bin/python experiments/bench_foundation.py       # everything (~10 minutes on 2 cores)
    .venv/bin/python experiments/bench_foundation.py --skip-demo
    .venv/bin/python experiments/bench_foundation.py --demo-run runs/<name>   # a finished demo run

Writes experiments/results/foundation.md (and .json) with the command, the machine and the date.
Run it on an otherwise idle machine: every number is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nucleo.core.runtime import configure_threads  # noqa: E402

configure_threads()

import deepspeed  # noqa: E402

from data_pipeline.loader import DataConfig, TrainLoader, validation_windows  # noqa: E402
from data_pipeline.readers import read_sequences  # noqa: E402
from data_pipeline.shards import build_shards, read_sources_tsv  # noqa: E402
from data_pipeline.tokenizers import CharTokenizer  # noqa: E402
from experiments.report import RESULTS, header, run_record, write  # noqa: E402

SAMPLE = ROOT / "data_pipeline" / "sample"
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def bench_reading() -> dict[str, float]:
    path = SAMPLE / "bacteria" / "E_coli_536.fna.xz"
    started = time.perf_counter()
    bases = sum(len(r) for r in read_sequences(path))
    seconds = time.perf_counter() - started
    return {
        "file": str(path.relative_to(ROOT)),
        "bases": bases,
        "seconds": round(seconds, 3),
        "mbases_per_second": round(bases / seconds / 1e6, 1),
    }


def bench_sharding(out: Path) -> dict[str, float]:
    sources = read_sources_tsv(SAMPLE / "sources.tsv")
    started = time.perf_counter()
    manifest = build_shards(sources, out, log=lambda _: None, overwrite=True)
    seconds = time.perf_counter() - started
    bases = sum(r["length"] for r in manifest["records"])
    return {
        "records": len(manifest["records"]),
        "bases": bases,
        "seconds": round(seconds, 2),
        "mbases_per_second": round(bases / seconds / 1e6, 1),
    }


def bench_loader(shards: Path, workers: int, batches: int = 300) -> dict[str, float]:
    cfg = DataConfig(shards=str(shards), seq_len=512, num_workers=workers)
    loader = iter(TrainLoader(cfg, CharTokenizer(), batch_size=16, seed=0))
    next(loader)  # worker start-up
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - started
    loader.close()  # stop the workers before the next measurement
    windows = batches * 16
    return {
        "workers": workers,
        "windows_per_second": round(windows / seconds),
        "tokens_per_second": round(windows * 512 / seconds),
    }


def bench_validation_draw(shards: Path) -> dict[str, float]:
    cfg = DataConfig(shards=str(shards), seq_len=512)
    started = time.perf_counter()
    tokens, _, _ = validation_windows(cfg, CharTokenizer(), 32, seed=0)
    return {"windows": len(tokens), "seconds": round(time.perf_counter() - started, 3)}


def train(shards: Path, runs: Path, procs: int, steps: int, extra: list[str]) -> dict:
    name = f"bench-{procs}p-{int(time.time())}"
    sets = [
        f"data.shards={shards}",
        f"run.root={runs}",
        f"run.name={name}",
        f"train.max_steps={steps}",
        *extra,
    ]
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        str(procs),
        "launch/pretrain.py",
        "--config",
        "experiments/configs/demo.yaml",
    ]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("OMP_NUM_THREADS", None)  # let each process take its share of the cores
    env.pop("MKL_NUM_THREADS", None)
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    summary = json.loads((runs / name / "summary.json").read_text())
    summary["launcher_wall_seconds"] = round(wall, 1)
    summary["command"] = " ".join(["deepspeed", *cmd[1:]])
    return summary


def report(results: dict) -> list[str]:
    lines = [
        "# Foundation benchmarks",
        "",
        *header(results),
        "",
        "## Data",
        "",
        "| what | result |",
        "|---|---|",
    ]
    r = results["reading"]
    lines.append(
        f"| read {r['file']} ({r['bases']:,} bases, xz) | {r['seconds']} s, "
        f"{r['mbases_per_second']} Mbases/s |"
    )
    s = results["sharding"]
    lines.append(
        f"| `nucleo data build` of the sample ({s['records']} records, {s['bases']:,} "
        f"bases) | {s['seconds']} s, {s['mbases_per_second']} Mbases/s |"
    )
    for lo in results["loader"]:
        lines.append(
            f"| loader, {lo['workers']} worker(s), 16 x 512 windows | "
            f"{lo['windows_per_second']:,} windows/s = {lo['tokens_per_second']:,} tokens/s |"
        )
    v = results["validation_draw"]
    lines.append(f"| draw the fixed validation set ({v['windows']} windows) | {v['seconds']} s |")
    lines += [
        "",
        "## Training throughput (demo model: 0.8M-parameter transformer, 512-base "
        "windows, global batch 16, fp32, ZeRO 0, 80 steps, no validation)",
        "",
        "| processes x threads | tokens/s (training), each run in order |",
        "|---|---|",
    ]
    for procs in sorted({t["procs"] for t in results["training"]}):
        runs = [t for t in results["training"] if t["procs"] == procs]
        rates = ", ".join(f"{t['tokens_per_second']:,}" for t in runs)
        lines.append(f"| {procs} x {runs[0]['threads']} | {rates} |")
    lines += ["", "Commands (the run name and temporary paths vary):", ""]
    for procs in sorted({t["procs"] for t in results["training"]}):
        run = next(t for t in results["training"] if t["procs"] == procs)
        lines.append(f"    {run['command']}")
    if "demo" in results:
        d = results["demo"]
        val = d["final_validation"]
        lines += [
            "",
            "## The README demo",
            "",
            f"- command: `{d['command']}` (on a fresh clone: no .venv, no pip cache), "
            f"finished {d.get('finished', 'unknown')}",
            f"- {d['step']} steps, {d['tokens']:,} tokens; "
            f"wall time {d['launcher_wall_seconds']} s "
            f"for the command (training {d['train_seconds']} s, validation "
            f"{d['validation_seconds']} s); {d['tokens_per_second']:,} tokens/s while training",
            f"- validation bits per base: {d['first_bits_per_base']:.4f} at step 0 -> "
            f"{val['val/bits_per_base']:.4f} at step {d['step']}",
            "",
            "| kingdom | bits per base, step 0 | final |",
            "|---|---|---|",
        ]
        for key, value in sorted(val.items()):
            if key.startswith("val/bits_per_base/"):
                kingdom = key.rsplit("/", 1)[1]
                lines.append(
                    f"| {kingdom} | {d['first_per_kingdom'].get(kingdom, float('nan')):.3f} "
                    f"| {value:.3f} |"
                )
    return lines


def first_validation(runs: Path, run_id: str) -> tuple[float, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs.resolve() / 'mlflow.db'}")
    run = client.get_run(run_id)
    first = {}
    for key in run.data.metrics:
        if key.startswith("val/bits_per_base"):
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            first[key] = history[0].value
    per_kingdom = {k.rsplit("/", 1)[1]: v for k, v in first.items() if k.count("/") == 2}
    return first["val/bits_per_base"], per_kingdom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--demo-run", type=Path, help="report this finished demo run instead")
    ap.add_argument("--demo-wall", type=float, help="wall seconds of that demo's command")
    ap.add_argument("--out", type=Path, default=RESULTS / "foundation.md")
    args = ap.parse_args()
    results = run_record()
    results["machine"]["deepspeed"] = deepspeed.__version__
    work = Path(tempfile.mkdtemp(prefix="nucleo-bench-"))
    try:
        shards = work / "shards"
        results["reading"] = bench_reading()
        results["sharding"] = bench_sharding(shards)
        results["loader"] = [bench_loader(shards, w) for w in (0, 1, 2)]
        results["validation_draw"] = bench_validation_draw(shards)
        quick = [
            "eval.every=0",
            "checkpoint.every=0",
            "checkpoint.export=false",
            "tracking.enabled=false",
            "train.log_every=20",
        ]
        cores = int(results["machine"]["cores"])
        results["training"] = []
        for procs in (1, 2, 2, 1):  # alternated and repeated: this machine's noise is ~15%
            micro = 16 // procs
            summary = train(
                shards, work / "runs", procs, 80, [*quick, f"train.micro_batch_size={micro}"]
            )
            summary.update(procs=procs, threads=max(1, cores // procs))
            results["training"].append(summary)
        if args.demo_run:
            demo = json.loads((args.demo_run / "summary.json").read_text())
            demo["command"] = "launch/demo.sh"
            demo["launcher_wall_seconds"] = args.demo_wall or demo["wall_seconds"]
            runs = args.demo_run.parent
        elif not args.skip_demo:
            demo = train(shards, work / "runs", 1, 600, [])
            runs = work / "runs"
        if args.demo_run or not args.skip_demo:
            demo["first_bits_per_base"], demo["first_per_kingdom"] = first_validation(
                runs, demo["mlflow_run_id"]
            )
            results["demo"] = demo
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(args.out, report(results), results)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
