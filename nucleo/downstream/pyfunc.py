"""nucleo exports and classifiers as MLflow models (``mlflow.pyfunc``): predict on DNA strings.

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")   # or "models:/NAME/VERSION"
    model.predict(pd.DataFrame({"sequence": ["ACGT...", "GGC..."]}))        # or a list of str
    model.predict(df, params={"output": "embedding", "window": 512})

What ``predict`` returns, one row per input sequence, in input order:

- a language-model export, ``output="score"`` (the default for a causal model): a DataFrame
  of ``bases``, ``tokens_scored``, ``log_likelihood`` (nats) and ``bits_per_base``, the numbers
  of ``nucleo score`` (``nucleo.downstream.inference.score_sequence``; params ``window``,
  ``stride`` (0: consecutive windows), ``batch_size``, ``both_strands``);
- a language-model export, ``output="embedding"`` (the default for a bidirectional model): a
  float32 array [n, d_model], the numbers of ``nucleo embed`` (``embed_sequence``; params
  ``window``, ``stride``, ``batch_size``, ``pooling``, ``layer``: 0 the embedding, -1 the
  final states);
- a classifier (``nucleo finetune`` output): a DataFrame of ``prediction`` (the class name)
  and one ``p_<class>`` column per class, the numbers of ``nucleo predict`` (``classifier.classify``
  with the classifier's own ``max_tokens`` and ``rc_conjoin``; param ``batch_size``).

Input: a DataFrame with a ``sequence`` column (other columns are ignored; a one-column frame
is read whatever its name), a list of strings, or one string. Sequences are normalised as the
genome readers do (upper case, IUPAC codes to N, U to T); anything else is a ``ValueError``
naming the sequence and the character. The signature holds the params (a ParamSchema with
their defaults) and the outputs; it has no input schema on purpose (``signature``), and the
input example shows the DataFrame form. ``mlflow.pyfunc.load_model(uri, model_config={"device":
"cuda"})`` picks the device (default ``auto``).

The model folder holds a two-line ``nucleo_model.py`` (MLflow's "models from code", no
pickle) that imports ``NucleoModel`` from here: nucleo must be importable where the model
loads. ``requirements.txt`` pins mlflow, torch, numpy, pandas and safetensors as installed when
the model was logged (no dependency inference: logging stays offline and fast); nucleo is not
on PyPI and is not listed (install it from its repository).

**The folder contract** (for serving and anything else that wants the export, not the pyfunc):
the export or classifier folder travels as the MLflow model's artifact ``export``, so

    mlflow.set_tracking_uri(URI)    # models:/ URIs resolve through the registry of this store
    folder = mlflow.artifacts.download_artifacts("models:/NAME/VERSION")  # or runs:/RUN/model
    <folder>/artifacts/export/config.json        -> nucleo.train.export.load_exported(...)
    <folder>/artifacts/export/classifier.json    (classifiers only) -> load_classifier(...)

Who logs these models, across the layers: ``nucleo.train.store.ModelLog`` knows MLflow's
logged models and the registry but no flavour; it takes a writer ``(folder, mlflow Model)``.
``save_pyfunc`` here is that writer: the command line hands it to ``nucleo.train.trainer.fit``
(which logs the export in the tracker's background thread once it is written, on rank 0), and
fine-tuning calls ``log_pyfunc`` for each classifier it saves. The training layer never
imports this module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

#: the artifact key of the export folder inside an MLflow model
EXPORT_KEY = "export"
#: example sequences of the logged input example (two, of different lengths)
EXAMPLE = ["ACGTTGCAACGGTACCGTTAGCATGCAAGCTTGGCA", "GGGCCCATATATCGCGTTAA"]


def normalise(sequences: list[str]) -> list[bytes]:
    """Upper-case ACGTN bytes of each sequence (the readers' table); a bad one is named."""
    from data_pipeline.readers import NORMALISE

    out = []
    for i, seq in enumerate(sequences):
        if not isinstance(seq, str) or not seq:
            raise ValueError(f"sequence {i}: expected a non-empty string of bases, got {seq!r}")
        raw = seq.encode("ascii", errors="replace")
        clean = raw.translate(NORMALISE)
        if b"!" in clean:
            bad = chr(raw[clean.index(b"!")])
            raise ValueError(
                f"sequence {i}: invalid character {bad!r}; valid: A C G T N (any case), "
                "IUPAC codes R Y K M S W B D H V, U"
            )
        out.append(clean)
    return out


def _sequences(model_input: Any) -> list[str]:
    """The sequences of a DataFrame's ``sequence`` column, a list of str, or one str."""
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:
        if "sequence" in columns:
            return list(model_input["sequence"])
        if len(columns) != 1:
            raise ValueError(f"input has columns {list(columns)}; expected a 'sequence' column")
        return list(model_input.iloc[:, 0])
    return list(model_input)


class NucleoModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper of one export or classifier folder (the ``export`` artifact)."""

    def load_context(self, context: Any) -> None:
        from nucleo.core.device import resolve

        self.folder = Path(context.artifacts[EXPORT_KEY])
        config = getattr(context, "model_config", None) or {}
        self.device = resolve(config.get("device", "auto"))
        self.classifier = (self.folder / "classifier.json").is_file()
        if self.classifier:
            from nucleo.downstream.classifier import load_classifier

            self.model, self.tokenizer, self.info = load_classifier(self.folder, self.device)
        else:
            from nucleo.train.export import load_exported

            self.model, self.tokenizer, self.info = load_exported(self.folder, self.device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> Any:
        """Scores, embeddings or class probabilities of each sequence (module docstring)."""
        from nucleo.downstream.inference import windows

        params = params or {}
        seqs = normalise(_sequences(model_input))
        if self.classifier:
            return self._classify(seqs, int(params.get("batch_size", 64)))
        causal = bool(self.info.get("causal", True))
        output = params.get("output") or ("score" if causal else "embedding")
        window, batch = int(params.get("window", 1024)), int(params.get("batch_size", 8))
        stride = int(params.get("stride", 0)) or None
        if window < 2 or batch < 1:
            raise ValueError(f"window must be >= 2 and batch_size >= 1, got {window}, {batch}")
        windows(0, window, stride)  # checks the stride
        if output == "embedding":
            pooling, layer = str(params.get("pooling", "mean")), int(params.get("layer", -1))
            return self._embed(seqs, window, batch, pooling, stride, layer)
        if output != "score":
            raise ValueError(f"output {output!r}: choose score or embedding")
        if not causal:
            raise ValueError(
                f"a {self.info['arch']} model trained bidirectionally has no left-to-right "
                "likelihood; use output=embedding"
            )
        both = bool(params.get("both_strands", False))
        return self._score(seqs, window, batch, stride, both)

    def _score(
        self, seqs: list[bytes], window: int, batch: int, stride: int | None, both: bool
    ) -> Any:
        """As ``nucleo.downstream.inference.score_file``, per sequence."""
        from nucleo.downstream.inference import score_sequence

        rows = []
        for i, seq in enumerate(seqs):
            s = score_sequence(self.model, self.tokenizer, str(i), seq, window, batch,
                               self.device, stride, both)  # fmt: skip
            rows.append((s.bases, s.tokens_scored, s.log_likelihood, s.bits_per_base))
        columns = ["bases", "tokens_scored", "log_likelihood", "bits_per_base"]
        return pd.DataFrame(rows, columns=columns)

    def _embed(
        self, seqs: list[bytes], window: int, batch: int, pooling: str, stride: int | None,
        layer: int,
    ) -> np.ndarray:  # fmt: skip
        from nucleo.downstream.inference import embed_sequence

        model, tok, dev = self.model, self.tokenizer, self.device
        options = (window, batch, dev, pooling, stride, layer)
        return np.stack([embed_sequence(model, tok, s, *options) for s in seqs])

    def _classify(self, seqs: list[bytes], batch: int) -> Any:
        """As ``nucleo.downstream.classifier.predict_file``, on one batch of sequences."""
        from nucleo.downstream.classifier import classify

        info = self.info
        probs = classify(self.model, self.tokenizer, info, seqs, max(batch, 1), self.device)
        classes = info["classes"]
        frame = pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])
        frame.insert(0, "prediction", [classes[int(i)] for i in probs.argmax(1)])
        return frame


_CODE = """\
# The MLflow model of a nucleo export or classifier (see nucleo.downstream.pyfunc).
import mlflow.models

from nucleo.downstream.pyfunc import NucleoModel

mlflow.models.set_model(NucleoModel())
"""


def signature(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """(ModelSignature, metadata) of an export or classifier folder."""
    import json

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    root = Path(folder)
    meta = json.loads((root / "config.json").read_text())
    # No input schema: MLflow would then refuse either a plain list of strings (a named
    # column) or a DataFrame whose sequence column is not the first (an unnamed one, silently
    # reading the wrong column); ``predict`` checks its input itself and names what is wrong.
    inputs = None
    described = {"nucleo_version": meta.get("nucleo_version"), "arch": meta.get("arch")}
    if (root / "classifier.json").is_file():
        info = json.loads((root / "classifier.json").read_text())
        outputs = Schema(
            [ColSpec("string", "prediction")]
            + [ColSpec("double", f"p_{c}") for c in info["classes"]]
        )
        params = ParamSchema([ParamSpec("batch_size", "long", 64)])
        described.update(kind="classifier", task=info.get("task"), classes=info["classes"])
        return ModelSignature(inputs, outputs, params), described
    causal = bool(meta.get("causal", True))
    params = ParamSchema(
        [
            ParamSpec("output", "string", "score" if causal else "embedding"),
            ParamSpec("window", "long", 1024),
            ParamSpec("batch_size", "long", 8),
            ParamSpec("both_strands", "boolean", False),
            ParamSpec("pooling", "string", "mean"),
            ParamSpec("stride", "long", 0),  # 0: the window (consecutive windows)
            ParamSpec("layer", "long", -1),
        ]
    )
    outputs = None  # a DataFrame of scores or an [n, D] array, as ``output`` says
    if causal:
        outputs = Schema(
            [
                ColSpec("long", "bases"),
                ColSpec("long", "tokens_scored"),
                ColSpec("double", "log_likelihood"),
                ColSpec("double", "bits_per_base"),
            ]
        )
    described.update(kind="language-model", causal=causal)
    return ModelSignature(inputs, outputs, params), described


def requirements() -> list[str]:
    """Pins of what the wrapper imports, as installed now (no pip inference: it is slow and
    may reach for the network); nucleo itself is not on PyPI and is not listed."""
    from importlib.metadata import version

    pins = []
    for name in ("mlflow", "torch", "numpy", "pandas", "safetensors"):
        pins.append(f"{name}=={version(name).split('+')[0]}")
    return pins


def save_pyfunc(folder: str | Path, path: str | Path, mlflow_model: Any = None) -> Path:
    """Write the MLflow model of export or classifier ``folder`` to ``path`` (a new folder):
    the wrapper, the folder as artifact ``export``, signature, input example, requirements.
    ``mlflow_model``: the ``mlflow.models.Model`` to fill (ids of a logged model), or None.

    The wrapper is saved as code (MLflow's models from code: a two-line ``nucleo_model.py``
    that builds ``NucleoModel``), not as a pickle."""
    import tempfile

    sig, metadata = signature(folder)
    code = Path(tempfile.mkdtemp(prefix="nucleo-pyfunc-")) / "nucleo_model.py"
    code.write_text(_CODE)
    try:
        with _quiet():
            mlflow.pyfunc.save_model(
                str(path),
                python_model=str(code),
                artifacts={EXPORT_KEY: str(Path(folder).resolve())},
                signature=sig,
                input_example=pd.DataFrame({"sequence": EXAMPLE}),
                pip_requirements=requirements(),
                metadata=metadata,
                mlflow_model=mlflow_model,
            )
    finally:
        code.unlink()
        code.parent.rmdir()
    return Path(path)


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bar for copying the export into the model, no INFO line about validating
    the input example: a training run's last lines stay its own (a user's settings win)."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    bar = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    ours = bar not in os.environ
    if ours:
        os.environ[bar] = "false"
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
        if ours:
            os.environ.pop(bar, None)


def log_pyfunc(
    client: Any, run_id: str, folder: str | Path, register_as: str | None = None
) -> tuple[str, int | None]:
    """Log ``folder`` as run ``run_id``'s MLflow model ``model`` (and register it as a new
    version of ``register_as``); returns (``models:/<model id>``, version or None)."""
    from nucleo.train.store import log_model

    return log_model(client, run_id, lambda path, model: save_pyfunc(folder, path, model),
                     register_as=register_as)  # fmt: skip
