"""Benchmark ``nucleo generate``: bases per second with and without the decoding cache, per
causal family, at a 1k-token context.

    .venv/bin/python experiments/generation_bench.py                    # tens of minutes, 2 cores
    .venv/bin/python experiments/generation_bench.py --families transformer,mamba --rounds 1
    .venv/bin/python experiments/generation_bench.py --prompt 50 --new 8 --batches 1 \\
        --rounds 1 --out /tmp/generation.md                             # a smoke test

One model of about 1M parameters per family (random weights: speed does not depend on them),
prompts of ``--prompt`` bases of phage lambda (different windows in a batch), ``--new`` new
bases each, sampled at temperature 1 with ``window`` 1024 (as ``nucleo generate`` for a model of
max_len 1024). Each configuration (family x batch x cached/uncached) runs in its own process
with the same thread count, the configurations interleaved within each round; the median
over rounds is reported. In each process: a warm-up, then the time to the first new base (the
prompt's forward pass, or prefill), then the whole sample. ``same tokens`` compares, per
family and batch, the bases the two modes drew while the context was within the window
(cached and uncached must agree there).

Writes experiments/results/generation.md (and .json) with the command, machine and date.
Wall-clock numbers: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: about 1M parameters each (d_model, depth), the families' default settings otherwise
MODELS: dict[str, list[str]] = {
    "transformer": ["model.d_model=128", "model.n_layers=5", "model.n_heads=4"],
    "hyena": ["model.d_model=128", "model.n_layers=4"],
    "mamba": ["model.d_model=128", "model.n_layers=8"],
    "multires": ["model.d_model=256", "model.n_layers=6"],
    "hybrid": [
        "model.d_model=128", "model.n_layers=4", "model.pattern=[hyena,mamba,attention,multires]",
    ],
}  # fmt: skip
LAMBDA = ROOT / "data_pipeline" / "sample" / "viral" / "lambda.fasta.gz"
WINDOW = 1024
TARGET = {"transformer": 10.0, "mamba": 10.0}  # the target speed-ups


# ----------------------------------------------------------------------------- one configuration


def prompts(length: int, count: int) -> list[bytes]:
    """``count`` different windows of ``length`` bases of phage lambda (N-free)."""
    from data_pipeline.readers import read_sequences

    (record,) = read_sequences(LAMBDA)
    seq = bytes(record.seq)
    step = max(1, (len(seq) - length) // max(1, count))
    return [seq[i * step : i * step + length] for i in range(count)]


def one(family: str, batch: int, cached: bool, args: argparse.Namespace) -> dict:
    """Time one configuration in this process: warm-up, first base, whole sample."""
    import torch

    from data_pipeline.tokenizers import CharTokenizer
    from nucleo.downstream.generate import sample
    from nucleo.train.components import build_model
    from nucleo.train.config import load_config

    torch.set_num_threads(args.threads)
    cfg = load_config(arch=family, overrides=MODELS[family])
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = build_model(family, cfg.model, tokenizer).eval()
    from nucleo.core.device import resolve

    device = resolve(args.device)
    model = model.to(device)
    chosen = prompts(args.prompt, batch)
    settings = {"window": WINDOW, "device": device, "cache": cached, "seed": 0}

    def timed(length: int) -> tuple[float, list[bytes]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = sample(model, tokenizer, batch, length, chosen, **settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, out

    timed(2)  # warm-up: allocations, kernels, the compiled CPU ops
    first, _ = timed(1)
    seconds, seqs = timed(args.new)
    within = max(0, min(args.new, WINDOW - args.prompt))  # bases drawn inside the window
    digest = hashlib.sha1(b"|".join(s[:within] for s in seqs)).hexdigest()
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "bases_per_s": batch * args.new / seconds,
        "first_ms": 1000 * first,
        "step_ms": 1000 * (seconds - first) / max(1, args.new - 1),
        "within_window": within,
        "digest": digest,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def run_one(family: str, batch: int, cached: bool, args: argparse.Namespace) -> dict:
    """``one`` in a fresh process with ``--threads`` threads."""
    command = [
        sys.executable, __file__, "--one", f"{family}:{batch}:{int(cached)}",
        "--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.threads),
        "--device", args.device,
    ]  # fmt: skip
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{family} batch {batch} cached={cached} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the report


def median_cell(cells: list[dict]) -> dict:
    out = dict(cells[0])
    for key in ("seconds", "bases_per_s", "first_ms", "step_ms"):
        out[key] = statistics.median(c[key] for c in cells)
    out["rounds"] = [{k: c[k] for k in ("seconds", "bases_per_s")} for c in cells]
    return out


def report(results: dict, meta: dict, record: dict, out: Path) -> None:
    from experiments.report import header, write

    lines = [
        "# Generation: bases per second with and without the decoding cache",
        "",
        *header(record),
        f"- each configuration: {meta['prompt']}-base prompts of phage lambda, {meta['new']} new "
        f"bases per sequence, temperature 1, window {WINDOW} tokens (char tokenizer), "
        f"{meta['threads']} thread(s), on {meta['device']}; its own process, the "
        f"configurations interleaved, median of {meta['rounds']} round(s)",
        "- uncached: every new base reruns the model over the last window tokens "
        "(`nucleo generate --no-cache`); cached: the prompt once (prefill), then one token per "
        "step from each layer's state (architectures/incremental.py)",
        "- bases/s counts new bases of the whole batch and includes the prompt's pass; first "
        "base: the prompt's forward pass and one draw; per step: the rest, per new base",
        "- same tokens: the bases both modes drew while the context was within the window "
        "(the first window - prompt of them) are identical",
        "",
        "| family | parameters | batch | uncached bases/s | cached bases/s | speed-up | "
        "uncached ms/step | cached ms/step | first base ms (uncached / cached) | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for family in meta["families"]:
        for batch in meta["batches"]:
            plain, fast = (
                results[family][str(batch)]["uncached"],
                results[family][str(batch)]["cached"],
            )
            ratio = fast["bases_per_s"] / plain["bases_per_s"]
            same = "yes" if plain["digest"] == fast["digest"] else "NO"
            if not plain["within_window"]:
                same = "n/a (prompt fills the window)"
            lines.append(
                f"| {family} | {plain['parameters'] / 1e6:.2f}M | {batch} | "
                f"{plain['bases_per_s']:.1f} | {fast['bases_per_s']:.1f} | {ratio:.1f}x | "
                f"{plain['step_ms']:.1f} | {fast['step_ms']:.2f} | "
                f"{plain['first_ms']:.0f} / {fast['first_ms']:.0f} | {same} |"
            )
            if family in TARGET:
                met = "met" if ratio >= TARGET[family] else "NOT met"
                verdicts.append(
                    f"- {family}, batch {batch}: {ratio:.1f}x (target >= {TARGET[family]:g}x: "
                    f"{met})"
                )
    if verdicts:
        lines += ["", "Against the target (issue 20: >= 10x for transformer and mamba):", ""]
        lines += verdicts
    write(out, lines, {"record": record, "meta": meta, "results": results})


def main() -> None:
    from experiments.report import RESULTS, run_record

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--families", default=",".join(MODELS), help="comma-separated families")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (sequences)")
    ap.add_argument("--prompt", type=int, default=1000, help="prompt bases")
    ap.add_argument("--new", type=int, default=256, help="new bases per sequence")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every configuration")
    ap.add_argument("--threads", type=int, default=cores or 1, help="threads of every process")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--out", type=Path, default=RESULTS / "generation.md", help="report to write")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one configuration
    args = ap.parse_args()
    if args.one:
        family, batch, cached = args.one.split(":")
        print(json.dumps(one(family, int(batch), cached == "1", args)))
        return
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(MODELS))
    if unknown:
        raise SystemExit(f"--families: unknown {', '.join(unknown)}; have {', '.join(MODELS)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    record = run_record()
    cells: dict[str, dict[str, dict[str, list[dict]]]] = {}
    device = args.device
    for round_ in range(args.rounds):
        for family in families:
            for batch in batches:
                for mode in ("uncached", "cached"):
                    cell = run_one(family, batch, mode == "cached", args)
                    device = cell["device"]
                    by_batch = cells.setdefault(family, {}).setdefault(str(batch), {})
                    by_batch.setdefault(mode, []).append(cell)
                    print(
                        f"round {round_ + 1}/{args.rounds} | {family} | batch {batch} | {mode} | "
                        f"{cell['bases_per_s']:.1f} bases/s | {cell['step_ms']:.2f} ms/step",
                        flush=True,
                    )
    results = {
        family: {b: {m: median_cell(c) for m, c in modes.items()} for b, modes in by.items()}
        for family, by in cells.items()
    }
    meta = {
        "families": families, "batches": batches, "prompt": args.prompt, "new": args.new,
        "rounds": args.rounds, "threads": args.threads, "device": device, "window": WINDOW,
        "models": {f: MODELS[f] for f in families},
    }  # fmt: skip
    report(results, meta, record, args.out)


if __name__ == "__main__":
    main()
