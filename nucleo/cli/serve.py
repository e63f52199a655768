"""``nucleo serve MODEL``: a model behind a JSON HTTP endpoint (nucleo.downstream.serve).

    nucleo serve runs/demo/export --port 8000
    nucleo serve runs/finetune/kingdom-0 --max-batch 64
    nucleo serve models:/dna-lm/3 --tracking-uri sqlite:///runs/mlflow.db

Imports nothing heavy: fastapi, uvicorn and torch load when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nucleo.cli.common import add_device, add_store, at_least, number


def cmd_serve(args: argparse.Namespace) -> int:
    from nucleo.downstream.serve import Limits, bind, create_app, make_server, url_of
    from nucleo.downstream.serve_model import default_max_length, load_served

    sock = bind(args.host, args.port)  # a taken port fails before the model loads
    served = load_served(args.model, args.device, args.tracking_uri, args.runs_root)
    limits = Limits(
        args.max_length or default_max_length(served), args.max_sequences, args.max_body_bytes
    )
    app = create_app(served, limits, args.max_batch, args.batch_wait_ms, not args.no_batching)
    server = make_server(app, access_log=args.access_log)
    batching = (
        f"micro-batches of up to {args.max_batch} sequences, {args.batch_wait_ms:g} ms wait"
        if not args.no_batching
        else "no batching (each request alone)"
    )
    print(
        f"serving {args.model}: {served.describe()} on {served.device} at {url_of(sock)} | "
        f"routes /health {' '.join('/' + r for r in served.routes)} | up to "
        f"{limits.max_sequences} sequences of {limits.max_length} tokens per request | "
        f"{batching} | Ctrl+C stops",
        file=sys.stderr,
        flush=True,
    )
    server.run(sockets=[sock])
    return 0


def add_commands(sub: Any) -> None:
    """Register ``serve`` on nucleo's subparsers."""
    p = sub.add_parser("serve", help="serve a model over HTTP (JSON: /score /embed /classify "
                       "/generate /health)")  # fmt: skip
    p.add_argument("model", help="an export folder, a classifier folder (nucleo finetune "
                   "output), or an MLflow model: models:/NAME/VERSION, models:/NAME@ALIAS, "
                   "runs:/RUN_ID/model")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every "
                   "interface)")  # fmt: skip
    p.add_argument("--port", type=at_least(0), default=8000, help="TCP port (0: any free one)")
    add_device(p)
    p.add_argument("--max-length", type=at_least(2), metavar="TOKENS",
                   help="tokens per sequence, longer ones are refused (bases for the char "
                   "tokenizer; default: a classifier's fine-tuning length, else 1024)")  # fmt: skip
    p.add_argument("--max-sequences", type=at_least(1), default=64, metavar="N",
                   help="sequences per request (and /generate's num)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=at_least(1), default=1 << 20, metavar="BYTES",
                   help="request body size")  # fmt: skip
    p.add_argument("--max-batch", type=at_least(1), default=32, metavar="N",
                   help="sequences per forward pass, from concurrent requests")  # fmt: skip
    p.add_argument("--batch-wait-ms", type=number(0), default=0.0, metavar="MS",
                   help="how long a batch's first request waits for others (0: none; requests "
                        "that queue while the model is busy still share a pass)")  # fmt: skip
    p.add_argument("--no-batching", action="store_true", help="run each request alone (one "
                   "request, one forward pass)")  # fmt: skip
    p.add_argument("--access-log", action="store_true", help="a line per request on stderr")
    add_store(p, tags=False)
    p.set_defaults(func=cmd_serve)
