"""Shared fixtures: the bundled real genome sample and shards built from it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from data_pipeline.readers import read_sequences
from data_pipeline.shards import ShardOptions, SourceFile, build_shards, read_sources_tsv
from data_pipeline.tokenizers import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_pipeline" / "sample"

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def sample_file(relative: str) -> Path:
    return SAMPLE / relative


@pytest.fixture(scope="session")
def yeast_windows() -> Callable[[int, int, int], torch.Tensor]:
    """``windows(length, count, seed)``: ``count`` random windows [count, length] of
    S. cerevisiae chromosome I (real DNA for the learning tests)."""
    (record,) = read_sequences(sample_file("fungi/ScerR64_I.fna.gz"))
    tokens = torch.from_numpy(CharTokenizer().encode(bytes(record.seq)))

    def windows(length: int, count: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - length, (count,), generator=gen)
        return torch.stack([tokens[s : s + length] for s in starts.tolist()])

    return windows


@pytest.fixture(scope="session")
def sample_sources() -> list[SourceFile]:
    return read_sources_tsv(SAMPLE / "sources.tsv")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory, sample_sources) -> Path:
    """The whole bundled sample, sharded with the default options."""
    out = tmp_path_factory.mktemp("shards") / "sample"
    build_shards(sample_sources, out, ShardOptions(), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def four_kingdom_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real genomes of four kingdoms, one training shard each (no validation split), so
    that the kingdom of a window tells which shard it came from."""
    sources = [
        SourceFile(sample_file("viral/lambda.fasta.gz"), "viral"),
        SourceFile(sample_file("plasmid/deinococcus_MP1.fna.gz"), "plasmid"),
        SourceFile(sample_file("plastid/gingko.fasta.gz"), "plastid"),
        SourceFile(sample_file("fungi/ScerR64_I.fna.gz"), "fungi"),
    ]
    out = tmp_path_factory.mktemp("shards") / "four"
    options = ShardOptions(chunk_len=8192, min_shards=1, val_fraction=0.0)
    build_shards(sources, out, options, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def sample_bpe(tmp_path_factory: pytest.TempPathFactory, sample_shards) -> Path:
    """A 256-token BPE learned on 1 Mb of the sample's training split (about a second)."""
    from data_pipeline.tokenizers import train_bpe

    out = tmp_path_factory.mktemp("bpe") / "bpe256.json"
    train_bpe(sample_shards, out, vocab_size=256, max_bases=1_000_000, log=lambda _: None)
    return out
