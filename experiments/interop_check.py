"""Does one export give the same numbers everywhere users load it? nucleo, Hugging Face
``transformers`` (a fresh process), ``mlflow.pyfunc`` (logged, registered, loaded in a fresh
process) and ``nucleo serve`` (real HTTP), on real DNA from the bundled genomes.

    python experiments/interop_check.py [--export runs/NAME/export] [--classifier DIR]

Defaults: the newest ``runs/*/export`` and the newest ``runs/finetune/*`` classifier (what
``launch/demo.sh`` leaves). Writes experiments/results/interop.md (and .json): per path the
largest difference from nucleo's own numbers, and whether it is within 1e-5 (logits,
probabilities) or 1e-4 (log-likelihoods in nats, summed over up to 1,000 tokens).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.report import RESULTS, ROOT, header, run_record, write

LENGTHS = (1000, 250, 617, 64, 900, 333)  # bases: one right-padded batch of uneven rows


def real_sequences() -> list[str]:
    """Windows of E. coli 536 (a bundled genome) of the LENGTHS, from spread-out offsets."""
    with lzma.open(ROOT / "data_pipeline/sample/bacteria/E_coli_536.fna.xz", "rt") as f:
        text = f.read()
    genome = "".join(line for line in text.splitlines() if not line.startswith(">"))
    return [genome[100_000 * (i + 1) :][:n].upper() for i, n in enumerate(LENGTHS)]


def newest(pattern: str, inside: str) -> Path | None:
    found = sorted(ROOT.glob(pattern), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if (p / inside).is_file()]
    return found[-1] if found else None


def nucleo_numbers(export: Path, seqs: list[str], classifier: Path | None) -> dict[str, Any]:
    """Logits on the real positions, log-likelihoods, embeddings, class probabilities."""
    import torch

    from nucleo.downstream.classifier import classify, load_classifier
    from nucleo.downstream.inference import embed_sequence, log_likelihood
    from nucleo.train.export import load_exported

    model, tokenizer, meta = load_exported(export)
    cpu = torch.device("cpu")
    ids = [np.asarray(tokenizer.encode(s.encode()), np.int64) for s in seqs]
    logits = []
    with torch.no_grad():
        for row in ids:
            logits.append(model(torch.from_numpy(row)[None]).logits[0].numpy())
    out: dict[str, Any] = {"ids": ids, "logits": logits, "causal": bool(meta["causal"])}
    if meta["causal"]:
        out["nats"] = [log_likelihood(model, tokenizer, s.encode(), 4096, 1, cpu)[0] for s in seqs]
    out["embedding"] = np.stack(
        [embed_sequence(model, tokenizer, s.encode(), 4096, 1, cpu) for s in seqs]
    )
    if classifier is not None:
        clf, tok, info = load_classifier(classifier, "cpu")  # as nucleo predict: both strands
        out["probs"] = classify(clf, tok, info, [s.encode() for s in seqs], 1, cpu)
        out["classes"] = info["classes"]
    return out


HF_SCRIPT = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
export, causal, seqs, out = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
cls = AutoModelForCausalLM if causal else AutoModelForMaskedLM
model = cls.from_pretrained(export, trust_remote_code=True).eval()
batch = tok(seqs, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits.numpy()
ids = [tok(s)["input_ids"] for s in seqs]
np.savez(out, logits=logits, mask=batch["attention_mask"].numpy(),
         ids=np.array(json.dumps(ids)))
"""

PYFUNC_SCRIPT = r"""
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
seqs = json.loads(sys.argv[3])
res = model.predict(pd.DataFrame({"sequence": seqs}), params=json.loads(sys.argv[4]))
res = res.to_dict(orient="list") if hasattr(res, "to_dict") else {"array": res.tolist()}
print(json.dumps(res))
"""


def hf_check(export: Path, seqs: list[str], ref: dict[str, Any], tmp: Path) -> dict[str, Any]:
    out = tmp / "hf.npz"
    args = [export, "1" if ref["causal"] else "0", json.dumps(seqs), out]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", HF_SCRIPT, *map(str, args)], check=True)
    got = np.load(out)
    ids = json.loads(str(got["ids"]))
    same_ids = all(list(a) == list(b) for a, b in zip(ids, ref["ids"], strict=True))
    diff = max(
        float(np.abs(got["logits"][i, : len(r)] - r).max()) for i, r in enumerate(ref["logits"])
    )
    seconds = round(time.perf_counter() - started, 1)
    ok = same_ids and diff <= 1e-5
    return {"tokenizer ids equal": same_ids, "max |logit diff|": diff, "ok": ok, "seconds": seconds}


