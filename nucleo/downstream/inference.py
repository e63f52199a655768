"""Inference from a portable export: per-sequence scores and embeddings of FASTA/GenBank files.

    nucleo score EXPORT genomes.fa [--out scores.tsv] [--both-strands] [--window 1024]
    nucleo embed EXPORT genomes.fa --out embeddings.npy [--window 1024]

Records are streamed one at a time (a file is never loaded whole); a record longer than the
window is cut into consecutive windows of ``window`` tokens, run ``batch`` windows at a time.

Scores need a causal model: the log-likelihood of each token given the ones before it in its
window (the first token of each window has no context and is not scored). Bits per base divide
the bits by the bases those tokens cover (exact for ``char``; for k-mer and BPE tokenizers the
bases of the scored tokens are counted from their decoded text). ``both_strands`` averages the
record's score with its reverse complement's. Embeddings pool the final hidden states over
every token of the record (mean by default; max; or the last token's): [D] per record.
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


def _windows(ids: np.ndarray, window: int) -> list[np.ndarray]:
    return [ids[i : i + window] for i in range(0, len(ids), window)] or [ids]


def _batches(
    pieces: list[np.ndarray], batch: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [b, L], mask [b, L]) of ``batch`` windows at a time, right-padded."""
    for start in range(0, len(pieces), batch):
        yield pad(pieces, np.arange(start, min(start + batch, len(pieces))), pad_id)


@torch.no_grad()
def window_scores(
    model: nn.Module, tokenizer: Any, tokens: torch.Tensor, mask: torch.Tensor
) -> list[tuple[float, int, int]]:
    """Per row of a right-padded batch (tokens, mask [b, L] on the model's device): (sum of
    log p(token | earlier tokens of its row) in nats, tokens scored, bases they cover). The
    first token of a row is context, not scored; bases are counted from the decoded tokens for
    k-mer and BPE tokenizers."""
    logits = model(tokens, attention_mask=mask).logits[:, :-1].float()
    targets, valid = tokens[:, 1:], mask[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    nats = (logp * valid).sum(1).tolist()
    scored = valid.sum(1).tolist()
    if getattr(tokenizer, "name", "") == "char":
        bases = scored
    else:
        bases = [len(tokenizer.decode(t[v].tolist())) for t, v in zip(targets, valid, strict=True)]
    return list(zip(nats, scored, bases, strict=True))


def log_likelihood(
    model: nn.Module, tokenizer: Any, seq: bytes, window: int, batch: int, device: torch.device
) -> tuple[float, int, int]:
    """(sum of log p(token | earlier tokens of its window) in nats, tokens scored, bases they
    cover) of one sequence."""
    ids = tokenizer.encode(seq)
    total, scored, bases = 0.0, 0, 0
    for tokens, mask in _batches(_windows(ids, window), batch, tokenizer.pad_id):
        for nats, n, b in window_scores(model, tokenizer, tokens.to(device), mask.to(device)):
            total, scored, bases = total + nats, scored + n, bases + b
    return total, scored, bases


def score_file(
    export: str | Path,
    path: str | Path,
    window: int = 1024,
    batch: int = 8,
    both_strands: bool = False,
    device: str = "auto",
) -> Iterator[Score]:
    """A Score per record of ``path`` (FASTA or GenBank, compressed or not), streamed.

    The export is loaded (and every argument checked) before this returns, so a bad input
    fails before anything is written; the records are scored as the iterator is read.
    """
    from nucleo.train.export import load_exported

    if window < 2 or batch < 1:
        raise ValueError(f"window must be >= 2 and batch >= 1, got {window} and {batch}")
    dev = resolve_device(device)
    model, tokenizer, meta = load_exported(export, dev)
    if not meta.get("causal", True):
        raise ValueError(
            f"{export}: a {meta['arch']} model trained bidirectionally has no left-to-right "
            "likelihood; score needs a causal model (use nucleo embed for this one)"
        )

    def bits(seq: bytes) -> tuple[float, int, float]:
        nats, scored, bases = log_likelihood(model, tokenizer, seq, window, batch, dev)
        return (-nats / math.log(2) / bases if bases else math.nan), scored, nats

    def scores() -> Iterator[Score]:
        for record in read_sequences(path):
            seq = bytes(record.seq)
            per_base, scored, nats = bits(seq)
            if both_strands:
                per_base = (per_base + bits(reverse_complement_bytes(seq))[0]) / 2
            yield Score(record.id, len(seq), scored, nats, per_base, n_fraction(seq))

    return scores()


POOLINGS = ("mean", "max", "last")


@torch.no_grad()
def embed_sequence(
    model: nn.Module,
    tokenizer: Any,
    seq: bytes,
    window: int,
    batch: int,
    device: torch.device,
    pooling: str = "mean",
) -> np.ndarray:
    """[D] float32 embedding of ``seq`` from the final hidden states of all its tokens:
    their mean (default), their element-wise max, or the last token's state (for a causal
    model, the one that has seen the most of its window)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    ids = tokenizer.encode(seq)
    total: torch.Tensor | None = None
    count = 0
    last: torch.Tensor | None = None
    for tokens, mask in _batches(_windows(ids, window), batch, tokenizer.pad_id):
        tokens, mask = tokens.to(device), mask.to(device)
        hidden = model(tokens, attention_mask=mask).hidden.float()
        if pooling == "mean":
            summed = (hidden * mask[..., None]).sum((0, 1))
        elif pooling == "max":
            summed = hidden.masked_fill(~mask[..., None], float("-inf")).amax((0, 1))
        else:
            row = hidden.shape[0] - 1
            last = hidden[row, int(mask[row].sum()) - 1]
            continue
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
) -> tuple[list[str], np.ndarray]:
    """(record ids, embeddings [records, D] float32) of ``path``, streamed record by record."""
    from nucleo.train.export import load_exported

    dev = resolve_device(device)
    model, tokenizer, _meta = load_exported(export, dev)
    ids, rows = [], []
    for record in read_sequences(path):
        ids.append(record.id)
        seq = bytes(record.seq)
        rows.append(embed_sequence(model, tokenizer, seq, window, batch, dev, pooling))
    return ids, np.stack(rows) if rows else np.zeros((0, 0), np.float32)
