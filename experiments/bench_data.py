"""Benchmark the data path: tokenization, shard building, loader throughput vs training.

    .venv/bin/python experiments/bench_data.py            # ~3 minutes on 2 cores

Measures, on the bundled 10-kingdom sample (19.3 Mb):
- FASTA bases -> token ids, MB/s on one core, for ``char`` and ``kmer`` (k = 6), best of 3;
- shard building (read, normalise, split, chunk, tar) MB/s of bases and the bytes on disk;
- loader tokens/s (windows of 1,024 tokens, batches of 16) with 1 and 2 DataLoader workers,
  per tokenizer, against what the smallest preset (hyena tiny) consumes training on the same
  machine (forward, backward, AdamW; all cores).

Writes experiments/results/data.md (and .json) with the command, machine and date. Wall-clock
numbers: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data_pipeline.loader import DataConfig, TrainLoader  # noqa: E402
from data_pipeline.readers import read_sequences  # noqa: E402
from data_pipeline.shards import ShardOptions, build_shards, read_sources_tsv  # noqa: E402
from data_pipeline.tokenizers import build_tokenizer, train_bpe  # noqa: E402
from experiments.report import RESULTS, header, run_record, write  # noqa: E402
from nucleo.train.components import build_model  # noqa: E402
from nucleo.train.config import load_config  # noqa: E402

SAMPLE = ROOT / "data_pipeline" / "sample"
TOKENIZERS: dict[str, dict] = {"char": {}, "kmer": {"k": 6}}  # + "bpe" once it is known


def tokenize_speed(name: str, options: dict, seq: bytes, compact: bool = False) -> float:
    """MB/s of bases encoded by one core, best of 3 (``compact``: the uint8 path the loader
    uses for ``char``)."""
    tokenizer = build_tokenizer(name, options)
    encode = tokenizer.encode_compact if compact else tokenizer.encode
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        encode(seq)
        best = min(best, time.perf_counter() - started)
    return len(seq) / best / 1e6


def loader_speed(shards: Path, name: str, options: dict, workers: int, batches: int) -> float:
    """Tokens per second (padding included) the loader hands the trainer, after warm-up."""
    tokenizer = build_tokenizer(name, options)
    cfg = DataConfig(
        shards=str(shards), seq_len=1024, tokenizer=name, tokenizer_options=options,
        num_workers=workers,
    )  # fmt: skip
    it = iter(TrainLoader(cfg, tokenizer, 16, seed=0))
    for _ in range(5):
        next(it)
    started = time.perf_counter()
    tokens = sum(next(it).tokens.numel() for _ in range(batches))
    return tokens / (time.perf_counter() - started)


def training_speed(steps: int) -> float:
    """Tokens per second hyena tiny trains at (batch 16 x 1,024, AdamW, all threads)."""
    cfg = load_config(arch="hyena", overrides=["model.size=tiny", "model.max_len=1024"])
    model = build_model("hyena", cfg.model, build_tokenizer("char")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 4, (16, 1024))

    def step() -> None:
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 9), tokens[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * tokens.numel() / (time.perf_counter() - started)


def shard_build(sources_tsv: Path, out: Path) -> dict:
    """Seconds, bases and bytes on disk of ``build_shards`` (default options) of a sources TSV."""
    started = time.perf_counter()
    manifest = build_shards(read_sources_tsv(sources_tsv), out, ShardOptions(), log=lambda _: None)
    seconds = time.perf_counter() - started
    bases = sum(
        split.get("bases", 0) for k in manifest["kingdoms"].values() for split in k.values()
    )
    disk = sum(p.stat().st_size for p in out.rglob("*.tar"))
    return {
        "seconds": seconds,
        "bases": bases,
        "bytes_on_disk": disk,
        "kingdoms": len(manifest["kingdoms"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--batches", type=int, default=200, help="loader batches timed")
    ap.add_argument("--out", type=Path, default=RESULTS / "data.md")
    ap.add_argument(
        "--bpe", type=Path, default=ROOT / "data/offline/bpe4096.json",
        help="a BPE (nucleo data bpe); when missing, one of 4096 tokens is learned on the sample",
    )  # fmt: skip
    ap.add_argument(
        "--corpus", type=Path, default=ROOT / "data/offline",
        help="an offline corpus (nucleo data corpus) whose shard build is timed, when present",
    )  # fmt: skip
    args = ap.parse_args()
    record = run_record()
    (genome,) = read_sequences(SAMPLE / "bacteria" / "E_coli_536.fna.xz")
    seq = bytes(genome.seq)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "sample"
        record["shards"] = shard_build(SAMPLE / "sources.tsv", shards)
        print("shards", record["shards"])
        corpus_sources = args.corpus / "manifests" / "all.tsv"
        if corpus_sources.is_file():
            record["corpus_shards"] = shard_build(corpus_sources, Path(tmp) / "corpus")
            shutil.rmtree(Path(tmp) / "corpus")
            print("corpus shards", record["corpus_shards"])
        bpe = args.bpe
        if not bpe.is_file():
            bpe = Path(tmp) / "bpe.json"
            train_bpe(shards, bpe, vocab_size=4096, max_bases=20_000_000)
        TOKENIZERS["bpe"] = {"path": str(bpe)}
        record["bpe"] = {"path": str(args.bpe if args.bpe.is_file() else "learned on the sample")}
        record["bpe"]["vocab_size"] = build_tokenizer("bpe", TOKENIZERS["bpe"]).vocab_size
        record["tokenize_mb_per_s"] = {n: tokenize_speed(n, o, seq) for n, o in TOKENIZERS.items()}
        record["tokenize_mb_per_s"]["char (uint8 ids)"] = tokenize_speed("char", {}, seq, True)
        record["tokenize_input_mb"] = len(seq) / 1e6
        print("tokenize", record["tokenize_mb_per_s"])
        record["loader_tokens_per_s"] = {
            f"{n} x {w} worker(s)": loader_speed(shards, n, o, w, args.batches)
            for n, o in TOKENIZERS.items()
            for w in (1, 2)
        }
        print("loader", record["loader_tokens_per_s"])
    record["training_tokens_per_s"] = training_speed(5)
    print("training", record["training_tokens_per_s"])
    write(args.out, report(record), record)


def report(r: dict) -> list[str]:
    train = r["training_tokens_per_s"]
    s = r["shards"]
    lines = [
        "# Data path benchmarks",
        "",
        *header(r),
        "",
        "## Tokenization (one core, best of 3)",
        "",
        f"*E. coli* 536 ({r['tokenize_input_mb']:.1f} Mb), normalised bases -> token ids:",
        "",
        "| tokenizer | MB/s | target |",
        "|---|---|---|",
    ]
    labels = {
        "char": "`char` (int64 ids)",
        "char (uint8 ids)": "`char`, uint8 ids (what the loader calls)",
        "kmer": "`kmer` (k = 6)",
        "bpe": f"`bpe` ({r.get('bpe', {}).get('vocab_size', '?')} tokens)",
    }
    for name, speed in r["tokenize_mb_per_s"].items():
        verdict = "met" if speed >= 500 else "**not met**"
        target = f">= 500 MB/s: {verdict}" if name.startswith("char") else ""
        lines.append(f"| {labels.get(name, name)} | {speed:,.0f} | {target} |")
    if "bpe" in r["tokenize_mb_per_s"]:
        lines += [
            "",
            "`bpe` here encodes the whole genome as one string; the loader encodes windows of "
            "about 6 kb, where BPE's cost per base is lower (see its loader rows below).",
        ]
    lines += [
        "",
        "## Shard building",
        "",
        f"The bundled sample ({s['bases'] / 1e6:.1f} Mb of bases, 10 kingdoms), default options: "
        f"{s['seconds']:.1f} s = {s['bases'] / s['seconds'] / 1e6:.1f} MB/s of bases (reading "
        f"compressed FASTA/GenBank, normalising, splitting, chunking, writing tars); "
        f"{s['bytes_on_disk'] / 1e6:.1f} MB on disk. Since the near-duplicate clustering came in, "
        "this includes MinHash sketching of every kept record.",
        "",
    ]
    if "corpus_shards" in r:
        c = r["corpus_shards"]
        lines += [
            f"The offline corpus (`nucleo data corpus`; {c['bases'] / 1e6:.1f} Mb, "
            f"{c['kingdoms']} kingdoms, from the unpacked packages): {c['seconds']:.1f} s = "
            f"**{c['bases'] / c['seconds'] / 1e6:.1f} MB/s** of bases; "
            f"**{c['bytes_on_disk'] / 1e6:.0f} MB** on disk (chunks of 65,536 bases, one per "
            "tar member, so tar overhead is ~1%).",
            "",
        ]
    lines += [
        "## Loader vs training",
        "",
        f"hyena tiny (the smallest preset) trains at **{train:,.0f} tokens/s** here (batch 16 x "
        "1,024, AdamW, all cores, no DeepSpeed). Loader: windows of 1,024 tokens, batches of 16, "
        "wall clock after 5 warm-up batches, while nothing else runs.",
        "",
        "| tokenizer x workers | tokens/s | x training | target |",
        "|---|---|---|---|",
    ]
    for name, speed in r["loader_tokens_per_s"].items():
        ratio = speed / train
        target = f">= 20x: {'met' if ratio >= 20 else '**not met**'}"
        if name.startswith("char x 1"):
            target += f"; >= 5M tok/s per worker: {'met' if speed >= 5e6 else '**not met**'}"
        lines.append(f"| {name} | {speed:,.0f} | {ratio:.1f}x | {target} |")
    lines += [
        "",
        "The loader shares the machine's cores with the training it feeds; a worker's tokens/s "
        "here is its speed with the cores to itself.",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
