"""Benchmark ``nucleo serve``: requests per second and latency of /score, with and without
micro-batching, at several concurrencies.

    .venv/bin/python experiments/serving_bench.py                 # about 3 minutes on 2 cores
    .venv/bin/python experiments/serving_bench.py --export runs/demo/export --requests 400

Without ``--export`` it writes a fresh export of the demo's model (a causal transformer, d_model
128, 4 layers, 0.8M parameters, random weights: speed does not depend on them) to a temporary
folder. Each request scores one real 1 kb window of phage lambda. For each round, each server
configuration (micro-batched; ``--no-batching``) runs in its own ``nucleo serve`` process,
the two interleaved, and each concurrency level is one client process (asyncio, one keep-alive
connection per concurrent client, so the client's cost stays small beside the server's) that
sends ``--requests`` requests after a warm-up and reports requests/s, p50/p99 latency and the
errors (anything but 200; zero expected). The median over rounds is reported.

Writes experiments/results/serving.md (and .json) with the command, machine and date.
Wall-clock numbers: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4"]  # the demo's
LAMBDA = ROOT / "data_pipeline" / "sample" / "viral" / "lambda.fasta.gz"


# ----------------------------------------------------------------------------- the client


async def _one_connection(
    host: str, port: int, bodies: list[bytes], next_index: list[int], out: list[tuple[float, int]]
) -> None:
    """Send bodies (taken in turn from the shared list) over one keep-alive connection."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while next_index[0] < len(bodies):
            body = bodies[next_index[0]]
            next_index[0] += 1
            started = time.perf_counter()
            writer.write(
                b"POST /score HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status = -1
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
            except (OSError, ValueError, StopIteration, asyncio.IncompleteReadError):
                out.append((time.perf_counter() - started, status))
                return
            out.append((time.perf_counter() - started, status))
    finally:
        writer.close()


async def _load(url: str, bodies: list[bytes], concurrency: int) -> list[tuple[float, int]]:
    host, port = url.removeprefix("http://").split(":")
    out: list[tuple[float, int]] = []
    index = [0]
    await asyncio.gather(
        *(_one_connection(host, int(port), bodies, index, out) for _ in range(concurrency))
    )
    return out


def client(url: str, concurrency: int, requests: int, seqs: list[str]) -> dict:
    """Warm up (2 x concurrency requests), then time ``requests`` requests."""
    bodies = [json.dumps({"sequences": [seqs[i % len(seqs)]]}).encode() for i in range(requests)]
    asyncio.run(_load(url, bodies[: 2 * concurrency], concurrency))
    started = time.perf_counter()
    done = asyncio.run(_load(url, bodies, concurrency))
    wall = time.perf_counter() - started
    latencies = sorted(t for t, status in done if status == 200)
    errors = sum(status != 200 for _, status in done) + (requests - len(done))

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "requests": requests,
        "errors": errors,
        "seconds": wall,
        "rps": len(latencies) / wall,
        "p50_ms": pct(0.50) if latencies else float("nan"),
        "p99_ms": pct(0.99) if latencies else float("nan"),
    }


# ----------------------------------------------------------------------------- the servers


def make_export(folder: Path) -> Path:
    import torch

    from data_pipeline.tokenizers import CharTokenizer
    from nucleo.train.components import build_model
    from nucleo.train.config import load_config
    from nucleo.train.export import export_model

    cfg = load_config(arch="transformer", overrides=MODEL)
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = build_model(cfg.arch, cfg.model, tokenizer)
    return export_model(model.state_dict(), cfg, tokenizer, folder / "export")


