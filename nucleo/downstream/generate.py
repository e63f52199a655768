"""Sampling DNA from a causal export, and judging generated sequences against real ones.

    nucleo generate EXPORT --out generated.fa [--num 16] [--length 1000] [--prompt ACGT...]
                    [--temperature 1.0 | 0 (greedy)] [--top-k 0] [--top-p 1.0] [--seed 0]
    nucleo evaluate-generation generated.fa --real heldout.fa --out report_dir
    nucleo evaluate-generation generated.fa --shards data/offline/shards --kingdom viral --out DIR

Sampling runs the prompt once and then one token per step from each layer's state (a KV cache
for attention, the recurrent state for mamba, input histories for hyena, ring buffers for
multires: ``architectures.incremental``); ``cache=False``, or a family without such state,
recomputes the forward pass over the last ``window`` tokens at every step. Both give the same
tokens for a seed while the context fits in the window. Only tokens that stand for A/C/G/T
bases can be drawn. Without a prompt, the first base is drawn uniformly from A, C, G, T.

The evaluation compares two sets of equal-length sequences by GC content, k-mer spectrum
divergence (Jensen-Shannon, bits), frequency-CGR and DNA-walk energy distances, and the
Wasserstein distance between CGR persistence diagrams (``nucleo.core.representations``). Each is
also computed between two disjoint halves of the real set (real vs real: the noise floor) and
for i.i.d. uniform random sequences (the ceiling a model should beat).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nucleo.core import representations as rep
from nucleo.core.device import resolve as resolve_device

log = logging.getLogger("nucleo")

# ----------------------------------------------------------------------------- sampling


def base_token_mask(tokenizer: Any) -> torch.Tensor:
    """[V] bool: the tokens made only of A/C/G/T (no N, no special tokens)."""
    allowed = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i])
        allowed[i] = bool(text) and set(text) <= set("ACGT")
    return allowed


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """[B, V] logits -> [B, V] sampling probabilities: temperature, then top-k, then nucleus
    (the smallest set of tokens whose probability reaches ``top_p``)."""
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, dim=-1)
        before = torch.cumsum(sorted_p, -1) - sorted_p  # mass of the tokens ranked above
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class _Recompute:
    """The uncached loop: every step reruns the model over the last ``window`` tokens."""

    def __init__(self, model: nn.Module, window: int) -> None:
        self.model, self.window = model, window

    def first(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = tokens
        return self.model(tokens[:, -self.window :]).logits[:, -1].float()

    def next(self, token: torch.Tensor) -> torch.Tensor:
        return self.first(torch.cat([self.tokens, token[:, None]], 1))


class _Incremental(_Recompute):
    """The cached loop: the prompt's last ``window`` tokens once (``prefill``), then one token
    per step from each mixer's state (architectures.incremental)."""

    def first(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.cache = self.model.prefill(tokens[:, -self.window :], self.window)
        return logits

    def next(self, token: torch.Tensor) -> torch.Tensor:
        logits, self.cache = self.model.step(token, self.cache)
        return logits


_SAID: set[str] = set()


def incremental_support(model: nn.Module) -> str | None:
    """Why ``model`` cannot sample with a cache (None: it can)."""
    from architectures.incremental import unsupported

    if not callable(getattr(model, "prefill", None)):
        return f"{type(model).__name__} has no prefill/step"
    return unsupported(model)


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: Any,
    num: int,
    length: int,
    prompt: bytes | Sequence[bytes] = b"",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    window: int = 1024,
    device: str | torch.device = "auto",
    *,
    cache: bool = True,
) -> list[bytes]:
    """``num`` sequences of ``length`` new bases each (at least: a token may hold several),
    continuing ``prompt`` (one for all, or one per sequence); returned without the prompt.

    temperature 0: greedy (the likeliest base token; top_k, top_p and the seed unused).
    Prompts of different lengths in tokens run together exactly: until a sequence's prompt
    ends, its next token is the prompt's (its own draw is thrown away), so each sequence sees
    what it would alone. ``cache``: decode incrementally (architectures.incremental: the same
    tokens as recomputing, while the context fits in ``window``); a model without incremental
    state falls back to recomputing, with one line saying so.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    dev = resolve_device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    allowed = base_token_mask(tokenizer).to(dev)
    prompts = [prompt] * num if isinstance(prompt, bytes | bytearray) else list(prompt)
    if len(prompts) != num:
        raise ValueError(f"{len(prompts)} prompts for {num} sequences")
    encoded = [list(np.asarray(tokenizer.encode(p), np.int64)) for p in prompts]
    begin = np.array([len(e) for e in encoded])  # where each sequence's output starts
    if not begin.all():  # a sequence without a prompt starts from a uniform base
        first = torch.randint(0, 4, (num,), generator=gen)
        for i in np.flatnonzero(begin == 0):
            encoded[i] = list(tokenizer.encode(b"ACGT"[first[i] : first[i] + 1]))
    known = min(map(len, encoded))
    decoder = _Recompute(model, window)
    if cache:
        why = incremental_support(model)
        if why is None:
            decoder = _Incremental(model, window)
        elif type(model).__name__ not in _SAID:
            _SAID.add(type(model).__name__)
            log.warning(f"generate: no cache ({why}); recomputing every step")
    bases_per = np.array([len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)])
    rows = [e[:known] for e in encoded]
    produced = np.array([bases_per[e[begin[i] :]].sum() for i, e in enumerate(rows)])
    done = np.where(produced >= length, [len(r) for r in rows], 0)
    if not done.all():
        logits = decoder.first(torch.tensor(rows, dtype=torch.int64, device=dev))
    while not done.all():
        logits = logits.masked_fill(~allowed, float("-inf"))
        if temperature == 0:
            drawn = logits.argmax(-1).cpu()
        else:
            probs = filter_logits(logits, temperature, top_k, top_p)
            drawn = torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0]
        picked = drawn.numpy().copy()
        for i, row in enumerate(rows):
            forced = len(row) < len(encoded[i])
            picked[i] = encoded[i][len(row)] if forced else picked[i]
            row.append(int(picked[i]))
            if not forced and not done[i]:
                produced[i] += bases_per[picked[i]]
                done[i] = len(row) if produced[i] >= length else 0
        if not done.all():
            logits = decoder.next(torch.from_numpy(picked).to(dev))
    cut = zip(rows, begin, done, strict=True)
    return [tokenizer.decode(row[b:d]).encode() for row, b, d in cut]


def generate_to_fasta(
    export: str | Path,
    out: str | Path,
    num: int = 16,
    length: int = 1000,
    prompts: Sequence[bytes] = (),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch: int = 16,
    device: str = "auto",
    say: Any = print,
    cache: bool = True,
) -> Path:
    """Sample ``num`` sequences in batches of ``batch`` and write them to a FASTA file whose
    headers record the settings. ``prompts``: none, one for all, or several used in turn
    (sequence i continues prompts[i % len(prompts)]). temperature 0: greedy. ``cache``:
    decode incrementally (``sample``)."""
    import time

    from nucleo.core.progress import duration
    from nucleo.train.export import load_exported

    device = resolve_device(device)
    model, tokenizer, meta = load_exported(export, device)
    if not meta.get("causal", True):
        raise ValueError(
            f"{export}: a bidirectional {meta['arch']} model cannot generate left to right; "
            "generate needs a causal export"
        )
    window = int(meta.get("model", {}).get("max_len") or 1024)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with path.open("w") as fh:
        for first in range(0, num, batch):
            count = min(batch, num - first)
            chosen = [prompts[(first + i) % len(prompts)] for i in range(count)] if prompts else b""
            seqs = sample(
                model, tokenizer, count, length, chosen, temperature, top_k, top_p,
                seed + first, window, device, cache=cache,
            )  # fmt: skip
            for i, seq in enumerate(seqs):
                used = chosen[i] if chosen else b""
                header = (
                    f"gen{first + i} temperature={temperature} top_k={top_k} top_p={top_p} "
                    f"seed={seed} prompt={used[:20].decode()}{'...' if len(used) > 20 else ''}"
                )
                fh.write(f">{header}\n")
                for j in range(0, len(seq), 80):
                    fh.write(seq[j : j + 80].decode() + "\n")
            done = first + count
            elapsed = time.perf_counter() - started
            say(
                f"generated {done}/{num} | {done * length / elapsed:.0f} bases/s | "
                f"elapsed {duration(elapsed)} | eta {duration(elapsed / done * (num - done))}"
            )
    return path


# ----------------------------------------------------------------------------- evaluation


def _tokens(seqs: Sequence[bytes]) -> list[torch.Tensor]:
    """Base ids (A0 C1 G2 T3, N 4) of each sequence."""
    table = np.full(256, 4, np.int64)
    for i, b in enumerate(b"ACGT"):
        table[b] = i
    return [torch.from_numpy(table[np.frombuffer(s, np.uint8)]) for s in seqs]


def _stack(tokens: list[torch.Tensor]) -> torch.Tensor:
    length = min(len(t) for t in tokens)
    return torch.stack([t[:length] for t in tokens])


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance between samples x [n, d] and y [m, d] (Euclidean): 2E|X-Y| - E|X-X'|
    - E|Y-Y'|; 0 when the distributions are equal."""
    from scipy.spatial.distance import cdist

    xy = cdist(x, y).mean()
    xx = cdist(x, x).sum() / max(len(x) * (len(x) - 1), 1)
    yy = cdist(y, y).sum() / max(len(y) * (len(y) - 1), 1)
    return float(2 * xy - xx - yy)


