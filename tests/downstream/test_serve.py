"""nucleo serve: the real server on 127.0.0.1 (an ephemeral port), real HTTP. Every route's
numbers equal nucleo's own functions; bad input gets a 4xx that says what is wrong; concurrent
requests are micro-batched and still answer exactly what they answer alone."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli.main import main
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.downstream.classifier import (
    SequenceClassifier,
    encode_all,
    load_classifier,
    predict_proba,
    save_classifier,
)
from nucleo.downstream.generate import sample
from nucleo.downstream.inference import embed_sequence, log_likelihood
from nucleo.downstream.serve import Limits, bind, create_app, make_server, url_of
from nucleo.downstream.serve_model import load_served, resolve_model
from nucleo.studies.precision import TINY
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model, load_exported
from tests.conftest import DEVICE, ROOT

LIMITS = Limits(max_length=96, max_sequences=8, max_body_bytes=4096)


def _export(root: Path, name: str, overrides: list[str]) -> Path:
    cfg = load_config(arch="transformer", overrides=overrides)
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = build_model(cfg.arch, cfg.model, tokenizer)
    return export_model(model.state_dict(), cfg, tokenizer, root / name)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny causal transformer export, and a classifier on a bidirectional one (random
    weights: the arithmetic, not the quality)."""
    root = tmp_path_factory.mktemp("serve")
    lm = _export(root, "lm", TINY["transformer"])
    bi = _export(root, "bi", [*TINY["transformer"], "model.causal=false"])
    backbone, _tok, _meta = load_exported(bi)
    torch.manual_seed(1)
    classifier = SequenceClassifier(backbone, 32, 3)
    info = {"classes": ["phage", "plasmid", "yeast"], "max_tokens": 64, "rc_conjoin": True}
    return {"lm": lm, "classifier": save_classifier(classifier, bi, info, root / "clf")}


