"""Inference from a portable export: per-sequence scores and embeddings of FASTA/GenBank files.

    nucleo score EXPORT genomes.fa [--out scores.tsv] [--both-strands] [--window 1024]
    nucleo embed EXPORT genomes.fa --out embeddings.npy [--window 1024] [--layer -1]

Records are streamed one at a time (a file is never loaded whole); a record longer than the
window is cut into windows of ``window`` tokens, run ``batch`` windows at a time. Windows start
every ``stride`` tokens (default: ``window``, consecutive windows); with a smaller stride they
overlap, and each token belongs to the first window that reaches it, where it has the most left
context (at least ``window - stride`` tokens after the first window): ``windows`` below.

Scores need a causal model: the log-likelihood of each token given the ones before it in its
window; each token is scored once, in the window it belongs to (the record's first token, and
with consecutive windows each window's first, has no context and is not scored). Bits per base
divide the bits by the bases those tokens cover (exact for ``char``; for k-mer and BPE
tokenizers the bases of the scored tokens are counted from their decoded text).
``both_strands`` averages the record's score with its reverse complement's. Embeddings pool
the hidden states of ``layer`` (default -1: the final ones; ``LanguageModel.hidden_states``)
over every token of the record, each once (mean by default; max; or the last token's): [D]
per record.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_pipeline.readers import read_sequences
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.core.device import resolve as resolve_device
from nucleo.downstream.classifier import pad


@dataclass
class Score:
    """One record's score: nats (sum of log-likelihoods), tokens and bases scored, and bits per
    base (both strands averaged when asked)."""

    record: str
    bases: int
    tokens_scored: int
    log_likelihood: float
    bits_per_base: float  # NaN when nothing was scored (a record of one token)
    n_fraction: float = 0.0  # of the record's bases


#: above this fraction of N a record's score or class says little; the commands warn
MOSTLY_N = 0.5


def n_fraction(seq: bytes) -> float:
    return seq.count(b"N") / len(seq) if seq else 0.0


def windows(length: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, stop, owned) of each window over ``length`` tokens: the window is tokens
    start..stop-1, and it owns those from start + owned on (the ones no earlier window
    reached). Windows start every ``stride`` tokens (None: ``window``)."""
    stride = stride or window
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    out, start, reached = [], 0, 0
    while True:
        stop = min(start + window, length)
        out.append((start, stop, reached - start))
        if stop >= length:
            return out
        reached, start = stop, start + stride


def _batches(
    ids: np.ndarray, window: int, stride: int | None, batch: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(tokens [b, L], mask [b, L], owned [b]) of ``batch`` windows of ``ids`` at a time,
    right-padded; ``owned``: the first position each window owns (``windows``)."""
    spans = windows(len(ids), window, stride)
    pieces = [ids[a:b] for a, b, _ in spans]
    for first in range(0, len(spans), batch):
        rows = np.arange(first, min(first + batch, len(spans)))
        tokens, mask = pad(pieces, rows, pad_id)
        yield tokens, mask, torch.tensor([spans[r][2] for r in rows])


@torch.no_grad()
def token_nats(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, L - 1] float32 -log p(tokens[:, t + 1] | tokens[:, : t + 1]) in nats, of a
    right-padded batch (tokens, mask [b, L] on the model's device); padding's are junk."""
    logits = model(tokens, attention_mask=mask).logits[:, :-1].float()
    return -torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]


def window_scores(
    model: nn.Module,
    tokenizer: Any,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    owned: torch.Tensor | None = None,
) -> list[tuple[float, int, int]]:
    """Per row of a right-padded batch (tokens, mask [b, L] on the model's device): (sum of
    log p(token | earlier tokens of its row) in nats, tokens scored, bases they cover). The
    first token of a row is context, not scored, and so are those before ``owned`` [b] (a
    strided window's context); bases are counted from the decoded tokens for k-mer and BPE
    tokenizers."""
    targets, valid = tokens[:, 1:], mask[:, 1:]
    if owned is not None:
        positions = torch.arange(1, tokens.shape[1], device=tokens.device)
        valid = valid & (positions >= owned.to(tokens.device)[:, None])
    nats = (-token_nats(model, tokens, mask) * valid).sum(1).tolist()
    scored = valid.sum(1).tolist()
    if getattr(tokenizer, "name", "") == "char":
        bases = scored
    else:
        bases = [len(tokenizer.decode(t[v].tolist())) for t, v in zip(targets, valid, strict=True)]
    return list(zip(nats, scored, bases, strict=True))


def log_likelihood(
    model: nn.Module,
    tokenizer: Any,
    seq: bytes,
    window: int,
    batch: int,
    device: torch.device,
    stride: int | None = None,
) -> tuple[float, int, int]:
    """(sum of log p(token | earlier tokens of its window) in nats, tokens scored, bases they
    cover) of one sequence, each token scored once (``windows``)."""
    ids = np.asarray(tokenizer.encode(seq))
    total, scored, bases = 0.0, 0, 0
    for tokens, mask, owned in _batches(ids, window, stride, batch, tokenizer.pad_id):
        rows = window_scores(model, tokenizer, tokens.to(device), mask.to(device), owned)
        for nats, n, b in rows:
            total, scored, bases = total + nats, scored + n, bases + b
    return total, scored, bases


