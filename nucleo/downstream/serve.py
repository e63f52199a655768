"""A real-time endpoint: ``nucleo serve MODEL`` answers JSON over HTTP (FastAPI on uvicorn).

    nucleo serve runs/demo/export --port 8000
    curl -s localhost:8000/score -d '{"sequences": ["ACGTACGT"]}' \\
         -H 'content-type: application/json'

MODEL: an export, a classifier or an MLflow model (``serve_model.load_served``). Routes, JSON
in and out: GET /health; POST /score (causal language models: log-likelihood in nats, bits per
base and tokens scored of each sequence, as ``nucleo score`` gives for a sequence of one
window); POST /embed (the mean of the final hidden states, as ``nucleo embed``); POST
/classify (classifiers: class probabilities and the predicted class, as ``nucleo predict``);
POST /generate (causal language models: ``nucleo.downstream.generate.sample``). Sequences are
read as the genome readers read them (any case; IUPAC codes become N, U becomes T). A route
the model cannot serve answers 404 with the reason; bad input 400 (413: a body over the
limit), with ``{"detail": "<what is wrong and what is valid>"}``.

Requests are micro-batched by one model-worker thread (``serve_model.Batcher``).
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_pipeline.readers import VALID_BASES, normalise_bases
from nucleo.downstream.serve_model import (
    DEFAULT_MAX_LENGTH,
    Batcher,
    Row,
    Served,
    classify_rows,
    embed_rows,
    score_rows,
)

EXAMPLES = {
    "score": '{"sequences": ["ACGTACGT"]}',
    "embed": '{"sequences": ["ACGTACGT"]}',
    "classify": '{"sequences": ["ACGTACGT"]}',
    "generate": '{"prompt": "ACGT", "length": 100, "num": 1, "temperature": 1.0, "seed": 0}',
}


@dataclass
class Limits:
    """What one request may ask: tokens per sequence (the tokenizer's tokens; bases for the
    ``char`` tokenizer), sequences per request, bytes of the request body."""

    max_length: int = DEFAULT_MAX_LENGTH
    max_sequences: int = 64
    max_body_bytes: int = 1 << 20


# ----------------------------------------------------------------------------- requests


class SequencesRequest(BaseModel):
    """POST /score, /embed, /classify."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sequences: list[str]


class GenerateRequest(BaseModel):
    """POST /generate: ``num`` sequences of at least ``length`` new bases after ``prompt``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = ""
    length: int = Field(100, ge=1)
    num: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0


def _bad(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status, detail=message)


def _where(loc: tuple[Any, ...]) -> str:
    """("sequences", 2) -> ``sequences[2]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _validation_message(err: ValidationError, schema: type[BaseModel], example: str) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = _where(e["loc"])
        if e["type"] == "missing":
            parts.append(f"{where}: missing (e.g. {example})")
        elif e["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field (valid: {', '.join(schema.model_fields)})")
        else:
            msg = e["msg"]
            parts.append(f"{where}: {msg[:1].lower()}{msg[1:]}, got {json.dumps(e['input'])[:40]}")
    return "; ".join(parts)


