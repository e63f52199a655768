"""Every family's training speed and memory on CPU, beside the published reference code.

    python experiments/bench_architectures.py                       # the full matrix (~70 min)
    python experiments/bench_architectures.py --families hyena,mamba --sizes tiny \\
        --lengths 1024 --precisions fp32 --rounds 1                 # a slice
    python experiments/bench_architectures.py --report-only         # rewrite the .md

One configuration per process, one thread, the same loop for every model: forward, next-token
cross-entropy, backward, AdamW step; tokens per CPU-second (``time.process_time``, so other jobs
on the machine hurt it less) over steps that add up to ``--min-time`` CPU seconds after one
warm-up step, and the process's peak resident memory. Every process gets the same allocator
settings (glibc keeps freed memory, as nucleo's trainer does by default: ``engine.cpu_allocator``),
the references included. Rounds are interleaved (A B C A B C); the report gives each number's
range over the rounds and each ratio's range over rounds measured side by side.

Configurations: every family (tiny and mini presets) x L 1k, 4k, 16k x fp32 and bf16 autocast,
batch 8192 / L sequences (8 at 1k, 2 at 4k, 1 at 16k); caduceus tiny at 4k with batch 8 for its
memory target; ``train.compile`` (each block torch.compiled) for every tiny family at 1k fp32,
with its compile time (the first step's wall time less a later step's).

References (``--refs``, default /tmp/ref, never committed): the published HyenaDNA code
(``standalone_hyenadna.py``) at hyena tiny's shape, every length and precision (bf16 through
torch.autocast, as nucleo's ``model.autocast``), and Mamba's sequential ``selective_scan_ref``
(d 128, 2 layers, beside nucleo's mamba at that shape) at 1k fp32. They are loaded by
``../shared/perfbench/refmodels.py`` (``--perfbench``); without either, they are left out.

Writes experiments/results/architectures.md and .json with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.report import RESULTS, header, run_record, write  # noqa: E402

FAMILIES = ["hyena", "transformer", "mamba", "caduceus", "multires", "hybrid"]
SIZES = ["tiny", "mini"]
LENGTHS = [1024, 4096, 16384]
PRECISIONS = ["fp32", "bf16"]
TOKENS_PER_STEP = 8192
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
OUT = RESULTS / "architectures"

Config = dict[str, Any]


# --------------------------------------------------------------------------- worker side


def build(cfg: Config):
    """(model, vocabulary size) of one configuration."""
    import torch

    kind, rest = cfg["model"].split(":", 1)
    if kind == "ref":
        sys.path.insert(0, cfg["perfbench"])
        import refmodels  # ../shared/perfbench: loads the code in /tmp/ref

        refmodels.REF = cfg["refs"]
        return refmodels.BUILDERS[rest](cfg["L"]), 12
    from data_pipeline.tokenizers import build_tokenizer
    from nucleo.core.registry import ARCHITECTURES
    from nucleo.core.schema import from_dict
    from nucleo.train.components import build_model

    family, size = rest.split(":")
    settings: dict[str, Any] = {"size": size, **cfg.get("sets", {})}
    if cfg["precision"] == "bf16":
        settings["autocast"] = "bf16"
    if family in ("hyena", "multires"):  # their filters are sized by max_len
        settings["max_len"] = cfg["L"]
    if family == "hybrid":
        settings.update(hyena={"max_len": cfg["L"]}, multires={"max_len": cfg["L"]})
    model_cfg = from_dict(ARCHITECTURES.get(family).config, settings, "model")
    tokenizer = build_tokenizer("char", {})
    model = build_model(family, model_cfg, tokenizer)
    torch.manual_seed(0)
    return model, tokenizer.vocab_size


def work(cfg: Config) -> Config:
    """Time one configuration in this process (one thread)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = build(cfg)
    if cfg.get("compile"):
        from nucleo.train.engine import compile_blocks

        compile_blocks(model)
    reference = cfg["model"].startswith("ref:")
    autocast = cfg["precision"] == "bf16" and reference  # nucleo models autocast themselves
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4)
    ids = torch.randint(0, 4, (cfg["B"], cfg["L"] + 1))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    wall = time.perf_counter()
    step()  # warm-up (and compilation)
    first = time.perf_counter() - wall
    times, walls = [], []
    while len(times) < cfg["min_steps"] or sum(times) < cfg["min_time"]:
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        times.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    per_step = statistics.median(times)
    params = {id(p): p.numel() for p in model.parameters()}
    return {
        **cfg,
        "params": sum(params.values()),
        "tok_per_cpu_s": cfg["B"] * cfg["L"] / per_step,
        "cpu_s_per_step": per_step,
        "steps": len(times),
        "compile_s": max(0.0, first - min(walls)) if cfg.get("compile") else None,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


# --------------------------------------------------------------------------- driver side


def configurations(args: argparse.Namespace) -> list[Config]:
    """Every configuration of one round, in the order each round runs them."""
    base = {"min_time": args.min_time, "min_steps": 2, "refs": args.refs,
            "perfbench": args.perfbench}  # fmt: skip
    refs = Path(args.refs, "standalone_hyenadna.py").is_file() and Path(args.perfbench).is_dir()
    mamba_ref = refs and Path(args.refs, "mamba").is_dir()
    out = []
    for length in args.lengths:
        batch = max(1, TOKENS_PER_STEP // length)
        for precision in args.precisions:
            for size in args.sizes:
                for family in args.families:
                    out.append({**base, "model": f"nucleo:{family}:{size}", "L": length,
                                "B": batch, "precision": precision})  # fmt: skip
            if refs and "hyena" in args.families:
                out.append({**base, "model": "ref:hyena_ref", "L": length, "B": batch,
                            "precision": precision})  # fmt: skip
    if 1024 in args.lengths and "fp32" in args.precisions and "tiny" in args.sizes:
        for family in args.families:
            out.append({**base, "model": f"nucleo:{family}:tiny", "L": 1024, "B": 8,
                        "precision": "fp32", "compile": True})  # fmt: skip
        if mamba_ref and "mamba" in args.families:
            for model in ("ref:mamba_ref", "nucleo:mamba:tiny"):
                out.append({**base, "model": model, "L": 1024, "B": 8, "precision": "fp32",
                            "sets": {"n_layers": 2}, "min_time": 0, "min_steps": 1,
                            "once": True})  # fmt: skip
    if 4096 in args.lengths and "caduceus" in args.families and "tiny" in args.sizes:
        out.append({**base, "model": "nucleo:caduceus:tiny", "L": 4096, "B": 8,
                    "precision": "fp32", "min_time": 0, "min_steps": 1})  # fmt: skip
    return out


def key(cfg: Config) -> str:
    sets = ",".join(f"{k}={v}" for k, v in sorted(cfg.get("sets", {}).items()))
    extra = (" " + sets if sets else "") + (" compiled" if cfg.get("compile") else "")
    return f"{cfg['model']} L{cfg['L']} B{cfg['B']} {cfg['precision']}{extra}"


def run_one(cfg: Config, timeout: float) -> Config:
    env = {**os.environ, **ALLOCATOR, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**cfg, "error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def measure(args: argparse.Namespace) -> list[Config]:
    todo = configurations(args)
    records: list[Config] = []
    failed: set[str] = set()
    total = len(todo) * args.rounds
    for r in range(args.rounds):
        for i, cfg in enumerate(todo, 1):
            if key(cfg) in failed or (r and cfg.get("once")):  # failed before; or too slow
                continue
            started = time.time()
            rec = {**run_one(cfg, args.timeout), "round": r}
            records.append(rec)
            if "error" in rec:
                failed.add(key(cfg))
                what = rec["error"]
            else:
                what = f"{rec['tok_per_cpu_s']:8.0f} tok/CPU-s  {rec['peak_gb']:.2f} GB"
                if rec.get("compile_s") is not None:
                    what += f"  compile {rec['compile_s']:.0f} s"
            done = r * len(todo) + i
            print(f"[{done}/{total}] {key(cfg):<52} {what}  ({time.time() - started:.0f} s)",
                  flush=True)  # fmt: skip
    return records


# --------------------------------------------------------------------------- report


def _values(records: list[Config], k: str, field: str = "tok_per_cpu_s") -> list[float]:
    return [r[field] for r in records if key(r) == k and "error" not in r]


def _range(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return (
        fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"
    )


def ratios(records: list[Config], a: str, b: str) -> list[float]:
    """a / b per round, for the rounds that measured both."""
    by_round: dict[int, dict[str, float]] = {}
    for r in records:
        if "error" not in r and key(r) in (a, b):
            by_round.setdefault(r["round"], {})[key(r)] = r["tok_per_cpu_s"]
    return [v[a] / v[b] for v in by_round.values() if a in v and b in v]


def _error(records: list[Config], k: str) -> str:
    errors = [r["error"] for r in records if key(r) == k and "error" in r]
    return errors[0] if errors else ""


def report(records: list[Config], meta: dict[str, Any]) -> list[str]:
    lines = [
        "# Architectures: training speed and memory on CPU", "", *header(meta),
        f"- {meta['rounds']} rounds, interleaved; one configuration per process, one thread; "
        "the same loop for every model (forward, next-token cross-entropy, backward, AdamW); "
        f"glibc allocator settings {' '.join(f'{k}={v}' for k, v in ALLOCATOR.items())} for "
        "every process, references included",
        f"- batch {TOKENS_PER_STEP} / L sequences; tokens per CPU-second (range over rounds); "
        "peak resident memory of the process in GB (1e9 bytes), which includes Python and "
        "PyTorch (about 0.4 GB)", "",
    ]  # fmt: skip
    lengths = sorted({r["L"] for r in records if not r.get("compile") and "sets" not in r})
    for precision in ("fp32", "bf16"):
        for size in ("tiny", "mini"):
            rows = sorted(
                {r["model"] for r in records if r["precision"] == precision
                 and r["model"].endswith(f":{size}") and not r.get("compile") and "sets" not in r},
                key=lambda m: FAMILIES.index(m.split(":")[1]),
            )  # fmt: skip
            if not rows:
                continue
            if size == "tiny":
                rows.append("ref:hyena_ref")
            name = "fp32" if precision == "fp32" else "bf16 autocast"
            heads = " | ".join(f"L {n:,}: tok/CPU-s, GB, vs hyena tiny" for n in lengths)
            lines += [f"## {size} presets, {name}", "", f"| model | params | {heads} |",
                      "|---|---|" + "---|" * len(lengths)]  # fmt: skip
            for model in rows:
                cells = []
                params = ""
                for length in lengths:
                    batch = max(1, TOKENS_PER_STEP // length)
                    k = f"{model} L{length} B{batch} {precision}"
                    hyena = f"nucleo:hyena:tiny L{length} B{batch} {precision}"
                    tok = _values(records, k)
                    if not tok:
                        cells.append(_error(records, k) or "-")
                        continue
                    params = f"{_values(records, k, 'params')[0] / 1e6:.2f}M"
                    gb = _range(_values(records, k, "peak_gb"), "{:.2f}")
                    rel = _range(ratios(records, k, hyena), "{:.2f}")
                    cells.append(f"{_range(tok)}, {gb}, {rel}")
                label = "published HyenaDNA code" if model == "ref:hyena_ref" else model[7:]
                lines.append(f"| {label} | {params} | " + " | ".join(cells) + " |")
            lines.append("")
    compiled = [r for r in records if r.get("compile")]
    if compiled:
        lines += ["## train.compile (tiny, L 1,024, batch 8, fp32)", "",
                  "| family | eager tok/CPU-s | compiled tok/CPU-s | speed-up | compile time (s) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for family in FAMILIES:
            eager = f"nucleo:{family}:tiny L1024 B8 fp32"
            k = eager + " compiled"
            if not _values(records, k) and not _error(records, k):
                continue
            comp_s = _range(_values(records, k, "compile_s"))
            fast = _range(_values(records, k)) if _values(records, k) else _error(records, k)
            lines.append(f"| {family} | {_range(_values(records, eager))} | {fast} | "
                         f"{_range(ratios(records, k, eager), '{:.2f}')} | {comp_s} |")  # fmt: skip
        lines.append("")
    return lines + targets(records)


def targets(records: list[Config]) -> list[str]:
    """The issue's targets as measured ratios, met or not."""
    out = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]

    def row(what: str, values: list[float], ok, fmt: str = "{:.2f}") -> None:
        if values:
            out.append(f"| {what} | {_range(values, fmt)} | {'yes' if ok(values) else 'no'} |")

    for family, goal in (("mamba", 0.5), ("multires", 0.5), ("caduceus", 0.25)):
        for length in (1024, 4096):
            for precision in ("fp32", "bf16"):
                b = max(1, TOKENS_PER_STEP // length)
                a, h = (f"nucleo:{m}:tiny L{length} B{b} {precision}" for m in (family, "hyena"))
                row(f"{family} tiny / hyena tiny, L {length}, {precision} >= {goal}",
                    ratios(records, a, h), lambda v, g=goal: min(v) >= g)  # fmt: skip
    row(
        "caduceus tiny peak memory, L 4,096, batch 8, fp32 <= 3 GB (GB)",
        _values(records, "nucleo:caduceus:tiny L4096 B8 fp32", "peak_gb"),
        lambda v: max(v) <= 3,
    )
    for length in (1024, 16384):
        for precision in ("fp32", "bf16"):
            b = max(1, TOKENS_PER_STEP // length)
            a, ref = (
                f"{m} L{length} B{b} {precision}" for m in ("nucleo:hyena:tiny", "ref:hyena_ref")
            )
            row(f"hyena tiny / published HyenaDNA, L {length}, {precision} >= 1.5",
                ratios(records, a, ref), lambda v: min(v) >= 1.5)  # fmt: skip
            if length == 16384:
                mine, theirs = _values(records, a, "peak_gb"), _values(records, ref, "peak_gb")
                if mine and theirs:
                    out.append(f"| hyena tiny peak memory <= the reference's, L 16,384, "
                               f"{precision} | {max(mine):.2f} vs {min(theirs):.2f} GB | "
                               f"{'yes' if max(mine) <= min(theirs) else 'no'} |")  # fmt: skip
    ref, mine = (
        "ref:mamba_ref L1024 B8 fp32 n_layers=2",
        "nucleo:mamba:tiny L1024 B8 fp32 n_layers=2",
    )
    row("mamba (d 128, 2 layers) / Mamba's sequential reference, L 1,024, fp32",
        ratios(records, mine, ref), lambda v: True, "{:.1f}")  # fmt: skip
    return [*out, ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-time", type=float, default=3.0, help="CPU seconds of timed steps")
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--refs", default="/tmp/ref", help="the reference code (see the docstring)")
    p.add_argument("--perfbench", default=str(ROOT.parent / "shared" / "perfbench"))
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(work(json.loads(args.worker))), flush=True)
        return 0
    if args.report_only:
        data = json.loads(OUT.with_suffix(".json").read_text())
        write(OUT.with_suffix(".md"), report(data["records"], data["meta"]))
        return 0
    args.families = args.families.split(",")
    args.sizes = args.sizes.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.precisions = args.precisions.split(",")
    meta = {**run_record(), "rounds": args.rounds}
    records = measure(args)
    write(OUT.with_suffix(".md"), report(records, meta), {"meta": meta, "records": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