def _fcgr_vectors(tokens: torch.Tensor, k: int) -> np.ndarray:
    spec = rep.kmer_spectrum(tokens, k).numpy()
    return spec / np.maximum(spec.sum(1, keepdims=True), 1)


def _walk_vectors(tokens: torch.Tensor, points: int = 64) -> np.ndarray:
    """Each sequence's DNA walk resampled at ``points`` evenly spaced positions and divided by
    the square root of its length (a random walk's scale): [n, 2 * points]."""
    valid = rep.base_mask(tokens)
    walk = rep.dna_walk(rep.onehot(tokens, torch.float64), valid).numpy()
    idx = np.linspace(0, walk.shape[1] - 1, points).round().astype(int)
    return (walk[:, idx] / math.sqrt(walk.shape[1])).reshape(len(walk), -1)


def compare_sets(
    a: Sequence[bytes], b: Sequence[bytes], k: int = 4, topo_pairs: int = 16
) -> dict[str, float]:
    """Distances between two sets of sequences (cut to the shortest length of both)."""
    ta, tb = _tokens(a), _tokens(b)
    length = min(min(len(t) for t in ta), min(len(t) for t in tb))
    xa, xb = _stack([t[:length] for t in ta]), _stack([t[:length] for t in tb])
    gc_a, gc_b = rep.gc_content(xa).numpy(), rep.gc_content(xb).numpy()
    pairs = min(topo_pairs, len(ta), len(tb))
    return {
        "gc_a": float(np.nanmean(gc_a)),
        "gc_b": float(np.nanmean(gc_b)),
        "gc_difference": float(abs(np.nanmean(gc_a) - np.nanmean(gc_b))),
        f"kmer{k}_js_bits": rep.kmer_divergence(xa, xb, k),
        "kmer6_js_bits": rep.kmer_divergence(xa, xb, 6),
        "fcgr_energy": energy_distance(_fcgr_vectors(xa, k), _fcgr_vectors(xb, k)),
        "walk_energy": energy_distance(_walk_vectors(xa), _walk_vectors(xb)),
        "persistence_w1": rep.topology_distance(list(xa[:pairs]), list(xb[:pairs])),
    }


