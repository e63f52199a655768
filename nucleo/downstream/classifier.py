"""The sequence classifier that fine-tuning trains and ``nucleo predict`` runs: a backbone,
mean-pooled, and one linear head; its batches, predictions, metrics, and its saved form.

A classifier is the backbone's final hidden states, mean-pooled over the sequence's tokens
(padding excluded), then one linear layer: [B, L] tokens -> [B, L, D] -> [B, D] -> [B, C].
Saved, it is a portable export (nucleo.train.export's files) plus ``head.safetensors`` and
``classifier.json`` (and the Hugging Face files of ``hf_export``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.core.device import resolve as resolve_device


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, D], mask [B, L] -> [B, D]: the mean over each row's real tokens."""
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class SequenceClassifier(nn.Module):
    """Backbone -> masked mean of the hidden states of ``layer`` [B, D] -> linear head [B, C].

    layer: -1 the final states (default), 0 the embedding, i the states after block i
    (``LanguageModel.hidden_states``); a probe may read a middle layer.
    """

    def __init__(self, backbone: nn.Module, d_model: int, n_classes: int, layer: int = -1) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(d_model, n_classes)
        self.layer = layer

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask [B, L] (right padding) -> [B, D] mean of the real tokens' states; the
        backbone sees the mask too, so a bidirectional one keeps pads out of real states."""
        if self.layer == -1:
            return masked_mean(self.backbone(tokens, attention_mask=mask).hidden.float(), mask)
        return masked_mean(self.backbone.hidden_states(tokens, mask, self.layer), mask)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask: [B, L] -> class logits [B, C] (in the head's dtype: bf16 weights
        under DeepSpeed's bf16)."""
        return self.head(self.embed(tokens, mask).to(self.head.weight.dtype))


def hidden_size(backbone: nn.Module, tokenizer: Any, device: torch.device) -> int:
    probe = torch.from_numpy(np.asarray(tokenizer.encode(b"ACGTACGT"), np.int64))[None].to(device)
    with torch.no_grad():
        return int(backbone(probe).hidden.shape[-1])


def load_backbone(
    export: str | Path, init: str, seed: int, device: torch.device
) -> tuple[nn.Module, Any, dict]:
    """(backbone, tokenizer, export meta): the export's weights, or (``scratch``) its
    architecture freshly initialised from ``seed``."""
    from nucleo.core.schema import from_dict
    from nucleo.train.components import ARCHITECTURES, build_model
    from nucleo.train.export import load_exported

    model, tokenizer, meta = load_exported(export, device)
    if init == "scratch":
        torch.manual_seed(seed)
        entry = ARCHITECTURES.get(meta["arch"])
        model = build_model(
            meta["arch"], from_dict(entry.config, meta["model"], "model"), tokenizer
        )
        model = model.to(device)
    return model, tokenizer, meta


def encode_all(tokenizer: Any, sequences: Sequence[bytes], max_tokens: int) -> list[np.ndarray]:
    """Token ids of each sequence, cut to its first ``max_tokens`` tokens."""
    return [np.asarray(tokenizer.encode(s), np.int64)[:max_tokens] for s in sequences]


def pad(ids: list[np.ndarray], rows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, L] and mask [b, L] of ``ids[rows]``, right-padded to the longest (CPU)."""
    width = max(len(ids[r]) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(ids[r])] = torch.from_numpy(ids[r])
        mask[i, : len(ids[r])] = True
    return tokens, mask


def batches(
    ids: list[np.ndarray], order: np.ndarray, batch: int, pad_id: int, device: torch.device
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(row indices, tokens [b, L], mask [b, L]) right-padded, ``batch`` rows at a time."""
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        tokens, mask = pad(ids, rows, pad_id)
        yield rows, tokens.to(device), mask.to(device)