def pyfunc_check(folder: Path, seqs: list[str], tmp: Path, params: dict, name: str) -> dict:
    """Log ``folder`` as a registered MLflow model in a fresh sqlite store; predict in a fresh
    process through ``models:/NAME/1``."""
    import mlflow

    from nucleo.downstream.pyfunc import log_pyfunc
    from nucleo.train.store import client

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    c = client(uri)
    experiment = c.create_experiment(f"interop-{name}", artifact_location=str(tmp / name))
    run = c.create_run(experiment)
    _, version = log_pyfunc(c, run.info.run_id, folder, register_as=name)
    c.set_terminated(run.info.run_id)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PYFUNC_SCRIPT, uri, f"models:/{name}/{version}",
         json.dumps(seqs), json.dumps(params)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def serve_check(
    export: Path, seqs: list[str], causal: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``nucleo serve EXPORT``: the README's curl example, then /score and /embed of seqs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nucleo = Path(sys.executable).parent / "nucleo"
    server = subprocess.Popen([str(nucleo), "serve", str(export), "--port", str(port)])

    def post(route: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/{route}", json.dumps(body).encode(),
            {"content-type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        example = post("score" if causal else "embed", {"sequences": ["ACGTACGT"]})
        answers = {"embed": post("embed", {"sequences": seqs})}
        if causal:  # a bidirectional model has no /score
            answers["score"] = post("score", {"sequences": seqs})
        return example, answers
    finally:
        server.terminate()
        server.wait(30)


def shown(path: Path | None) -> str:
    """``path`` relative to the checkout when inside it."""
    if path is None:
        return "none"
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=newest("runs/*/export", "config.json"))
    parser.add_argument(
        "--classifier", type=Path, default=newest("runs/finetune/*", "classifier.json")
    )
    args = parser.parse_args()
    if args.export is None:
        parser.error("no runs/*/export found; run launch/demo.sh or pass --export")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    record = run_record()
    seqs = real_sequences()
    ref = nucleo_numbers(args.export, seqs, args.classifier)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="nucleo-interop-") as name:
        tmp = Path(name)
        rows["transformers"] = hf_check(args.export, seqs, ref, tmp)
        output = "score" if ref["causal"] else "embedding"
        got = pyfunc_check(args.export, seqs, tmp, {"window": 4096, "output": output}, "lm")
        if ref["causal"]:
            diff = float(np.abs(np.array(got["log_likelihood"]) - ref["nats"]).max())
            tol = 1e-4
        else:
            diff = float(np.abs(np.array(got["array"]) - ref["embedding"]).max())
            tol = 1e-5
        rows["mlflow.pyfunc (language model)"] = {
            f"max |{output} diff|": diff,
            "ok": diff <= tol,
            "seconds": got["seconds"],
        }
        if args.classifier is not None:
            got = pyfunc_check(args.classifier, seqs, tmp, {}, "classifier")
            probs = np.array([got[f"p_{c}"] for c in ref["classes"]]).T
            diff = float(np.abs(probs - ref["probs"]).max())
            rows["mlflow.pyfunc (classifier)"] = {
                "max |probability diff|": diff,
                "ok": diff <= 1e-5,
                "seconds": got["seconds"],
            }
        example, answers = serve_check(args.export, seqs, ref["causal"])
        embed = np.array(answers["embed"]["embeddings"])
        serve = {"README curl answered": bool(example.get("results"))}
        serve["max |embedding diff|"] = float(np.abs(embed - ref["embedding"]).max())
        ok = serve["README curl answered"] and serve["max |embedding diff|"] <= 1e-5
        if "score" in answers:
            nats = [r["log_likelihood_nats"] for r in answers["score"]["results"]]
            serve["max |nats diff|"] = float(np.abs(np.array(nats) - ref["nats"]).max())
            ok = ok and serve["max |nats diff|"] <= 1e-4
        rows["nucleo serve (HTTP)"] = {**serve, "ok": ok}
    lines = [
        "# One export, every way in: nucleo, transformers, mlflow.pyfunc, HTTP",
        "",
        *header(record),
        "",
        f"Export: `{shown(args.export)}`"
        f" ({'causal' if ref['causal'] else 'bidirectional'}); classifier: "
        f"`{shown(args.classifier)}`. Sequences: {len(seqs)} windows of E. coli 536 of "
        f"{', '.join(map(str, LENGTHS))} bases, one right-padded batch where the path batches.",
        "",
        "| path | result | ok |",
        "|---|---|---|",
    ]
    for path, row in rows.items():
        cells = ", ".join(
            f"{v} s" if k == "seconds" else f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
            for k, v in row.items()
            if k != "ok"
        )
        lines.append(f"| {path} | {cells} | {'yes' if row['ok'] else 'NO'} |")
    write(RESULTS / "interop.md", lines, {"record": record, "rows": rows})
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