def real_windows(
    shards: str | Path, kingdom: str, length: int, count: int, seed: int = 0, split: str = "val"
) -> list[bytes]:
    """Up to ``count`` N-free windows of ``length`` bases from a kingdom's held-out shards."""
    from data_pipeline.loader import split_chunks
    from data_pipeline.shards import load_manifest
    from nucleo.downstream.tasks.base import grid_fragments

    manifest = load_manifest(shards)
    if kingdom not in manifest["kingdoms"]:
        raise ValueError(
            f"{shards}: no kingdom {kingdom!r}; have {', '.join(manifest['kingdoms'])}"
        )
    chunks = split_chunks(shards, kingdom, split, manifest)
    if not chunks:
        raise ValueError(f"{shards}: kingdom {kingdom!r} has no {split} shards")
    rng = np.random.default_rng(seed)
    out: list[bytes] = []
    for index in rng.permutation(len(chunks)):
        seq = chunks[index][2]
        for start in grid_fragments(seq, length, max(1, count // len(chunks) + 1), rng):
            out.append(seq[start : start + length])
        if len(out) >= count:
            break
    return out[:count]


def read_fasta_set(path: str | Path, limit: int | None = None) -> list[bytes]:
    from data_pipeline.readers import read_sequences

    out = []
    for record in read_sequences(path):
        out.append(bytes(record.seq))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no sequences")
    return out


def evaluate_generation(
    generated: Sequence[bytes],
    real: Sequence[bytes],
    out: str | Path,
    seed: int = 0,
    k: int = 4,
    label: str = "generated",
) -> dict[str, Any]:
    """Distances generated-vs-real, real-vs-real (halves) and random-vs-real; a markdown
    report, JSON and a picture of the pooled frequency-CGR images side by side in ``out``."""
    rng = np.random.default_rng(seed)
    length = min(min(map(len, generated)), min(map(len, real)))
    real = [s[:length] for s in real]
    generated = [s[:length] for s in generated]
    order = rng.permutation(len(real))
    half_a = [real[i] for i in order[: len(real) // 2]]
    half_b = [real[i] for i in order[len(real) // 2 :]]
    random = [bytes(rng.choice(list(b"ACGT"), size=length).astype(np.uint8)) for _ in generated]
    n = min(len(generated), len(half_b))
    rows = {
        f"{label} vs real": compare_sets(generated[:n], half_b[:n], k),
        "real vs real (held-out halves)": compare_sets(half_a[:n], half_b[:n], k),
        "uniform random vs real": compare_sets(random[:n], half_b[:n], k),
    }
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _cgr_picture({"real": real, label: generated, "uniform random": random}, root / "cgr.png", k=6)
    keys = list(next(iter(rows.values())))
    lines = [
        f"# Generation quality: {label}",
        "",
        f"{len(generated)} generated and {len(real)} real sequences, compared over the first "
        f"{length} bases ({n} per set). Lower is closer to real; `real vs real` is the noise "
        "floor of two disjoint halves of the real set, `uniform random` the ceiling.",
        "",
        "| comparison | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[key]:.4f}" for key in keys) + " |")
    lines += ["", "![pooled frequency CGR, k = 6](cgr.png)", ""]
    (root / "report.md").write_text("\n".join(lines))
    result = {"length": length, "per_set": n, "rows": rows}
    (root / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _cgr_picture(sets: dict[str, Sequence[bytes]], path: Path, k: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {
        name: np.log10(
            rep.fcgr_image(sum(rep.kmer_spectrum(t, k) for t in _tokens(seqs)), k) + 1e-7
        )
        for name, seqs in sets.items()
    }
    vmax = max(float(im.max()) for im in images.values())
    vmin = math.log10(1.0 / 4**k) - 1.5  # one order and a half below uniform
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets) + 1, 4.3))
    for ax, (name, image) in zip(axes, images.items(), strict=True):
        shown = ax.imshow(image, cmap="magma", vmin=vmin, vmax=vmax)
        ax.set_title(f"{name} (n={len(sets[name])})")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label="log10 k-mer frequency")
    fig.suptitle(
        f"frequency CGR, k = {k}, log10 frequency "
        "(corners: A bottom-left, C top-left, G top-right, T bottom-right)",
        fontsize=9,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