@torch.no_grad()
def embed_ids(
    model: SequenceClassifier, ids: list[np.ndarray], batch: int, pad_id: int, device: torch.device
) -> np.ndarray:
    """[n, D] mean-pooled embeddings (eval mode)."""
    model.eval()
    out = np.zeros((len(ids), model.head.in_features), np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for rows, tokens, mask in batches(ids, order, batch, pad_id, device):
        out[rows] = model.embed(tokens, mask).cpu().numpy()
    return out


@torch.no_grad()
def predict_proba(
    model: SequenceClassifier,
    ids: list[np.ndarray],
    batch: int,
    pad_id: int,
    device: torch.device,
    rc_ids: list[np.ndarray] | None = None,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """[n, C] class probabilities; with ``rc_ids`` the mean of both strands' probabilities.
    ``forward``: what runs the model (a DeepSpeed engine; default ``model`` itself)."""
    model.eval()
    forward = forward or model
    probs = np.zeros((len(ids), model.head.out_features), np.float64)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for views in [ids] if rc_ids is None else [ids, rc_ids]:
        for rows, tokens, mask in batches(views, order, batch, pad_id, device):
            probs[rows] += torch.softmax(forward(tokens, mask).float(), -1).cpu().numpy()
    return probs / (1 if rc_ids is None else 2)


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """accuracy, MCC, macro F1 and AUROC (binary; one-vs-rest macro for more classes)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

    pred = probs.argmax(1)
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "mcc": float(matthews_corrcoef(labels, pred)),
        "f1": float(f1_score(labels, pred, average="macro")),
    }
    present = np.unique(labels)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif probs.shape[1] == 2:
        out["auroc"] = float(roc_auc_score(labels, probs[:, 1]))
    else:
        p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
        out["auroc"] = float(roc_auc_score(labels, p, multi_class="ovr", labels=present))
    return out


def save_classifier(
    model: SequenceClassifier, export: str | Path, info: dict[str, Any], out: Path
) -> Path:
    """The classifier as a portable export (``export``'s config.json and tokenizer, the
    backbone's model.safetensors) plus head.safetensors and classifier.json (``info``: classes,
    pooling and the settings it was trained with), loadable by transformers'
    AutoModelForSequenceClassification too. ``model``: full fp32 weights on the CPU."""
    from nucleo.downstream.hf_export import classifier_config

    out.mkdir(parents=True, exist_ok=True)
    info = {"format": "nucleo-classifier/1", "pooling": "mean", "layer": model.layer, **info}
    meta = classifier_config(export, out, info, model.head.in_features)
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_model(model.backbone, str(out / "model.safetensors"))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(out / "head.safetensors"),
    )
    (out / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def load_classifier(
    path: str | Path, device: str | torch.device = "auto"
) -> tuple[SequenceClassifier, Any, dict]:
    """(classifier in eval mode, tokenizer, classifier.json) of a saved fine-tuned model."""
    from nucleo.train.export import load_exported

    root = Path(path)
    info_path = root / "classifier.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: not found; is {root} a `nucleo finetune` output?")
    info = json.loads(info_path.read_text())
    device = resolve_device(device)
    backbone, tokenizer, _meta = load_exported(root, device)
    head = load_file(str(root / "head.safetensors"))
    width, classes = head["weight"].shape[1], head["weight"].shape[0]
    model = SequenceClassifier(backbone, width, classes, int(info.get("layer", -1)))
    model.head.load_state_dict(head)
    return model.to(device).eval(), tokenizer, info


def record_windows(
    tokenizer: Any, seq: bytes, max_tokens: int, stride: int | None, rc: bool
) -> tuple[list[np.ndarray], list[np.ndarray] | None, np.ndarray]:
    """A whole record as windows of at most ``max_tokens`` tokens every ``stride`` tokens
    (None: consecutive): (token ids of each window, those of the reverse complement of the same
    bases when ``rc``, each window's weight: its share of the windows' tokens)."""
    from nucleo.downstream.inference import windows

    ids = np.asarray(tokenizer.encode(seq), np.int64)
    pieces = [ids[a:b] for a, b, _ in windows(len(ids), max_tokens, stride)]
    flipped = None
    if rc:  # the same bases, reverse-complemented, encoded as training encoded them
        bases = [tokenizer.decode(piece).encode() for piece in pieces]
        flipped = encode_all(tokenizer, [reverse_complement_bytes(b) for b in bases], max_tokens)
    sizes = np.array([max(len(piece), 1) for piece in pieces], np.float64)
    return pieces, flipped, sizes / sizes.sum()


def classify(
    model: SequenceClassifier,
    tokenizer: Any,
    info: dict[str, Any],
    sequences: Sequence[bytes],
    batch: int,
    device: torch.device,
    stride: int | None = None,
) -> np.ndarray:
    """[n, C] class probabilities of whole sequences: each cut into windows of the
    classifier's ``max_tokens`` (``record_windows``), its probabilities the token-weighted mean
    of its windows' (both strands of each window averaged under ``rc_conjoin``). What
    ``nucleo predict``, the MLflow model and the endpoint all give."""
    rc = bool(info.get("rc_conjoin"))
    ids: list[np.ndarray] = []
    rc_ids: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for seq in sequences:
        pieces, flipped, weight = record_windows(tokenizer, seq, info["max_tokens"], stride, rc)
        ids += pieces
        rc_ids += flipped or []
        weights.append(weight)
    probs = predict_proba(model, ids, batch, tokenizer.pad_id, device, rc_ids if rc else None)
    return pool_windows(probs, weights)


def pool_windows(probs: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """[windows, C] probabilities of consecutive records' windows -> [records, C], each record
    the mean of its windows' weighted by ``weights`` (one array per record, summing to 1)."""
    out = np.zeros((len(weights), probs.shape[1]), np.float64)
    first = 0
    for row, weight in enumerate(weights):
        out[row] = (probs[first : first + len(weight)] * weight[:, None]).sum(0)
        first += len(weight)
    return out


def predict_file(
    classifier: str | Path,
    path: str | Path,
    batch: int = 64,
    device: str = "auto",
    warn: Callable[[str], None] | None = None,
    stride: int | None = None,
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(record id, predicted class, probabilities [C]) per record of a FASTA/GenBank file,
    streamed. A record longer than the classifier's ``max_tokens`` is cut into windows of that
    many tokens (every ``stride`` tokens; default consecutive), and its probabilities are the
    mean of its windows', weighted by their tokens; with the classifier's rc_conjoin each
    window is averaged with the reverse complement of the same bases. ``batch``: windows per
    forward pass.

    The classifier is loaded before this returns (a bad one fails before anything is
    written); records more than half N are named through ``warn`` (default: stderr).
    """
    from data_pipeline.readers import read_sequences
    from nucleo.downstream.inference import MOSTLY_N, n_fraction, windows

    dev = resolve_device(device)
    model, tokenizer, info = load_classifier(classifier, dev)
    classes = info["classes"]
    windows(0, info["max_tokens"], stride)  # checks the stride before anything is read
    say = warn or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))

    def flush(pending: list[tuple[str, bytes]]) -> Iterator[tuple[str, str, np.ndarray]]:
        seqs = [seq for _, seq in pending]
        probs = classify(model, tokenizer, info, seqs, batch, dev, stride)
        for (rid, _), p in zip(pending, probs, strict=True):
            yield rid, classes[int(p.argmax())], p

    def predictions() -> Iterator[tuple[str, str, np.ndarray]]:
        pending: list[tuple[str, bytes]] = []
        for record in read_sequences(path):
            seq = bytes(record.seq)
            if n_fraction(seq) > MOSTLY_N:
                say(f"{record.id}: {100 * n_fraction(seq):.0f}% N: its prediction says little")
            pending.append((record.id, seq))
            if len(pending) == batch:
                yield from flush(pending)
                pending = []
        if pending:
            yield from flush(pending)

    return predictions()