async def parse(request: Request, schema: type[BaseModel], limits: Limits, example: str) -> Any:
    """The request's JSON body as ``schema``, read up to ``limits.max_body_bytes``; a clear
    400 (413: too large) otherwise."""
    too_big = _bad(
        f"request body over {limits.max_body_bytes} bytes (the server's --max-body-bytes); "
        "send fewer or shorter sequences",
        413,
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise too_big
    if not body.strip():
        raise _bad(f"empty body; send JSON, e.g. {example}")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise _bad(
            f"malformed JSON (line {err.lineno} column {err.colno}: {err.msg}); send e.g. {example}"
        ) from None
    except ValueError:  # bytes that are not UTF-8/16/32 text
        raise _bad(f"the body is not JSON text; send e.g. {example}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        got = kind.get(type(data), "a number")
        raise _bad(f"the body must be a JSON object, e.g. {example}; got {got}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise _bad(_validation_message(err, schema, example)) from None


def check_dna(text: str, where: str, empty_ok: bool = False) -> bytes:
    """``text`` normalised as the genome readers do (``normalise_bases``: upper case, IUPAC codes to
    N, U to T), or a 400 naming the first character that is not a base."""
    if not text and not empty_ok:
        raise _bad(f"{where}: empty sequence; give at least one base")
    clean, bad = normalise_bases(text)
    if bad >= 0:
        raise _bad(f"{where}[{bad}]: {text[bad]!r} is not a base; valid: {VALID_BASES}")
    return clean


def encode_checked(tokenizer: Any, seq: bytes, where: str, limits: Limits) -> np.ndarray:
    """Token ids [T] int64 of ``seq``; a 400 when T is over ``limits.max_length``."""
    ids = np.asarray(tokenizer.encode(seq), np.int64)
    if len(ids) > limits.max_length:
        raise _bad(
            f"{where}: {len(ids)} tokens ({len(seq)} bases), over the limit of "
            f"{limits.max_length} tokens per sequence (the server's --max-length)"
        )
    return ids


def sequences_of(req: SequencesRequest, limits: Limits) -> list[bytes]:
    if not req.sequences:
        raise _bad(f"sequences: empty list; give at least one, e.g. {EXAMPLES['score']}")
    if len(req.sequences) > limits.max_sequences:
        raise _bad(
            f"sequences: {len(req.sequences)} in one request, over the limit of "
            f"{limits.max_sequences} (the server's --max-sequences); split the request"
        )
    return [check_dna(s, f"sequences[{i}]") for i, s in enumerate(req.sequences)]


# ----------------------------------------------------------------------------- the app


def create_app(
    served: Served,
    limits: Limits,
    max_batch: int = 32,
    batch_wait_ms: float = 0.0,
    batching: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``served``; its model-worker thread lives as long as the app
    is being served (started and stopped by the app's lifespan)."""
    from nucleo.downstream.classifier import pool_windows, record_windows
    from nucleo.downstream.generate import sample

    tok, dev, backbone = served.tokenizer, served.device, served.backbone
    handlers = {
        "score": lambda rows: score_rows(backbone, tok, [r.ids for r in rows], dev),
        "embed": lambda rows: embed_rows(backbone, tok, [r.ids for r in rows], dev),
        "classify": lambda rows: classify_rows(served.model, tok, rows, dev),
    }

    def generate(p: dict[str, Any]) -> list[str]:
        seqs = sample(
            backbone, tok, p["num"], p["length"], p["prompt"], p["temperature"], p["top_k"],
            p["top_p"], p["seed"], limits.max_length, dev,
        )  # fmt: skip
        return [s.decode() for s in seqs]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = Batcher(
            handlers, {"generate": generate}, max_batch, batch_wait_ms / 1000, batching
        )
        yield
        app.state.batcher.close()

    app = FastAPI(title="nucleo", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = None
    available = ", ".join(f"/{r}" for r in ["health", *served.routes])

    def require(route: str) -> None:
        if route in served.routes:
            return
        needs = {
            "classify": "a classifier (a nucleo finetune output)",
            "score": "a causal language model export",
            "generate": "a causal language model export",
        }[route]
        raise _bad(
            f"/{route} needs {needs}; this server runs {served.describe()}; its routes: "
            f"{available}",
            404,
        )

    @app.exception_handler(404)
    async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
        detail = getattr(exc, "detail", "Not Found")
        if detail == "Not Found":
            detail = f"{request.url.path}: no such route; routes: {available}"
        return JSONResponse({"detail": detail}, status_code=404)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        """A failure of the server, not of the request (logged with its traceback)."""
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return JSONResponse({"detail": f"internal error ({what})"}, status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        batcher = app.state.batcher
        return JSONResponse(
            {
                "status": "ok",
                "model": served.source,
                "kind": served.kind,
                "arch": served.meta["arch"],
                "causal": served.causal,
                "tokenizer": served.meta.get("tokenizer"),
                "vocab_size": tok.vocab_size,
                "parameters": sum(p.numel() for p in served.model.parameters()),
                "device": str(dev),
                "routes": ["health", *served.routes],
                **({"classes": served.info["classes"]} if served.kind == "classifier" else {}),
                "limits": {
                    "max_length_tokens": limits.max_length,
                    "max_sequences": limits.max_sequences,
                    "max_body_bytes": limits.max_body_bytes,
                },
                "batching": {
                    "enabled": batching,
                    "max_batch": max_batch,
                    "wait_ms": batch_wait_ms,
                    "forward_passes": batcher.forward_passes if batcher else 0,
                },
            }
        )

    async def rows_of(request: Request, route: str) -> tuple[list[bytes], list[Row]]:
        require(route)
        req = await parse(request, SequencesRequest, limits, EXAMPLES[route])
        seqs = sequences_of(req, limits)
        ids = [encode_checked(tok, s, f"sequences[{i}]", limits) for i, s in enumerate(seqs)]
        return seqs, [Row(i) for i in ids]

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        seqs, rows = await rows_of(request, "score")
        results = await app.state.batcher.run("score", rows)
        results = [{"bases": len(s), **r} for s, r in zip(seqs, results, strict=True)]
        return JSONResponse({"results": results})

    @app.post("/embed")
    async def embed(request: Request) -> JSONResponse:
        _seqs, rows = await rows_of(request, "embed")
        vectors = await app.state.batcher.run("embed", rows)
        return JSONResponse({"dim": len(vectors[0]), "embeddings": vectors})

    @app.post("/classify")
    async def classify(request: Request) -> JSONResponse:
        seqs, _rows = await rows_of(request, "classify")
        # as nucleo predict: windows of the fine-tuning length, token-weighted mean
        rc, cut = bool(served.info.get("rc_conjoin")), served.info["max_tokens"]
        rows, weights = [], []
        for seq in seqs:
            pieces, flipped, weight = record_windows(tok, seq, cut, None, rc)
            strands = flipped or [None] * len(pieces)
            rows += [Row(i, f) for i, f in zip(pieces, strands, strict=True)]
            weights.append(weight)
        window_probs = await app.state.batcher.run("classify", rows)
        probs = pool_windows(np.asarray(window_probs), weights)
        classes = served.info["classes"]
        results = [
            {
                "prediction": classes[int(np.argmax(p))],
                "probabilities": dict(zip(classes, p, strict=True)),
            }
            for p in probs
        ]
        return JSONResponse({"classes": classes, "results": results})

    @app.post("/generate")
    async def generate_route(request: Request) -> JSONResponse:
        require("generate")
        req = await parse(request, GenerateRequest, limits, EXAMPLES["generate"])
        prompt = check_dna(req.prompt, "prompt", empty_ok=True)
        encode_checked(tok, prompt, "prompt", limits)
        if req.length > limits.max_length:
            raise _bad(f"length: {req.length} bases, over the limit of {limits.max_length} "
                       "(the server's --max-length)")  # fmt: skip
        if req.num > limits.max_sequences:
            raise _bad(f"num: {req.num}, over the limit of {limits.max_sequences} "
                       "(the server's --max-sequences)")  # fmt: skip
        params = {**req.model_dump(), "prompt": prompt}
        seqs = await app.state.batcher.run("generate", [], params)
        return JSONResponse({"prompt": prompt.decode(), "sequences": seqs})

    return app


# ----------------------------------------------------------------------------- the server


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host``:``port`` (0: a free port), or a one-line error."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: not an address ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another "
            "--port (0: any free one)"
        ) from None
    return sock


def make_server(app: FastAPI, access_log: bool = False) -> Any:
    """A uvicorn.Server for ``app``: ``server.run(sockets=[bind(...)])`` serves until
    Ctrl+C / SIGTERM (or ``server.should_exit = True`` from another thread)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
