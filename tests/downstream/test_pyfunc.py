"""MLflow models of exports and classifiers: logged and registered in a SQLite store, loaded
with ``mlflow.pyfunc.load_model`` in a fresh process, they give nucleo's own numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from data_pipeline.readers import read_sequences
from data_pipeline.tokenizers import CharTokenizer
from nucleo.downstream.classifier import SequenceClassifier, predict_file, save_classifier
from nucleo.downstream.inference import embed_file, score_file
from nucleo.downstream.pyfunc import log_pyfunc
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model
from nucleo.train.store import tracked_run
from tests.conftest import ROOT, sample_file

pytestmark = pytest.mark.slow  # one fresh Python with mlflow and torch: ~6 s

# Loads both models by URI in a fresh process, as a user would; prints what they predict.
PROBE = """
import json, sys
import mlflow, pandas as pd
uri, lm_uri, clf_uri, seqs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
mlflow.set_tracking_uri(uri)
lm, clf = mlflow.pyfunc.load_model(lm_uri), mlflow.pyfunc.load_model(clf_uri)
scores = lm.predict(pd.DataFrame({"id": range(len(seqs)), "sequence": seqs}))
embeddings = lm.predict(seqs, params={"output": "embedding", "window": 64, "stride": 48,
                                      "layer": 0})
try:
    lm.predict(["ACGT", "AC@GT"])
    refused = ""
except ValueError as err:
    refused = str(err)
folder = mlflow.artifacts.download_artifacts(lm_uri)
print(json.dumps({
    "scores": scores.to_dict("list"), "embeddings": embeddings.tolist(),
    "classes": clf.predict(seqs).to_dict("list"), "refused": refused, "folder": folder,
    "params": str(lm.metadata.get_params_schema()),
}))
"""


def test_logged_models_load_by_uri_in_a_fresh_process_and_give_nucleos_numbers(tmp_path):
    cfg = load_config(arch="transformer", overrides=[
        "model.d_model=16", "model.n_layers=1", "model.n_heads=2"])  # fmt: skip
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    backbone = build_model(cfg.arch, cfg.model, tokenizer)
    export = export_model(backbone.state_dict(), cfg, tokenizer, tmp_path / "export")
    classifier = save_classifier(
        SequenceClassifier(backbone, 16, 3), export,
        {"task": "t", "classes": ["a", "b", "c"], "rc_conjoin": True, "max_tokens": 96},
        tmp_path / "classifier",
    )  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracked_run(uri, "e", "lm", {}, tmp_path) as (client, lm_run):
        assert log_pyfunc(client, lm_run, export, "dna-lm")[1] == 1
    with tracked_run(uri, "e", "clf", {}, tmp_path) as (client, clf_run):
        assert log_pyfunc(client, clf_run, classifier)[1] is None  # logged, not registered
    (lam,) = read_sequences(sample_file("viral/lambda.fasta.gz"))
    real = bytes(lam.seq)[1000:1300].decode()
    seqs = [real, real[:50].lower() + "RYN" + real[50:120], "ACGTU"]
    fasta = tmp_path / "q.fa"
    fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))

    probe = [sys.executable, "-c", PROBE, uri, "models:/dna-lm/1", f"runs:/{clf_run}/model"]
    done = subprocess.run([*probe, json.dumps(seqs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])

    expected = list(score_file(export, fasta, device="cpu"))
    assert got["scores"]["bases"] == [s.bases for s in expected] == [300, 123, 5]
    assert got["scores"]["tokens_scored"] == [s.tokens_scored for s in expected]
    assert got["scores"]["bits_per_base"] == pytest.approx([s.bits_per_base for s in expected])
    _ids, vectors = embed_file(export, fasta, window=64, device="cpu", stride=48, layer=0)
    assert np.allclose(got["embeddings"], vectors, atol=1e-5)
    rows = list(predict_file(classifier, fasta, device="cpu"))
    assert got["classes"]["prediction"] == [label for _, label, _ in rows]
    for c, name in enumerate("abc"):
        assert got["classes"][f"p_{name}"] == pytest.approx([p[c] for _, _, p in rows])
    assert "sequence 1: invalid character '@'" in got["refused"]
    assert "'output': string (default: score)" in got["params"]
    # the folder contract of serving: the export travels as the model's artifact "export"
    copied = tmp_path.joinpath(got["folder"], "artifacts", "export", "config.json")
    assert copied.read_text() == (export / "config.json").read_text()

    client = MlflowClient(uri)
    (output,) = client.get_run(lm_run).outputs.model_outputs  # the run's logged model
    model = client.get_logged_model(output.model_id)
    assert model.status == "READY" and model.name == "model"
    version = client.get_model_version("dna-lm", "1")
    assert version.run_id == lm_run and version.source == model.artifact_location