def windows(length: int, count: int) -> list[str]:
    from data_pipeline.readers import read_sequences

    (record,) = read_sequences(LAMBDA)
    seq = bytes(record.seq).decode()
    return [seq[i * length : (i + 1) * length] for i in range(min(count, len(seq) // length))]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    export: Path, batching: bool, args: argparse.Namespace
) -> tuple[subprocess.Popen, str, dict]:
    """A ``nucleo serve`` process on a free port, once it answers /health: (process, URL,
    its /health answer)."""
    port = free_port()
    command = [
        sys.executable, "-m", "nucleo", "serve", str(export), "--port", str(port),
        "--device", args.device, "--max-batch", str(args.max_batch),
        "--batch-wait-ms", str(args.batch_wait_ms), "--max-length", str(args.length),
        *([] if batching else ["--no-batching"]),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"nucleo serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                return proc, url, json.loads(answer.read())
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("nucleo serve did not answer /health in 120 s") from None
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_client(url: str, concurrency: int, args: argparse.Namespace, seqs_file: Path) -> dict:
    """One client process (so the client's Python does not share the server's GIL)."""
    command = [
        sys.executable, __file__, "--client", url, "--concurrency", str(concurrency),
        "--requests", str(args.requests), "--sequences", str(seqs_file),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the report


def report(results: dict, meta: dict, record: dict, out: Path) -> None:
    from experiments.report import header, write

    lines = [
        "# Serving: requests per second and latency of `nucleo serve`",
        "",
        *header(record),
        f"- model: {meta['model']}",
        f"- each request: POST /score of one {meta['length']}-base window of phage lambda; "
        f"{meta['requests']} timed requests per cell after a warm-up, median of "
        f"{meta['rounds']} round(s); the two server configurations in separate processes, "
        "interleaved",
        f"- micro-batched: `--max-batch {meta['max_batch']} --batch-wait-ms "
        f"{meta['batch_wait_ms']:g}`; unbatched: `--no-batching` (each request its own forward "
        "pass)",
        "",
        "| concurrency | server | requests/s | p50 ms | p99 ms | errors |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for concurrency in meta["concurrency"]:
        for mode in ("micro-batched", "unbatched"):
            cell = results[mode][str(concurrency)]
            lines.append(
                f"| {concurrency} | {mode} | {cell['rps']:.1f} | {cell['p50_ms']:.1f} | "
                f"{cell['p99_ms']:.1f} | {cell['errors']} |"
            )
    lines += ["", "Speed-up of micro-batching (requests/s, batched / unbatched):", ""]
    for concurrency in meta["concurrency"]:
        ratio = (
            results["micro-batched"][str(concurrency)]["rps"]
            / results["unbatched"][str(concurrency)]["rps"]
        )
        lines.append(f"- concurrency {concurrency}: {ratio:.2f}x")
    errors = sum(c["errors"] for server in results.values() for c in server.values())
    lines += [
        "",
        f"Errors over every cell: {errors}. Where the device is a CPU, one forward pass of a "
        "1,000-base window already keeps every core busy, so a batch of n windows costs about "
        "n times one: micro-batching saves only the per-request overhead (Python, tokenizing, "
        "the hand-off to the model thread), and latency grows with concurrency as requests "
        "queue. On a GPU, where a batch costs little more than one window, it is the "
        "configuration that scales (not measured here).",
    ]
    write(out, lines, {"record": record, "meta": meta, "results": results})


def median_cell(cells: list[dict]) -> dict:
    keys = ("rps", "p50_ms", "p99_ms", "seconds")
    out = {k: statistics.median(c[k] for c in cells) for k in keys}
    out["errors"] = sum(c["errors"] for c in cells)
    out["requests"] = sum(c["requests"] for c in cells)
    out["rounds"] = [{k: c[k] for k in keys} for c in cells]
    return out


def main() -> None:
    from experiments.report import RESULTS, run_record

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--export", type=Path, help="a causal export (default: a fresh demo model)")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per cell")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both servers, interleaved")
    ap.add_argument("--length", type=int, default=1000, help="bases per sequence")
    ap.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="its --batch-wait-ms")
    ap.add_argument("--device", default="auto", help="the servers' --device")
    ap.add_argument("--out", type=Path, default=RESULTS / "serving.md", help="report to write")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run one client
    ap.add_argument("--sequences", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        seqs = json.loads(args.sequences.read_text())
        print(json.dumps(client(args.client, int(args.concurrency), args.requests, seqs)))
        return

    record = run_record()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        export = args.export or make_export(Path(tmp))
        seqs_file = Path(tmp) / "sequences.json"
        seqs_file.write_text(json.dumps(windows(args.length, 48)))
        cells: dict[str, dict[str, list[dict]]] = {"micro-batched": {}, "unbatched": {}}
        model = ""
        for round_ in range(args.rounds):
            for mode in ("micro-batched", "unbatched"):
                proc, url, health = start_server(export, mode == "micro-batched", args)
                model = (
                    f"{health['arch']} ({health['parameters'] / 1e6:.2f}M parameters, "
                    f"{health['tokenizer']} tokenizer) on {health['device']}"
                )
                try:
                    for level in levels:
                        cell = run_client(url, level, args, seqs_file)
                        cells[mode].setdefault(str(level), []).append(cell)
                        print(
                            f"round {round_ + 1}/{args.rounds} | {mode} | concurrency {level} | "
                            f"{cell['rps']:.1f} req/s | p50 {cell['p50_ms']:.1f} ms | p99 "
                            f"{cell['p99_ms']:.1f} ms | errors {cell['errors']}",
                            flush=True,
                        )
                finally:
                    stop_server(proc)
    results = {mode: {k: median_cell(v) for k, v in by.items()} for mode, by in cells.items()}
    meta = {
        "model": model,
        "length": args.length,
        "requests": args.requests,
        "rounds": args.rounds,
        "concurrency": levels,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
    }
    report(results, meta, record, args.out)


if __name__ == "__main__":
    main()