@contextlib.contextmanager
def serving(path: Path, limits: Limits = LIMITS, **batching) -> Iterator[str]:
    """``path`` served on 127.0.0.1:<free port> in a thread; yields the base URL."""
    served = load_served(str(path), str(DEVICE))
    sock = bind("127.0.0.1", 0)
    server = make_server(create_app(served, limits, **batching))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def call(url: str, route: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of GET ``route`` (no body) or POST of ``body`` as JSON."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        if body is None and raw is None:
            conn.request("GET", route)
        else:
            data = raw if raw is not None else json.dumps(body).encode()
            conn.request("POST", route, data, {"content-type": "application/json"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def _seqs(lengths: list[int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACGT"), n)) for n in lengths]


def test_a_language_model_scores_embeds_and_generates_as_nucleo_does(models):
    model, tok, _meta = load_exported(models["lm"], DEVICE)
    seqs = [*_seqs([40, 96, 7]), "acgunRYACGT", "A"]
    read_as = {"acgunRYACGT": "ACGTNNNACGT"}  # as the genome readers read it
    with serving(models["lm"]) as url:
        status, health = call(url, "/health")
        assert status == 200 and health["kind"] == "language model" and health["causal"]
        assert health["arch"] == "transformer" and health["vocab_size"] == tok.vocab_size
        assert health["routes"] == ["health", "score", "embed", "generate"]
        assert health["limits"]["max_length_tokens"] == 96

        status, scored = call(url, "/score", {"sequences": seqs})
        assert status == 200
        for seq, got in zip(seqs, scored["results"], strict=True):
            clean = read_as.get(seq, seq).encode()
            nats, n, bases = log_likelihood(model, tok, clean, 1024, 8, DEVICE)
            assert got["log_likelihood_nats"] == pytest.approx(nats, rel=1e-5, abs=1e-5)
            assert (got["tokens_scored"], got["bases_scored"], got["bases"]) == (
                n, bases, len(seq),
            )  # fmt: skip
            if n:
                bits = -nats / math.log(2) / bases
                assert got["bits_per_base"] == pytest.approx(bits, rel=1e-5)
        assert scored["results"][-1]["bits_per_base"] is None  # one base: nothing to score

        status, embedded = call(url, "/embed", {"sequences": seqs})
        assert status == 200 and embedded["dim"] == 32
        for seq, got in zip(seqs, embedded["embeddings"], strict=True):
            want = embed_sequence(model, tok, read_as.get(seq, seq).encode(), 1024, 8, DEVICE)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

        request = {"prompt": "acgta", "length": 12, "num": 2, "temperature": 0.8, "top_k": 3,
                   "seed": 7}  # fmt: skip
        status, generated = call(url, "/generate", request)
        want = sample(model, tok, 2, 12, b"ACGTA", 0.8, 3, 1.0, 7, 96, DEVICE)
        assert status == 200 and generated["sequences"] == [s.decode() for s in want]
        greedy = {"prompt": "acgta", "length": 12, "num": 1, "temperature": 0}
        status, generated = call(url, "/generate", greedy)
        want = sample(model, tok, 1, 12, b"ACGTA", 0.0, 0, 1.0, 0, 96, DEVICE)
        assert status == 200 and generated["sequences"] == [s.decode() for s in want]

        status, answer = call(url, "/classify", {"sequences": ["ACGT"]})
        assert status == 404 and "/classify needs a classifier" in answer["detail"]
        assert "/score" in answer["detail"]  # the routes this server has


def test_a_classifier_classifies_and_embeds_as_nucleo_does(models):
    clf, tok, info = load_classifier(models["classifier"], DEVICE)
    seqs = _seqs([64, 20, 5, 33], seed=1)
    with serving(models["classifier"], Limits(max_length=64)) as url:
        status, health = call(url, "/health")
        assert status == 200 and health["kind"] == "classifier" and not health["causal"]
        assert health["classes"] == info["classes"]
        assert health["routes"] == ["health", "classify", "embed"]

        status, answer = call(url, "/classify", {"sequences": seqs})
        assert status == 200 and answer["classes"] == info["classes"]
        raw = [s.encode() for s in seqs]
        ids = encode_all(tok, raw, 64)
        rc = encode_all(tok, [reverse_complement_bytes(s) for s in raw], 64)
        want = predict_proba(clf, ids, 1, tok.pad_id, DEVICE, rc)  # one at a time
        for got, p in zip(answer["results"], want, strict=True):
            np.testing.assert_allclose(list(got["probabilities"].values()), p, atol=1e-6)
            assert got["prediction"] == info["classes"][int(p.argmax())]

        status, embedded = call(url, "/embed", {"sequences": seqs})
        for seq, got in zip(raw, embedded["embeddings"], strict=True):
            want_vec = embed_sequence(clf.backbone, tok, seq, 1024, 1, DEVICE)
            np.testing.assert_allclose(got, want_vec, rtol=0, atol=1e-5)

        for route in ("/score", "/generate"):
            status, answer = call(url, route, {"sequences": ["ACGT"]})
            assert status == 404 and "needs a causal language model" in answer["detail"]


BAD = [  # (route, body or raw bytes, status, what the message says)
    ("/score", b"{not json", 400, "malformed JSON (line 1 column 2"),
    ("/score", b"", 400, "empty body; send JSON"),
    ("/score", ["ACGT"], 400, "the body must be a JSON object"),
    ("/score", {}, 400, "sequences: missing"),
    ("/score", {"sequence": ["ACGT"]}, 400, "sequence: unknown field (valid: sequences)"),
    ("/score", {"sequences": "ACGT"}, 400, "sequences: input should be a valid list"),
    ("/score", {"sequences": ["ACGT", 5]}, 400, "sequences[1]: input should be a valid string"),
    ("/score", {"sequences": []}, 400, "sequences: empty list"),
    ("/score", {"sequences": ["ACGT", ""]}, 400, "sequences[1]: empty sequence"),
    ("/embed", {"sequences": ["ACGT", "ACXGT"]}, 400,
     "sequences[1][2]: 'X' is not a base; valid: A C G T N (any case), IUPAC codes"),
    ("/score", {"sequences": ["ACGTé"]}, 400, "sequences[0][4]: 'é' is not a base"),
    ("/score", {"sequences": ["A" * 97]}, 400,
     "sequences[0]: 97 tokens (97 bases), over the limit of 96 tokens per sequence"),
    ("/score", {"sequences": ["A"] * 9}, 400, "9 in one request, over the limit of 8"),
    ("/score", {"sequences": ["A" * 90] * 60}, 413, "request body over 4096 bytes"),
    ("/generate", {"prompt": "ACG*"}, 400, "prompt[3]: '*' is not a base"),
    ("/generate", {"temperature": -1}, 400, "temperature: input should be greater than or equal"),
    ("/generate", {"length": 97}, 400, "length: 97 bases, over the limit of 96"),
    ("/generate", {"num": "2"}, 400, "num: input should be a valid integer"),
    ("/nowhere", {}, 404, "/nowhere: no such route; routes: /health, /score"),
]  # fmt: skip


def test_bad_input_gets_a_4xx_that_says_what_is_wrong(models):
    with serving(models["lm"]) as url:
        for route, body, status, message in BAD:
            raw = body if isinstance(body, bytes) else None
            got, answer = call(url, route, None if raw is not None else body, raw)
            assert (got, message) == (status, message) and message in answer["detail"], (
                route, body, answer,
            )  # fmt: skip
        assert call(url, "/health")[0] == 200  # still serving


def test_concurrent_requests_are_micro_batched_and_exact(models):
    model, tok, _meta = load_exported(models["lm"], DEVICE)
    seqs = _seqs([int(n) for n in np.random.default_rng(2).integers(2, 97, 32)], seed=3)
    alone = [log_likelihood(model, tok, s.encode(), 1024, 1, DEVICE)[0] for s in seqs]

    def score_all(url: str) -> list[float]:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda s: call(url, "/score", {"sequences": [s]}), seqs))
        assert all(status == 200 for status, _ in answers), answers
        return [a["results"][0]["log_likelihood_nats"] for _, a in answers]

    for batching, wait in ((True, 50.0), (False, 0.0)):
        with serving(models["lm"], batching=batching, batch_wait_ms=wait, max_batch=32) as url:
            got = score_all(url)
            passes = call(url, "/health")[1]["batching"]["forward_passes"]
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)
        if batching:
            assert passes < len(seqs), f"{passes} forward passes for {len(seqs)} requests"
        else:
            assert passes == len(seqs)


def test_the_command_fails_in_one_line_before_serving(models, capsys):
    assert main(["serve", str(models["lm"].parent / "missing")]) == 2
    assert "missing: no such folder; give an export folder" in capsys.readouterr().err
    taken = bind("127.0.0.1", 0)
    taken.listen()
    try:
        port = str(taken.getsockname()[1])
        assert main(["serve", str(models["lm"]), "--port", port]) == 2
        err = capsys.readouterr().err
        assert f"--port {port}: cannot listen there" in err and "Traceback" not in err
    finally:
        taken.close()


def test_nucleo_serve_answers_over_http_and_stops_on_sigterm(models):
    free = bind("127.0.0.1", 0)
    port = free.getsockname()[1]
    free.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nucleo", "serve", str(models["lm"]), "--port", str(port),
         "--device", str(DEVICE)],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                status, answer = call(url, "/score", {"sequences": ["ACGTACGT"]})
                break
            except OSError:
                assert time.monotonic() < deadline, "nucleo serve did not answer in 60 s"
                time.sleep(0.1)
        assert status == 200 and answer["results"][0]["tokens_scored"] == 7
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    first = err.splitlines()[0]
    assert first.startswith(f"serving {models['lm']}: a causal transformer language model")
    assert f"at {url}" in first and "/score" in first


@pytest.mark.slow
def test_an_mlflow_model_uri_serves_its_export(models, tmp_path):
    """The layout nucleo logs (``<model>/artifacts/export``), built with MLflow's own APIs:
    a run's artifacts, then a registered version and an alias pointing at them."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve", (tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(models["lm"]), "model/artifacts/export")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("dna-lm")
    source = f"{run.info.artifact_uri}/model"
    client.create_model_version("dna-lm", source, run.info.run_id)
    client.set_registered_model_alias("dna-lm", "live", "1")
    for name in (f"runs:/{run.info.run_id}/model", "models:/dna-lm/1", "models:/dna-lm@live"):
        path = resolve_model(name, uri)
        assert (path / "model.safetensors").read_bytes() == (
            models["lm"] / "model.safetensors"
        ).read_bytes()
    assert load_served("models:/dna-lm@live", "cpu", uri).meta["arch"] == "transformer"
    with pytest.raises(FileNotFoundError, match="models:/dna-lm/9: cannot be fetched"):
        resolve_model("models:/dna-lm/9", uri)


@pytest.mark.slow
def test_a_model_logged_by_nucleo_serves_from_its_mlflow_uris(models, tmp_path):
    """What nucleo's own MLflow logging writes (an MLflow 3 logged model, its MLmodel naming
    the export artifact), by every URI: the logged model's, the registered version's, the run's."""
    try:
        from nucleo.downstream.pyfunc import log_pyfunc
    except ImportError as err:
        pytest.skip(f"nucleo.downstream.pyfunc.log_pyfunc is not here ({err})")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("serve", (tmp_path / "art").as_uri()))
    logged, version = log_pyfunc(client, run.info.run_id, models["classifier"], "dna-clf")
    for name in (logged, f"models:/dna-clf/{version}", f"runs:/{run.info.run_id}/model"):
        served = load_served(name, "cpu", uri)
        assert served.kind == "classifier" and served.info["classes"][0] == "phage", name