def score_file(
    export: str | Path,
    path: str | Path,
    window: int = 1024,
    batch: int = 8,
    both_strands: bool = False,
    device: str = "auto",
    stride: int | None = None,
) -> Iterator[Score]:
    """A Score per record of ``path`` (FASTA or GenBank, compressed or not), streamed.

    The export is loaded (and every argument checked) before this returns, so a bad input
    fails before anything is written; the records are scored as the iterator is read.
    """
    from nucleo.train.export import load_exported

    if window < 2 or batch < 1:
        raise ValueError(f"window must be >= 2 and batch >= 1, got {window} and {batch}")
    windows(0, window, stride)  # checks the stride
    dev = resolve_device(device)
    model, tokenizer, meta = load_exported(export, dev)
    if not meta.get("causal", True):
        raise ValueError(
            f"{export}: a {meta['arch']} model trained bidirectionally has no left-to-right "
            "likelihood; score needs a causal model (use nucleo embed for this one)"
        )

    def scores() -> Iterator[Score]:
        for record in read_sequences(path):
            yield score_sequence(model, tokenizer, record.id, bytes(record.seq), window, batch,
                                 dev, stride, both_strands)  # fmt: skip

    return scores()


def score_sequence(
    model: nn.Module,
    tokenizer: Any,
    record: str,
    seq: bytes,
    window: int,
    batch: int,
    device: torch.device,
    stride: int | None = None,
    both_strands: bool = False,
) -> Score:
    """The Score of one sequence (``log_likelihood``; bits per base averaged with the reverse
    complement's when ``both_strands``): what nucleo score, the Python API and the MLflow
    model report."""

    def bits(text: bytes) -> tuple[float, int, float]:
        nats, scored, bases = log_likelihood(model, tokenizer, text, window, batch, device, stride)
        return (-nats / math.log(2) / bases if bases else math.nan), scored, nats

    per_base, scored, nats = bits(seq)
    if both_strands:
        per_base = (per_base + bits(reverse_complement_bytes(seq))[0]) / 2
    return Score(record, len(seq), scored, nats, per_base, n_fraction(seq))


POOLINGS = ("mean", "max", "last")


def states(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """[B, L, D] float32 hidden states of ``layer`` (-1: forward's final ones)."""
    if layer == -1:
        return model(tokens, attention_mask=mask).hidden.float()
    return model.hidden_states(tokens, mask, layer)


@torch.no_grad()
def embed_sequence(
    model: nn.Module,
    tokenizer: Any,
    seq: bytes,
    window: int,
    batch: int,
    device: torch.device,
    pooling: str = "mean",
    stride: int | None = None,
    layer: int = -1,
) -> np.ndarray:
    """[D] float32 embedding of ``seq`` from the hidden states of ``layer`` (-1: the final
    ones) of all its tokens, each taken once from the window it belongs to (``windows``):
    their mean (default), their element-wise max, or the last token's state (for a causal
    model, the one that has seen the most of its window)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    ids = np.asarray(tokenizer.encode(seq))
    total: torch.Tensor | None = None
    count = 0
    last: torch.Tensor | None = None
    for tokens, mask, owned in _batches(ids, window, stride, batch, tokenizer.pad_id):
        tokens, mask = tokens.to(device), mask.to(device)
        hidden = states(model, tokens, mask, layer)
        if pooling == "last":  # the last window's last token
            last = hidden[-1, int(mask[-1].sum()) - 1]
            continue
        positions = torch.arange(tokens.shape[1], device=device)
        mask = mask & (positions >= owned.to(device)[:, None])  # each token once
        if pooling == "mean":
            summed = (hidden * mask[..., None]).sum((0, 1))
        else:
            summed = hidden.masked_fill(~mask[..., None], float("-inf")).amax((0, 1))
        if total is None:
            total = summed
        else:
            total = total + summed if pooling == "mean" else torch.maximum(total, summed)
        count += int(mask.sum())
    if pooling == "last":
        assert last is not None
        return last.cpu().numpy().astype(np.float32)
    assert total is not None
    out = total / max(count, 1) if pooling == "mean" else total
    return out.cpu().numpy().astype(np.float32)


def embed_file(
    export: str | Path,
    path: str | Path,
    window: int = 1024,
    batch: int = 8,
    device: str = "auto",
    pooling: str = "mean",
    stride: int | None = None,
    layer: int = -1,
) -> tuple[list[str], np.ndarray]:
    """(record ids, embeddings [records, D] float32) of ``path``, streamed record by record."""
    from nucleo.train.export import load_exported

    dev = resolve_device(device)
    model, tokenizer, _meta = load_exported(export, dev)
    ids, rows = [], []
    for record in read_sequences(path):
        ids.append(record.id)
        seq = bytes(record.seq)
        rows.append(
            embed_sequence(model, tokenizer, seq, window, batch, dev, pooling, stride, layer)
        )
    return ids, np.stack(rows) if rows else np.zeros((0, 0), np.float32)
